"""A confidence probe in the served profile: the served confidence (answers and claims) equals the offline scorer's.

One real ``semgrad-serve serve`` (default model, float32) with ``--profile``: the built-in profile whose confidence is a
probe reading every feature of the scoring pass, per-layer SemGrad and both vectors at t* included (weights made up,
small enough that the confidence stays inside (0, 1)), and a claims' probe."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import openai
import pytest

from semgrad_serve.errors import ItemError
from semgrad_serve.scoring.confidence import ConfidenceModel, OperatingPoint, ProbeCalibrator, Projection
from semgrad_serve.scoring.probe_features import CLAIM_FEATURES, VECTORS, scalar_features

pytestmark = pytest.mark.slow  # starts the vLLM server

QUESTION = [{"role": "user", "content": "Which planet is the largest in our solar system? Answer in two sentences."}]


def probe_profile(scorer, path: Path):
    """The default model's profile with a made-up probe over every feature its scoring pass gives."""
    prompt = scorer.prompt_ids(QUESTION)
    asked, scorer.t_star_features = scorer.t_star_features, True
    (result,) = scorer.score([(prompt, scorer.answer_ids("Jupiter."))])
    scorer.t_star_features = asked
    names = sorted(scalar_features(result))
    rng = np.random.default_rng(0)
    d = scorer.weights.hidden_size
    projections = tuple(
        Projection(
            v, tuple(rng.normal(0, 0.1, d).tolist()), tuple(tuple(rng.normal(0, 1 / d, d).tolist()) for _ in range(2))
        )
        for v in VECTORS
    )
    names += [f"{v} pc{j}" for v in VECTORS for j in range(2)]
    k = len(names)
    probe = ProbeCalibrator(
        tuple(names),
        tuple(rng.normal(0, 1, k).tolist()),
        tuple(rng.uniform(5, 10, k).tolist()),
        tuple(rng.normal(0, 0.3, k).tolist()),
        0.2,
        projections,
    )
    claims = ProbeCalibrator(
        CLAIM_FEATURES, (-9.0, -9.0, -9.0, 2.0, 1.0), (1.0,) * 5, (0.2, -0.1, 0.1, -0.3, -0.4), 0.1
    )
    model = ConfidenceModel(
        scorer.profile.score, probe, OperatingPoint(0.5, "precision", 0.95, {}), {"note": "test"}, claims
    )
    profile = replace(scorer.profile, name="probe-test", confidence=model)
    profile.save(path)
    return profile


def test_served_probe_confidence_equals_the_offline_one(tmp_path, default_scorer) -> None:
    from semgrad_serve.scoring.scorer import Scorer
    from semgrad_serve.testing.launch_server import checkout_env, semgrad_server

    path = tmp_path / "probe.json"
    profile = probe_profile(default_scorer, path)
    offline_scorer = Scorer(
        default_scorer.weights,
        default_scorer.tokenizer,
        profile,
        default_scorer.kernels,
        eos_ids=default_scorer.eos_ids,
    )
    assert offline_scorer.t_star_features  # the probe reads them, so the scorer computes them

    args = [
        "--dtype",
        "float32",
        "--profile",
        str(path),
        "--max-batch",
        "4",
        "--",
        "--kv-cache-memory-bytes",
        str(1 << 30),
    ]
    with semgrad_server(tmp_path / "server.log", *args, env=checkout_env()) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=180, max_retries=0)
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=QUESTION,
            max_tokens=40,
            temperature=0,
            extra_body={"return_token_ids": True, "semgrad": {"claims": True}},
        )
    (choice,) = reply.choices
    served = choice.model_extra["semgrad"]
    prompt = reply.model_extra["prompt_token_ids"]
    assert prompt == offline_scorer.prompt_ids(QUESTION)
    (offline,) = offline_scorer.score([(prompt, choice.model_extra["token_ids"])], claims=True)
    assert not isinstance(offline, ItemError), offline
    expected = offline_scorer.report(offline)
    assert 0.02 < expected["confidence"] < 0.98  # the made-up probe is not saturated: the comparison means something
    assert served["confidence"] == pytest.approx(expected["confidence"], abs=1e-4)
    assert served["flagged"] == expected["flagged"] and "t_star_features" not in served
    assert len(served["claims"]) == len(expected["claims"]) >= 1
    for got, want in zip(served["claims"], expected["claims"]):
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-4) and 0 < got["confidence"] < 1

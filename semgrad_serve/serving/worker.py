"""The vLLM worker extension: SemGrad scoring inside the worker, over the weights vLLM already holds.

vLLM mixes ``SemgradWorkerExtension`` into its worker (``--worker-extension-cls``);
the API server calls ``semgrad_setup`` once with ``collective_rpc``, then talks to
the scoring service it starts. Importing this module
makes vLLM keep the dense CPU weights, so it must happen before the model loads,
which is when vLLM imports worker extensions.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ..errors import ItemError, SemgradError
from ..scoring.items import FLAG_SCORES, ScoreResult
from ..scoring.profiles import resolve_profile
from ..scoring.scorer import Scorer
from .captures import STORE
from .config import CAPTURE_CONNECTOR_MODULE, TEST_FAULT_MARKER, TEST_FAULTS_ENV, log
from .scoring_service import Pair, ScoreFn, ScoringService, scoring_cores
from .weights import from_vllm_model, keep_dense_cpu_weights

keep_dense_cpu_weights()

# The fields of a scored answer in the API response, in this order.
SERVED_SCORES = tuple(name for name in FLAG_SCORES if name != "exgrad")  # ExGrad is a baseline: not served
REPORTED = (*SERVED_SCORES, "score", "threshold", "confidence", "min_confidence", "flagged", "prompt_kv")


def answer_report(scorer: Scorer, result: ScoreResult | ItemError, from_cache: bool = False, tokens: bool = False) -> dict[str, Any]:
    """The ``"semgrad"`` object of one answer: its scores and flag, or ``{"error": ...}``; ``prompt_kv`` says
    whether the prompt's keys/values came from vLLM's KV cache or were recomputed. ``tokens`` adds the per-token
    entropies and log-probs (the API server passes them on to requests that ask for them)."""
    if isinstance(result, ItemError):
        return {"error": str(result)}
    if not all(math.isfinite(v) for v in result.scores().values()):
        return {"error": "scoring produced a non-finite value (NaN or inf)"}
    report = {**scorer.report(result), "prompt_kv": "cache" if from_cache else "recomputed"}
    out = {key: report[key] for key in REPORTED}
    if tokens:
        out["token_entropies"], out["token_logprobs"] = list(result.token_entropies), list(result.token_logprobs)
    return out


def capture_state(kv_transfer_config: Any) -> bool:
    """Whether vLLM runs this package's capture connector; a different connector is refused."""
    if kv_transfer_config is None or kv_transfer_config.kv_connector is None:
        return False
    if kv_transfer_config.kv_connector_module_path == CAPTURE_CONNECTOR_MODULE:
        return True
    raise SemgradError(
        f"SemGrad scoring needs its own KV connector ({CAPTURE_CONNECTOR_MODULE}); "
        f"this server runs {kv_transfer_config.kv_connector!r}: drop --kv-transfer-config"
    )


def with_test_faults(score: ScoreFn, tokenizer: Any) -> ScoreFn:
    """The test seam: ``score`` that fails, as a broken scoring pass would, for a batch holding a prompt whose
    text contains ``TEST_FAULT_MARKER`` (the scoring service then retries each request alone)."""

    def score_or_fail(pairs: list[Pair], prefixes: list[torch.Tensor | None]) -> list[dict[str, Any]]:
        if any(TEST_FAULT_MARKER in tokenizer.decode(prompt) for prompt, _ in pairs):
            raise RuntimeError("injected scoring fault (test hook)")
        return score(pairs, prefixes)

    return score_or_fail


class SemgradWorkerExtension:
    """Methods added to vLLM's worker. ``semgrad_setup`` runs once at server start and starts the scoring
    service, which then takes answers over its own socket (``scoring_service.py``)."""

    semgrad_service: ScoringService | None = None

    def semgrad_setup(self, profile_path: str | None, max_batch: int, api_cores: list[int]) -> dict[str, Any]:
        """Build the scorer over vLLM's modules and start the scoring service; raise a ``SemgradError``
        naming what is unsupported. Returns what the API server needs to reach the service."""
        from transformers import AutoTokenizer

        vllm_config = self.vllm_config  # type: ignore[attr-defined]
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise SemgradError("SemGrad scoring needs tensor- and pipeline-parallel size 1")
        capture = capture_state(vllm_config.kv_transfer_config)
        model_config = self.model_config  # type: ignore[attr-defined]
        config = model_config.hf_config
        weights = from_vllm_model(self.model_runner.model, config)  # type: ignore[attr-defined]
        tokenizer = AutoTokenizer.from_pretrained(
            model_config.tokenizer,
            revision=model_config.tokenizer_revision,
            trust_remote_code=model_config.trust_remote_code,
        )
        profile = resolve_profile(config, tokenizer.chat_template, model_config.model, profile_path)
        # responses carry no ExGrad: compute it only where it is the flag's score
        scorer = Scorer(weights, tokenizer, profile, exgrad=profile.score == "exgrad")
        STORE.prefix_length = scorer.t_star_or_none

        def score(pairs: list[Pair], prefixes: list[torch.Tensor | None]) -> list[dict[str, Any]]:
            results = scorer.score(pairs, batch_size=max(len(pairs), 1), prefix_kv=prefixes)
            return [answer_report(scorer, r, kv is not None, tokens=True) for r, kv in zip(results, prefixes)]

        if os.environ.get(TEST_FAULTS_ENV) == "1":
            log.warning("%s=1: the scoring fault test seam is on; do not use this server in production", TEST_FAULTS_ENV)
            score = with_test_faults(score, tokenizer)
        cores = scoring_cores(set(api_cores))
        self.semgrad_service = ScoringService(score, STORE, max_batch, cores)
        band = scorer.band
        return {
            "family": weights.family,
            "profile": profile.name,
            "t_star": {"token": profile.t_star.token, "offset": profile.t_star.offset},
            "band": [band.start, band.stop - 1],
            "score": profile.score,
            "threshold": profile.threshold,
            "min_confidence": None if profile.confidence is None else profile.confidence.operating_point.min_confidence,
            "dtype": str(weights.dtype).removeprefix("torch."),
            "kernels": scorer.kernels.name,
            "scoring_cores": sorted(cores),
            "capture": capture,
            "address": self.semgrad_service.address,
            "authkey": self.semgrad_service.authkey,
        }

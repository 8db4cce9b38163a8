"""The vLLM worker extension: SemGrad scoring inside the worker, over the weights vLLM already holds.

vLLM mixes ``SemgradWorkerExtension`` into its worker (``--worker-extension-cls``);
the API server calls its methods with ``collective_rpc``. Importing this module
makes vLLM keep the dense CPU weights, so it must happen before the model loads,
which is when vLLM imports worker extensions.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import ItemError, SemgradError
from ..profiles import resolve_profile
from ..scorer import Scorer
from ..scoring import ScoreResult
from .weights import from_vllm_model, keep_dense_cpu_weights

keep_dense_cpu_weights()

# The fields of a scored answer in the API response, in this order.
REPORTED = ("semgrad", "paragrad", "hybridgrad", "mean_entropy", "score", "threshold", "flagged")


def answer_report(scorer: Scorer, result: ScoreResult | ItemError) -> dict[str, Any]:
    """The ``"semgrad"`` object of one answer: its scores and flag, or ``{"error": ...}``."""
    if isinstance(result, ItemError):
        return {"error": str(result)}
    if not all(math.isfinite(v) for v in result.scores().values()):
        return {"error": "scoring produced a non-finite value (NaN or inf)"}
    report = scorer.report(result)
    return {key: report[key] for key in REPORTED}


class SemgradWorkerExtension:
    """Methods added to vLLM's worker. ``semgrad_setup`` runs once at server start, then ``semgrad_score`` per batch."""

    semgrad_scorer: Scorer | None = None

    def semgrad_setup(self, profile_path: str | None = None) -> dict[str, Any]:
        """Build the scorer over vLLM's modules; raise a ``SemgradError`` naming what is unsupported."""
        from transformers import AutoTokenizer

        parallel = self.vllm_config.parallel_config  # type: ignore[attr-defined]
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise SemgradError("SemGrad scoring needs tensor- and pipeline-parallel size 1")
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
        self.semgrad_scorer = scorer
        band = scorer.band
        return {
            "family": weights.family,
            "profile": profile.name,
            "band": [band.start, band.stop - 1],
            "score": profile.score,
            "threshold": profile.threshold,
            "dtype": str(weights.dtype).removeprefix("torch."),
            "kernels": scorer.kernels.name,
            "threads": torch.get_num_threads(),
        }

    def semgrad_score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], fault: bool = False) -> list[dict[str, Any]]:
        """Score (prompt ids, answer ids) pairs with one backward; one ``"semgrad"`` object per pair.

        ``fault`` (the test hook) makes the whole call fail, as an unexpected error would.
        """
        scorer = self.semgrad_scorer
        if scorer is None:
            raise SemgradError("semgrad_setup has not run in this worker")
        if fault:
            raise RuntimeError("injected scoring fault (test hook)")
        with torch.enable_grad():
            results = scorer.score(pairs, batch_size=max(len(pairs), 1))
        return [answer_report(scorer, r) for r in results]

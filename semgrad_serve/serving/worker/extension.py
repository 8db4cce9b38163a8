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
import time
from typing import Any

from ...errors import ItemError, SemgradError
from ...model.weights import DecoderWeights
from ...scoring import semgrad_object
from ...scoring.claim_budget import DEFAULT_SEED_BUDGET, claim_windows
from ...scoring.given import NOTHING_GIVEN, Given
from ...scoring.items import ClaimsResult, ScoreResult
from ...scoring.profiles import resolve_profile
from ...scoring.scorer import Scorer
from ..capture_keys import fingerprint, secret_from_env
from ..messages import SETUP_REFUSED, Pair
from ..settings import (
    CAPTURE_CONNECTOR_MODULE,
    PIPELINE_REFUSED,
    TEST_FAULT_MARKER,
    TEST_FAULTS_ENV,
    TEST_SLOW_MARKER,
    TEST_SLOW_S,
    check_tensor_parallel,
    log,
)
from . import rank_sync
from .captures import STORE
from .live_scoring import live_given
from .runner_check import check_runner
from .scoring_service import PlanFn, ScoreFn, ScoringService, Window, generation_cores, scoring_cores
from .step_recorder import RECORDER
from .vllm_weights import from_vllm_model, keep_dense_cpu_weights

keep_dense_cpu_weights()


def answer_report(
    scorer: Scorer, result: ScoreResult | ClaimsResult | ItemError, given: Given | None = None, tokens: bool = False
) -> dict[str, Any]:
    """The ``"semgrad"`` object of one answer: its scores and flag, or ``{"error": ...}``; ``reused`` lists what
    scoring took from vLLM instead of computing it (``prompt_kv``: the prompt's keys/values from its KV cache;
    ``band_inputs``: the residual stream entering the band; ``logits``: the answer's logits), each the same
    numbers up to float rounding. ``tokens`` adds the per-token entropies and log-probs (the API server passes
    them on to requests that ask for them); ``claims`` are there where they were scored. An answer so far's claims
    alone: ``{"claims": [...]}``."""
    if isinstance(result, ItemError):
        return semgrad_object.error_report(str(result))
    if not all(math.isfinite(v) for v in result.scores().values()):
        return semgrad_object.error_report(semgrad_object.NON_FINITE)
    if isinstance(result, ClaimsResult):
        return scorer.report(result)
    return semgrad_object.served(scorer.report(result), (given or NOTHING_GIVEN).reused(), tokens)


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


def records_band_inputs(vllm_config: Any) -> bool:
    """Whether the band's inputs can be recorded while generating: the model runs eagerly (a compiled graph or
    a replayed CUDA graph, which vLLM captures even uncompiled, would not call the hook) and without
    speculative decoding (rejected draft tokens would be recorded)."""
    from vllm.config import CompilationMode, CUDAGraphMode

    compilation = vllm_config.compilation_config
    eager = vllm_config.model_config.enforce_eager or (
        compilation.mode == CompilationMode.NONE and compilation.cudagraph_mode == CUDAGraphMode.NONE
    )
    return bool(eager) and vllm_config.speculative_config is None


def rope_agrees(weights: DecoderWeights, max_model_len: int, n_tokens: int) -> bool:
    """Whether vLLM rotated a sequence of ``n_tokens`` (prompt + answer) as the scoring forward does. With LongRoPE,
    vLLM takes the long frequencies for every sequence when its context is longer than the original one,
    transformers only for a sequence longer than that; where they differ, nothing vLLM computed is reused."""
    after = weights.long_rope_after
    return after is None or (max_model_len > after) == (n_tokens > after)


def with_test_faults(score: ScoreFn, tokenizer: Any) -> ScoreFn:
    """The test seam: ``score`` that fails, as a broken scoring pass would, for a batch holding a prompt whose
    text contains ``TEST_FAULT_MARKER`` (the scoring service then retries each request alone), and that takes
    ``TEST_SLOW_S`` longer for one holding ``TEST_SLOW_MARKER`` (a long job, without the long answer)."""

    def score_or_fail(
        pairs: list[Pair], given: list[Given], windows: list[Window], so_far: list[bool]
    ) -> list[dict[str, Any]]:
        prompts = [tokenizer.decode(prompt) for prompt, _ in pairs]
        if any(TEST_FAULT_MARKER in text for text in prompts):
            raise RuntimeError("injected scoring fault (test hook)")
        if any(TEST_SLOW_MARKER in text for text in prompts):
            time.sleep(TEST_SLOW_S)
        return score(pairs, given, windows, so_far)

    return score_or_fail


def over_limit_error(max_claims: int) -> str:
    """The error of a claim past the server's limit."""
    return f"not scored: over this server's limit of {max_claims} claims per answer (semgrad-serve serve --max-claims)"


def over_limit(scorer: Scorer, answer: list[int], window: range, max_claims: int) -> list[dict[str, Any]]:
    """The entries of ``"claims"`` for the answer's claims past ``max_claims``, given after its last scored window
    (none after the others)."""
    claims = scorer.claims(answer)
    if window.stop != max_claims or len(claims) <= max_claims:
        return []
    error = over_limit_error(max_claims)
    return [semgrad_object.claim_error(c, error) for c in claims[max_claims:]]


def claim_plan(scorer: Scorer, max_claims: int, claims_per_pass: int) -> PlanFn:
    """An answer's scoring passes: one without claims; with claims, its first ``max_claims`` claims in windows of
    at most ``claims_per_pass`` (each pass also scores the whole answer, as seed 0; the first pass's counts)."""

    def plan(pair: Pair, claims: bool) -> list[Window]:
        if not claims:
            return [None]
        return claim_windows(min(len(scorer.claims(pair[1])), max_claims), claims_per_pass)

    return plan


class SemgradWorkerExtension:
    """Methods added to vLLM's worker. ``semgrad_setup`` runs once at server start and starts the scoring
    service, which then takes answers over its own socket (``scoring_service.py``)."""

    semgrad_service: ScoringService | None = None

    def semgrad_setup(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``start_scoring`` (its arguments), called by the API server through ``collective_rpc``; a ``SemgradError``
        (what is unsupported) comes back as ``{SETUP_REFUSED: message}``, since an exception crosses vLLM's RPC as
        text only. Any other failure is raised, with its traceback."""
        try:
            return self.start_scoring(*args, **kwargs)
        except SemgradError as exc:
            return {SETUP_REFUSED: str(exc)}

    def start_scoring(
        self,
        profile_path: str | None,
        max_batch: int,
        api_cores: list[int],
        max_claims: int = 64,
        claims_per_pass: int = 16,
        seed_budget: int = DEFAULT_SEED_BUDGET,
    ) -> dict[str, Any]:
        """Build the scorer over vLLM's modules and start the scoring service; raise a ``SemgradError``
        naming what is unsupported. Returns what the API server needs to reach the service. ``max_claims``: the
        most claims scored per answer; ``claims_per_pass``: the most claims of an answer per scoring pass;
        ``seed_budget``: bytes of one backward's claim seeds (``claim_budget.py``)."""
        from transformers import AutoTokenizer

        vllm_config = self.vllm_config  # type: ignore[attr-defined]
        check_runner(vllm_config, self.model_runner)  # type: ignore[attr-defined]
        model = self.model_runner.get_model()  # type: ignore[attr-defined]  # unwrapped from any CUDA graph wrapper
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size != 1:
            raise SemgradError(PIPELINE_REFUSED)
        capture = capture_state(vllm_config.kv_transfer_config)
        secret = secret_from_env()  # the connector trusts only keys minted under it (``capture_keys.py``)
        model_config = self.model_config  # type: ignore[attr-defined]
        config = model_config.hf_config
        check_tensor_parallel(config.model_type, parallel.tensor_parallel_size)
        groups = rank_sync.scoring_groups() if parallel.tensor_parallel_size > 1 else None
        weights = from_vllm_model(model, config, groups)
        tokenizer = AutoTokenizer.from_pretrained(
            model_config.tokenizer,
            revision=model_config.tokenizer_revision,
            trust_remote_code=model_config.trust_remote_code,
        )
        profile = resolve_profile(config, tokenizer.chat_template, model_config.model, profile_path)
        # responses carry no ExGrad: compute it only where it is the flag's score
        scorer = Scorer(weights, tokenizer, profile, exgrad=profile.score == "exgrad", seed_budget=seed_budget)
        STORE.prefix_length = scorer.t_star_or_none
        band = scorer.band
        record = capture and secret is not None and records_band_inputs(vllm_config)
        if record:
            # under tensor parallelism the logits are gathered to rank 0 only, and each rank's head forms its own
            logits_processor = model.logits_processor if groups is None else None
            RECORDER.install(
                self.model_runner, model.model.layers[band.start], logits_processor, band.start, scorer.t_star_or_none
            )  # type: ignore[attr-defined]

        def score(
            pairs: list[Pair], given: list[Given], windows: list[Window], so_far: list[bool]
        ) -> list[dict[str, Any]]:
            given = [
                g if rope_agrees(weights, model_config.max_model_len, len(p) + len(a)) else NOTHING_GIVEN
                for (p, a), g in zip(pairs, given)
            ]
            results = scorer.score(
                pairs,
                batch_size=max(len(pairs), 1),
                given=given,
                claims=[False if w is None else w for w in windows],
                whole_answer=[not s for s in so_far],
            )
            reports = [answer_report(scorer, r, g, tokens=True) for r, g in zip(results, given)]
            for (_, answer), window, running, report in zip(pairs, windows, so_far, reports):
                if window is not None and not running and "error" not in report:
                    report["claims"] = report.get("claims", []) + over_limit(scorer, answer, window, max_claims)
            return reports

        if os.environ.get(TEST_FAULTS_ENV) == "1":
            log.warning(
                "%s=1: the scoring fault test seam is on; do not use this server in production", TEST_FAULTS_ENV
            )
            score = with_test_faults(score, tokenizer)
        generation = generation_cores()
        cores = scoring_cores(set(api_cores), generation)
        if weights.device.type == "cpu" and cores <= generation:
            log.warning(
                "SemGrad: generation's threads hold every core (%s), so scoring competes with them; give vLLM a "
                "reserved core (VLLM_CPU_NUM_OF_RESERVED_CPU=1, as semgrad-serve serve sets)",
                sorted(generation),
            )
        self.semgrad_service = ScoringService(
            score,
            STORE,
            max_batch,
            cores,
            groups,
            claim_plan(scorer, max_claims, claims_per_pass),
            live_given=lambda key, pair: live_given(STORE, RECORDER, key, pair),
        )
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
            "records": record,
            "tensor_parallel_size": parallel.tensor_parallel_size,
            "max_claims": max_claims,
            "claims_per_pass": claims_per_pass,
            "claim_memory_mib": seed_budget >> 20,
            "address": self.semgrad_service.address,
            "authkey": self.semgrad_service.authkey,
            "capture_secret_check": fingerprint(secret) if capture and secret is not None else None,
        }

"""Prometheus metrics of SemGrad scoring, exported on vLLM's ``/metrics`` (its default registry)."""

from __future__ import annotations

from typing import Any, Sequence

from prometheus_client import Counter, Histogram

ANSWERS_SCORED = Counter("semgrad_answers_scored", "Answers scored with SemGrad.")
ANSWERS_FLAGGED = Counter("semgrad_answers_flagged", "Scored answers flagged as likely hallucinated.")
SCORING_ERRORS = Counter("semgrad_scoring_errors", "Answers whose scoring failed (returned with an error).")
SCORING_LATENCY = Histogram(
    "semgrad_scoring_latency_seconds",
    "Time from an answer's completion to its scores, queueing included.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
# Per data-parallel engine (its index in vLLM's engine order): its answers by outcome, "scored" (flagged or not),
# "flagged" (of those scored) or "error"; the totals above count all engines together.
ENGINE_ANSWERS = Counter(
    "semgrad_engine_answers", "Answers per engine and outcome (scored, flagged, error).", ["engine", "outcome"]
)
SCORING_BATCH_SIZE = Histogram(
    "semgrad_scoring_batch_size", "Answers per scoring batch (one backward).", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)


def record_answers(results: Sequence[dict[str, Any]], latency: float, engine: int = 0) -> None:
    """Count the scored answers of one request's call, scored by ``engine``: latency and outcome of each."""
    for result in results:
        SCORING_LATENCY.observe(latency)
        if "error" in result:
            SCORING_ERRORS.inc()
            ENGINE_ANSWERS.labels(str(engine), "error").inc()
        else:
            ANSWERS_SCORED.inc()
            ENGINE_ANSWERS.labels(str(engine), "scored").inc()
            if result.get("flagged"):
                ANSWERS_FLAGGED.inc()
                ENGINE_ANSWERS.labels(str(engine), "flagged").inc()

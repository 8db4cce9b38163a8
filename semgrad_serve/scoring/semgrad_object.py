"""The ``"semgrad"`` object of a scored answer: one builder for every place that shows it.

The object goes through up to three stages, each built here from the one before:
``full`` (``Scorer.report``: every field of the ``ScoreResult`` with the profile's assessment; what ``score`` and
``ask`` print), ``served`` (the worker extension: the served fields in ``SERVED_FIELDS`` order, what was reused, the
claims and the per-token arrays the API server may pass on) and ``for_response`` (the API server: ``stop_token``, and
the per-token data only where the request asked for it); ``for_recent`` is what the recent-answers page keeps. An
answer that was not scored is ``error_report``. No torch here: the API server builds its part too.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

from .claims import Claim
from .items import FLAG_SCORES, ClaimScores, ScoreResult

SemgradObject = dict[str, Any]  # the JSON object, in the key order a response shows

# The fields of a served answer's object, in this order; then ``claims`` where scored, ``stop_token`` and, where
# asked for, ``TOKEN_FIELDS``.
SERVED_SCORES = tuple(name for name in FLAG_SCORES if name != "exgrad")  # ExGrad is a baseline: not served
SERVED_FIELDS = (
    *SERVED_SCORES,
    "score",
    "threshold",
    "confidence",
    "min_confidence",
    "flagged",
    "reused",
    "t_star_rule",
)
TOKEN_FIELDS = ("token_texts", "token_entropies", "token_logprobs")
CLAIM_FIELDS = ("text", "token_start", "token_end", "semgrad", "paragrad", "hybridgrad", "mean_entropy")
NON_FINITE = "scoring produced a non-finite value (NaN or inf)"


def error_report(message: str) -> SemgradObject:
    """The object of an answer that was not scored."""
    return {"error": message}


def claim_report(claim: ClaimScores, assessed: dict[str, Any]) -> SemgradObject:
    """One claim's entry of ``"claims"``: its text, tokens and raw scores, and the profile's confidence and flag
    (``assessed``: ``ModelProfile.assess`` of its scores)."""
    raw = {k: getattr(claim, k) for k in CLAIM_FIELDS}
    return {**raw, "confidence": assessed["confidence"], "flagged": assessed["flagged"]}


def claim_error(claim: Claim, error: str) -> SemgradObject:
    """The entry of ``"claims"`` for a claim that was not scored."""
    return {"text": claim.text, "token_start": claim.token_start, "token_end": claim.token_end, "error": error}


def full(result: ScoreResult, assessed: dict[str, Any], claims: Sequence[SemgradObject] | None) -> SemgradObject:
    """Every field of ``result`` (the probe's inputs left out) followed by the profile's assessment (``assessed``:
    ``ModelProfile.assess``); ``claims``: the claims' entries, where the answer's claims were scored."""
    report = {**asdict(result), **assessed}
    del report["t_star_features"]  # the probe's inputs, not for the user
    if claims is None:
        del report["claims"]
    else:
        report["claims"] = list(claims)
    return report


def served(report: SemgradObject, reused: Sequence[str], tokens: bool) -> SemgradObject:
    """The worker's object from ``full``'s: the ``SERVED_FIELDS`` (``reused``: what scoring took from vLLM), the
    claims where scored and, with ``tokens``, the per-token entropies and log-probs."""
    out = {key: list(reused) if key == "reused" else report[key] for key in SERVED_FIELDS}
    if "claims" in report:
        out["claims"] = report["claims"]
    if tokens:
        out["token_entropies"], out["token_logprobs"] = list(report["token_entropies"]), list(report["token_logprobs"])
    return out


def for_response(report: SemgradObject, stop_token: bool, token_texts: Sequence[str] | None) -> SemgradObject:
    """The API server's object from the worker's: ``stop_token`` (the answer ended on the EOS token that was scored)
    and, with ``token_texts`` (the request asked for per-token data), the texts, entropies and log-probs."""
    if "error" in report:
        return report
    out = for_recent(report)
    out["stop_token"] = stop_token
    if token_texts is not None and "token_entropies" in report:
        out["token_texts"] = list(token_texts)
        out["token_entropies"], out["token_logprobs"] = report["token_entropies"], report["token_logprobs"]
    return out


def for_recent(report: SemgradObject) -> SemgradObject:
    """The object without its per-token arrays, as the recent-answers ring keeps it."""
    return {k: v for k, v in report.items() if k not in TOKEN_FIELDS}

"""The numbers a confidence probe reads from one scored answer: all from its one scoring pass, no other pass.

Scalars (``scalar_features``, by name): ln SemGrad, ln ParaGrad, ln HybridGrad, ln answer tokens (the stop token not
counted), token entropy and NLL statistics (mean, max, quartiles) and ln SemGrad per band layer (``ln semgrad @L``,
L the hidden-state index). Vectors (``vector_features``): at t*, entering the band's last layer, the gradient scaled
to mean |·| = 1 (its size is already the last layer's SemGrad) and the residual stream scaled to root-mean-square 1.
Plain Python: computed for every served answer.
"""

from __future__ import annotations

import math
from typing import Sequence

from .items import ScoreResult

VECTORS = ("t* gradient", "t* hidden")
# what a claim has too (its own scores, length and mean entropy): the features of the claims' probe
CLAIM_FEATURES = ("ln semgrad", "ln paragrad", "ln hybridgrad", "ln answer tokens", "mean entropy")
_FLOOR = 1e-30


def _ln(x: float) -> float:
    return math.log(max(x, _FLOOR))


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by linear interpolation between order statistics (numpy's default rule)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def _stats(name: str, values: Sequence[float]) -> dict[str, float]:
    out = {f"mean {name}": math.fsum(values) / len(values), f"max {name}": max(values)}
    out.update({f"{name} q{int(100 * q)}": quantile(values, q) for q in (0.25, 0.5, 0.75)})
    return out


def claim_features(scores: dict[str, float], length: int) -> dict[str, float]:
    """``CLAIM_FEATURES`` from the scores (SemGrad, ParaGrad, HybridGrad, mean entropy) and length (tokens, the stop
    token not counted) of an answer or a claim."""
    return {
        "ln semgrad": _ln(scores["semgrad"]),
        "ln paragrad": _ln(scores["paragrad"]),
        "ln hybridgrad": _ln(scores["hybridgrad"]),
        "ln answer tokens": math.log(max(1, length)),
        "mean entropy": scores["mean_entropy"],
    }


def scalar_features(result: ScoreResult) -> dict[str, float]:
    """The scalar features of a result scored with ``TStarFeatures`` (per-layer SemGrad is left out without them)."""
    out = claim_features(result.scores(), result.answer_tokens - result.stop_token)
    out.update(_stats("entropy", result.token_entropies))
    out.update(_stats("nll", [-v for v in result.token_logprobs]))
    if result.t_star_features is not None:
        first = result.band[0]
        out.update({f"ln semgrad @{first + i}": _ln(v) for i, v in enumerate(result.t_star_features.semgrad_layers)})
    return out


def vector_features(result: ScoreResult) -> dict[str, list[float]]:
    """``VECTORS`` of a result scored with ``TStarFeatures`` (empty without them)."""
    f = result.t_star_features
    if f is None:
        return {}
    g_scale = max(math.fsum(abs(v) for v in f.gradient) / len(f.gradient), _FLOOR)
    h_scale = max(math.sqrt(math.fsum(v * v for v in f.hidden) / len(f.hidden)), _FLOOR)
    return {VECTORS[0]: [v / g_scale for v in f.gradient], VECTORS[1]: [v / h_scale for v in f.hidden]}

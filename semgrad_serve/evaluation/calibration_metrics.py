"""How good a confidence is: expected calibration error, Brier score, reliability bins, length strata.

``confidence``: estimated P(correct) in [0, 1]; ``correct``: 1 (or True) for a correct answer. Plain numpy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import brier_score_loss

from ..errors import SemgradError

# Answer-length strata (tokens, the stop token not counted): (first, last), last None = no bound.
LENGTH_STRATA: tuple[tuple[int, int | None], ...] = ((1, 3), (4, 8), (9, 20), (21, None))
ECE_BINS = 10


def stratum_label(stratum: tuple[int, int | None]) -> str:
    first, last = stratum
    return f"{first}+" if last is None else f"{first}-{last}"


def in_stratum(lengths: Sequence[int], stratum: tuple[int, int | None]) -> np.ndarray:
    """Mask of the answers whose length lies in ``stratum``."""
    n = np.asarray(lengths)
    first, last = stratum
    return (n >= first) & (n <= (np.inf if last is None else last))


def _arrays(confidence: Sequence[float], correct: Sequence[int | bool]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct).astype(np.float64)
    if p.shape != y.shape or p.ndim != 1:
        raise SemgradError(f"confidences and labels must be 1-d and of one length, not {p.shape} and {y.shape}")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise SemgradError("confidences must lie in [0, 1]")
    return p, y


def brier(confidence: Sequence[float], correct: Sequence[int | bool]) -> float:
    """Mean squared difference between confidence and outcome (NaN for no answers)."""
    p, y = _arrays(confidence, correct)
    return float(brier_score_loss(y, p, pos_label=1, labels=[0, 1])) if p.size else float("nan")


def reliability_bins(
    confidence: Sequence[float], correct: Sequence[int | bool], bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Equal-width bins of confidence ([0, 1/bins), ..., [1 − 1/bins, 1]): per non-empty bin its bounds, count,
    mean confidence and share correct."""
    p, y = _arrays(confidence, correct)
    index = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = index == b
        if m.any():
            out.append(
                {
                    "low": b / bins,
                    "high": (b + 1) / bins,
                    "n": int(m.sum()),
                    "confidence": float(p[m].mean()),
                    "accuracy": float(y[m].mean()),
                }
            )
    return out


def expected_calibration_error(
    confidence: Sequence[float], correct: Sequence[int | bool], bins: int = ECE_BINS
) -> float:
    """Σ_bins (n_b / n) · |share correct − mean confidence| over ``reliability_bins`` (NaN for no answers)."""
    p, _ = _arrays(confidence, correct)
    if not p.size:
        return float("nan")
    return float(
        sum(b["n"] / p.size * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(confidence, correct, bins))
    )


def flag_quality(flagged: Sequence[bool], wrong: Sequence[bool]) -> dict[str, float | int]:
    """Precision (flagged answers that are wrong) and recall (wrong answers flagged) of a flag; NaN where undefined."""
    f, w = np.asarray(flagged, dtype=bool), np.asarray(wrong, dtype=bool)
    hits = int((f & w).sum())
    return {
        "flagged": int(f.sum()),
        "n": int(f.size),
        "wrong": int(w.sum()),
        "precision": hits / f.sum() if f.any() else float("nan"),
        "recall": hits / w.sum() if w.any() else float("nan"),
    }

"""How well an uncertainty score detects wrong answers: AUROC, AUPRC, PRR, ROC curves, flag thresholds.

Conventions, everywhere in this module:
- ``scores``: higher = more uncertain; ``wrong``: 1 (or True) for a wrong answer
  (the positive class), 0 for a correct one;
- ties are broken neither way: every metric is the expectation over a random
  order of tied scores (AUROC counts a tied wrong/correct pair as ½).
AUROC, AUPRC and the ROC curve are scikit-learn's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve as sk_roc_curve

from ..errors import SemgradError


def _arrays(scores: Sequence[float], wrong: Sequence[int | bool]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(wrong).astype(bool)
    if s.shape != y.shape or s.ndim != 1:
        raise SemgradError(f"scores and labels must be 1-d and of one length, not {s.shape} and {y.shape}")
    if not np.all(np.isfinite(s)):
        raise SemgradError("scores must be finite")
    return s, y


def _tied_groups(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order by score descending, start index of each tie group in that order, group sizes)."""
    order = np.argsort(-s, kind="stable")
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    sizes = np.diff(np.r_[starts, len(s)])
    return order, starts, sizes


def auroc(scores: Sequence[float], wrong: Sequence[int | bool]) -> float:
    """P(score of a wrong answer > score of a correct one) + ½ P(tie) (scikit-learn's ``roc_auc_score``); NaN when
    one class is empty."""
    s, y = _arrays(scores, wrong)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def roc_curve(scores: Sequence[float], wrong: Sequence[int | bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate, thresholds): flag ``score >= threshold``, one point per distinct
    score from the highest down, starting at (0, 0) with threshold +inf (scikit-learn's, every point kept)."""
    s, y = _arrays(scores, wrong)
    fpr, tpr, thresholds = sk_roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thresholds


def auprc(scores: Sequence[float], wrong: Sequence[int | bool]) -> float:
    """Average precision of flagging wrong answers (scikit-learn's ``average_precision_score``). NaN without
    wrong answers."""
    s, y = _arrays(scores, wrong)
    if not y.any():
        return float("nan")
    return float(average_precision_score(y, s))


def rejection_curve(scores: Sequence[float], quality: Sequence[float]) -> np.ndarray:
    """Mean quality of the kept answers after rejecting the k most uncertain, k = 0 .. n−1 (expected value over
    random orders of tied scores)."""
    s = np.asarray(scores, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    if s.shape != q.shape or s.ndim != 1 or len(s) == 0:
        raise SemgradError("scores and quality must be non-empty, 1-d and of one length")
    order, starts, sizes = _tied_groups(s)
    group_mean = np.add.reduceat(q[order], starts) / sizes
    expected = np.repeat(group_mean, sizes)  # expected quality at each rejection rank
    n = len(s)
    rejected = np.r_[0.0, np.cumsum(expected)[:-1]]
    kept = n - np.arange(n)
    return (q.sum() - rejected) / kept


def prr(scores: Sequence[float], wrong: Sequence[int | bool]) -> float:
    """Prediction rejection ratio (Malinin et al.): (AUC_score − AUC_random) / (AUC_oracle − AUC_random) of the
    rejection curves of answer quality (1 correct, 0 wrong); 1 = oracle, 0 = random. NaN for a single class."""
    s, y = _arrays(scores, wrong)
    quality = (~y).astype(np.float64)
    if y.all() or (~y).all():
        return float("nan")
    auc = rejection_curve(s, quality).mean()
    oracle = rejection_curve(y.astype(np.float64), quality).mean()
    random = quality.mean()
    return float((auc - random) / (oracle - random))


@dataclass(frozen=True)
class FlagThreshold:
    """A flag rule ``score > threshold`` and what it achieves on the data it was chosen on."""

    threshold: float
    target: str  # "precision" or "recall"
    target_value: float
    precision: float
    recall: float
    flagged: int
    n: int
    met: bool  # whether the target could be met

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return dict(self.__dict__)


def parse_target(text: str) -> tuple[str, float]:
    """``precision:0.9`` / ``recall=0.8`` → (kind, value)."""
    for sep in (":", "="):
        if sep in text:
            kind, _, value = text.partition(sep)
            break
    else:
        raise SemgradError(f"flag target {text!r}: write precision:VALUE or recall:VALUE")
    kind = kind.strip().lower()
    try:
        number = float(value)
    except ValueError:
        raise SemgradError(f"flag target {text!r}: {value!r} is not a number") from None
    if kind not in ("precision", "recall") or not 0 < number <= 1:
        raise SemgradError(f"flag target {text!r}: write precision:VALUE or recall:VALUE with 0 < VALUE ≤ 1")
    return kind, number


def choose_threshold(scores: Sequence[float], wrong: Sequence[int | bool], target: str, value: float) -> FlagThreshold:
    """The flag threshold (flag = ``score > threshold``) for a target precision or recall of flagging wrong answers.

    - recall target: the highest threshold whose recall is ≥ value (fewest flags that catch that share of the
      wrong answers);
    - precision target: the lowest threshold whose precision is ≥ value (most wrong answers caught while the
      flagged ones are that pure); if no threshold reaches it, the one with the highest precision among those that
      flag at least 1% of the answers, with ``met=False``.
    Thresholds are placed midway between consecutive distinct scores, so that the rule is stable for new scores.
    """
    s, y = _arrays(scores, wrong)
    if len(s) == 0 or not y.any():
        raise SemgradError("choosing a flag threshold needs at least one wrong answer")
    order, starts, sizes = _tied_groups(s)
    distinct = s[order][starts]
    flagged = starts + sizes
    tp = np.cumsum(y[order])[flagged - 1]
    precision, recall = tp / flagged, tp / y.sum()
    # flagging the i-th group and above = threshold between distinct[i+1] and distinct[i]
    below = np.r_[distinct[1:], distinct[-1] - max(1.0, abs(distinct[-1])) * 1e-3]
    cut = (distinct + below) / 2
    if target == "recall":
        ok = np.flatnonzero(recall >= value - 1e-12)
        i, met = int(ok[0]), True
    elif target == "precision":
        ok = np.flatnonzero(precision >= value - 1e-12)
        if len(ok):
            i, met = int(ok[-1]), True
        else:
            enough = np.flatnonzero(flagged >= max(1, int(np.ceil(0.01 * len(s)))))
            i, met = int(enough[np.argmax(precision[enough])]), False
    else:
        raise SemgradError(f"unknown flag target {target!r}")
    return FlagThreshold(
        float(cut[i]), target, value, float(precision[i]), float(recall[i]), int(flagged[i]), len(s), met
    )


def summarize(scores: Sequence[float], wrong: Sequence[int | bool]) -> dict[str, float]:
    """AUROC, AUPRC and PRR of one score (percentages are left to the caller)."""
    return {"auroc": auroc(scores, wrong), "auprc": auprc(scores, wrong), "prr": prr(scores, wrong)}

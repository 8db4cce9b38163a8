"""Fitting the confidence model (``scoring/confidence.py``) from judged answers, with held-out estimates.

Candidates (``CANDIDATES``), each from the configured score, the answer length and the mean entropy:
- ``logistic``: logistic regression on ln score, ln length, ln mean entropy;
- ``logistic, pairwise``: the same plus their pairwise products and squares (the score's meaning may change with length);
- ``isotonic by length``: per length stratum (1-3, 4-8, 9-20, 21+ tokens), the non-increasing isotonic fit of
  correctness on ln score (pool-adjacent-violators), interpolated linearly between blocks.
The logistic fits are Newton's method on the L2-penalised log-likelihood (penalty ``L2`` on the standardised
weights, not the intercept).

Selection and estimates, all with fixed seeds: folds are stratified by group (dataset × judged correct).
``fit_confidence`` picks the candidate with the lowest cross-validated Brier score and fits it on every answer;
its held-out confidences come from nested cross-validation (in each outer fold the candidate is chosen on the
other folds only), so the reported figures and the operating point never saw the answers they are measured on.
The operating point is the largest ``min_confidence`` (flag = confidence below it) whose held-out flags meet the
target (e.g. precision ≥ 0.95 of flagging wrong answers), via ``metrics.choose_threshold`` on 1 − confidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import SemgradError
from ..scoring.confidence import ConfidenceModel, IsotonicCalibrator, LogisticCalibrator, OperatingPoint, features
from . import metrics
from .calibration_metrics import LENGTH_STRATA, brier

L2 = 1.0
FOLDS = 5
SEED = 0
MIN_PER_CLASS = 2 * FOLDS  # correct and wrong answers needed to fit (every training fold then holds both)


@dataclass(frozen=True)
class Answers:
    """Judged answers: configured score, length (tokens, stop token not counted), mean entropy, correct, group."""

    score: np.ndarray
    length: np.ndarray
    entropy: np.ndarray
    correct: np.ndarray
    group: np.ndarray  # stratification label (e.g. the dataset name)

    def __len__(self) -> int:
        return len(self.correct)

    def take(self, index: np.ndarray) -> "Answers":
        return Answers(self.score[index], self.length[index], self.entropy[index], self.correct[index], self.group[index])

    def features(self) -> np.ndarray:
        return np.array([features(s, int(n), h) for s, n, h in zip(self.score, self.length, self.entropy)], dtype=np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, terms: Sequence[Sequence[int]], l2: float = L2) -> LogisticCalibrator:
    """Logistic regression of ``y`` on the standardised products ``terms`` of the columns of ``x`` (Newton's method)."""
    z = np.stack([np.prod(x[:, list(t)], axis=1) for t in terms], axis=1)
    mean, scale = z.mean(0), z.std(0)
    scale[scale == 0] = 1.0
    design = np.c_[np.ones(len(z)), (z - mean) / scale]
    penalty = np.diag([0.0] + [l2] * len(terms))
    w = np.zeros(design.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-design @ w))
        grad = design.T @ (p - y) + penalty @ w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + penalty
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    else:
        raise SemgradError("the logistic calibrator did not converge")
    return LogisticCalibrator(tuple(tuple(t) for t in terms), tuple(mean), tuple(scale), tuple(w[1:]), float(w[0]))


def isotonic_decreasing(x: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """Pool-adjacent-violators: the non-increasing step fit of ``y`` on ``x``, as knots (x, y) at each block's first
    and last distinct x (tied x values are pooled first)."""
    xs, inverse = np.unique(x, return_inverse=True)
    sums, counts = np.bincount(inverse, weights=y), np.bincount(inverse).astype(np.float64)
    blocks: list[list[float]] = []  # [sum, count, first x index, last x index]
    for i, (s, c) in enumerate(zip(sums, counts)):
        blocks.append([s, c, i, i])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            s2, c2, _, last = blocks.pop()
            blocks[-1][0] += s2
            blocks[-1][1] += c2
            blocks[-1][3] = last
    kx: list[float] = []
    ky: list[float] = []
    for s, c, first, last in blocks:
        for i in dict.fromkeys((first, last)):
            kx.append(float(xs[int(i)]))
            ky.append(s / c)
    return kx, ky


def fit_isotonic(answers: Answers) -> IsotonicCalibrator:
    """Per length stratum, the isotonic fit of correctness on ln score (all answers where a stratum has none)."""
    x = answers.features()[:, 0]
    tops = tuple(last for _, last in LENGTH_STRATA)
    everything = isotonic_decreasing(x, answers.correct)
    knots = []
    for first, last in LENGTH_STRATA:
        m = (answers.length >= first) & (answers.length <= (np.inf if last is None else last))
        knots.append(isotonic_decreasing(x[m], answers.correct[m]) if m.any() else everything)
    return IsotonicCalibrator(tops, tuple(tuple(k[0]) for k in knots), tuple(tuple(k[1]) for k in knots))


PAIRWISE = ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 0), (1, 1), (2, 2))
CANDIDATES: dict[str, Callable[[Answers], LogisticCalibrator | IsotonicCalibrator]] = {
    "logistic": lambda a: fit_logistic(a.features(), a.correct, ((0,), (1,), (2,))),
    "logistic, pairwise": lambda a: fit_logistic(a.features(), a.correct, PAIRWISE),
    "isotonic by length": fit_isotonic,
}


def stratified_folds(groups: np.ndarray, k: int = FOLDS, seed: int = SEED) -> np.ndarray:
    """Fold number (0..k−1) of every answer: each group shuffled with ``seed`` and dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(groups), dtype=int)
    start = 0
    for g in sorted(set(groups.tolist())):
        members = rng.permutation(np.flatnonzero(groups == g))
        fold[members] = (start + np.arange(len(members))) % k
        start += len(members)
    return fold


def predict(calibrator: LogisticCalibrator | IsotonicCalibrator, answers: Answers) -> np.ndarray:
    return np.array([calibrator.probability(float(s), int(n), float(h)) for s, n, h in zip(answers.score, answers.length, answers.entropy)])


def out_of_fold(fit: Callable[[Answers], LogisticCalibrator | IsotonicCalibrator], answers: Answers, fold: np.ndarray) -> np.ndarray:
    """Each answer's confidence from the candidate fitted on the other folds."""
    out = np.empty(len(answers))
    for f in np.unique(fold):
        out[fold == f] = predict(fit(answers.take(np.flatnonzero(fold != f))), answers.take(np.flatnonzero(fold == f)))
    return out


def cv_brier(answers: Answers, seed: int = SEED) -> dict[str, float]:
    """Cross-validated Brier score of every candidate (folds stratified by group × correct)."""
    fold = stratified_folds(_strata(answers), seed=seed)
    return {name: brier(out_of_fold(fit, answers, fold), answers.correct) for name, fit in CANDIDATES.items()}


def _strata(answers: Answers) -> np.ndarray:
    return np.array([f"{g}/{int(c)}" for g, c in zip(answers.group, answers.correct)])


def enough_to_fit(answers: Answers) -> bool:
    correct = int(answers.correct.sum())
    return min(correct, len(answers) - correct) >= MIN_PER_CLASS


@dataclass(frozen=True)
class FittedConfidence:
    model: ConfidenceModel
    heldout: np.ndarray  # each answer's confidence from nested cross-validation
    heldout_choice: list[str]  # the candidate chosen in each outer fold
    cv_brier: dict[str, float]  # candidate → cross-validated Brier score on every answer


def fit_confidence(answers: Answers, score: str, target: str, value: float, fitted: dict, seed: int = SEED) -> FittedConfidence:
    """Choose, fit and place the operating point of the confidence model (module docstring)."""
    if not enough_to_fit(answers):
        raise SemgradError(f"fitting a confidence needs at least {MIN_PER_CLASS} correct and {MIN_PER_CLASS} wrong answers")
    fold = stratified_folds(_strata(answers), seed=seed)
    heldout = np.empty(len(answers))
    choice = []
    for f in range(FOLDS):
        train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        inner = cv_brier(answers.take(train), seed)
        best = min(inner, key=inner.get)
        choice.append(best)
        heldout[test] = predict(CANDIDATES[best](answers.take(train)), answers.take(test))
    scores = cv_brier(answers, seed)
    chosen = min(scores, key=scores.get)
    point = metrics.choose_threshold(1 - heldout, ~answers.correct.astype(bool), target, value)
    op = OperatingPoint(1 - point.threshold, target, value,
                        {"precision": point.precision, "recall": point.recall, "flagged": point.flagged, "n": point.n, "met": point.met})
    info = {**fitted, "calibrator": chosen, "cv_brier": scores, "folds": FOLDS, "seed": seed, "l2": L2}
    return FittedConfidence(ConfidenceModel(score, CANDIDATES[chosen](answers), op, info), heldout, choice, scores)

"""Fitting the confidence probe (``scoring/confidence.py``) from judged answers, with held-out estimates.

Every candidate is a logistic regression (scikit-learn, L2 penalty ``C``) on standardised features of the answers'
scoring pass (``scoring/probe_features.py``), some with the vectors at t* projected on their first principal
components (PCA fitted on the same training answers); ``CANDIDATES`` lists them. Each dataset weighs the same in
every fit and every held-out loss (an answer's weight is n / (datasets · answers of its dataset)), so that no dataset
swamps another.

Selection and estimates, all with fixed seeds: folds are scikit-learn's ``StratifiedKFold`` over dataset × judged
correct. ``fit_confidence`` picks the candidate with the lowest cross-validated (weighted) log-loss and fits it on
every answer; its held-out confidences come from nested cross-validation (in each outer fold the candidate is chosen
on the other folds only), so the reported figures and the operating point never saw the answers they are measured
on. ``transfer`` fits on one dataset (its candidate chosen there) and measures on another. The operating point is the
largest ``min_confidence`` (flag = confidence below it) whose held-out flags meet a precision target (e.g. ≥ 0.95 of
flagged answers wrong) in every dataset on its own (``operating_point``); a recall target is met on the pooled answers
(``metrics.choose_threshold``). Claims, which have only their scores, length and mean entropy, get a companion probe on
``CLAIM_FEATURES`` fitted on the whole answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold

from ..errors import SemgradError
from ..scoring.confidence import ConfidenceModel, OperatingPoint, ProbeCalibrator, Projection
from ..scoring.probe_features import CLAIM_FEATURES
from . import metrics

FOLDS = 5
SEED = 0
MIN_PER_CLASS = 2 * FOLDS  # correct and wrong answers needed to fit (every training fold then holds both)
# the features every answer has, from its scores alone (answers recorded before the probe's features were kept)
SCORE_FEATURES = (
    "ln semgrad",
    "ln paragrad",
    "ln hybridgrad",
    "ln answer tokens",
    "mean entropy",
    "mean nll",
    "max nll",
)


@dataclass(frozen=True)
class Candidate:
    """Which scalar features (None: all), how many principal components of each vector at t*, the penalty ``C``."""

    scalars: tuple[str, ...] | None
    components: int
    c: float


CANDIDATES: dict[str, Candidate] = {
    "entropy, length": Candidate(("mean entropy", "ln answer tokens"), 0, 1.0),
    "scores": Candidate(SCORE_FEATURES, 0, 1.0),
    "all scalars": Candidate(None, 0, 0.1),
    "all scalars + t* (4 components each)": Candidate(None, 4, 0.1),
    "all scalars + t* (16 components each)": Candidate(None, 16, 0.05),
}


@dataclass(frozen=True)
class Answers:
    """Judged answers: scalar features [n, F] (``names``), vectors at t* (name → [n, d]; may be empty), length
    (tokens, stop token not counted), correct, group (the dataset)."""

    scalars: np.ndarray
    names: tuple[str, ...]
    vectors: dict[str, np.ndarray]
    length: np.ndarray
    correct: np.ndarray
    group: np.ndarray

    def __len__(self) -> int:
        return len(self.correct)

    def take(self, index: np.ndarray) -> "Answers":
        return Answers(
            self.scalars[index],
            self.names,
            {k: v[index] for k, v in self.vectors.items()},
            self.length[index],
            self.correct[index],
            self.group[index],
        )

    def column(self, name: str) -> np.ndarray:
        return self.scalars[:, self.names.index(name)]


def group_weights(group: np.ndarray) -> np.ndarray:
    """n / (groups · answers of the group) per answer: each group weighs the same, the weights sum to n."""
    names, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    return len(group) / (len(names) * counts[inverse])


def usable(candidate: Candidate, answers: Answers) -> bool:
    """Whether the answers have what the candidate reads."""
    wanted = candidate.scalars or ()
    return all(n in answers.names for n in wanted) and (candidate.components == 0 or bool(answers.vectors))


def fit_probe(candidate: Candidate, answers: Answers) -> ProbeCalibrator:
    """The candidate fitted on ``answers`` (each group weighing the same)."""
    names = list(candidate.scalars or answers.names)
    x = [answers.scalars[:, [answers.names.index(n) for n in names]]]
    projections = []
    for vector in sorted(answers.vectors) if candidate.components else ():
        v = answers.vectors[vector]
        pca = PCA(n_components=min(candidate.components, *v.shape), random_state=SEED).fit(v)
        projections.append(
            Projection(vector, tuple(pca.mean_.tolist()), tuple(tuple(c) for c in pca.components_.tolist()))
        )
        x.append((v - pca.mean_) @ pca.components_.T)
        names += [f"{vector} pc{j}" for j in range(pca.n_components_)]
    z = np.concatenate(x, axis=1)
    mean, scale = z.mean(0), z.std(0)
    scale[scale == 0] = 1.0
    model = LogisticRegression(C=candidate.c, max_iter=5000)
    model.fit((z - mean) / scale, answers.correct.astype(int), sample_weight=group_weights(answers.group))
    return ProbeCalibrator(
        tuple(names),
        tuple(mean.tolist()),
        tuple(scale.tolist()),
        tuple(model.coef_[0].tolist()),
        float(model.intercept_[0]),
        tuple(projections),
    )


def predict(probe: ProbeCalibrator, answers: Answers) -> np.ndarray:
    """P(correct) of each answer under ``probe``: the same sums as ``ProbeCalibrator.probability_of``, vectorised."""
    columns = {n: answers.scalars[:, i] for i, n in enumerate(answers.names)}
    for p in probe.projections:
        projected = (answers.vectors[p.vector] - np.asarray(p.mean)) @ np.asarray(p.components).T
        columns.update({f"{p.vector} pc{j}": projected[:, j] for j in range(projected.shape[1])})
    z = np.stack([columns[n] for n in probe.features], axis=1)
    logit = probe.intercept + ((z - np.asarray(probe.mean)) / np.asarray(probe.scale)) @ np.asarray(probe.weights)
    return 1 / (1 + np.exp(-logit))


def folds(answers: Answers, seed: int = SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of ``FOLDS`` folds stratified by group × correct."""
    strata = np.array([f"{g}/{int(c)}" for g, c in zip(answers.group, answers.correct)])
    return list(StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(np.zeros(len(strata)), strata))


def weighted_log_loss(p: np.ndarray, answers: Answers) -> float:
    return float(log_loss(answers.correct.astype(int), p, sample_weight=group_weights(answers.group), labels=[0, 1]))


def cv_log_loss(answers: Answers, seed: int = SEED) -> dict[str, float]:
    """Cross-validated, group-weighted log-loss of every usable candidate."""
    split = folds(answers, seed)
    out = {}
    for name, cand in CANDIDATES.items():
        if not usable(cand, answers):
            continue
        p = np.empty(len(answers))
        for train, test in split:
            p[test] = predict(fit_probe(cand, answers.take(train)), answers.take(test))
        out[name] = weighted_log_loss(p, answers)
    return out


def choose_and_fit(answers: Answers, seed: int = SEED) -> tuple[str, ProbeCalibrator, dict[str, float]]:
    """The candidate with the lowest cross-validated log-loss on ``answers``, fitted on all of them."""
    losses = cv_log_loss(answers, seed)
    best = min(losses, key=losses.get)
    return best, fit_probe(CANDIDATES[best], answers), losses


def enough_to_fit(answers: Answers) -> bool:
    correct = int(answers.correct.sum())
    return min(correct, len(answers) - correct) >= MIN_PER_CLASS


@dataclass(frozen=True)
class FittedConfidence:
    model: ConfidenceModel
    heldout: np.ndarray  # each answer's confidence from nested cross-validation
    heldout_choice: list[str]  # the candidate chosen in each outer fold
    cv_log_loss: dict[str, float]  # candidate → cross-validated log-loss on every answer
    transfer: dict[str, Any] = field(default_factory=dict)  # "A→B" → the confidences on B of a probe fitted on A


def transfer(answers: Answers, seed: int = SEED) -> dict[str, dict[str, Any]]:
    """For each ordered pair of groups (A, B): the candidate chosen and fitted on A alone, its confidences on B."""
    out = {}
    names = list(dict.fromkeys(answers.group.tolist()))
    for a in names:
        source = answers.take(np.flatnonzero(answers.group == a))
        if not enough_to_fit(source):
            continue
        chosen, probe, _ = choose_and_fit(source, seed)
        for b in names:
            if b != a:
                target = np.flatnonzero(answers.group == b)
                out[f"{a}→{b}"] = {
                    "source": a,
                    "target": b,
                    "candidate": chosen,
                    "index": target,
                    "confidence": predict(probe, answers.take(target)),
                }
    return out


def fit_confidence(
    answers: Answers, score: str, target: str, value: float, fitted: dict, seed: int = SEED
) -> FittedConfidence:
    """Choose, fit and place the operating point of the confidence probe (module docstring)."""
    if not enough_to_fit(answers):
        raise SemgradError(
            f"fitting a confidence needs at least {MIN_PER_CLASS} correct and {MIN_PER_CLASS} wrong answers"
        )
    heldout = np.empty(len(answers))
    choice = []
    for train, test in folds(answers, seed):
        best, probe, _ = choose_and_fit(answers.take(train), seed)
        choice.append(best)
        heldout[test] = predict(probe, answers.take(test))
    chosen, probe, losses = choose_and_fit(answers, seed)
    op = operating_point(heldout, answers, target, value)
    info = {
        **fitted,
        "calibrator": chosen,
        "cv_log_loss": losses,
        "folds": FOLDS,
        "seed": seed,
        "weighting": "each dataset the same total weight",
    }
    claims = (
        fit_probe(Candidate(CLAIM_FEATURES, 0, 1.0), answers)
        if usable(Candidate(CLAIM_FEATURES, 0, 1.0), answers)
        else None
    )
    return FittedConfidence(
        ConfidenceModel(score, probe, op, info, claims), heldout, choice, losses, transfer(answers, seed)
    )


def operating_point(heldout: np.ndarray, answers: Answers, target: str, value: float) -> OperatingPoint:
    """The flag's cut on held-out confidences (module docstring); its figures on the pooled answers."""
    wrong = ~answers.correct.astype(bool)
    if target == "precision":
        levels = np.unique(heldout)
        cuts = np.r_[(levels[:-1] + levels[1:]) / 2, levels[-1] + 1e-9]  # a cut between each pair of levels, one above
        flagged = heldout[None, :] < cuts[:, None]  # [cuts, n]
        ok = np.ones(len(cuts), bool)
        for g in np.unique(answers.group):
            m = answers.group == g
            f = flagged[:, m]
            hits, count = (f & wrong[m]).sum(1), f.sum(1)
            ok &= (count == 0) | (hits >= value * count - 1e-9)
        met = bool(ok.any() and flagged[np.flatnonzero(ok)[-1]].any())
        cut = float(cuts[np.flatnonzero(ok)[-1]]) if met else float(levels[0])  # unmet: flag nothing below the lowest
        f = heldout < cut
        quality = {
            "precision": float((f & wrong).sum() / f.sum()) if f.any() else float("nan"),
            "recall": float((f & wrong).sum() / wrong.sum()),
            "flagged": int(f.sum()),
            "n": len(f),
            "met": met,
        }
        return OperatingPoint(cut, target, value, quality)
    point = metrics.choose_threshold(1 - heldout, wrong, target, value)
    return OperatingPoint(
        1 - point.threshold,
        target,
        value,
        {
            "precision": point.precision,
            "recall": point.recall,
            "flagged": point.flagged,
            "n": point.n,
            "met": point.met,
        },
    )

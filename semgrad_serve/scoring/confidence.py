"""Calibrated confidence: the estimated probability that an answer is correct, and the flag derived from it.

A profile may carry a ``confidence`` model (fitted by ``semgrad-serve eval`` from judged answers; see
``evaluation/confidence_fit.py``). It maps numbers of a scored answer to a probability in [0, 1], and flags the
answer when that probability is below the model's ``min_confidence`` (its operating point). The raw scores are
never changed. Plain Python: applied to every served answer, it needs no numpy, torch or scikit-learn.

Version 2 (what ``eval`` fits): a ``probe``, logistic regression on named features of the answer's scoring pass
(``probe_features.py``), some of them projections of the vectors at t* on fitted components::

    {"version": 2, "score": "hybridgrad",
     "calibrator": {"kind": "probe", "features": ["mean entropy", ..., "t* hidden pc0", ...],
                    "mean": [...], "scale": [...], "weights": [...], "intercept": -1.2,
                    "projections": [{"vector": "t* hidden", "mean": [d values], "components": [[d values], ...]}]},
     "operating_point": {...}, "fitted": {...}}

P(correct) = σ(intercept + Σ_k weights_k · (x_k − mean_k) / scale_k), x_k the feature named ``features[k]``; the
projection j of a vector v is ``"<vector> pc<j>"`` = Σ_i components_j[i] · (v_i − mean_i).

Version 1 (older profiles, still applied as they were fitted), from three numbers: the configured score, the answer's
length in tokens (its stop token not counted) and its mean token entropy::

    {"version": 1, "score": "hybridgrad",
     "calibrator": {"kind": "logistic", "terms": [[0], [1], [2], [0, 1]], "mean": [...], "scale": [...],
                    "weights": [...], "intercept": -1.2}
               or {"kind": "isotonic", "max_tokens": [3, 8, 20, null], "x": [[...], ...], "y": [[...], ...]},
     "operating_point": {"min_confidence": 0.05, "target": "precision", "target_value": 0.95, ...held-out figures},
     "fitted": {...how and on what}}

Features (``features``): x0 = ln score, x1 = ln length, x2 = ln mean entropy (floors: 1e-30, 1 token, 1e-6 nats).
``logistic``: P(correct) = σ(intercept + Σ_k weights_k · (Π_{i ∈ terms_k} x_i − mean_k) / scale_k).
``isotonic``: per length bucket (the first whose ``max_tokens`` bound, null = none, holds the length), P(correct)
is the piecewise-linear curve through the points (x, y) of ln score (constant beyond the ends).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import SemgradError
from .items import ScoreResult
from .probe_features import claim_features, scalar_features, vector_features

VERSION = 2
VERSIONS = (1, 2)
FEATURES = ("ln score", "ln answer tokens", "ln mean entropy")
_FLOORS = (1e-30, 1.0, 1e-6)


def features(score: float, length: int, mean_entropy: float) -> tuple[float, float, float]:
    """(ln score, ln length, ln mean entropy), each value floored first (``_FLOORS``)."""
    return tuple(math.log(max(v, floor)) for v, floor in zip((score, float(length), mean_entropy), _FLOORS))  # type: ignore[return-value]


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@dataclass(frozen=True)
class LogisticCalibrator:
    """Logistic regression on standardised products of the features (``terms``)."""

    terms: tuple[tuple[int, ...], ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    intercept: float
    kind: str = field(default="logistic", init=False)

    def probability(self, score: float, length: int, mean_entropy: float) -> float:
        x = features(score, length, mean_entropy)
        z = self.intercept
        for term, m, s, w in zip(self.terms, self.mean, self.scale, self.weights):
            z += w * (math.prod(x[i] for i in term) - m) / s
        return sigmoid(z)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "terms": [list(t) for t in self.terms],
            "mean": list(self.mean),
            "scale": list(self.scale),
            "weights": list(self.weights),
            "intercept": self.intercept,
        }


@dataclass(frozen=True)
class IsotonicCalibrator:
    """Per length bucket, a non-increasing piecewise-linear map from ln score to P(correct)."""

    max_tokens: tuple[int | None, ...]  # upper bound of each bucket (inclusive), None for the last
    x: tuple[tuple[float, ...], ...]
    y: tuple[tuple[float, ...], ...]
    kind: str = field(default="isotonic", init=False)

    def bucket(self, length: int) -> int:
        return next(i for i, top in enumerate(self.max_tokens) if top is None or length <= top)

    def probability(self, score: float, length: int, mean_entropy: float) -> float:
        xs, ys = self.x[self.bucket(length)], self.y[self.bucket(length)]
        x = features(score, length, mean_entropy)[0]
        k = bisect_right(xs, x)
        if k == 0:
            return ys[0]
        if k == len(xs):
            return ys[-1]
        t = (x - xs[k - 1]) / (xs[k] - xs[k - 1])
        return ys[k - 1] + t * (ys[k] - ys[k - 1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "max_tokens": list(self.max_tokens),
            "x": [list(v) for v in self.x],
            "y": [list(v) for v in self.y],
        }


@dataclass(frozen=True)
class Projection:
    """Components [k][d] and centre [d] projecting one of ``probe_features.VECTORS``."""

    vector: str
    mean: tuple[float, ...]
    components: tuple[tuple[float, ...], ...]

    def apply(self, v: Sequence[float]) -> dict[str, float]:
        if len(v) != len(self.mean):
            raise SemgradError(
                f"confidence probe: {self.vector!r} has {len(v)} values, the probe was fitted on {len(self.mean)}"
            )
        centred = [a - m for a, m in zip(v, self.mean)]
        return {
            f"{self.vector} pc{j}": math.fsum(c * x for c, x in zip(comp, centred))
            for j, comp in enumerate(self.components)
        }


@dataclass(frozen=True)
class ProbeCalibrator:
    """Logistic regression on named, standardised features of the scoring pass (module docstring)."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    intercept: float
    projections: tuple[Projection, ...] = ()
    kind: str = field(default="probe", init=False)

    @property
    def needs_t_star(self) -> bool:
        """Whether it reads ``TStarFeatures`` (per-layer SemGrad or the vectors at t*)."""
        return bool(self.projections) or any("@" in f for f in self.features)

    def inputs(self, scalars: dict[str, float], vectors: dict[str, list[float]]) -> list[float]:
        values = dict(scalars)
        for p in self.projections:
            if p.vector not in vectors:
                raise SemgradError(f"confidence probe: the answer has no {p.vector!r} (scored without its t* features)")
            values.update(p.apply(vectors[p.vector]))
        missing = [f for f in self.features if f not in values]
        if missing:
            raise SemgradError(f"confidence probe: the answer has no feature {missing[0]!r}")
        return [values[f] for f in self.features]

    def probability_of(self, scalars: dict[str, float], vectors: dict[str, list[float]]) -> float:
        x = self.inputs(scalars, vectors)
        terms = (w * (v - m) / s for v, m, s, w in zip(x, self.mean, self.scale, self.weights))
        return sigmoid(self.intercept + math.fsum(terms))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "features": list(self.features),
            "mean": list(self.mean),
            "scale": list(self.scale),
            "weights": list(self.weights),
            "intercept": self.intercept,
            "projections": [
                {"vector": p.vector, "mean": list(p.mean), "components": [list(c) for c in p.components]}
                for p in self.projections
            ],
        }


Calibrator = LogisticCalibrator | IsotonicCalibrator | ProbeCalibrator


def calibrator_from_dict(doc: dict[str, Any]) -> Calibrator:
    kind = doc.get("kind")
    if kind == "logistic":
        terms = tuple(tuple(int(i) for i in t) for t in doc["terms"])
        if any(not 0 <= i < len(FEATURES) for t in terms for i in t):
            raise ValueError(f"terms index features 0..{len(FEATURES) - 1}")
        fields = [tuple(float(v) for v in doc[k]) for k in ("mean", "scale", "weights")]
        if any(len(f) != len(terms) for f in fields) or 0.0 in fields[1]:
            raise ValueError("mean, scale and weights need one non-zero scale and one value per term")
        return LogisticCalibrator(terms, *fields, float(doc["intercept"]))
    if kind == "isotonic":
        tops = tuple(None if t is None else int(t) for t in doc["max_tokens"])
        xs = tuple(tuple(float(v) for v in xb) for xb in doc["x"])
        ys = tuple(tuple(float(v) for v in yb) for yb in doc["y"])
        if not tops or tops[-1] is not None or len(xs) != len(tops) or len(ys) != len(tops):
            raise ValueError("max_tokens must end with null, with one x and one y list per bucket")
        if any(len(xb) != len(yb) or not xb or list(xb) != sorted(xb) for xb, yb in zip(xs, ys)):
            raise ValueError("each bucket needs as many x as y values, x ascending")
        return IsotonicCalibrator(tops, xs, ys)
    if kind == "probe":
        names = tuple(str(f) for f in doc["features"])
        fields = [tuple(float(v) for v in doc[k]) for k in ("mean", "scale", "weights")]
        if any(len(f) != len(names) for f in fields) or 0.0 in fields[1]:
            raise ValueError("mean, scale and weights need one non-zero scale and one value per feature")
        projections = tuple(
            Projection(
                str(p["vector"]),
                tuple(float(v) for v in p["mean"]),
                tuple(tuple(float(v) for v in c) for c in p["components"]),
            )
            for p in doc.get("projections") or []
        )
        if any(len(c) != len(p.mean) for p in projections for c in p.components):
            raise ValueError("each projection's components need as many values as its mean")
        return ProbeCalibrator(names, *fields, float(doc["intercept"]), projections)
    raise ValueError(f"unknown calibrator kind {kind!r}")


@dataclass(frozen=True)
class OperatingPoint:
    """Flag an answer when its confidence is below ``min_confidence``; what that achieved on held-out folds."""

    min_confidence: float
    target: str  # "precision" or "recall" of flagging wrong answers
    target_value: float
    heldout: dict[str, Any]  # precision, recall, flagged, n, met: on out-of-fold confidences

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_confidence": self.min_confidence,
            "target": self.target,
            "target_value": self.target_value,
            **self.heldout,
        }


@dataclass(frozen=True)
class ConfidenceModel:
    """A fitted calibrator of one score, its operating point and how it was fitted."""

    score: str
    calibrator: Calibrator
    operating_point: OperatingPoint
    fitted: dict[str, Any] = field(default_factory=dict)
    claim_calibrator: ProbeCalibrator | None = None  # a probe's companion for claims (``CLAIM_FEATURES`` only)

    @property
    def needs_t_star(self) -> bool:
        """Whether answers must be scored with ``TStarFeatures`` for this model."""
        return isinstance(self.calibrator, ProbeCalibrator) and self.calibrator.needs_t_star

    def confidence(self, score: float, length: int, mean_entropy: float) -> float:
        """P(correct) under a version-1 calibrator, from the configured score, length (tokens, stop token not
        counted) and mean entropy; a probe needs more (``confidence_of``)."""
        if isinstance(self.calibrator, ProbeCalibrator):
            raise SemgradError("a confidence probe reads the whole scored answer: use confidence_of")
        return self.calibrator.probability(score, length, mean_entropy)

    def confidence_of(self, scores: dict[str, float], length: int, result: ScoreResult | None = None) -> float | None:
        """P(correct) of an answer (or claim) with these scores and length (tokens, stop token not counted); a probe
        reads the whole ``result`` of an answer, and a claim (no ``result``) goes to ``claim_calibrator`` (None
        without one)."""
        if not isinstance(self.calibrator, ProbeCalibrator):
            return self.confidence(scores[self.score], length, scores["mean_entropy"])
        if result is not None:
            return self.calibrator.probability_of(scalar_features(result), vector_features(result))
        if self.claim_calibrator is None:
            return None
        return self.claim_calibrator.probability_of(claim_features(scores, length), {})

    def flagged(self, confidence: float | None) -> bool | None:
        return None if confidence is None else confidence < self.operating_point.min_confidence

    def to_dict(self) -> dict[str, Any]:
        version = 2 if isinstance(self.calibrator, ProbeCalibrator) else 1
        doc = {
            "version": version,
            "score": self.score,
            "calibrator": self.calibrator.to_dict(),
            "operating_point": self.operating_point.to_dict(),
            "fitted": self.fitted,
        }
        if self.claim_calibrator is not None:
            doc["claim_calibrator"] = self.claim_calibrator.to_dict()
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any], source: str = "profile") -> "ConfidenceModel":
        if not isinstance(doc, dict) or doc.get("version") not in VERSIONS:
            raise SemgradError(
                f"{source}: its confidence model is not of version {' or '.join(map(str, VERSIONS))}; "
                "refit it with `semgrad-serve eval`"
            )
        try:
            op = dict(doc["operating_point"])
            point = OperatingPoint(
                float(op.pop("min_confidence")), str(op.pop("target")), float(op.pop("target_value")), op
            )
            claims = doc.get("claim_calibrator")
            claim_calibrator = None if claims is None else calibrator_from_dict(claims)
            if claim_calibrator is not None and not isinstance(claim_calibrator, ProbeCalibrator):
                raise ValueError("claim_calibrator must be a probe")
            fitted = dict(doc.get("fitted") or {})
            return cls(str(doc["score"]), calibrator_from_dict(doc["calibrator"]), point, fitted, claim_calibrator)
        except (KeyError, TypeError, ValueError) as exc:
            raise SemgradError(f"{source}: not a valid confidence model ({exc.__class__.__name__}: {exc})") from None

"""A version-2 confidence probe (``scoring/confidence.py``) applied by hand with numpy, from an answer's raw numbers:
the reference that the confidences of ``Scorer.report``, ``score``, ``ask`` and the server are checked against."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def answer_features(
    semgrad: float,
    paragrad: float,
    hybridgrad: float,
    length: int,
    logprobs: Sequence[float],
    entropies: Sequence[float],
) -> dict[str, float]:
    """The probe's scalar features of an answer (``length``: tokens, the stop token not counted), from the docs'
    definitions: ln of the scores and length, mean / max / quartiles of token entropy and NLL."""
    nll, ent = -np.asarray(logprobs, float), np.asarray(entropies, float)
    out = {
        "ln semgrad": np.log(semgrad),
        "ln paragrad": np.log(paragrad),
        "ln hybridgrad": np.log(hybridgrad),
        "ln answer tokens": np.log(max(length, 1)),
    }
    for name, v in (("entropy", ent), ("nll", nll)):
        out[f"mean {name}"], out[f"max {name}"] = v.mean(), v.max()
        out.update({f"{name} q{q}": np.quantile(v, q / 100) for q in (25, 50, 75)})
    return {k: float(v) for k, v in out.items()}


def row_features(row: dict[str, Any]) -> dict[str, float]:
    """``answer_features`` of a scored answer's report (``Scorer.report`` or a line of ``score``'s output)."""
    return answer_features(
        row["semgrad"],
        row["paragrad"],
        row["hybridgrad"],
        row["answer_tokens"] - row["stop_token"],
        row["token_logprobs"],
        row["token_entropies"],
    )


def claim_row_features(claim: dict[str, Any], length: int) -> dict[str, float]:
    """What a claim has (its scores, length and mean entropy)."""
    return {
        "ln semgrad": float(np.log(claim["semgrad"])),
        "ln paragrad": float(np.log(claim["paragrad"])),
        "ln hybridgrad": float(np.log(claim["hybridgrad"])),
        "ln answer tokens": float(np.log(max(length, 1))),
        "mean entropy": float(claim["mean_entropy"]),
    }


def t_star_features(row: dict[str, Any]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """A report's per-band-layer ln SemGrad and its vectors at t* (the gradient scaled to mean |·| = 1, the hidden
    state to root-mean-square 1), from its ``t_star_features``."""
    f = row["t_star_features"]
    layers = {f"ln semgrad @{row['band'][0] + i}": float(np.log(v)) for i, v in enumerate(f["semgrad_layers"])}
    g, h = np.asarray(f["gradient"], float), np.asarray(f["hidden"], float)
    return layers, {"t* gradient": g / np.abs(g).mean(), "t* hidden": h / np.sqrt(np.mean(h * h))}


def probe_confidence(probe: Any, features: dict[str, float], vectors: dict[str, np.ndarray] | None = None) -> float:
    """σ(intercept + Σ weights · (x − mean) / scale), the projections of ``vectors`` on the probe's components
    (``"<vector> pc<j>"``) among the features."""
    features = dict(features)
    for p in probe.projections:
        centred = np.asarray(vectors[p.vector]) - np.array(p.mean)
        features.update({f"{p.vector} pc{j}": float(np.dot(c, centred)) for j, c in enumerate(np.array(p.components))})
    x = np.array([features[f] for f in probe.features])
    z = probe.intercept + np.sum(np.array(probe.weights) * (x - np.array(probe.mean)) / np.array(probe.scale))
    return float(1 / (1 + np.exp(-z)))

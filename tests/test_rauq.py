"""RAUQ's recurrence, head choice and layer maximum against hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from semgrad_serve.evaluation.rauq import layer_uncertainty, middle_layers, rauq_from_attentions


def test_recurrence_by_hand() -> None:
    p, a, alpha = np.array([0.5, 0.2, 0.9]), np.array([0.0, 0.6, 0.1]), 0.2
    c1 = 0.5
    c2 = alpha * 0.2 + (1 - alpha) * 0.6 * c1
    c3 = alpha * 0.9 + (1 - alpha) * 0.1 * c2
    expected = -(math.log(c1) + math.log(c2) + math.log(c3)) / 3
    assert layer_uncertainty(p, a, alpha) == pytest.approx(expected, rel=1e-12)
    assert layer_uncertainty(np.array([0.25]), np.array([0.0])) == pytest.approx(math.log(4), rel=1e-12)


def test_head_with_most_attention_to_the_previous_token_and_the_layer_maximum() -> None:
    n = 3
    probs = np.array([0.6, 0.3, 0.5])
    quiet = np.full((n, n), 1 / n)
    diagonal = np.eye(n, k=-1) * 0.9 + 0.05  # head 1 attends mostly to the previous token
    layers = [np.stack([quiet, diagonal]) for _ in range(6)]
    layers[3] = np.stack([diagonal * 0.5, quiet])  # a middle layer where head 0 wins, with weaker attention
    assert list(middle_layers(6)) == [2, 3]
    per_layer = [layer_uncertainty(probs, np.r_[0.0, 0.95, 0.95]), layer_uncertainty(probs, np.r_[0.0, 0.475, 0.475])]
    assert rauq_from_attentions(probs, layers) == pytest.approx(max(per_layer), rel=1e-12)
    assert per_layer[1] > per_layer[0]  # less attention carried over: less confidence, more uncertainty


def test_probe_feature_quantiles_match_numpy() -> None:
    from semgrad_serve.scoring.probe_features import quantile

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 10):
        v = rng.normal(size=n).tolist()
        for q in (0.25, 0.5, 0.75):
            assert quantile(v, q) == pytest.approx(float(np.quantile(v, q)), rel=1e-12, abs=1e-15)

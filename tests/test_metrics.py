"""AUROC, AUPRC, PRR and flag thresholds against brute-force computations from their definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from semgrad_serve.errors import SemgradError
from semgrad_serve.evaluation import metrics


def random_case(seed: int, n: int, levels: int):
    """Scores with many ties (``levels`` distinct values) and labels with both classes."""
    rng = np.random.default_rng(seed)
    while True:
        wrong = rng.random(n) < 0.45
        if 0 < wrong.sum() < n:
            break
    scores = rng.integers(0, levels, n) + 0.7 * wrong  # informative but imperfect
    return scores.astype(float), wrong


def brute_auroc(scores, wrong) -> float:
    """Mann–Whitney U by counting every (wrong, correct) pair: 1 if the wrong one scores higher, ½ on a tie."""
    pos = [s for s, w in zip(scores, wrong) if w]
    neg = [s for s, w in zip(scores, wrong) if not w]
    u = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return u / (len(pos) * len(neg))


def brute_auprc(scores, wrong) -> float:
    """Σ (R_k − R_{k−1}) P_k over the distinct thresholds, flagging score ≥ threshold."""
    total, prev_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        flagged = [w for s, w in zip(scores, wrong) if s >= t]
        tp = sum(flagged)
        recall = tp / sum(wrong)
        total += (recall - prev_recall) * tp / len(flagged)
        prev_recall = recall
    return total


def rejection_auc(order, quality) -> float:
    """Mean over k = 0..n−1 of the mean quality of the answers left after rejecting the first k of ``order``."""
    n = len(order)
    return sum(sum(quality[i] for i in order[k:]) / (n - k) for k in range(n)) / n


def brute_prr(scores, wrong) -> float:
    """PRR with the score's rejection AUC averaged over every order of tied scores (all permutations)."""
    quality = [0.0 if w else 1.0 for w in wrong]
    n = len(scores)
    aucs = [
        rejection_auc(p, quality)
        for p in itertools.permutations(range(n))
        if all(scores[p[i]] >= scores[p[i + 1]] for i in range(n - 1))
    ]
    auc = sum(aucs) / len(aucs)
    oracle = rejection_auc(sorted(range(n), key=lambda i: quality[i]), quality)
    random = sum(quality) / n
    return (auc - random) / (oracle - random)


@pytest.mark.parametrize("seed", range(12))
def test_auroc_and_auprc_match_brute_force(seed):
    scores, wrong = random_case(seed, n=25 + seed, levels=4)
    assert metrics.auroc(scores, wrong) == pytest.approx(brute_auroc(scores, wrong), abs=1e-12)
    assert metrics.auprc(scores, wrong) == pytest.approx(brute_auprc(scores, wrong), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_prr_matches_brute_force_over_tie_orders(seed):
    scores, wrong = random_case(100 + seed, n=7, levels=3)
    assert metrics.prr(scores, wrong) == pytest.approx(brute_prr(list(scores), list(wrong)), abs=1e-12)


def test_roc_curve_area_is_auroc():
    scores, wrong = random_case(7, n=60, levels=5)
    fpr, tpr, thresholds = metrics.roc_curve(scores, wrong)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and thresholds[0] == np.inf
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids: a tie segment counts ½
    assert area == pytest.approx(metrics.auroc(scores, wrong), abs=1e-12)


def test_extremes():
    wrong = np.array([1, 1, 0, 0, 0, 1, 0], dtype=bool)
    perfect = wrong + 0.1 * np.arange(7)
    assert (
        metrics.auroc(perfect, wrong) == 1
        and metrics.auprc(perfect, wrong) == 1
        and metrics.prr(perfect, wrong) == pytest.approx(1)
    )
    assert metrics.auroc(-perfect, wrong) == 0 and metrics.prr(-perfect, wrong) < -1 + 0.2
    flat = np.zeros(7)
    assert metrics.auroc(flat, wrong) == 0.5 and metrics.prr(flat, wrong) == pytest.approx(0, abs=1e-12)
    assert metrics.auprc(flat, wrong) == pytest.approx(wrong.mean())
    assert math.isnan(metrics.auroc([1.0, 2.0], [1, 1])) and math.isnan(metrics.prr([1.0, 2.0], [0, 0]))
    with pytest.raises(SemgradError, match="scores must be finite"):
        metrics.auroc([1.0, float("nan")], [0, 1])


@pytest.mark.parametrize(
    "kind,value", [("recall", 0.5), ("recall", 0.9), ("recall", 1.0), ("precision", 0.6), ("precision", 0.75)]
)
def test_choose_threshold_is_the_best_rule_meeting_the_target(kind, value):
    scores, wrong = random_case(11, n=80, levels=8)
    got = metrics.choose_threshold(scores, wrong, kind, value)
    flags = scores > got.threshold
    precision, recall = wrong[flags].mean(), wrong[flags].sum() / wrong.sum()
    assert got.met and got.flagged == flags.sum()
    assert got.precision == pytest.approx(precision) and got.recall == pytest.approx(recall)
    # brute force over every distinct rule "score > t": recall → highest t meeting it; precision → most flags
    # meeting it
    rules = []
    for t in sorted(set(scores)):
        for cut in (t - 1e-9,):
            f = scores > cut
            p, r = wrong[f].mean(), wrong[f].sum() / wrong.sum()
            rules.append((cut, f.sum(), p, r))
    if kind == "recall":
        best = max((c for c, _, _, r in rules if r >= value), key=lambda c: c)
        assert flags.sum() == (scores > best).sum()
    else:
        best = max((n for _, n, p, _ in rules if p >= value))
        assert flags.sum() == best


def test_unreachable_precision_is_reported():
    scores, wrong = np.arange(10.0), np.array([1, 0] * 5, dtype=bool)  # the highest score is a correct answer
    got = metrics.choose_threshold(scores, wrong, "precision", 0.9)
    assert not got.met and got.precision == 0.5 and got.flagged >= 1


def test_parse_target():
    assert metrics.parse_target("precision:0.9") == ("precision", 0.9)
    assert metrics.parse_target("Recall=0.5") == ("recall", 0.5)
    for bad, message in (
        ("f1:0.5", "with 0 < VALUE ≤ 1"),
        ("recall:2", "with 0 < VALUE ≤ 1"),
        ("recall", "write precision:VALUE or recall:VALUE$"),
        ("recall:x", "'x' is not a number"),
    ):
        with pytest.raises(SemgradError, match=f"flag target '{bad}': .*{message}"):
            metrics.parse_target(bad)

"""Calibrated confidence: fitting against independent computations, applying, the profile's JSON, the flag, the
metrics of the evaluation's confidence section, and ``eval --from-items`` end to end on made-up answers."""

from __future__ import annotations

import gzip
import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from semgrad_serve.cli import main
from semgrad_serve.errors import SemgradError
from semgrad_serve.evaluation import metrics
from semgrad_serve.evaluation.calibration_metrics import (
    brier,
    expected_calibration_error,
    flag_quality,
    in_stratum,
    reliability_bins,
)
from semgrad_serve.evaluation.confidence_fit import (
    Answers,
    fit_confidence,
    fit_isotonic,
    fit_logistic,
    isotonic_decreasing,
    stratified_folds,
)
from semgrad_serve.evaluation.confidence_report import analyse
from semgrad_serve.scoring.confidence import IsotonicCalibrator, features
from semgrad_serve.scoring.profiles import ModelProfile, TStarRule


def answers(score, length, entropy, correct, group=None) -> Answers:
    n = len(correct)
    return Answers(np.asarray(score, float), np.asarray(length), np.asarray(entropy, float), np.asarray(correct, bool),
                   np.asarray(group if group is not None else ["d"] * n))


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


# -- fitting ---------------------------------------------------------------------------------------


def test_logistic_fit_on_one_binary_feature_is_each_groups_share() -> None:
    """Unpenalised, one binary feature: the maximum-likelihood fit gives each group its share correct (by hand:
    3 of 10 and 8 of 10), whatever the standardisation."""
    score = [1.0] * 10 + [math.e] * 10  # ln score 0 or 1
    correct = [1] * 3 + [0] * 7 + [1] * 8 + [0] * 2
    a = answers(score, [5] * 20, [1.0] * 20, correct)
    cal = fit_logistic(a.features(), a.correct, ((0,),), l2=0.0)
    assert cal.probability(1.0, 5, 1.0) == pytest.approx(0.3, abs=1e-9)
    assert cal.probability(math.e, 5, 1.0) == pytest.approx(0.8, abs=1e-9)
    # the intercept and weight by hand: logit(0.3) at x = 0, logit(0.8) − logit(0.3) per unit of x
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    w = cal.weights[0] / cal.scale[0]
    assert w == pytest.approx(logit(0.8) - logit(0.3), abs=1e-8)
    assert cal.intercept - w * cal.mean[0] == pytest.approx(logit(0.3), abs=1e-8)


def test_logistic_fit_recovers_known_probabilities() -> None:
    """Synthetic answers drawn with known P(correct) = σ(1 − 1.5·(ln s + 10) + 0.8·ln n − 1.2·ln h)."""
    rng = np.random.default_rng(0)
    n = 20000
    ln_s, ln_n, ln_h = rng.normal(-10, 1, n), np.log(rng.integers(1, 60, n)), rng.normal(0.5, 0.4, n)
    truth = sigmoid(1 - 1.5 * (ln_s + 10) + 0.8 * ln_n - 1.2 * ln_h)
    a = answers(np.exp(ln_s), np.round(np.exp(ln_n)).astype(int), np.exp(ln_h), rng.random(n) < truth)
    cal = fit_logistic(a.features(), a.correct, ((0,), (1,), (2,)))
    got = np.array([cal.probability(s, k, h) for s, k, h in zip(a.score, a.length, a.entropy)])
    assert np.max(np.abs(got - truth)) < 0.03
    assert expected_calibration_error(got, a.correct) < 0.02


def test_isotonic_by_hand_and_monotone() -> None:
    # non-increasing fit of 0, 1, 1, 0, 0: the first three pool to 2/3
    xs, ys = isotonic_decreasing(np.array([1.0, 2, 3, 4, 5]), np.array([0.0, 1, 1, 0, 0]))
    assert xs == [1, 3, 4, 5] and ys == pytest.approx([2 / 3, 2 / 3, 0, 0])
    # tied x values are pooled before the blocks
    xs, ys = isotonic_decreasing(np.array([1.0, 1, 2]), np.array([1.0, 0, 1]))
    assert xs == [1, 2] and ys == pytest.approx([2 / 3, 2 / 3])
    rng = np.random.default_rng(1)
    n = 600
    score = np.exp(rng.normal(-10, 1, n))
    length = rng.integers(1, 40, n)
    a = answers(score, length, np.ones(n), rng.random(n) < sigmoid(-np.log(score) - 10))
    cal = fit_isotonic(a)
    grid = np.exp(np.linspace(-14, -6, 200))
    for k in (2, 6, 15, 30):
        p = [cal.probability(s, k, 1.0) for s in grid]
        assert all(b <= c + 1e-12 for b, c in zip(p[1:], p[:-1])) and 0 <= min(p) <= max(p) <= 1


def test_isotonic_fit_minimises_squared_error_among_monotone_fits() -> None:
    """Against brute force: over all non-increasing step values on a 0/⅓/½/⅔/1 grid, none fits 8 points better."""
    x = np.arange(8.0)
    y = np.array([1, 0, 1, 1, 0, 1, 0, 0], float)
    kx, ky = isotonic_decreasing(x, y)
    fit = np.interp(x, kx, ky)
    best = min(np.sum((np.array(v) - y) ** 2) for v in itertools.product((0, 1 / 3, 0.5, 2 / 3, 1), repeat=8)
               if all(a >= b for a, b in zip(v, v[1:])))
    assert np.sum((fit - y) ** 2) <= best + 1e-12


def test_folds_are_stratified_and_fixed() -> None:
    groups = np.array(["a"] * 23 + ["b"] * 7)
    fold = stratified_folds(groups, k=5, seed=0)
    assert np.array_equal(fold, stratified_folds(groups, k=5, seed=0))
    for g in ("a", "b"):
        counts = np.bincount(fold[groups == g], minlength=5)
        assert counts.max() - counts.min() <= 1


def synthetic(n: int = 900, seed: int = 2) -> Answers:
    rng = np.random.default_rng(seed)
    ln_s = rng.normal(-10, 1, n)
    length = rng.integers(1, 50, n)
    entropy = np.exp(rng.normal(0.5, 0.4, n))
    truth = sigmoid(-1.5 - 1.2 * (ln_s + 10) - 0.8 * np.log(entropy))
    return answers(np.exp(ln_s), length, entropy, rng.random(n) < truth, np.where(rng.random(n) < 0.5, "x", "y"))


def test_fit_confidence_operating_point_and_held_out_flags() -> None:
    a = synthetic()
    got = fit_confidence(a, "hybridgrad", "precision", 0.9, {"note": "test"})
    op = got.model.operating_point
    flagged = got.heldout < op.min_confidence
    quality = flag_quality(flagged, ~a.correct)
    assert op.heldout["met"] and quality["precision"] >= 0.9 and quality["precision"] == pytest.approx(op.heldout["precision"])
    assert quality["flagged"] == op.heldout["flagged"] and quality["recall"] == pytest.approx(op.heldout["recall"])
    # the largest such cut: flagging the next answer up would break the target
    nxt = np.min(got.heldout[~flagged])
    assert flag_quality(got.heldout <= nxt, ~a.correct)["precision"] < 0.9
    assert got.model.fitted["calibrator"] == min(got.cv_brier, key=got.cv_brier.get) and got.model.fitted["note"] == "test"
    assert np.array_equal(got.heldout, fit_confidence(a, "hybridgrad", "precision", 0.9, {}).heldout)  # fixed seeds
    with pytest.raises(SemgradError, match="at least 10 correct"):
        fit_confidence(a.take(np.arange(15)), "hybridgrad", "precision", 0.9, {})


# -- the profile -----------------------------------------------------------------------------------


def test_profile_round_trip_with_each_calibrator(tmp_path) -> None:
    a = synthetic(300)
    base = ModelProfile("m", TStarRule("<|x|>"), score="hybridgrad", threshold=1e-4)
    for fit in (lambda: fit_logistic(a.features(), a.correct, ((0,), (1,), (0, 2))), lambda: fit_isotonic(a)):
        model = replace(fit_confidence(a, "hybridgrad", "recall", 0.5, {"d": 1}).model, calibrator=fit())
        profile = replace(base, confidence=model)
        profile.save(tmp_path / "p.json")
        back = ModelProfile.load(tmp_path / "p.json")
        assert back == profile
        assert back.confidence.confidence(3e-5, 7, 1.1) == model.confidence(3e-5, 7, 1.1)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d["confidence"].update(version=2), "not version 1"),
        (lambda d: d["confidence"].update(score="paragrad"), "fitted on 'paragrad'"),
        (lambda d: d["confidence"]["calibrator"].update(kind="forest"), "unknown calibrator kind"),
        (lambda d: d["confidence"]["calibrator"].update(weights=[1.0]), "one value per term"),
    ],
)
def test_bad_confidence_models_are_one_line_errors(tmp_path, default_scorer, change, message) -> None:
    doc = json.loads(default_scorer.profile.to_json())
    change(doc)
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(SemgradError, match=message):
        ModelProfile.load(tmp_path / "p.json")


def test_report_carries_the_calibrated_confidence_and_its_flag(default_scorer) -> None:
    scorer = default_scorer
    model = scorer.profile.confidence
    assert model is not None  # the built-in profile of the default model is calibrated
    prompt = scorer.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    results = scorer.score([(prompt, scorer.answer_ids(a)) for a in ("Paris.", "Berlin", "I think it is Lyon, in the south.")])
    for r in results:
        report = scorer.report(r)
        assert report["hybridgrad"] == r.hybridgrad and report["score"] == r.hybridgrad  # raw scores unchanged
        assert report["confidence"] == model.confidence(r.hybridgrad, r.answer_tokens - 1, r.mean_entropy)
        assert report["confidence"] == model.calibrator.probability(r.hybridgrad, r.answer_tokens - 1, r.mean_entropy)
        assert report["flagged"] is (report["confidence"] < report["min_confidence"])
    # a flag at the operating point: nudge the cut around one answer's confidence
    p = scorer.profile.assess(results[0].scores(), 2)["confidence"]
    for cut, expected in ((p + 1e-9, True), (p, False)):
        op = replace(model.operating_point, min_confidence=cut)
        profile = replace(scorer.profile, confidence=replace(model, operating_point=op))
        assert profile.assess(results[0].scores(), 2)["flagged"] is expected


def test_a_profile_without_a_calibrator_keeps_the_threshold_flag(default_scorer) -> None:
    scores = {"hybridgrad": 2e-4, "mean_entropy": 1.0}
    old = replace(default_scorer.profile, confidence=None, threshold=1e-4)
    assert old.assess(scores, 5) == {"score": 2e-4, "threshold": 1e-4, "confidence": None, "min_confidence": None, "flagged": True}
    assert replace(old, threshold=None).assess(scores, 5)["flagged"] is None


def test_features_are_the_logs_with_floors() -> None:
    assert features(math.e, 1, 1.0) == (1.0, 0.0, 0.0)
    assert features(0.0, 0, 0.0) == (math.log(1e-30), 0.0, math.log(1e-6))
    iso = IsotonicCalibrator((3, None), ((0.0, 1.0), (0.0,)), ((0.9, 0.1), (0.4,)))
    assert iso.probability(math.exp(0.25), 2, 1.0) == pytest.approx(0.7) and iso.probability(1e-9, 2, 1.0) == 0.9
    assert iso.probability(5.0, 3, 1.0) == 0.1 and iso.probability(5.0, 4, 1.0) == 0.4


# -- the metrics of the confidence section ---------------------------------------------------------


def test_brier_ece_and_bins_by_hand() -> None:
    p = [0.05, 0.15, 0.15, 0.95]
    y = [0, 1, 0, 1]
    assert brier(p, y) == pytest.approx((0.05**2 + 0.85**2 + 0.15**2 + 0.05**2) / 4)
    bins = reliability_bins(p, y)
    assert [(b["n"], b["accuracy"]) for b in bins] == [(1, 0.0), (2, 0.5), (1, 1.0)]
    # |0 − 0.05|·¼ + |0.5 − 0.15|·½ + |1 − 0.95|·¼
    assert expected_calibration_error(p, y) == pytest.approx(0.05 / 4 + 0.35 / 2 + 0.05 / 4)
    assert reliability_bins([1.0], [1])[0]["low"] == 0.9  # 1.0 falls in the last bin
    with pytest.raises(SemgradError, match=r"\[0, 1\]"):
        brier([1.2], [1])


def brute_auroc(scores, wrong) -> float:
    pos = [s for s, w in zip(scores, wrong) if w]
    neg = [s for s, w in zip(scores, wrong) if not w]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def test_analysis_auroc_within_strata_and_flags_match_direct_computations() -> None:
    a = synthetic(400, seed=5)
    fitted = fit_confidence(a, "hybridgrad", "precision", 0.9, {})
    raw = {"hybridgrad": a.score, "mean_entropy": a.entropy}
    out = analyse(a, raw, fitted)
    wrong = ~a.correct
    for name in ("x", "pooled"):
        g = out["groups"][name]
        base = np.ones(len(a), bool) if name == "pooled" else a.group == name
        for label, stratum in (("1-3", (1, 3)), ("9-20", (9, 20)), ("21+", (21, None))):
            m = base & in_stratum(a.length, stratum)
            assert g["auroc"]["hybridgrad"][label] == pytest.approx(brute_auroc(a.score[m], wrong[m]))
            assert g["auroc"]["confidence"][label] == pytest.approx(brute_auroc(1 - fitted.heldout[m], wrong[m]))
            f = fitted.heldout[m] < fitted.model.operating_point.min_confidence
            assert g["flags"][label]["flagged"] == f.sum() and g["flags"][label]["precision"] == pytest.approx((f & wrong[m]).sum() / f.sum())
        assert g["brier"] == pytest.approx(np.mean((fitted.heldout[base] - a.correct[base]) ** 2))
        assert g["auroc"]["mean_entropy"]["all"] == pytest.approx(metrics.auroc(a.entropy[base], wrong[base]))


# -- eval --from-items -----------------------------------------------------------------------------


def test_eval_from_items_refits_without_generating(tmp_path, data_dir) -> None:
    """Made-up answers to the first 120 SciQ questions (the gold answer or a wrong one) with scores that lean
    towards the truth: re-judged, measured, fitted and written without a model run."""
    rows = [json.loads(line) for line in open(data_dir / "sciq" / "test.jsonl")][:120]
    data = tmp_path / "sciq"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rng = np.random.default_rng(3)
    items = []
    for i, row in enumerate(rows):
        correct = i % 3 == 0
        answer = f"It is {row['truthful answer'][0]}." if correct else "It is a banana."
        score = float(np.exp(rng.normal(-10.5 if correct else -9.5, 0.8)))
        entropy = float(np.exp(rng.normal(0.2 if correct else 0.6, 0.3)))
        length = int(rng.integers(1, 30))
        items.append({"dataset": "sciq", "index": i, "answer": answer, "token_ids": [1] * length + [2], "answer_tokens": length,
                      "ended_on_eos": True, "correct": {}, "similarity": {},
                      "scores": {"semgrad": score, "paragrad": score, "hybridgrad": score, "mean_entropy": entropy, "p_true": None}})
    path = tmp_path / "run_items.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(i) + "\n" for i in items)
    out = tmp_path / "out"
    assert main(["eval", "--dataset", str(data / "test.jsonl"), "--from-items", str(path), "--out", str(out), "--prefix", "e"]) == 0
    report = json.loads((out / "e.json").read_text())
    assert report["config"]["from_items"] == str(path) and report["judge"]["name"] == "reference"
    assert report["datasets"]["sciq"]["accuracy"]["reference"] == pytest.approx(40 / 120)
    profile = ModelProfile.load(out / "e_profile.json")
    assert profile.confidence is not None and profile.confidence.fitted["answers"] == 120
    assert report["confidence"]["groups"]["sciq"]["auroc"]["confidence"]["all"] > 0.7
    text = (out / "e.md").read_text()
    assert "## Calibrated confidence" in text and "| **Calibrated confidence (held-out)** |" in text
    assert (out / "e_reliability.png").stat().st_size > 10_000 and (out / "e_roc.png").is_file()
    again = [json.loads(line) for line in gzip.open(out / "e_items.jsonl.gz", "rt")]
    assert [i["token_ids"] for i in again] == [i["token_ids"] for i in items] and again[0]["correct"]["reference"] is True
    # the items must cover the datasets given
    assert main(["eval", "--dataset", str(data_dir / "sciq" / "test.jsonl"), "--from-items", str(path), "--out", str(out)]) == 2

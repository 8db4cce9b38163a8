"""Calibrated confidence: fitting against independent computations, applying, the profile's JSON, the flag, the
metrics of the evaluation's confidence section, and ``eval --from-items`` end to end on made-up answers."""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from semgrad_serve.cli import main
from semgrad_serve.errors import SemgradError
from semgrad_serve.evaluation.calibration_metrics import (
    brier,
    expected_calibration_error,
    flag_quality,
    in_stratum,
    reliability_bins,
)
from semgrad_serve.evaluation.confidence_fit import (
    CANDIDATES,
    Answers,
    Candidate,
    fit_confidence,
    fit_probe,
    folds,
    group_weights,
    predict,
    transfer,
)
from semgrad_serve.evaluation.confidence_report import analyse
from semgrad_serve.scoring.confidence import IsotonicCalibrator, ProbeCalibrator, features
from semgrad_serve.scoring.profiles import ModelProfile, TStarRule

from probe_by_hand import probe_confidence, row_features

NAMES = ("ln hybridgrad", "ln answer tokens", "mean entropy", "ln semgrad", "ln paragrad")


def answers(score, length, entropy, correct, group=None, vectors=None) -> Answers:
    """Answers whose SemGrad and ParaGrad are made from the score and entropy (every claim feature present)."""
    n = len(correct)
    ln_s, h = np.log(np.asarray(score, float)), np.asarray(entropy, float)
    x = np.stack([ln_s, np.log(np.maximum(np.asarray(length), 1)), h, ln_s - 0.5, ln_s + 0.3 * h], axis=1)
    return Answers(
        x,
        NAMES,
        vectors or {},
        np.asarray(length),
        np.asarray(correct, bool),
        np.asarray(group if group is not None else ["d"] * n),
    )


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


# -- fitting ---------------------------------------------------------------------------------------


def test_unpenalised_probe_on_one_binary_feature_is_each_groups_share() -> None:
    """One binary feature, (almost) no penalty: the maximum-likelihood fit gives each group its share correct (by
    hand: 3 of 10 and 8 of 10), whatever the standardisation."""
    score = [1.0] * 10 + [math.e] * 10  # ln score 0 or 1
    correct = [1] * 3 + [0] * 7 + [1] * 8 + [0] * 2
    a = answers(score, [5] * 20, [1.0] * 20, correct)
    probe = fit_probe(Candidate(("ln hybridgrad",), 0, 1e8), a)
    assert predict(probe, a)[[0, 10]] == pytest.approx([0.3, 0.8], abs=1e-4)


def test_each_dataset_weighs_the_same() -> None:
    """A feature that says nothing: the fit is the mean of the datasets' shares correct (0.9 of 900 answers and
    0.2 of 100: ½(0.9 + 0.2) = 0.55), not the pooled share (0.83)."""
    correct = [1] * 810 + [0] * 90 + [1] * 20 + [0] * 80
    group = ["big"] * 900 + ["small"] * 100
    a = answers([1.0] * 1000, [5] * 1000, [1.0] * 1000, correct, group)
    w = group_weights(a.group)
    assert w.sum() == pytest.approx(1000) and w[0] * 900 == pytest.approx(w[-1] * 100)
    probe = fit_probe(Candidate(("ln hybridgrad",), 0, 1.0), a)
    assert predict(probe, a) == pytest.approx(np.full(1000, 0.55), abs=1e-4)


def test_probe_recovers_known_probabilities() -> None:
    """Synthetic answers drawn with known P(correct) = σ(1 − 1.5·(ln s + 10) + 0.8·ln n − 1.2·h)."""
    rng = np.random.default_rng(0)
    n = 20000
    ln_s, ln_n, h = rng.normal(-10, 1, n), np.log(rng.integers(1, 60, n)), rng.normal(0.5, 0.4, n)
    truth = sigmoid(1 - 1.5 * (ln_s + 10) + 0.8 * ln_n - 1.2 * h)
    a = answers(np.exp(ln_s), np.round(np.exp(ln_n)).astype(int), h, rng.random(n) < truth)
    got = predict(fit_probe(Candidate(None, 0, 1.0), a), a)
    assert np.max(np.abs(got - truth)) < 0.03
    assert expected_calibration_error(got, a.correct) < 0.02


def with_vectors(a: Answers, d: int = 12, seed: int = 4) -> Answers:
    """``a`` with two made-up vectors at t*, one of them carrying the truth along a direction."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(len(a), d)) + np.outer(a.correct - 0.5, np.linspace(1, 2, d))
    return replace(a, vectors={"t* hidden": hidden, "t* gradient": rng.normal(size=(len(a), d))})


def test_projections_are_the_principal_axes_and_predict_matches_the_plain_python_probe() -> None:
    a = with_vectors(synthetic(400))
    probe = fit_probe(Candidate(None, 3, 0.1), a)
    assert [p.vector for p in probe.projections] == ["t* gradient", "t* hidden"]
    for p in probe.projections:
        v = a.vectors[p.vector]
        _, _, vt = np.linalg.svd(v - v.mean(0), full_matrices=False)  # principal axes by SVD, up to sign
        assert np.abs(np.abs(np.asarray(p.components) @ vt[:3].T) - np.eye(3)).max() < 1e-8
        assert np.asarray(p.mean) == pytest.approx(v.mean(0), abs=1e-12)
    got = predict(probe, a)
    for i in range(0, 400, 37):
        scalars = dict(zip(a.names, a.scalars[i]))
        plain = probe.probability_of(scalars, {k: v[i].tolist() for k, v in a.vectors.items()})
        assert plain == pytest.approx(got[i], abs=1e-12)
    with pytest.raises(SemgradError, match="has no 't\\* gradient'"):
        probe.probability_of(dict(zip(a.names, a.scalars[0])), {})


def test_folds_are_stratified_and_fixed() -> None:
    a = synthetic(300)
    first, again = folds(a), folds(a)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(first, again))
    assert np.array_equal(np.sort(np.concatenate([t for _, t in first])), np.arange(300))
    for g in ("x", "y"):
        for c in (False, True):
            counts = [np.sum((a.group[t] == g) & (a.correct[t] == c)) for _, t in first]
            assert max(counts) - min(counts) <= 1


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
    assert (
        op.heldout["met"]
        and quality["precision"] >= 0.9
        and quality["precision"] == pytest.approx(op.heldout["precision"])
    )
    assert quality["flagged"] == op.heldout["flagged"] and quality["recall"] == pytest.approx(op.heldout["recall"])
    for g in ("x", "y"):  # the target holds in each dataset on its own
        m = a.group == g
        assert flag_quality(flagged[m], ~a.correct[m])["precision"] >= 0.9
    # the largest such cut: flagging the next answer up would break the target in a dataset
    nxt = np.min(got.heldout[~flagged])
    after = [flag_quality(got.heldout[a.group == g] <= nxt, ~a.correct[a.group == g])["precision"] for g in ("x", "y")]
    assert min(after) < 0.9
    assert got.model.fitted["calibrator"] == min(got.cv_log_loss, key=got.cv_log_loss.get)
    assert got.model.fitted["note"] == "test"
    usable = {
        k for k, c in CANDIDATES.items() if c.components == 0 and (c.scalars is None or set(c.scalars) <= set(NAMES))
    }
    assert set(got.cv_log_loss) == usable
    assert np.array_equal(got.heldout, fit_confidence(a, "hybridgrad", "precision", 0.9, {}).heldout)  # fixed seeds
    with pytest.raises(SemgradError, match="at least 10 correct"):
        fit_confidence(a.take(np.arange(15)), "hybridgrad", "precision", 0.9, {})


def test_transfer_fits_on_one_dataset_only() -> None:
    """The confidences on y of the x→y transfer do not change when y's labels do."""
    a = synthetic(600)
    flipped = replace(a, correct=np.where(a.group == "y", ~a.correct, a.correct))
    t, u = transfer(a)["x→y"], transfer(flipped)["x→y"]
    assert np.array_equal(t["index"], np.flatnonzero(a.group == "y"))
    assert np.array_equal(t["confidence"], u["confidence"])
    assert set(transfer(a)) == {"x→y", "y→x"}


# -- the profile -----------------------------------------------------------------------------------


def test_profile_round_trip_with_each_calibrator(tmp_path) -> None:
    a = with_vectors(synthetic(300))
    base = ModelProfile("m", TStarRule("<|x|>"), score="hybridgrad", threshold=1e-4)
    fitted = fit_confidence(a, "hybridgrad", "recall", 0.5, {"d": 1}).model
    iso = IsotonicCalibrator((3, None), ((0.0, 1.0), (0.0,)), ((0.9, 0.1), (0.4,)))
    for model in (fitted, replace(fitted, calibrator=iso)):
        profile = replace(base, confidence=model)
        profile.save(tmp_path / "p.json")
        back = ModelProfile.load(tmp_path / "p.json")
        assert back == profile
        assert json.loads(profile.to_json())["confidence"]["version"] == (2 if model is fitted else 1)
    assert isinstance(fitted.calibrator, ProbeCalibrator) and fitted.needs_t_star
    # a claim (no whole result): the claims' probe on its scores, length and mean entropy
    claim = {"semgrad": 2e-5, "paragrad": 1e-4, "hybridgrad": 5e-5, "mean_entropy": 1.3}
    x = [math.log(2e-5), math.log(1e-4), math.log(5e-5), math.log(3), 1.3]
    c = fitted.claim_calibrator
    assert c.features == ("ln semgrad", "ln paragrad", "ln hybridgrad", "ln answer tokens", "mean entropy")
    z = c.intercept + sum(w * (v - m) / s for v, m, s, w in zip(x, c.mean, c.scale, c.weights))
    assert fitted.confidence_of(claim, 3) == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-12)
    assert replace(fitted, claim_calibrator=None).confidence_of(claim, 3) is None and fitted.flagged(None) is None


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d["confidence"].update(version=3), "not of version 1 or 2"),
        (lambda d: d["confidence"].update(score="paragrad"), "fitted on 'paragrad'"),
        (lambda d: d["confidence"]["calibrator"].update(kind="forest"), "unknown calibrator kind"),
        (lambda d: d["confidence"]["calibrator"].update(weights=[1.0]), "one value per feature"),
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
    results = scorer.score(
        [(prompt, scorer.answer_ids(a)) for a in ("Paris.", "Berlin", "I think it is Lyon, in the south.")]
    )
    assert isinstance(model.calibrator, ProbeCalibrator)  # the fitted probe (version 2)
    for r in results:
        report = scorer.report(r)
        assert report["hybridgrad"] == r.hybridgrad and report["score"] == r.hybridgrad  # raw scores unchanged
        # the probe applied by hand to the answer's scores, length (stop token not counted) and token statistics
        assert report["confidence"] == pytest.approx(probe_confidence(model.calibrator, row_features(report)), rel=1e-9)
        assert 0 < report["confidence"] < 1
        assert report["flagged"] is (report["confidence"] < report["min_confidence"])
    # a flag at the operating point: nudge the cut around one answer's confidence
    first = results[0]
    p = scorer.profile.assess(first.scores(), first.answer_tokens - 1, first)["confidence"]
    for cut, expected in ((p + 1e-9, True), (p, False)):
        op = replace(model.operating_point, min_confidence=cut)
        profile = replace(scorer.profile, confidence=replace(model, operating_point=op))
        assert profile.assess(first.scores(), first.answer_tokens - 1, first)["flagged"] is expected


def test_a_profile_without_a_calibrator_keeps_the_threshold_flag(default_scorer) -> None:
    scores = {"hybridgrad": 2e-4, "mean_entropy": 1.0}
    old = replace(default_scorer.profile, confidence=None, threshold=1e-4)
    assert old.assess(scores, 5) == {
        "score": 2e-4,
        "threshold": 1e-4,
        "confidence": None,
        "min_confidence": None,
        "flagged": True,
    }
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
    score, entropy = np.exp(a.column("ln hybridgrad")), a.column("mean entropy")
    raw = {"hybridgrad": score, "mean_entropy": entropy}
    out = analyse(a, raw, fitted)
    wrong = ~a.correct
    for name in ("x", "pooled"):
        g = out["groups"][name]
        base = np.ones(len(a), bool) if name == "pooled" else a.group == name
        for label, stratum in (("1-3", (1, 3)), ("9-20", (9, 20)), ("21+", (21, None))):
            m = base & in_stratum(a.length, stratum)
            assert g["auroc"]["hybridgrad"][label] == pytest.approx(brute_auroc(score[m], wrong[m]))
            assert g["auroc"]["confidence"][label] == pytest.approx(brute_auroc(1 - fitted.heldout[m], wrong[m]))
            f = fitted.heldout[m] < fitted.model.operating_point.min_confidence
            assert g["flags"][label]["flagged"] == f.sum() and g["flags"][label]["precision"] == pytest.approx(
                (f & wrong[m]).sum() / f.sum()
            )
        assert g["brier"] == pytest.approx(np.mean((fitted.heldout[base] - a.correct[base]) ** 2))
        assert g["auroc"]["mean_entropy"]["all"] == pytest.approx(brute_auroc(entropy[base], wrong[base]))
    for key, t in out["transfer"].items():
        src, dst = key.split("→")
        m = a.group == dst
        assert t["n"] == m.sum()
        assert t["auroc"]["confidence"] == pytest.approx(brute_auroc(1 - fitted.transfer[key]["confidence"], wrong[m]))


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
        items.append(
            {
                "dataset": "sciq",
                "index": i,
                "answer": answer,
                "token_ids": [1] * length + [2],
                "answer_tokens": length,
                "ended_on_eos": True,
                "correct": {},
                "similarity": {},
                "scores": {
                    "semgrad": score,
                    "paragrad": score,
                    "hybridgrad": score,
                    "mean_entropy": entropy,
                    "p_true": None,
                    "mean_nll": entropy / 2,
                    "max_nll": entropy,
                },
            }
        )
    path = tmp_path / "run_items.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(i) + "\n" for i in items)
    out = tmp_path / "out"
    assert (
        main(
            [
                "eval",
                "--dataset",
                str(data / "test.jsonl"),
                "--from-items",
                str(path),
                "--out",
                str(out),
                "--prefix",
                "e",
            ]
        )
        == 0
    )
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
    assert [i["token_ids"] for i in again] == [i["token_ids"] for i in items] and again[0]["correct"][
        "reference"
    ] is True
    held = [i["heldout_confidence"] for i in again]
    wrong = [not i["correct"]["reference"] for i in again]
    reported = report["confidence"]["groups"]["sciq"]["auroc"]["confidence"]["all"]
    assert brute_auroc([1 - c for c in held], wrong) == pytest.approx(reported, abs=1e-5)
    # the items must cover the datasets given
    assert (
        main(["eval", "--dataset", str(data_dir / "sciq" / "test.jsonl"), "--from-items", str(path), "--out", str(out)])
        == 2
    )

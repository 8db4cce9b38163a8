"""The evaluation's confidence section: the fitted confidence against every raw score, controlling for length.

Per dataset and pooled, on held-out confidences (nested cross-validation, ``confidence_fit.py``): AUROC of every
method and of the confidence overall and within answer-length strata, ECE and Brier score of the confidence (beside
the Brier score of always answering the base rate), the flag's precision and recall per stratum at the operating
point, and a reliability diagram. The raw methods need no fitting: their AUROCs use every answer of the group.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .calibration_metrics import (
    LENGTH_STRATA,
    brier,
    expected_calibration_error,
    flag_quality,
    in_stratum,
    reliability_bins,
    stratum_label,
)
from .confidence_fit import Answers, FittedConfidence
from .runs import DatasetRun

CONFIDENCE = ("confidence", "Calibrated confidence (held-out)", "ours")
POOLED = "pooled"
CELLS = ("all", *(stratum_label(s) for s in LENGTH_STRATA))


def _score_features(r: DatasetRun, i: int) -> dict[str, float]:
    """The probe's features that an answer's recorded scores give (``SCORE_FEATURES``), for answers recorded
    without the probe's own."""
    keys = ("semgrad", "paragrad", "hybridgrad", "mean_entropy", "mean_nll", "max_nll")
    s = {k: r.scores[k][i] for k in keys if k in r.scores}
    if len(s) < 6:
        return {}
    out = {f"ln {k}": math.log(max(s[k], 1e-30)) for k in ("semgrad", "paragrad", "hybridgrad")}
    return {
        **out,
        "ln answer tokens": math.log(max(1, r.answer_tokens[i])),
        "mean entropy": s["mean_entropy"],
        "mean nll": s["mean_nll"],
        "max nll": s["max_nll"],
    }


def answer_table(
    runs: list[DatasetRun], judge: str, methods: list[tuple[str, str, str]]
) -> tuple[Answers, dict[str, np.ndarray], list[np.ndarray]]:
    """The answers a confidence can be fitted on (scored, with every feature finite) as ``Answers`` grouped by
    dataset, every method's score of each of them (NaN where it has none) and, per run, the indices kept."""
    rows, raw, kept = [], {k: [] for k, _, _ in methods}, []
    for r in runs:
        keep = []
        for i in np.flatnonzero(r.kept()):
            f = (r.features[i] if r.features and r.features[i] else None) or _score_features(r, int(i))
            if f and all(math.isfinite(v) for v in f.values()):
                rows.append((f, r.vectors[i] if r.vectors else {}, r.answer_tokens[i], not r.wrong(judge)[i], r.name))
                keep.append(int(i))
        keep = np.asarray(keep, dtype=int)
        kept.append(keep)
        for k in raw:
            raw[k].append(np.asarray(r.scores.get(k, [math.nan] * r.n), dtype=np.float64)[keep])
    names = tuple(sorted(set.intersection(*(set(f) for f, *_ in rows)))) if rows else ()
    vectors = sorted(set.intersection(*(set(v) for _, v, *_ in rows))) if rows else []
    answers = Answers(
        np.array([[f[n] for n in names] for f, *_ in rows], dtype=np.float64).reshape(len(rows), len(names)),
        names,
        {v: np.array([vs[v] for _, vs, *_ in rows], dtype=np.float64) for v in vectors},
        np.array([n for _, _, n, _, _ in rows]),
        np.array([c for *_, c, _ in rows], dtype=bool),
        np.array([g for *_, g in rows]),
    )
    return answers, {k: np.concatenate(v) for k, v in raw.items()}, kept


def _auroc(scores: np.ndarray, wrong: np.ndarray) -> float:
    ok = np.isfinite(scores)
    return metrics.auroc(scores[ok], wrong[ok]) if ok.sum() >= 2 else math.nan


def analyse(answers: Answers, raw: dict[str, np.ndarray], fitted: FittedConfidence) -> dict[str, Any]:
    """Every figure of the section, JSON-ready (see the module docstring)."""
    conf = fitted.heldout
    wrong = ~answers.correct.astype(bool)
    op = fitted.model.operating_point
    flagged = conf < op.min_confidence
    groups: dict[str, Any] = {}
    for name in [*dict.fromkeys(answers.group.tolist()), POOLED]:
        g = np.ones(len(answers), bool) if name == POOLED else answers.group == name
        cells = {"all": g, **{stratum_label(s): g & in_stratum(answers.length, s) for s in LENGTH_STRATA}}
        groups[name] = {
            "n": int(g.sum()),
            "accuracy": float(answers.correct[g].mean()),
            "ece": expected_calibration_error(conf[g], answers.correct[g]),
            "brier": brier(conf[g], answers.correct[g]),
            "brier_base_rate": brier(np.full(int(g.sum()), answers.correct[g].mean()), answers.correct[g]),
            "cells": {c: {"n": int(m.sum()), "correct": int(answers.correct[m].sum())} for c, m in cells.items()},
            "auroc": {
                k: {c: _auroc(v[m], wrong[m]) for c, m in cells.items()}
                for k, v in {**raw, "confidence": 1 - conf}.items()
            },
            "flags": {c: flag_quality(flagged[m], wrong[m]) for c, m in cells.items()},
            "reliability": reliability_bins(conf[g], answers.correct[g]),
        }
    transfer = {}
    for key, t in fitted.transfer.items():
        idx, conf_t = t["index"], t["confidence"]
        y, w = answers.correct[idx], wrong[idx]
        transfer[key] = {
            "candidate": t["candidate"],
            "n": int(len(idx)),
            "ece": expected_calibration_error(conf_t, y),
            "brier": brier(conf_t, y),
            "auroc": {**{k: _auroc(v[idx], w) for k, v in raw.items()}, "confidence": _auroc(1 - conf_t, w)},
        }
    return {
        "calibrator": fitted.model.fitted["calibrator"],
        "cv_log_loss": fitted.cv_log_loss,
        "heldout_choice": fitted.heldout_choice,
        "features": list(fitted.model.calibrator.features),
        "operating_point": op.to_dict(),
        "groups": groups,
        "transfer": transfer,
    }


def _short(features: list[str]) -> list[str]:
    """Feature names with the per-layer and per-component ones summarised."""
    out, seen = [], set()
    for f in features:
        if " @" in f:
            group = f.split(" @")[0] + " per band layer"
        else:
            group = f.split(" pc")[0] + " components" if " pc" in f else f
        if group not in seen:
            seen.add(group)
            out.append(group)
    return out


def _pct(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{100 * x:.1f}"


def markdown(analysis: dict[str, Any], methods: list[tuple[str, str, str]], score: str, judge: str) -> str:
    op = analysis["operating_point"]
    lines = [
        "## Calibrated confidence",
        "",
        "`confidence` = estimated P(correct): a logistic probe on the features of the answer's scoring pass "
        f"({len(analysis['features'])} inputs: " + ", ".join(f"`{f}`" for f in _short(analysis["features"])) + "), "
        f"fitted on the answers judged by **{judge}**, every dataset weighing the same. Candidates, by cross-validated "
        "log-loss (5 folds stratified by dataset × correct, seed 0): "
        + ", ".join(f"{name} {b:.4f}" for name, b in analysis["cv_log_loss"].items())
        + f"; chosen: **{analysis['calibrator']}** (in the outer folds: {', '.join(analysis['heldout_choice'])}). "
        "Every figure below is on held-out confidences (nested cross-validation: no answer is measured by a calibrator "
        "fitted or chosen on it).",
        f"Operating point: flag when confidence < **{op['min_confidence']:.4g}**, the largest cut whose held-out "
        "flags reach "
        f"{op['target']} ≥ {op['target_value']:g} for wrong answers (held-out: precision {_pct(op['precision'])}%, "
        "recall "
        f"{_pct(op['recall'])}%, {op['flagged']} of {op['n']} flagged"
        + ("" if op["met"] else "; target not reachable, the highest precision shown")
        + ").",
        "",
        "| | answers | correct | ECE | Brier | Brier of the base rate | flag precision | flag recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, g in analysis["groups"].items():
        f = g["flags"]["all"]
        lines.append(
            f"| {name} | {g['n']} | {_pct(g['accuracy'])}% | {g['ece']:.4f} | {g['brier']:.4f} | "
            f"{g['brier_base_rate']:.4f} | "
            f"{_pct(f['precision'])}% | {_pct(f['recall'])}% |"
        )
    labels = [(k, label) for k, label, _ in methods] + [CONFIDENCE[:2]]
    for name, g in analysis["groups"].items():
        head = " | ".join(f"{c} ({g['cells'][c]['n']}, {g['cells'][c]['correct']} correct)" for c in CELLS)
        lines += [
            "",
            f"AUROC (%) for wrong answers, {name}, overall and by answer length in tokens (answers, correct):",
            "",
            f"| method | {head} |",
            "|---|" + "---|" * len(CELLS),
        ]
        for key, label in labels:
            cells = [_pct(g["auroc"].get(key, {}).get(c, math.nan)) for c in CELLS]
            lines.append(f"| {'**' + label + '**' if key == 'confidence' else label} | " + " | ".join(cells) + " |")
        better = [
            c
            for c in CELLS
            if math.isfinite(g["auroc"]["confidence"][c])
            and all(
                g["auroc"]["confidence"][c] > v[c]
                for k, v in g["auroc"].items()
                if k != "confidence" and math.isfinite(v[c])
            )
        ]
        lines.append("")
        lines.append(
            f"Confidence is above every other method in {len(better)} of "
            f"{sum(math.isfinite(g['auroc']['confidence'][c]) for c in CELLS)} cells"
            + (f" ({', '.join(better)})." if better else ".")
        )
    if analysis["transfer"]:
        keys = [k for k, _ in labels]
        lines += [
            "",
            "Transfer: the probe chosen and fitted on one dataset alone, measured on the other "
            "(AUROC %, ECE, Brier); "
            "the raw methods need no fitting:",
            "",
            "| | candidate | ECE | Brier | " + " | ".join(label for _, label in labels) + " |",
            "|---|---|---|---|" + "---|" * len(labels),
        ]
        for key, t in analysis["transfer"].items():
            lines.append(
                f"| {key} | {t['candidate']} | {t['ece']:.4f} | {t['brier']:.4f} | "
                + " | ".join(_pct(t["auroc"].get(k, math.nan)) for k in keys)
                + " |"
            )
    lines += [
        "",
        "Flag precision / recall (%) per length stratum at the operating point (held-out):",
        "",
        "| | " + " | ".join(CELLS) + " |",
        "|---|" + "---|" * len(CELLS),
    ]
    for name, g in analysis["groups"].items():
        cells = [
            f"{_pct(g['flags'][c]['precision'])} / {_pct(g['flags'][c]['recall'])} ({g['flags'][c]['flagged']} of "
            f"{g['flags'][c]['n']})"
            for c in CELLS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reliability_png(analysis: dict[str, Any], path: Path, title: str) -> None:
    """One panel per group: share correct against mean confidence per bin (marker area ∝ answers), the diagonal,
    and below it how many answers fall in each bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = analysis["groups"]
    fig, axes = plt.subplots(
        2,
        len(groups),
        figsize=(4.2 * len(groups), 5.6),
        dpi=90,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
        sharex=True,
    )
    for col, (name, g) in enumerate(groups.items()):
        top, bottom = axes[0][col], axes[1][col]
        bins = g["reliability"]
        x, y, n = ([b[k] for b in bins] for k in ("confidence", "accuracy", "n"))
        top.plot([0, 1], [0, 1], color="grey", lw=0.8)
        top.plot(x, y, "-", color="tab:blue", lw=1.2)
        top.scatter(x, y, s=[12 + 400 * c / max(n) for c in n], color="tab:blue", zorder=3)
        top.set_title(f"{name}: ECE {g['ece']:.3f}, Brier {g['brier']:.3f}", fontsize=10)
        top.set_ylabel("share correct" if col == 0 else "", fontsize=9)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        bottom.bar([(b["low"] + b["high"]) / 2 for b in bins], n, width=0.09, color="tab:grey")
        bottom.set_yscale("log")
        bottom.set_xlabel("confidence (held-out)", fontsize=9)
        bottom.set_ylabel("answers" if col == 0 else "", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)

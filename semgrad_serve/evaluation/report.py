"""The evaluation's results: detection metrics per method, seconds per answer, and the files written.

A markdown table and one PNG of ROC curves; ``evaluate.run_eval`` adds the JSON report, the per-answer records
(``cached_items.py``), the confidence section (``confidence_report.py``) and the profile.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..scoring.items import GRADIENT_SCORES
from . import judges, metrics
from .config import EvalConfig
from .prompts import PAPER_PROMPT
from .runs import DatasetRun

# (key, label, family); the order of the tables
METHODS = [
    ("semgrad", "SemGrad", "ours"),
    ("paragrad", "ParaGrad", "ours"),
    ("paragrad_tied", "ParaGrad, tied head (authors')", "ours"),
    ("hybridgrad", "HybridGrad", "ours"),
    ("mean_nll", "Mean token NLL (perplexity)", "single pass"),
    ("max_nll", "Max token NLL", "single pass"),
    ("mean_entropy", "Mean token entropy", "single pass"),
    ("exgrad", "ExGrad", "single pass"),
    ("rauq", "RAUQ (attention, unsupervised)", "single pass"),
    ("p_true", "P(True)", "single pass"),
    ("lexical_similarity", "Lexical similarity (K samples)", "sampling"),
    ("semantic_entropy", "Semantic entropy (K samples)", "sampling"),
]


def method_seconds(run: DatasetRun, key: str) -> float | None:
    """Seconds per answer that ``key`` costs on top of generating the greedy answer."""
    s = run.seconds
    if key in GRADIENT_SCORES:
        total = s.get("gradient pass")
    elif key == "paragrad_tied":
        total = s.get("gradient pass", 0.0) + s.get("tied backward", 0.0)
    elif "[" in key:
        total = s.get(f"gradient pass [{key.split('[', 1)[1][:-1]}]")
    elif key in ("mean_nll", "max_nll", "mean_entropy"):
        total = s.get("forward pass")
    elif key == "rauq":
        total = s.get("RAUQ forward")
    elif key == "p_true":
        total = s.get("P(True) pass")
    elif key == "lexical_similarity":
        total = s.get("K samples", 0.0) + s.get("ROUGE-L among samples", 0.0) if "K samples" in s else None
    elif key == "semantic_entropy":
        total = s.get("K samples", 0.0) + s.get("embeddings + clustering", 0.0) if "K samples" in s else None
    else:
        total = None
    return None if total is None else total / run.n


def method_list(runs: list[DatasetRun], extra_labels: list[str]) -> list[tuple[str, str, str]]:
    present = set().union(*(r.scores for r in runs))
    out = [m for m in METHODS if m[0] in present]
    for label in extra_labels:
        out.insert(3, (f"hybridgrad[{label}]", f"HybridGrad [{label}]", "ours"))
        out.insert(3, (f"semgrad[{label}]", f"SemGrad [{label}]", "ours"))
    return out


def compute_metrics(run: DatasetRun, methods: list[tuple[str, str, str]], judge: str) -> dict[str, dict[str, float]]:
    wrong = run.wrong(judge)
    out = {}
    for key, _, _ in methods:
        s = np.asarray(run.scores.get(key, [math.nan] * run.n), dtype=np.float64)
        ok = run.kept() & np.isfinite(s)
        if ok.sum() < 2:
            continue
        out[key] = {**metrics.summarize(s[ok], wrong[ok]), "n": int(ok.sum())}
    return out


def _pct(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _secs(x: float | None) -> str:
    return "–" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def write_roc_png(
    runs: list[DatasetRun], methods: list[tuple[str, str, str]], judge: str, all_metrics: dict, path: Path, title: str
) -> None:
    """One panel per dataset, one curve per method; one legend (with each dataset's AUROC) beside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs) + 3.6, 5.0), dpi=90, squeeze=False)
    colors = plt.get_cmap("tab20").colors
    handles: dict[str, Any] = {}
    for ax, run in zip(axes[0], runs):
        wrong = run.wrong(judge)
        for c, (key, _, family) in enumerate(methods):
            s = np.asarray(run.scores.get(key, []), dtype=np.float64)
            if len(s) != run.n:
                continue
            ok = run.kept() & np.isfinite(s)
            if ok.sum() < 2 or wrong[ok].all() or not wrong[ok].any():
                continue
            fpr, tpr, _ = metrics.roc_curve(s[ok], wrong[ok])
            style = "-" if family == "ours" else ("--" if family == "single pass" else ":")
            (line,) = ax.plot(
                fpr,
                tpr,
                style,
                color=colors[(2 * c) % 20 if c < 10 else (2 * c + 1) % 20],
                lw=2.2 if family == "ours" else (1.9 if family == "sampling" else 1.4),
            )
            handles.setdefault(key, line)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        acc = 1 - run.wrong(judge)[run.kept()].mean()
        ax.set_title(f"{run.name}: {run.kept().sum()} answers, {100 * acc:.1f}% correct", fontsize=10)
        ax.set_xlabel("false-positive rate (correct answers flagged)", fontsize=9)
        ax.set_ylabel("true-positive rate (wrong answers flagged)", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
    labels = []
    for key, label, _ in methods:
        if key in handles:
            aucs = " / ".join(_pct(all_metrics[r.name].get(key, {}).get("auroc", math.nan)) for r in runs)
            labels.append((handles[key], f"{label}: {aucs}"))
    fig.legend(
        [h for h, _ in labels],
        [t for _, t in labels],
        loc="center right",
        fontsize=8,
        frameon=False,
        title="AUROC % (" + " / ".join(r.name for r in runs) + ")\nsolid: ours, dashed: single pass, dotted: sampling",
        title_fontsize=8,
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 3.6 / (4.6 * len(runs) + 3.6), 0.96))
    fig.savefig(path)
    plt.close(fig)


def markdown(
    cfg: EvalConfig,
    runs: list[DatasetRun],
    methods,
    all_metrics,
    per_judge,
    threshold,
    profile_name: str,
    model_name: str,
    profiles: Sequence[tuple[str, str, int, str]] = (),
) -> str:
    lines = [
        f"# Hallucination detection: {model_name}",
        "",
        f"Greedy answers ({cfg.generator}, at most {cfg.max_tokens} new tokens) to the paper's prompt "
        f'"{PAPER_PROMPT.splitlines()[0]}\\n{{query}}"; profile `{profile_name}`; '
        f"{cfg.samples} samples per question at temperature {cfg.temperature:g} for the sampling baselines.",
        *(
            [
                "NLL and entropy baselines: from the gradient pass's own log-probs and entropies of the same answer "
                "tokens "
                "(`--cheap-baselines`: no separate forward, so their cost is not measured); P(True) not run."
            ]
            if cfg.cheap_baselines
            else []
        ),
        *(
            [
                f"Answers and scores read from `{cfg.from_items}` (`--from-items`: nothing generated or scored in "
                "this run; "
                "re-judged, re-measured and re-fitted)."
            ]
            if cfg.from_items
            else []
        ),
        "Stop token: "
        + (
            "counted (SPEC): an answer that ended on the model's EOS token is scored with it."
            if cfg.stop_token
            else "not counted (the old convention): answers are scored without their EOS token."
        ),
        "Profiles: "
        + "; ".join(
            f"`{name}`: t* = last {tok!r} {off:+d}, band = hidden states {band}" for name, tok, off, band in profiles
        )
        + ".",
        f"Judge: **{cfg.judge}** — correct if {judges.describe(cfg.judge, cfg.judge_threshold)}. "
        "Positive class = wrong answer; higher score = more likely wrong.",
        "Seconds per answer: wall time of the work each method needs on top of the greedy answer, "
        "on this machine, divided by the number of answers.",
        "",
    ]
    header = "| method | kind | " + " | ".join(f"{r.name} AUROC | AUPRC | PRR | s/answer" for r in runs) + " |"
    lines += [header, "|---|---|" + "---|---|---|---|" * len(runs)]
    for key, label, family in methods:
        cells = []
        for r in runs:
            m = all_metrics[r.name].get(key)
            if m is None:
                cells.append("– | – | – | –")
            else:
                cells.append(
                    f"{_pct(m['auroc'])} | {_pct(m['auprc'])} | {_pct(m['prr'])} | {_secs(method_seconds(r, key))}"
                )
        lines.append(f"| {label} | {family} | " + " | ".join(cells) + " |")
    lines += ["", "Per dataset:", ""]
    for r in runs:
        kept = r.kept()
        acc = {j: 1 - r.wrong(j)[kept].mean() for j in r.judgements}
        gen = r.seconds.get("greedy answer")
        lines.append(
            f"- {r.name}: {r.n} questions, {int(kept.sum())} scored ({len(r.excluded)} excluded: empty answers); "
            f"accuracy "
            + ", ".join(f"{j} {100 * a:.1f}%" for j, a in acc.items())
            + (f"; greedy answer {gen / r.n:.3f} s/answer" if gen else "")
            + f"; mean answer length {np.mean(r.answer_tokens):.1f} tokens, {np.mean(r.ended_on_eos) * 100:.1f}% "
            "ended on the EOS token"
            + (f"; {np.mean(r.clusters):.2f} clusters of {cfg.samples} samples on average" if r.clusters else "")
        )
    lines += ["", "AUROC (%) of every method under each judge:", ""]
    judge_names = list(runs[0].judgements)
    lines.append("| method | " + " | ".join(f"{r.name} {j}" for r in runs for j in judge_names) + " |")
    lines.append("|---|" + "---|" * (len(runs) * len(judge_names)))
    for key, label, _ in methods:
        cells = [_pct(per_judge[r.name][j].get(key, {}).get("auroc", math.nan)) for r in runs for j in judge_names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if threshold is not None:
        t = threshold
        lines += [
            "",
            f"Flag threshold for `{t['score']}` (target {t['target']} ≥ {t['target_value']:g} on the pooled answers of "
            f"{', '.join(r.name for r in runs)}, {cfg.judge} judge): **{t['threshold']:.6g}** — flags {t['flagged']} "
            f"of {t['n']} "
            f"answers, precision {100 * t['precision']:.1f}%, recall {100 * t['recall']:.1f}%"
            + ("" if t["met"] else " (target not reachable: highest precision shown)")
            + ".",
        ]
    return "\n".join(lines) + "\n"

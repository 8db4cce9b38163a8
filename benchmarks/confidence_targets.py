"""Issue 24's targets for the calibrated confidence, per (model, dataset), from ``semgrad-serve eval``'s JSON reports.

    python benchmarks/confidence_targets.py benchmarks/results/eval_smollm2-135m.json \
        benchmarks/results/eval_qwen2.5-coder-1.5b.json --out benchmarks/results/confidence_targets.md

Every figure is held out as ``eval`` reports it (nested cross-validation; transfer: fitted on the other dataset only):
the confidence's AUROC against each single-pass baseline the run has (mean token entropy, mean and max token NLL, RAUQ
where it was run on every answer), its ECE and the flag's precision at the operating point per dataset, and whether
the targets hold: AUROC ≥ the best single-pass baseline − 0.5 points in every cell, ≥ mean entropy + 2 on average
over the cells, ECE ≤ 0.05 and precision ≥ 95% per dataset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASELINES = [("mean_entropy", "mean entropy"), ("mean_nll", "mean NLL"), ("max_nll", "max NLL"), ("rauq", "RAUQ")]
MARGIN, ABOVE_ENTROPY, MAX_ECE, MIN_PRECISION = 0.5, 2.0, 0.05, 0.95


def cells(run: dict) -> list[dict]:
    """One row per dataset of a run: AUROCs (%), ECE, precision, recall, the transfer's AUROC into this dataset."""
    conf = run["confidence"]
    out = []
    for name, group in conf["groups"].items():
        if name == "pooled":
            continue
        auroc = {k: 100 * v["all"] for k, v in group["auroc"].items() if v.get("all") is not None}
        into = next((t for key, t in conf.get("transfer", {}).items() if key.endswith(f"→{name}")), None)
        out.append(
            {
                "model": run["model"],
                "dataset": name,
                "n": group["n"],
                "accuracy": group["accuracy"],
                "auroc": auroc,
                "ece": group["ece"],
                "brier": group["brier"],
                "brier_base_rate": group["brier_base_rate"],
                "precision": group["flags"]["all"]["precision"],
                "recall": group["flags"]["all"]["recall"],
                "transfer": None if into is None else {k: 100 * v for k, v in into["auroc"].items()},
                "transfer_ece": None if into is None else into["ece"],
            }
        )
    return out


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def report(rows: list[dict]) -> str:
    head = ["model", "dataset", "answers (correct)", "**confidence**"] + [label for _, label in BASELINES]
    head += ["best baseline − 0.5 met", "ECE", "precision / recall", "transfer: confidence / mean entropy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    gaps, over_entropy, met = [], [], {"auroc": True, "ece": True, "precision": True}
    for r in rows:
        a = r["auroc"]
        base = {k: a.get(k) for k, _ in BASELINES}
        best = max(v for v in base.values() if v is not None)
        gap = a["confidence"] - best
        gaps.append(gap)
        over_entropy.append(a["confidence"] - a["mean_entropy"])
        met["auroc"] &= gap >= -MARGIN
        met["ece"] &= r["ece"] <= MAX_ECE
        met["precision"] &= r["precision"] >= MIN_PRECISION
        t = r["transfer"]
        cells_ = [r["model"], r["dataset"], f"{r['n']} ({100 * r['accuracy']:.1f}%)", f"**{a['confidence']:.1f}**"]
        cells_ += [fmt(v) for v in base.values()]
        cells_ += [
            f"{'yes' if gap >= -MARGIN else 'no'} ({gap:+.1f})",
            f"{r['ece']:.3f}",
            f"{100 * r['precision']:.1f}% / {100 * r['recall']:.1f}%",
            "–" if t is None else f"{t['confidence']:.1f} / {t['mean_entropy']:.1f}",
        ]
        lines.append("| " + " | ".join(cells_) + " |")
    mean_over = sum(over_entropy) / len(over_entropy)
    lines += [
        "",
        f"- AUROC ≥ best single-pass baseline − {MARGIN} in every cell: **{'met' if met['auroc'] else 'not met'}** "
        f"(confidence − best baseline: {', '.join(f'{g:+.1f}' for g in gaps)})",
        f"- AUROC ≥ mean entropy + {ABOVE_ENTROPY} on average: "
        f"**{'met' if mean_over >= ABOVE_ENTROPY else 'not met'}** "
        f"(mean {mean_over:+.2f}; per cell {', '.join(f'{g:+.1f}' for g in over_entropy)})",
        f"- ECE ≤ {MAX_ECE} per dataset: **{'met' if met['ece'] else 'not met'}**",
        f"- flag precision ≥ {100 * MIN_PRECISION:.0f}% per dataset: **{'met' if met['precision'] else 'not met'}**",
        "",
        "RAUQ is listed where the run computed it on every answer (`–`: not run; see `rauq_subset_*.md` for RAUQ on "
        "random subsets).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="eval's PREFIX.json files")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [row for path in args.reports for row in cells(json.loads(path.read_text()))]
    text = "# Issue 24's targets for the calibrated confidence (held out)\n\n" + report(rows)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

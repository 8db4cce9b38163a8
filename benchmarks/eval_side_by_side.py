"""Detection AUROC of several ``semgrad-serve eval`` runs side by side with the paper's.

    python benchmarks/eval_side_by_side.py benchmarks/results/eval_smollm2-135m.json \
        benchmarks/results/eval_qwen2.5-coder-1.5b.json --out benchmarks/results/eval_side_by_side.md

Reads each run's summary JSON (``eval`` writes ``PREFIX.json``): per dataset, the AUROC of every method under the
run's judge and the held-out AUROC of the calibrated confidence. The paper's column is its average over
Llama-3.1-8B, Qwen3-4B and Mistral-Nemo (BEM judge), as the SPEC quotes it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (key, label); "confidence" is the calibrated confidence (held-out), the others raw scores
ROWS = [
    ("semgrad", "SemGrad"),
    ("paragrad", "ParaGrad"),
    ("hybridgrad", "HybridGrad"),
    ("confidence", "Calibrated confidence (ours, held-out)"),
    ("exgrad", "ExGrad"),
    ("mean_entropy", "Mean token entropy"),
    ("mean_nll", "Mean token NLL"),
    ("max_nll", "Max token NLL"),
    ("p_true", "P(True)"),
]
DATASETS = ("sciq", "truthfulqa")
# The paper's AUROC (%), average over its three 4-12B models (docs/spec.md); None: not reported.
PAPER = {
    "semgrad": (74.50, 70.25),
    "paragrad": (75.02, 66.95),
    "hybridgrad": (75.35, 70.53),
    "exgrad": (74.33, 64.06),
}


def auroc_of(run: dict, dataset: str, key: str) -> float | None:
    if key == "confidence":
        group = (run.get("confidence") or {}).get("groups", {}).get(dataset, {})
        value = group.get("auroc", {}).get("confidence", {}).get("all")
    else:
        value = run["datasets"][dataset]["metrics"][run["judge"]["name"]].get(key, {}).get("auroc")
    return None if value is None else 100 * value


def table(runs: list[dict]) -> str:
    head = ["method"] + [f"{run['model']} {d}" for run in runs for d in DATASETS] + ["paper SciQ", "paper TruthfulQA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in ROWS:
        cells = [label]
        for run in runs:
            for dataset in DATASETS:
                value = auroc_of(run, dataset, key)
                cells.append("–" if value is None else f"{value:.1f}")
        cells += [f"{v:.1f}" for v in PAPER[key]] if key in PAPER else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    accuracy = ["accuracy (judge)"]
    for run in runs:
        for dataset in DATASETS:
            accuracy.append(f"{100 * run['datasets'][dataset]['accuracy'][run['judge']['name']]:.1f}%")
    lines.append("| " + " | ".join(accuracy + ["–", "–"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="eval summary JSON files (PREFIX.json)")
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args()
    runs = [json.loads(Path(p).read_text()) for p in args.runs]
    judges = sorted({run["judge"]["name"] for run in runs})
    text = "\n".join(
        [
            "# Hallucination detection AUROC (%), side by side with the paper",
            "",
            f"Runs: {', '.join(f'`{p}`' for p in args.runs)}; judge: {', '.join(judges)}. Greedy answers to the "
            "paper's "
            "prompt, full SciQ (1000) and TruthfulQA (817) test files. Paper: average over Llama-3.1-8B, Qwen3-4B and "
            "Mistral-Nemo, BEM judge (docs/spec.md).",
            "",
            table(runs),
            "",
        ]
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

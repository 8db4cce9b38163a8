"""AUROC under both stop-token conventions, from the per-answer records of two ``semgrad-serve eval`` runs.

    python benchmarks/stop_token_convention.py --old OLD_items.jsonl.gz --new NEW_items.jsonl.gz --out table.md

``--old``: answers scored without the EOS token that ended them (the convention before 2026-11-24, or
``eval --no-stop-token``); ``--new``: with it (SPEC). Both runs must hold the same answers (checked: text and
length); the short-answer rows take the answers of 1-5 tokens, the stop token not counted, in both.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from semgrad_serve.evaluation.metrics import auroc

METHODS = [
    ("semgrad", "SemGrad"),
    ("paragrad", "ParaGrad"),
    ("paragrad_tied", "ParaGrad, tied head (authors')"),
    ("hybridgrad", "HybridGrad"),
    ("exgrad", "ExGrad"),
    ("mean_nll", "Mean token NLL"),
    ("max_nll", "Max token NLL"),
    ("mean_entropy", "Mean token entropy"),
]
SHORT = (1, 5)


def read_items(path: str) -> dict[tuple[str, int], dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return {(r["dataset"], r["index"]): r for r in map(json.loads, f)}


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def cell(rows: list[dict], key: str, judge: str) -> str:
    pairs = [(r["scores"].get(key), not r["correct"][judge]) for r in rows if "excluded" not in r]
    pairs = [(s, w) for s, w in pairs if s is not None]
    wrong = [w for _, w in pairs]
    if not pairs or all(wrong) or not any(wrong):
        return "–"
    return f"{100 * auroc([s for s, _ in pairs], wrong):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="items of the run without the stop token")
    parser.add_argument("--new", required=True, help="items of the run with the stop token (SPEC)")
    parser.add_argument("--judge", default="containment")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    old, new = read_items(args.old), read_items(args.new)
    same = [
        k
        for k in new
        if k in old and (old[k]["answer"], old[k]["answer_tokens"]) == (new[k]["answer"], new[k]["answer_tokens"])
    ]
    if len(same) != len(new) or len(old) != len(new):
        raise SystemExit(f"the runs hold different answers: {len(same)} of {len(new)} ({len(old)} old) agree")
    datasets = list(dict.fromkeys(k[0] for k in new))
    lines = [
        f"# AUROC (%) under both stop-token conventions ({args.judge} judge)",
        "",
        "old = the answer scored without the EOS token that ended it; new (SPEC, 2026-11-24) = with it.",
        f"Short = answers of {SHORT[0]}-{SHORT[1]} tokens (the stop token not counted). Same answers in both runs.",
        "",
    ]
    head = "| method | " + " | ".join(f"{d} old | {d} new | {d} short old | {d} short new" for d in datasets) + " |"
    lines += [head, "|---|" + "---|---|---|---|" * len(datasets)]
    subsets = {}
    for d in datasets:
        keys = [k for k in new if k[0] == d]
        short = [k for k in keys if SHORT[0] <= new[k]["answer_tokens"] <= SHORT[1]]
        subsets[d] = (keys, short)
    for key, label in METHODS:
        cells = []
        for d in datasets:
            keys, short = subsets[d]
            cells += [
                cell([old[k] for k in keys], key, args.judge),
                cell([new[k] for k in keys], key, args.judge),
                cell([old[k] for k in short], key, args.judge),
                cell([new[k] for k in short], key, args.judge),
            ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Answers (wrong) and the Spearman rank correlation of each score between the conventions:", ""]
    lines += [
        "| dataset | answers | short answers | SemGrad ρ all / short | ParaGrad ρ all / short | HybridGrad ρ all / "
        "short |",
        "|---|---|---|---|---|---|",
    ]
    for d in datasets:
        keys, short = subsets[d]
        counts = []
        for subset in (keys, short):
            kept = [k for k in subset if "excluded" not in new[k]]
            counts.append(f"{len(kept)} ({sum(not new[k]['correct'][args.judge] for k in kept)})")
        rhos = []
        for key in ("semgrad", "paragrad", "hybridgrad"):
            pair = []
            for subset in (keys, short):
                kept = [
                    k for k in subset if new[k]["scores"].get(key) is not None and old[k]["scores"].get(key) is not None
                ]
                a = np.array([old[k]["scores"][key] for k in kept])
                b = np.array([new[k]["scores"][key] for k in kept])
                pair.append(f"{np.corrcoef(ranks(a), ranks(b))[0, 1]:.2f}")
            rhos.append(" / ".join(pair))
        lines.append(f"| {d} | " + " | ".join(counts + rhos) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

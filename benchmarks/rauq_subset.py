"""RAUQ against the held-out confidence and the single-pass baselines, on a seeded random subset of an eval run's
answers.

    python benchmarks/rauq_subset.py --items benchmarks/results/eval_qwen2.5-coder-1.5b_items.jsonl.gz \
        --model qwen2.5-coder-1.5b-instruct --dataset data/sciq/test.jsonl \
        --dataset data/truthfulqa/test.jsonl --per-class 50 --out benchmarks/results/rauq_subset_qwen.md

RAUQ needs a forward with every attention weight per answer (seconds each on a CPU), too slow for a full run's answers
here; this script computes it on ``--per-class`` correct and as many wrong answers of each dataset, drawn at random
within each class (seed ``--seed``, among the scored answers; AUROC depends only on each class's distribution of scores,
so sampling within classes leaves it unbiased and spends the forwards evenly), and compares, on exactly those answers,
its AUROC with the other methods' recorded scores and the held-out confidence recorded in the items
(``heldout_confidence``, from nested cross-validation over every answer: not fitted on the answers it is measured on). A
paired bootstrap (2000 resamples of the subset) gives a 95% interval of AUROC(confidence) − AUROC(RAUQ). Writes a
markdown table and a JSON file with the sampled indices and their RAUQ values; ``--reuse`` that JSON to measure again
(e.g. on re-fitted items) without the forwards.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np

from semgrad_serve.evaluation.metrics import auroc
from semgrad_serve.evaluation.prompts import paper_messages
from semgrad_serve.evaluation.rauq import rauq_scores
from semgrad_serve.evaluation.runs import dataset_name, read_dataset

METHODS = [
    ("confidence", "Calibrated confidence (held-out)"),
    ("rauq", "RAUQ"),
    ("mean_entropy", "Mean token entropy"),
    ("mean_nll", "Mean token NLL"),
    ("max_nll", "Max token NLL"),
    ("paragrad", "ParaGrad"),
]


def paired_interval(a: np.ndarray, b: np.ndarray, wrong: np.ndarray, seed: int, n: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of AUROC(a) − AUROC(b) over resamples of the answers (both classes kept)."""
    rng = np.random.default_rng(seed)
    diffs = []
    while len(diffs) < n:
        i = rng.integers(0, len(wrong), len(wrong))
        if wrong[i].all() or not wrong[i].any():
            continue
        diffs.append(auroc(a[i], wrong[i]) - auroc(b[i], wrong[i]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def main() -> None:
    from semgrad_serve.scoring.scorer import Scorer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", action="append", required=True)
    ap.add_argument("--per-class", type=int, default=50, help="correct answers, and wrong ones, per dataset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge", default="reference")
    ap.add_argument("--out", required=True, help="markdown file; the JSON goes beside it")
    ap.add_argument("--reuse", help="JSON of an earlier run with the same answers drawn: its RAUQ values, no forwards")
    args = ap.parse_args()

    records = [json.loads(line) for line in gzip.open(args.items, "rt", encoding="utf-8")]
    earlier = json.loads(Path(args.reuse).read_text())["datasets"] if args.reuse else None
    scorer = None if earlier else Scorer.from_pretrained(args.model, "float32", None, device="cpu", paragrad_tied=False)
    rng = np.random.default_rng(args.seed)
    lines = [
        f"# RAUQ on a random subset: {args.model}",
        "",
        f"`python benchmarks/rauq_subset.py --items {args.items} --model {args.model} "
        + " ".join(f"--dataset {d}" for d in args.dataset)
        + f" --per-class {args.per_class} --seed {args.seed}`",
        "",
        f"{args.per_class} correct and {args.per_class} wrong scored answers per dataset (fewer where there are not as "
        f"many), drawn at random within each class (seed {args.seed}); AUROC (%) for wrong answers ({args.judge} "
        "judge) of every method on exactly those answers; the confidence is each answer's "
        "held-out `heldout_confidence` (nested cross-validation over all answers). Δ: AUROC(confidence) − "
        "AUROC(RAUQ) with its 95% paired-bootstrap interval.",
        "",
    ]
    head = ["dataset", "answers (correct)"] + [label for _, label in METHODS] + ["Δ confidence − RAUQ", "RAUQ s/answer"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    doc = {"items": args.items, "model": args.model, "seed": args.seed, "per_class": args.per_class, "datasets": {}}
    for path in args.dataset:
        name = dataset_name(path)
        rows = read_dataset(path)
        mine = {r["index"]: r for r in records if r["dataset"] == name}
        scored = sorted(i for i, r in mine.items() if "excluded" not in r)
        chosen = []
        for correct in (True, False):
            pool = [i for i in scored if mine[i]["correct"][args.judge] is correct]
            chosen += rng.choice(pool, size=min(args.per_class, len(pool)), replace=False).tolist()
        chosen.sort()
        if earlier:
            if earlier[name]["index"] != chosen:
                raise SystemExit(f"--reuse {args.reuse}: other answers of {name} were drawn there")
            rauq, seconds = np.array(earlier[name]["rauq"]), earlier[name]["rauq_seconds_per_answer"]
        else:
            pairs = [(scorer.prompt_ids(paper_messages(rows[i][0])), mine[i]["token_ids"]) for i in chosen]
            t = time.perf_counter()
            rauq = np.array(rauq_scores(scorer.model, pairs))
            seconds = (time.perf_counter() - t) / len(chosen)
        wrong = np.array([not mine[i]["correct"][args.judge] for i in chosen])
        held = [mine[i].get("heldout_confidence") for i in chosen]
        if any(c is None for c in held):  # items without a held-out confidence: RAUQ is kept for --reuse
            held = [np.nan] * len(chosen)
        values = {"confidence": -np.array(held, dtype=float), "rauq": rauq}
        for key, _ in METHODS[2:]:
            values[key] = np.array([mine[i]["scores"][key] for i in chosen], dtype=float)
        aurocs = {key: 100 * auroc(v, wrong) if np.isfinite(v).all() else np.nan for key, v in values.items()}
        lo, hi = (
            paired_interval(values["confidence"], rauq, wrong, args.seed)
            if np.isfinite(aurocs["confidence"])
            else (np.nan,) * 2
        )
        cells = [name, f"{len(chosen)} ({int((~wrong).sum())})"] + [f"{aurocs[k]:.1f}" for k, _ in METHODS]
        cells += [f"{aurocs['confidence'] - aurocs['rauq']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]", f"{seconds:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
        doc["datasets"][name] = {
            "index": chosen,
            "rauq": rauq.tolist(),
            "auroc": aurocs,
            "delta_interval": [lo, hi],
            "rauq_seconds_per_answer": seconds,
        }
        print(lines[-1], flush=True)
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()

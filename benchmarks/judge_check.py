"""How well each offline judge agrees with hand labels (``benchmarks/hand_labels/*.jsonl``).

    python benchmarks/judge_check.py [--data data] [--items benchmarks/results/eval_smollm2-135m_items.jsonl.gz]

For each dataset: agreement (share of labelled answers where the judge says what the reviewer said), Cohen's kappa
(agreement beyond what the two shares of "correct" give by chance), the judge's recall and precision on the
answers labelled correct, on all labels and on the two sets (``rules``: the labels the reference judge's rules
were written with; ``held-out``: labelled after they were fixed), and the share of all cached answers each judge
calls correct. Writes ``benchmarks/results/eval_judge_check.md``.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from semgrad_serve.evaluation import judges
from semgrad_serve.evaluation.runs import read_dataset

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("sciq", "truthfulqa")


def kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two boolean labelings."""
    observed = float(np.mean(a == b))
    chance = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    return (observed - chance) / (1 - chance) if chance < 1 else float("nan")


def cell(said: np.ndarray, hand: np.ndarray) -> str:
    hits = int((said & hand).sum())
    return (
        f"**{100 * np.mean(said == hand):.1f}%**, κ {kappa(said, hand):.2f}, recall {hits}/{int(hand.sum())}, "
        f"precision {hits}/{int(said.sum())}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data"))
    parser.add_argument("--items", default=str(ROOT / "benchmarks/results/eval_smollm2-135m_items.jsonl.gz"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/eval_judge_check.md"))
    args = parser.parse_args()

    items = [json.loads(line) for line in gzip.open(args.items, "rt", encoding="utf-8")]
    embedder = judges.default_embedder()
    lines = [
        "# Which offline judge agrees with a human?",
        "",
        "Hand labels: `benchmarks/hand_labels/{sciq,truthfulqa}.jsonl`, 140 greedy answers of SmolLM2-135M-Instruct "
        "per",
        "dataset (the answers of `eval_smollm2-135m_items.jsonl.gz`), each labelled correct or wrong by a reviewer "
        "reading the",
        "question, the dataset's reference answers (`truthful answer`; the shared data has no list of incorrect "
        "answers) and",
        "the model's answer, with a short reason. Correct = the answer states the reference answer or a synonym of it",
        '("circulatory system" for "cardiovascular", "rich in fat" for "lipids"); wrong = another answer, a hedge over',
        "several, a restatement of the question, or, for TruthfulQA, a false claim beside the right one.",
        "Sets: `rules` = 100 per dataset (the 40 of the first check, drawn with `random.seed(S); "
        "random.sample(range(N), 40)`,",
        "S = 1 SciQ, 2 TruthfulQA, plus 60 drawn with `random.Random(1000 + S)` from the rest), with which the "
        "`reference`",
        "judge's rules were written; `held-out` = 40 more per dataset (`random.Random(3000 + S)` from the rest), "
        "labelled",
        "after those rules were fixed.",
        "",
        "Per cell: agreement, Cohen's kappa (κ), the correct answers the judge finds (recall) and the judge's "
        '"correct" that',
        "are (precision). Kappa matters here: so few answers are correct (TruthfulQA: 11 of 140) that a judge calling "
        "every",
        "answer wrong agrees 92%.",
        "",
        f"Command: `python benchmarks/judge_check.py` (`{Path(args.items).name}` for the answers).",
        "",
    ]
    agreement = {}
    for name in DATASETS:
        labels = [
            json.loads(line) for line in open(ROOT / "benchmarks/hand_labels" / f"{name}.jsonl", encoding="utf-8")
        ]
        rows = read_dataset(Path(args.data) / name / "test.jsonl")
        cached = {i["index"]: i["answer"] for i in items if i["dataset"] == name}
        if any(cached[lab["index"]] != lab["answer"] for lab in labels):
            raise SystemExit(f"{name}: the labelled answers are not the cached ones in {args.items}")
        said = judges.judge_all(
            [lab["answer"] for lab in labels],
            [rows[lab["index"]][1] for lab in labels],
            [rows[lab["index"]][0] for lab in labels],
            embedder=embedder,
        )
        hand = np.array([lab["label"] == "correct" for lab in labels])
        split = np.array([lab["set"] for lab in labels])
        everything = judges.judge_all(
            list(cached.values()), [rows[i][1] for i in cached], [rows[i][0] for i in cached], embedder=embedder
        )
        lines += [
            f"## {name}: {int(hand.sum())} of {len(hand)} labelled correct "
            f"({int(hand[split == 'rules'].sum())}/100 rules, {int(hand[split == 'held-out'].sum())}/40 held-out)",
            "",
            "| judge | all 140 | rules (100) | held-out (40) | share correct, all answers |",
            "|---|---|---|---|---|",
        ]
        for judge in judges.JUDGES:
            s = np.array([j.correct for j in said[judge]])
            share = np.mean([j.correct for j in everything[judge]])
            lines.append(
                f"| {judge} | {cell(s, hand)} | {cell(s[split == 'rules'], hand[split == 'rules'])} | "
                f"{cell(s[split == 'held-out'], hand[split == 'held-out'])} | {100 * share:.1f}% |"
            )
        agreement[name] = float(np.mean(np.array([j.correct for j in said[judges.DEFAULT_JUDGE]]) == hand))
        misses = [
            f"{lab['index']} ({lab['label']})"
            for lab, s in zip(labels, said["reference"])
            if s.correct != (lab["label"] == "correct")
        ]
        lines += ["", f"`reference` disagrees on answers {', '.join(misses)} (index: hand label).", ""]
    lines += [
        f"## Which judge `eval` uses: `{judges.DEFAULT_JUDGE}`",
        "",
        f"It agrees with the hand labels on {' and '.join(f'{100 * a:.1f}% of {n}' for n, a in agreement.items())} "
        "(all 140 labels each), the only judge at ≥ 90% on both with a kappa above 0.7 on both. On TruthfulQA it "
        "finds",
        "the correct paraphrases that containment misses (containment's 93.6% is mostly the base rate: it calls 1.3% "
        "of all",
        "answers correct). On SciQ it is no better than containment: on the 40 held-out labels it agreed less (its",
        'sentence rule took "hypothalamic nervous system" for "sympathetic nervous system"), and both miss synonyms',
        '("quantum mechanics" for "quantum theory", "overhunting" for "hunting by humans"). ROUGE-L and the',
        'embedding judge cannot see negation ("brown sugar is healthier" scores 0.89 against "No, brown sugar is not',
        'healthier") and fail one-word golds against sentence answers.',
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()

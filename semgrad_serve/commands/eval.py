"""``semgrad-serve eval``: wrong-answer detection of every score against the baselines; tables, ROC plot, threshold."""

from __future__ import annotations

import argparse
import sys

from ..errors import SemgradError
from ..evaluation.config import DEFAULT_CLUSTER_THRESHOLD, GENERATORS
from ..evaluation.judges import DEFAULT_JUDGE, DEFAULT_THRESHOLDS, JUDGES
from ..evaluation.prompts import MAX_NEW_TOKENS
from .common import add_convention_arguments, add_model_arguments, device_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--compare-profile",
        action="append",
        default=[],
        metavar="FILE",
        help="also score SemGrad and HybridGrad with this profile (e.g. a calibrated one); repeatable",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        required=True,
        metavar="FILE.jsonl",
        help='lines {"query": str, "truthful answer": [str, ...]}; repeatable (the threshold pools them)',
    )
    parser.add_argument("--limit", type=int, metavar="N", help="first N questions of each dataset")
    parser.add_argument(
        "--samples",
        type=int,
        default=5,
        metavar="K",
        help="samples per question for the sampling baselines (0: skip them; default: 5)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=MAX_NEW_TOKENS,
        metavar="N",
        help=f"most new tokens per answer (default: {MAX_NEW_TOKENS}, as the paper)",
    )
    parser.add_argument(
        "--generator",
        choices=GENERATORS,
        default="vllm",
        help="vllm (default) or hf (Hugging Face generate: no engine start, for small runs)",
    )
    parser.add_argument(
        "--judge",
        choices=JUDGES,
        default=DEFAULT_JUDGE,
        help=f"correctness judge for the main table, the threshold and the calibrator (default: {DEFAULT_JUDGE}, the "
        "one that agreed best with hand labels on SciQ and TruthfulQA); all are computed and reported "
        f"(thresholds: ROUGE-L {DEFAULT_THRESHOLDS['rouge']}, embedding cosine {DEFAULT_THRESHOLDS['embedding']})",
    )
    parser.add_argument(
        "--judge-threshold", type=float, metavar="X", help="threshold of the chosen judge (rouge, embedding)"
    )
    parser.add_argument(
        "--cluster-threshold",
        type=float,
        default=DEFAULT_CLUSTER_THRESHOLD,
        metavar="X",
        help=f"cosine similarity that puts two samples in one meaning cluster (default: {DEFAULT_CLUSTER_THRESHOLD})",
    )
    parser.add_argument(
        "--flag-target",
        default="precision:0.95",
        metavar="KIND:VALUE",
        help="choose the flag threshold and the confidence's operating point for this precision or recall of "
        "flagging wrong answers (default: precision:0.95)",
    )
    parser.add_argument("--out", default="eval_results", metavar="DIR", help="output folder (default: eval_results)")
    parser.add_argument("--prefix", default="eval", help="file name prefix in the output folder (default: eval)")
    parser.add_argument(
        "--profile-out", metavar="FILE", help="profile with the chosen threshold (default: OUT/PREFIX_profile.json)"
    )
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="answers per scoring pass (default: 8)")
    parser.add_argument(
        "--cache-dir", metavar="DIR", help="keep the generations here and reuse them when the run is repeated"
    )
    parser.add_argument(
        "--from-items",
        metavar="ITEMS.jsonl.gz",
        help="generate and score nothing: re-judge, re-measure and re-fit the per-answer records of an earlier run "
        "(its PREFIX_items.jsonl.gz; its settings come from the PREFIX.json beside it); same --dataset files and "
        "--limit",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="with --from-items: run the gradient pass (the confidence probe's features) and RAUQ "
        "again on the recorded answers, keeping their other scores",
    )
    parser.add_argument(
        "--no-rauq",
        dest="rauq",
        action="store_false",
        help="skip the RAUQ baseline (a forward per answer with every attention weight)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--cheap-baselines",
        action="store_true",
        help="take the NLL and entropy baselines from the gradient pass (the same numbers, no second forward; their "
        "cost is then not measured) and skip P(True): for larger models on a CPU, where each extra forward takes hours",
    )
    add_convention_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.config import EvalConfig
    from ..evaluation.evaluate import run_eval
    from ..evaluation.metrics import parse_target

    if args.limit is not None and args.limit < 1:
        raise SemgradError("--limit must be at least 1")
    if args.samples < 0 or args.samples == 1:
        raise SemgradError("--samples must be 0 (no sampling baselines) or at least 2")
    if args.batch_size < 1 or args.max_tokens < 1:
        raise SemgradError("--batch-size and --max-tokens must be at least 1")
    if args.temperature <= 0:
        raise SemgradError("--temperature must be positive")
    parse_target(args.flag_target)
    cfg = EvalConfig(
        datasets=args.dataset,
        model=args.model,
        dtype=args.dtype,
        device=device_from_args(args),
        profile=args.profile,
        compare_profiles=args.compare_profile,
        limit=args.limit,
        samples=args.samples,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        generator=args.generator,
        judge=args.judge,
        judge_threshold=args.judge_threshold,
        cluster_threshold=args.cluster_threshold,
        flag_target=args.flag_target,
        out=args.out,
        prefix=args.prefix,
        profile_out=args.profile_out,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        seed=args.seed,
        stop_token=args.stop_token,
        paragrad_tied=args.paragrad_tied,
        from_items=args.from_items,
        cheap_baselines=args.cheap_baselines,
        rescore=args.rescore,
        rauq=args.rauq,
    )
    report = run_eval(cfg)
    md = report["files"][0]
    with open(md, encoding="utf-8") as f:
        print(f.read())
    print(
        "wrote " + ", ".join(report["files"] + ([report["profile_path"]] if "profile_path" in report else [])),
        file=sys.stderr,
    )
    return 0

"""``semgrad-serve calibrate``: the SPS scan → a model profile (t*, band, SPS table) and a heatmap PNG."""

from __future__ import annotations

import argparse
import sys

from ..errors import SemgradError
from .common import add_model_arguments, device_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, profile=False)
    parser.add_argument(
        "--paraphrases", required=True, metavar="FILE.jsonl", help='lines {"query": str, "paraphrases": [str, ...]}'
    )
    parser.add_argument("--limit", type=int, metavar="N", help="use the first N queries only")
    parser.add_argument(
        "--positions", type=int, default=10, metavar="K", help="last K prompt positions to scan (≥ 8; default: 10)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="prompts per forward pass (default: 16)"
    )
    parser.add_argument(
        "--base-profile", metavar="FILE", help="profile whose name, match and score to keep (default: the built-in one)"
    )
    parser.add_argument(
        "--out", default="profile.json", metavar="PROFILE.json", help="profile to write (default: profile.json)"
    )
    parser.add_argument("--heatmap", metavar="PNG", help="heatmap to write (default: the profile path with .png)")


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 2:
        raise SemgradError("--limit must be at least 2 (SPS compares different queries)")
    if args.batch_size < 1:
        raise SemgradError("--batch-size must be at least 1")
    device = device_from_args(args)
    from ..sps_scan.profile_scan import run_scan

    profile, found, png = run_scan(
        args.model,
        args.paraphrases,
        args.limit,
        args.positions,
        args.batch_size,
        args.out,
        args.heatmap,
        args.dtype,
        args.base_profile,
        device,
    )
    rule = profile.t_star
    col = found.table.sps[:, found.t_star_column]
    print(
        f"t* = last {rule.token!r} {rule.offset:+d} (position {found.t_star_offset}), band = hidden states "
        f"{profile.band[0]}..{profile.band[1]}, SPS at t* peaks at {col.max():.4f}; "
        f"{found.table.groups} queries, {found.table.prompts} prompts",
        file=sys.stderr,
    )
    print(f"wrote {args.out} and {png}", file=sys.stderr)
    return 0

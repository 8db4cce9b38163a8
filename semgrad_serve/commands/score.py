"""``semgrad-serve score``: one output line per input line, in order; a bad line gets ``{"error": ...}``.

An input answer is a complete answer: its tokens and the model's end-of-turn token (``--no-stop-token``: without it).
``--claims`` adds each sentence's scores (``"claims"``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import ItemError, SemgradError
from ..jsonl import read_jsonl
from ..scoring.items import DEFAULT_BATCH_TOKENS
from .common import add_convention_arguments, add_model_arguments, check_output_file, scorer_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, kernels=True)
    add_convention_arguments(parser)
    parser.add_argument(
        "--input", required=True, metavar="IN.jsonl", help='lines {"question", "answer"} or {"messages", "answer"}'
    )
    parser.add_argument("--output", required=True, metavar="OUT.jsonl")
    parser.add_argument(
        "--claims", action="store_true", help='also score each sentence of the answer on its own ("claims")'
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="most answers per backward pass (default: 8)"
    )
    parser.add_argument(
        "--batch-tokens",
        type=int,
        default=DEFAULT_BATCH_TOKENS,
        metavar="N",
        help="most tokens per backward pass, padding included; a longer item goes alone (default: "
        f"{DEFAULT_BATCH_TOKENS})",
    )


def messages_of(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat of an input line: its ``messages``, or its ``question`` as one user message."""
    if "messages" in obj:
        if not isinstance(obj["messages"], list) or not obj["messages"]:
            raise ItemError("'messages' must be a non-empty list")
        return obj["messages"]
    if isinstance(obj.get("question"), str) and obj["question"].strip():
        return [{"role": "user", "content": obj["question"]}]
    raise ItemError("needs a non-empty 'question' string or a 'messages' list")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.batch_tokens < 1:
        raise SemgradError("--batch-size and --batch-tokens must be at least 1")
    check_output_file(args.output, "--output")
    rows = read_jsonl(args.input, keep_blank=True, require_object=True)
    scorer = scorer_from_args(args)
    outputs: list[dict[str, Any] | None] = [None] * len(rows)
    pairs, slots = [], []
    for k, (number, obj) in enumerate(rows):
        try:
            if isinstance(obj, str):
                raise ItemError(obj.removeprefix(f"line {number} "))
            answer = obj.get("answer")
            if not isinstance(answer, str) or not answer.strip():
                raise ItemError("needs a non-empty 'answer' string")
            pairs.append((scorer.prompt_ids(messages_of(obj)), scorer.answer_ids(answer, args.stop_token)))
            slots.append((k, number))
        except ItemError as exc:
            outputs[k] = {"error": f"line {number}: {exc}"}
    for (k, number), result in zip(
        slots,
        scorer.score(pairs, args.batch_size, progress=True, max_batch_tokens=args.batch_tokens, claims=args.claims),
    ):
        outputs[k] = {"error": f"line {number}: {result}"} if isinstance(result, ItemError) else scorer.report(result)
    with open(args.output, "w", encoding="utf-8") as f:
        for out in outputs:
            f.write(json.dumps(out) + "\n")
    failed = sum("error" in o for o in outputs if o)
    print(f"scored {len(outputs) - failed} of {len(outputs)} lines into {args.output}", file=sys.stderr)
    return 0

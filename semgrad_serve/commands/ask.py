"""``semgrad-serve ask "question"``: a greedy answer from the model, printed with its scores."""

from __future__ import annotations

import argparse
import json

from ..errors import ItemError, SemgradError
from ..scoring.items import SCORE_NAMES
from .common import add_convention_arguments, add_model_arguments, scorer_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question")
    add_model_arguments(parser, kernels=True)
    add_convention_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=150, metavar="N", help="most answer tokens (default: 150)")


def run(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise SemgradError("the question is empty")
    if args.max_tokens < 1:
        raise SemgradError("--max-tokens must be at least 1")
    scorer = scorer_from_args(args)
    import torch

    prompt = scorer.prompt_ids([{"role": "user", "content": args.question}])
    ids = torch.tensor([prompt], device=scorer.weights.device)
    with torch.no_grad():
        out = scorer.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens, do_sample=False
        )
    answer = out[0, len(prompt) :].tolist()  # ends on the EOS token when generation stopped on it
    if not args.stop_token:
        answer = scorer.without_stop_token(answer)
    print(scorer.tokenizer.decode(answer, skip_special_tokens=True).strip())
    (result,) = scorer.score([(prompt, answer)])
    if isinstance(result, ItemError):
        raise SemgradError(str(result))
    report = scorer.report(result)
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    *SCORE_NAMES,
                    "answer_tokens",
                    "stop_token",
                    "score",
                    "threshold",
                    "confidence",
                    "min_confidence",
                    "flagged",
                )
            },
            indent=2,
        )
    )
    return 0

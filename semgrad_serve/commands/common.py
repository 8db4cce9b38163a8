"""Options every model-loading subcommand shares, and the scorer they describe."""

from __future__ import annotations

import argparse

from ..kernels import kernel_choices
from ..model.loading import DTYPE_NAMES
from ..scoring.scorer import Scorer


def add_model_arguments(parser: argparse.ArgumentParser, kernels: bool = True) -> None:
    parser.add_argument("--model", metavar="DIR", help="local Hugging Face model directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="compute dtype (default: float32)")
    parser.add_argument("--profile", metavar="FILE", help="model profile JSON (t*, band, threshold); default: built-in")
    if kernels:
        parser.add_argument("--kernels", choices=kernel_choices(), default=None, help="kernel implementation (default: $SEMGRAD_KERNELS or auto)")


def add_convention_arguments(parser: argparse.ArgumentParser) -> None:
    """The stop-token convention and the opt-in tied-head ParaGrad."""
    parser.add_argument("--no-stop-token", dest="stop_token", action="store_false",
                        help="score answers without the end-of-turn / EOS token (default: counted, as the SPEC says)")
    parser.add_argument("--paragrad-tied", action="store_true", default=None,
                        help="also score the authors' tied-head ParaGrad (tied models only; a backward through every layer "
                        "and position; default: the profile's setting)")


def scorer_from_args(args: argparse.Namespace) -> Scorer:
    return Scorer.from_pretrained(args.model, args.dtype, args.profile, getattr(args, "kernels", None),
                                  paragrad_tied=getattr(args, "paragrad_tied", None))

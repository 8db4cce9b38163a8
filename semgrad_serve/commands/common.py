"""The options the subcommands share (``--model``, ``--dtype``, ``--profile``, ``--device``, ``--kernels``, the
stop-token convention) and the scorer they describe.

Building the parser imports nothing heavy (no torch, Triton or vLLM): values that need them are checked
in ``run``, before any model loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SemgradError
from ..model.loading import DTYPE_NAMES, check_model
from ..model.packaged import DEFAULT_MODEL, PACKAGED

if TYPE_CHECKING:
    from ..scoring.scorer import Scorer

SERVE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # vLLM's --dtype values that scoring supports


def add_model_arguments(
    parser: argparse.ArgumentParser, *, profile: bool = True, kernels: bool = False, serve: bool = False
) -> None:
    """``--model``, ``--dtype``, ``--profile`` (where ``profile``), ``--kernels`` (where ``kernels``) and, offline,
    ``--device``. ``serve``: ``--dtype`` takes vLLM's values and vLLM places the model (no ``--device``)."""
    parser.add_argument(
        "--model",
        metavar="DIR|NAME",
        help=f"local Hugging Face model directory, or a packaged model's name: {', '.join(PACKAGED)} "
        f"(default: {DEFAULT_MODEL}, embedded; the others are opt-in, see docs/scoring.md)",
    )
    if serve:
        parser.add_argument(
            "--dtype",
            choices=SERVE_DTYPES,
            help="weights and scoring dtype (default: float32 on CPU, where scores then equal `score`'s; vLLM's auto "
            "on GPU)",
        )
    else:
        parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="compute dtype (default: float32)")
        parser.add_argument(
            "--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)"
        )
    if profile:
        parser.add_argument(
            "--profile", metavar="FILE", help="model profile JSON (t*, band, score, threshold); default: built-in"
        )
    if kernels:
        parser.add_argument(
            "--kernels",
            metavar="NAME",
            help="kernel implementation: auto, torch, triton or native (default: $SEMGRAD_KERNELS, else auto)",
        )


def add_convention_arguments(parser: argparse.ArgumentParser) -> None:
    """The stop-token convention and the opt-in tied-head ParaGrad."""
    parser.add_argument(
        "--no-stop-token",
        dest="stop_token",
        action="store_false",
        help="score answers without the end-of-turn / EOS token (default: counted, as the SPEC says)",
    )
    parser.add_argument(
        "--paragrad-tied",
        action="store_true",
        default=None,
        help="also score the authors' tied-head ParaGrad (tied models only; a backward through every layer "
        "and position; default: the profile's setting)",
    )


def check_output_file(path: str, option: str) -> None:
    """A file the command writes when its work is done: its folder must exist before the work starts."""
    target = Path(path)
    if target.is_dir():
        raise SemgradError(f"{option} {path} is a directory")
    if not target.parent.is_dir():
        raise SemgradError(f"{option} {path}: the folder {target.parent} does not exist")


def device_from_args(args: argparse.Namespace) -> str:
    """``--device`` checked (a ``SemgradError`` for a bad one), or the default: cuda when available, else cpu."""
    from ..model.loading import resolve_device

    return resolve_device(args.device)


def scorer_from_args(args: argparse.Namespace) -> Scorer:
    """The scorer of ``add_model_arguments``' options. Checked before the model loads: the profile file and the
    model directory's files or packaged model's name first (without importing torch), then the device and the
    kernels."""
    from ..scoring.profiles import ModelProfile

    profile = ModelProfile.load(args.profile) if args.profile is not None else None
    if args.model is not None:
        check_model(args.model)
    from ..kernels import select_kernels
    from ..scoring.scorer import Scorer

    device = device_from_args(args)
    kernels = getattr(args, "kernels", None)
    select_kernels(kernels, device)  # an unknown or unavailable implementation is refused here, not after loading
    return Scorer.from_pretrained(
        args.model, args.dtype, profile, kernels, device=device, paragrad_tied=getattr(args, "paragrad_tied", None)
    )

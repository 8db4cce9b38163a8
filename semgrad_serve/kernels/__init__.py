"""The scoring kernels and the one place that picks their implementation.

Each operation lives in its own module beside its plain-torch reference, with its
Triton kernel and its native (csrc/) binding. ``select_kernels`` picks an
implementation set: an explicit choice, else the ``SEMGRAD_KERNELS`` environment
variable, else the best available for the device ("auto": native on CPU; Triton,
then native, on CUDA; the torch reference otherwise).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SemgradError
from ._native import native_available, native_loaded
from ._triton import triton_available
from .band_l1 import band_l1_native, band_l1_reference, band_l1_triton
from .head_grad_l1 import head_grad_l1_native, head_grad_l1_reference, head_grad_l1_triton
from .token_stats import TokenStats, token_stats_native, token_stats_reference, token_stats_triton

ENV_VAR = "SEMGRAD_KERNELS"


@dataclass(frozen=True)
class Kernels:
    """One implementation of each scoring operation."""

    name: str
    token_stats: Callable[[torch.Tensor, torch.Tensor], TokenStats]
    head_grad_l1: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    band_l1: Callable[[torch.Tensor], torch.Tensor]


TORCH = Kernels("torch", token_stats_reference, head_grad_l1_reference, band_l1_reference)
TRITON = Kernels("triton", token_stats_triton, head_grad_l1_triton, band_l1_triton)
NATIVE = Kernels("native", token_stats_native, head_grad_l1_native, band_l1_native)
_KERNELS = {k.name: k for k in (TORCH, TRITON, NATIVE)}
_AUTO_ORDER = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "torch")}


def kernel_choices() -> tuple[str, ...]:
    return ("auto", *_KERNELS)


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why kernels ``name`` cannot run on ``device_type`` ("cpu", "cuda"), or None if they can."""
    if name == "triton" and not triton_available(device_type):
        return (
            "triton kernels need the triton package and a CUDA device; on CPU, its (slow) interpreter, "
            "with TRITON_INTERPRET=1 set before triton is first imported"
        )
    if name == "native" and not native_loaded():
        return (
            "native kernels are not built in this install: reinstall with torch already installed "
            "(pip install --no-build-isolation -e .) so that setup.py compiles csrc/"
        )
    if name == "native" and not native_available(device_type):
        return f"native kernels were built without {device_type} support"
    return None


def select_kernels(choice: str | None = None, device: torch.device | str = "cpu") -> Kernels:
    """Kernels named by ``choice`` or ``$SEMGRAD_KERNELS``; "auto" (default) picks the best for ``device``."""
    choice = choice or os.environ.get(ENV_VAR) or "auto"
    device_type = torch.device(device).type
    if choice == "auto":
        order = _AUTO_ORDER.get(device_type, ("torch",))
        return next(_KERNELS[n] for n in order if unavailable_reason(n, device_type) is None)
    if choice not in _KERNELS:
        raise SemgradError(f"unknown kernels {choice!r}; choose one of {', '.join(kernel_choices())}")
    reason = unavailable_reason(choice, device_type)
    if reason is not None:
        raise SemgradError(reason)
    return _KERNELS[choice]

"""The scoring kernels and the one place that picks their implementation.

Each operation lives in its own module beside its plain-torch reference, with its
Triton kernel and its native (csrc/) binding. ``select_kernels`` picks an
implementation set: an explicit choice ("torch", "triton", "native": every op from
that set), else the ``SEMGRAD_KERNELS`` environment variable, else "auto": per
device and op, the first available implementation of ``AUTO`` (the dispatch table,
decided from ``benchmarks/kernels.py``; see its results in ``benchmarks/results/``).
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
OPS = ("token_stats", "head_grad_l1", "band_l1")


@dataclass(frozen=True)
class Kernels:
    """One implementation of each scoring operation."""

    name: str
    token_stats: Callable[..., TokenStats]  # (logits, targets, *, check=True, overwrite=False)
    head_grad_l1: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    band_l1: Callable[[torch.Tensor], torch.Tensor]


TORCH = Kernels("torch", token_stats_reference, head_grad_l1_reference, band_l1_reference)
TRITON = Kernels("triton", token_stats_triton, head_grad_l1_triton, band_l1_triton)
NATIVE = Kernels("native", token_stats_native, head_grad_l1_native, band_l1_native)
_KERNELS = {k.name: k for k in (TORCH, TRITON, NATIVE)}

# The dispatch table of "auto": per device type and op, implementations in order of preference
# (the first available one runs), and why; the measurements: benchmarks/results/kernels_notes.md.
AUTO: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {
    "cpu": {
        "token_stats": (("native", "torch"), "one streaming pass per row"),
        "head_grad_l1": (("native", "torch"), "BLAS tiles abs-summed in cache"),
        "band_l1": (("native", "torch"), "one pass; Triton runs on CPU only interpreted"),
    },
    "cuda": {
        "token_stats": (
            ("triton", "native", "torch"),
            "rows x vocabulary chunks",
        ),
        "head_grad_l1": (
            ("triton", "native", "torch"),
            "3xTF32 tensor cores, ParaGrad and ExGrad in one pass",
        ),
        "band_l1": (("native", "triton", "torch"), "one pass"),
    },
}


def kernel_choices() -> tuple[str, ...]:
    return ("auto", *_KERNELS)


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why kernels ``name`` cannot run on ``device_type`` ("cpu", "cuda"), or None if they can."""
    if name == "torch":
        return None
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


def auto_kernels(device_type: str) -> Kernels:
    """Per op, the first available implementation of ``AUTO[device_type]`` (the reference elsewhere)."""
    table = AUTO.get(device_type, {op: (("torch",), "no kernels for this device") for op in OPS})
    chosen = {op: next(n for n in table[op][0] if unavailable_reason(n, device_type) is None) for op in OPS}
    name = chosen["token_stats"] if len(set(chosen.values())) == 1 else "+".join(chosen[op] for op in OPS)
    return Kernels(name, *(getattr(_KERNELS[chosen[op]], op) for op in OPS))


def select_kernels(choice: str | None = None, device: torch.device | str = "cpu") -> Kernels:
    """Kernels named by ``choice`` or ``$SEMGRAD_KERNELS``; "auto" (default) follows ``AUTO`` for ``device``."""
    choice = choice or os.environ.get(ENV_VAR) or "auto"
    device_type = torch.device(device).type
    if choice == "auto":
        return auto_kernels(device_type)
    if choice not in _KERNELS:
        raise SemgradError(f"unknown kernels {choice!r}; choose one of {', '.join(kernel_choices())}")
    reason = unavailable_reason(choice, device_type)
    if reason is not None:
        raise SemgradError(reason)
    return _KERNELS[choice]

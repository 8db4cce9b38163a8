"""What the Triton kernels share: the optional import, the jit and autotune decorators, dtype names.

Triton runs on CUDA tensors, or on CPU tensors under its interpreter; the interpreter
must be chosen (``TRITON_INTERPRET=1``) before triton is first imported, because
triton's own library functions are jitted at that import.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch and native kernels do not need it
    triton = tl = None

INTERPRETED = tl is not None and os.environ.get("TRITON_INTERPRET") == "1"


def jit(fn: Callable[..., None]) -> Any:
    """``triton.jit``; without triton the plain function, which ``triton_available`` keeps from being launched."""
    return fn if triton is None else triton.jit(fn)


def autotuned(kernel: Any, configs: list[dict[str, int]], key: list[str]) -> Any:
    """``kernel`` autotuned over ``configs`` (block sizes plus ``num_warps``/``num_stages``) per ``key``
    shape, on a GPU; None where Triton is missing or interpreted, and then callers pass block sizes."""
    if triton is None or INTERPRETED:
        return None
    return triton.autotune(
        configs=[
            triton.Config(
                {k: v for k, v in c.items() if k.isupper()}, num_warps=c["num_warps"], num_stages=c["num_stages"]
            )
            for c in configs
        ],
        key=key,
    )(kernel)


def triton_available(device_type: str) -> bool:
    """Triton runs on CUDA devices, and on CPU tensors when this process imported it interpreted."""
    return tl is not None and (device_type == "cuda" or (device_type == "cpu" and INTERPRETED))


def tl_dtype(dtype: torch.dtype) -> Any:
    """The Triton type of a float32/float64 accumulation dtype."""
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]

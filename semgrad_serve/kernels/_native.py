"""The compiled ``semgrad`` ops (csrc/, built by setup.py as ``semgrad_serve._C``), when installed."""

from __future__ import annotations

import functools
import importlib

import torch


@functools.cache
def native_loaded() -> bool:
    """Load the extension (registering ``torch.ops.semgrad``); False if this install has none."""
    try:
        importlib.import_module("semgrad_serve._C")
    except ImportError:
        return False
    return True


def native_available(device_type: str) -> bool:
    """Whether the native ops have kernels for ``device_type`` ("cpu", "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (
        key is not None
        and native_loaded()
        and torch._C._dispatch_has_kernel_for_dispatch_key("semgrad::token_stats", key)
    )

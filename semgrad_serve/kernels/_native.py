"""The compiled ``semgrad`` ops (csrc/, built by setup.py as ``semgrad_serve._C``), when installed."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings

import torch


@functools.cache
def native_loaded() -> bool:
    """Load the extension (registering ``torch.ops.semgrad``); False if this install has none. An
    extension that is there but does not load (built against another torch, say) warns with the cause."""
    if importlib.util.find_spec("semgrad_serve._C") is None:
        return False
    try:
        importlib.import_module("semgrad_serve._C")
    except (ImportError, OSError) as exc:
        warnings.warn(
            f"semgrad-serve's native kernels do not load ({exc}); using the others. Rebuild them against "
            f"torch {torch.__version__}: pip install --no-build-isolation -e .",
            RuntimeWarning,
            stacklevel=2,
        )
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

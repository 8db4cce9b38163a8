"""Operation 3: SemGrad's ℓ1 mean of the band gradients at t*, for the whole batch at once.

Implementations: the plain-torch reference, a Triton kernel (one program per band
row, partials summed in float64) and the native op ``semgrad::band_l1`` (csrc/).
"""

from __future__ import annotations

import torch

from ._native import native_loaded
from ._triton import jit, tl, tl_dtype
from .token_stats import accumulation_dtype


def band_l1_reference(grads: torch.Tensor) -> torch.Tensor:
    """grads [n_band, B, d] → float64 [B]: Σ_{i,j} |grads[i, b, j]| / (n_band · d)."""
    n_band, _, d = grads.shape
    return grads.abs().sum(dim=(0, 2), dtype=torch.float64) / (n_band * d)


@jit
def _band_l1_kernel(grads_ptr, partial_ptr, D, stride_band, stride_batch, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """One program per (band index, item): Σ|·| over d."""
    i = tl.program_id(0)
    b = tl.program_id(1)
    row = grads_ptr + i.to(tl.int64) * stride_band + b.to(tl.int64) * stride_batch
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        acc += tl.abs(tl.load(row + d0 + cols, mask=d0 + cols < D, other=0.0).to(ACC))
    tl.store(partial_ptr + b * tl.num_programs(0) + i, tl.sum(acc, 0))


def band_l1_triton(grads: torch.Tensor, *, block_d: int = 1024) -> torch.Tensor:
    """Triton: per-row partials [B, n_band], then their float64 sum."""
    x = grads if grads.stride(2) == 1 else grads.contiguous()
    n_band, batch, d = x.shape
    partial = x.new_empty(batch, n_band, dtype=accumulation_dtype(x.dtype))
    if n_band and batch:
        _band_l1_kernel[(n_band, batch)](
            x, partial, d, x.stride(0), x.stride(1), BLOCK_D=block_d, ACC=tl_dtype(partial.dtype)
        )
    return partial.sum(1, dtype=torch.float64) / (n_band * d)


def band_l1_native(grads: torch.Tensor) -> torch.Tensor:
    """The native op: one pass, items in parallel, fixed summation order."""
    return torch.ops.semgrad.band_l1(grads)


if native_loaded():

    @torch.library.register_fake("semgrad::band_l1")
    def _band_l1_fake(grads: torch.Tensor) -> torch.Tensor:
        return grads.new_empty(grads.shape[1], dtype=torch.float64)

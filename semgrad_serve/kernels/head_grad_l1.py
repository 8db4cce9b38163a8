"""Operation 2: ParaGrad's ℓ1 mean of the head gradient, per sequence.

For sequence b with rows s..e: ``mean |Σ_t c_t · nll_grad_t h_tᵀ|`` over the V×d
matrix, where ``c_t`` is a per-row scale (``w_t/T`` for ParaGrad, ``1/T`` for ExGrad)
and ``h_t`` the final-normed hidden state that produced the logits.
The Triton kernel and the native op ``semgrad::head_grad_l1`` (csrc/) never form
the V×d matrix: each computes it tile by tile and keeps only per-tile ℓ1 partials,
summed in a fixed order in float64 (deterministic, no atomics).
"""

from __future__ import annotations

import torch

from ._native import native_loaded
from ._triton import jit, tl, tl_dtype
from .token_stats import accumulation_dtype


def head_grad_l1_reference(
    nll_grad: torch.Tensor, hidden: torch.Tensor, row_scale: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Plain torch: materializes each sequence's V×d gradient. Returns float64 [B]."""
    acc = accumulation_dtype(hidden.dtype)
    bounds = offsets.tolist()
    means = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        scaled = hidden[s:e].to(acc) * row_scale[s:e, None].to(acc)
        grad = nll_grad[s:e].to(acc).T @ scaled
        means.append(grad.abs().sum(dtype=torch.float64) / grad.numel())
    return torch.stack(means)


@jit
def _head_grad_l1_kernel(grad_ptr, hidden_ptr, scale_ptr, offsets_ptr, partial_ptr, V, D, tiles_d,
                         stride_grad, stride_hidden,
                         BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr):
    """One program per (V×d tile, sequence): Σ_t over the sequence's rows by tl.dot, then Σ|·| of the tile."""
    tile = tl.program_id(0)
    b = tl.program_id(1)
    start = tl.load(offsets_ptr + b)
    end = tl.load(offsets_ptr + b + 1)
    rv = (tile // tiles_d) * BLOCK_V + tl.arange(0, BLOCK_V)
    rd = (tile % tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_V, BLOCK_D], ACC)
    for t0 in range(start, end, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        t_ok = rt < end
        g_t = tl.load(grad_ptr + rt[None, :].to(tl.int64) * stride_grad + rv[:, None],
                      mask=t_ok[None, :] & (rv[:, None] < V), other=0.0).to(ACC)
        c = tl.load(scale_ptr + rt, mask=t_ok, other=0.0).to(ACC)
        h = tl.load(hidden_ptr + rt[:, None].to(tl.int64) * stride_hidden + rd[None, :],
                    mask=t_ok[:, None] & (rd[None, :] < D), other=0.0).to(ACC)
        acc = tl.dot(g_t, h * c[:, None], acc, input_precision="ieee")
    tl.store(partial_ptr + b * tl.num_programs(0) + tile, tl.sum(tl.sum(tl.abs(acc), 1), 0))


def head_grad_l1_triton(
    nll_grad: torch.Tensor,
    hidden: torch.Tensor,
    row_scale: torch.Tensor,
    offsets: torch.Tensor,
    *,
    block_v: int = 128,
    block_d: int = 128,
    block_t: int = 32,
) -> torch.Tensor:
    """Triton: ``block_v``×``block_d`` tiles (powers of two, ≥ 16), ``block_t`` rows per tl.dot step."""
    grad = nll_grad if nll_grad.stride(1) == 1 else nll_grad.contiguous()
    h = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    v, d = grad.shape[1], h.shape[1]
    tiles_v, tiles_d = -(-v // block_v), -(-d // block_d)
    batch = offsets.numel() - 1
    acc = accumulation_dtype(hidden.dtype)
    partial = grad.new_empty(batch, tiles_v * tiles_d, dtype=acc)
    if batch:
        _head_grad_l1_kernel[(tiles_v * tiles_d, batch)](
            grad, h, row_scale.contiguous(), offsets.contiguous(), partial, v, d, tiles_d,
            grad.stride(0), h.stride(0), BLOCK_V=block_v, BLOCK_D=block_d, BLOCK_T=block_t, ACC=tl_dtype(acc),
            num_warps=8,
        )
    return partial.sum(1, dtype=torch.float64) / (v * d)


def head_grad_l1_native(
    nll_grad: torch.Tensor, hidden: torch.Tensor, row_scale: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """The native op: BLAS tiles over V abs-summed in cache (CPU), tiled multiply-accumulate (CUDA)."""
    return torch.ops.semgrad.head_grad_l1(nll_grad, hidden, row_scale, offsets)


if native_loaded():

    @torch.library.register_fake("semgrad::head_grad_l1")
    def _head_grad_l1_fake(
        nll_grad: torch.Tensor, hidden: torch.Tensor, row_scale: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        return nll_grad.new_empty(offsets.shape[0] - 1, dtype=torch.float64)

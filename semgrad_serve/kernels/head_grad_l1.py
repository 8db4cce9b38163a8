"""Operation 2: ParaGrad's ℓ1 mean of the head gradient, per sequence.

For sequence b with rows s..e: ``mean |Σ_t c_t · nll_grad_t h_tᵀ|`` over the V×d
matrix, where ``c_t`` is a per-row scale (``w_t/T`` for ParaGrad, ``1/T`` for ExGrad;
both at once as a [2, N] scale) and ``h_t`` the final-normed hidden state that produced
the logits.
The Triton kernel and the native op ``semgrad::head_grad_l1`` (csrc/) never form
the V×d matrix: each computes it tile by tile and keeps only per-tile ℓ1 partials,
summed in a fixed order in float64 (deterministic, no atomics).
"""

from __future__ import annotations

import torch

from ._native import native_loaded
from ._triton import autotuned, jit, tl, tl_dtype, triton
from .token_stats import accumulation_dtype


def _scales(row_scale: torch.Tensor) -> torch.Tensor:
    """``row_scale`` as [S, N]: one scale per ℓ1 to compute (ParaGrad's w_t/T, ExGrad's 1/T)."""
    return row_scale if row_scale.dim() == 2 else row_scale[None]


def head_grad_l1_reference(
    nll_grad: torch.Tensor, hidden: torch.Tensor, row_scale: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Plain torch: materializes each sequence's V×d gradient. float64 [B] (row_scale [N]) or [S, B] ([S, N])."""
    acc = accumulation_dtype(hidden.dtype)
    bounds = offsets.tolist()
    out = []
    for scale in _scales(row_scale):
        means = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            grad = nll_grad[s:e].to(acc).T @ (hidden[s:e].to(acc) * scale[s:e, None].to(acc))
            means.append(grad.abs().sum(dtype=torch.float64) / grad.numel())
        out.append(torch.stack(means) if means else hidden.new_zeros(0, dtype=torch.float64))
    return torch.stack(out) if row_scale.dim() == 2 else out[0]


@jit
def _head_grad_l1_kernel(
    grad_ptr,
    hidden_ptr,
    scale_ptr,
    offsets_ptr,
    partial_ptr,
    N,
    V,
    D,
    stride_grad,
    stride_hidden,
    stride_partial,
    S: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per (V tile, sequence), looping over d: Σ_t over the sequence's rows (tl.dot on tensor
    cores, or a broadcast product for float64), then Σ|·| of each tile, for S = 1 or 2 row scales at
    once (ParaGrad and ExGrad share every load). The gradient tile is read from memory once and
    re-read per d tile from cache; rows are clamped to [0, N], so the offsets need no host check."""
    pid_v = tl.program_id(0)
    b = tl.program_id(1)
    n_b = tl.num_programs(1)
    start = tl.minimum(tl.maximum(tl.load(offsets_ptr + b), 0), N)
    end = tl.minimum(tl.maximum(tl.load(offsets_ptr + b + 1), start), N)
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    total0 = tl.zeros([], ACC)
    total1 = tl.zeros([], ACC)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        acc0 = tl.zeros([BLOCK_V, BLOCK_D], ACC)
        acc1 = tl.zeros([BLOCK_V, BLOCK_D], ACC)
        for t0 in range(start, end, BLOCK_T):
            rt = t0 + tl.arange(0, BLOCK_T)
            t_ok = rt < end
            g_t = tl.load(
                grad_ptr + rt[None, :].to(tl.int64) * stride_grad + rv[:, None],
                mask=t_ok[None, :] & (rv[:, None] < V),
                other=0.0,
            ).to(ACC)
            h = tl.load(
                hidden_ptr + rt[:, None].to(tl.int64) * stride_hidden + rd[None, :],
                mask=t_ok[:, None] & (rd[None, :] < D),
                other=0.0,
            ).to(ACC)
            h0 = h * tl.load(scale_ptr + rt, mask=t_ok, other=0.0).to(ACC)[:, None]
            if PRECISION == "none":
                acc0 += tl.sum(g_t[:, :, None] * h0[None, :, :], 1)
            else:
                acc0 = tl.dot(g_t, h0, acc0, input_precision=PRECISION)
            if S == 2:
                h1 = h * tl.load(scale_ptr + N + rt, mask=t_ok, other=0.0).to(ACC)[:, None]
                if PRECISION == "none":
                    acc1 += tl.sum(g_t[:, :, None] * h1[None, :, :], 1)
                else:
                    acc1 = tl.dot(g_t, h1, acc1, input_precision=PRECISION)
        total0 += tl.sum(tl.sum(tl.abs(acc0), 1), 0)
        if S == 2:
            total1 += tl.sum(tl.sum(tl.abs(acc1), 1), 0)
    tl.store(partial_ptr + b * stride_partial + pid_v, total0)
    if S == 2:
        tl.store(partial_ptr + (n_b + b) * stride_partial + pid_v, total1)


_HEAD_CONFIGS = [
    dict(BLOCK_V=128, BLOCK_D=128, BLOCK_T=32, num_warps=8, num_stages=3),
    dict(BLOCK_V=128, BLOCK_D=64, BLOCK_T=32, num_warps=4, num_stages=3),
    dict(BLOCK_V=64, BLOCK_D=128, BLOCK_T=32, num_warps=4, num_stages=3),
    dict(BLOCK_V=128, BLOCK_D=128, BLOCK_T=16, num_warps=8, num_stages=2),
    dict(BLOCK_V=256, BLOCK_D=64, BLOCK_T=32, num_warps=8, num_stages=3),
    dict(BLOCK_V=64, BLOCK_D=64, BLOCK_T=16, num_warps=4, num_stages=2),
]
_head_grad_l1_tuned = autotuned(_head_grad_l1_kernel, _HEAD_CONFIGS, key=["V", "D", "S", "PRECISION"])
# float64 has no tensor-core dot: a broadcast product over small blocks (used for exactness checks)
_FLOAT64_BLOCKS = dict(BLOCK_V=32, BLOCK_D=32, BLOCK_T=8)


def head_grad_l1_triton(
    nll_grad: torch.Tensor,
    hidden: torch.Tensor,
    row_scale: torch.Tensor,
    offsets: torch.Tensor,
    *,
    precision: str = "tf32x3",
    block_v: int | None = None,
    block_d: int | None = None,
    block_t: int | None = None,
) -> torch.Tensor:
    """Triton: float64 [B] (row_scale [N]) or [S, B] (row_scale [S, N], S ≤ 2) in one pass over the gradient.
    float32 products run on tensor cores as ``precision``: "tf32x3" (three TF32 products per split
    operand, ~float32 accuracy), "ieee" (no tensor cores) or "tf32" (one product: its rounding biases the
    ℓ1 upward by ~7e-4 relative, over the SPEC's 1e-4, see benchmarks/results/kernels_cuda_tf32_tried.md).
    Blocks are autotuned per (V, d) on a GPU unless given (powers of two, ≥ 16; required when interpreted)."""
    scales = _scales(row_scale)
    if scales.shape[0] not in (1, 2):
        raise ValueError(f"expected one or two row scales, got {scales.shape[0]}")
    grad = nll_grad if nll_grad.stride(1) == 1 else nll_grad.contiguous()
    h = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    n, v, d = grad.shape[0], grad.shape[1], h.shape[1]
    n_scales, batch = scales.shape[0], offsets.numel() - 1
    acc = accumulation_dtype(hidden.dtype)
    prec = "none" if acc == torch.float64 else precision
    blocks = dict(BLOCK_V=block_v, BLOCK_D=block_d, BLOCK_T=block_t)
    if acc == torch.float64:
        blocks = {k: b or _FLOAT64_BLOCKS[k] for k, b in blocks.items()}
    tuned = _head_grad_l1_tuned if None in blocks.values() else None
    if tuned is None:
        blocks = {k: b or _HEAD_CONFIGS[0][k] for k, b in blocks.items()}
    max_tiles = -(-v // 16)  # the smallest BLOCK_V: room for any tuned tiling
    partial = grad.new_zeros(n_scales, batch, max_tiles, dtype=acc)
    if batch:
        args = (
            grad,
            h,
            scales.contiguous(),
            offsets.contiguous(),
            partial,
            n,
            v,
            d,
            grad.stride(0),
            h.stride(0),
            max_tiles,
        )
        if tuned is not None:

            def grid(meta: dict) -> tuple[int, int]:
                return triton.cdiv(v, meta["BLOCK_V"]), batch

            tuned[grid](*args, S=n_scales, ACC=tl_dtype(acc), PRECISION=prec)
            block_v = tuned.best_config.kwargs["BLOCK_V"]
        else:
            block_v = blocks["BLOCK_V"]
            _head_grad_l1_kernel[(-(-v // block_v), batch)](
                *args, S=n_scales, ACC=tl_dtype(acc), PRECISION=prec, **blocks, num_warps=4
            )
        # only the tiles of the tiling that ran: autotuning's trial runs of other tilings may leave partials beyond
        partial = partial[:, :, : -(-v // block_v)]
    out = partial.sum(2, dtype=torch.float64) / (v * d)
    return out if row_scale.dim() == 2 else out[0]


def head_grad_l1_native(
    nll_grad: torch.Tensor, hidden: torch.Tensor, row_scale: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """The native op: BLAS tiles over V abs-summed in cache (CPU), tiled multiply-accumulate (CUDA);
    one call per row scale."""
    if row_scale.dim() == 1:
        return torch.ops.semgrad.head_grad_l1(nll_grad, hidden, row_scale, offsets)
    return torch.stack([torch.ops.semgrad.head_grad_l1(nll_grad, hidden, c, offsets) for c in row_scale])


if native_loaded():

    @torch.library.register_fake("semgrad::head_grad_l1")
    def _head_grad_l1_fake(
        nll_grad: torch.Tensor, hidden: torch.Tensor, row_scale: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        return nll_grad.new_empty(offsets.shape[0] - 1, dtype=torch.float64)

"""Operation 1: per answer token, log-prob of the chosen token, entropy, and the NLL's logits gradient.

The SPEC's loss is ``-(1/T) Σ_t w_t logp_t`` with ``w_t`` the (detached) entropy,
so its gradient w.r.t. logits row t is ``(w_t / T) · nll_grad_t`` where
``nll_grad_t = softmax(z_t) - onehot(y_t)``. Rows of many answers are packed
along the first axis; the operation is row-wise, so ragged batches need no offsets.
Implementations: the plain-torch reference, a Triton kernel and the native op
``semgrad::token_stats`` (csrc/); all accumulate in float32 (float64 for float64 input).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._native import native_loaded
from ._triton import jit, tl, tl_dtype


class TokenStats(NamedTuple):
    logp: torch.Tensor  # [N] log-prob of the target token
    entropy: torch.Tensor  # [N] entropy of softmax(z)
    nll_grad: torch.Tensor  # [N, V] softmax(z) - onehot(target)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/16-bit inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def check_logits(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Raise ValueError for NaN/+inf logits or out-of-range targets (-inf logits are allowed)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, V] and targets [N], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise ValueError("logits contain NaN or +inf: the model's forward pass is numerically broken")
    if targets.numel() and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError("target token id outside the vocabulary")


def token_stats_reference(logits: torch.Tensor, targets: torch.Tensor) -> TokenStats:
    """Plain torch: materializes log_softmax of all rows."""
    check_logits(logits, targets)
    z = logits.to(accumulation_dtype(logits.dtype))
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    nll_grad = p.scatter_add(1, targets[:, None], -torch.ones_like(p[:, :1]))
    return TokenStats(logp, entropy, nll_grad)


@jit
def _token_stats_kernel(logits_ptr, targets_ptr, logp_ptr, entropy_ptr, grad_ptr, V, stride_row,
                        BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    """One program per row: online max, Σe^(z−m) and Σe^(z−m)(z−m) over V chunks, then softmax − onehot."""
    row = tl.program_id(0).to(tl.int64)
    z_row = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    t = tl.zeros([], ACC)
    for v0 in range(0, V, BLOCK_V):
        z = tl.load(z_row + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(z, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (−inf) − (−inf) while all is −inf
        x = z - m_ref
        e = tl.exp(x)
        alpha = tl.exp(m - m_ref)
        shift = tl.where(m == float("-inf"), 0.0, m - m_ref)  # s = t = 0 then
        t = alpha * (t + s * shift) + tl.sum(e * tl.where(z == float("-inf"), 0.0, x), 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    y = tl.load(targets_ptr + row)
    tl.store(logp_ptr + row, (tl.load(z_row + y).to(ACC) - m) - log_s)
    tl.store(entropy_ptr + row, log_s - t / s)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + cols
        z = tl.load(z_row + idx, mask=idx < V, other=float("-inf")).to(ACC)
        grad = tl.exp((z - m) - log_s) - tl.where(idx == y, 1.0, 0.0)
        tl.store(grad_ptr + row * V + idx, grad, mask=idx < V)


def token_stats_triton(logits: torch.Tensor, targets: torch.Tensor, *, block_v: int = 4096) -> TokenStats:
    """Triton, one program per row streaming over V in ``block_v`` chunks (a power of two)."""
    check_logits(logits, targets)
    z = logits if logits.stride(1) == 1 else logits.contiguous()
    n, v = z.shape
    acc = accumulation_dtype(z.dtype)
    logp, entropy = z.new_empty(n, dtype=acc), z.new_empty(n, dtype=acc)
    grad = z.new_empty(n, v, dtype=acc)
    if n:
        _token_stats_kernel[(n,)](
            z, targets.contiguous(), logp, entropy, grad, v, z.stride(0), BLOCK_V=block_v, ACC=tl_dtype(acc),
            num_warps=8,
        )
    return TokenStats(logp, entropy, grad)


def token_stats_native(logits: torch.Tensor, targets: torch.Tensor) -> TokenStats:
    """The native op: three streaming passes per row, checking NaN/+inf in the first."""
    return TokenStats(*torch.ops.semgrad.token_stats(logits, targets))


if native_loaded():

    @torch.library.register_fake("semgrad::token_stats")
    def _token_stats_fake(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        acc = accumulation_dtype(logits.dtype)
        n, v = logits.shape
        return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc), logits.new_empty(n, v, dtype=acc)

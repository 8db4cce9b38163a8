"""Operation 1: per answer token, log-prob of the chosen token, entropy, and the NLL's logits gradient.

The SPEC's loss is ``-(1/T) Σ_t w_t logp_t`` with ``w_t`` the (detached) entropy,
so its gradient w.r.t. logits row t is ``(w_t / T) · nll_grad_t`` where
``nll_grad_t = softmax(z_t) - onehot(y_t)``. Rows of many answers are packed
along the first axis; the operation is row-wise, so ragged batches need no offsets.
Implementations: the plain-torch reference, a Triton kernel and the native op
``semgrad::token_stats`` (csrc/); all accumulate in float32 (float64 for float64 input).
Each checks its input unless told not to (``check=False``): then a row with NaN or +inf
logits gets NaN entropy and log-prob, which the caller checks once per batch without a
device synchronization per call.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._native import native_loaded
from ._triton import jit, tl, tl_dtype, triton


class TokenStats(NamedTuple):
    logp: torch.Tensor  # [N] log-prob of the target token
    entropy: torch.Tensor  # [N] entropy of softmax(z)
    nll_grad: torch.Tensor  # [N, V] softmax(z) - onehot(target)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/16-bit inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


NON_FINITE_LOGITS = "logits contain NaN or +inf: the model's forward pass is numerically broken"


def check_logits(logits: torch.Tensor, targets: torch.Tensor, check: bool = True) -> None:
    """Raise ValueError for a shape mismatch, and (``check``) for NaN/+inf logits or out-of-range
    targets (-inf logits are allowed). The value checks read the device back; scoring passes
    ``check=False`` and validates the whole batch once, from the entropies (NaN for such rows)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [N, V] and targets [N], got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if targets.device != logits.device:
        raise ValueError(f"targets on {targets.device}, logits on {logits.device}: both must be on one device")
    if not check:
        return
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise ValueError(NON_FINITE_LOGITS)
    if targets.numel() and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError("target token id outside the vocabulary")


def token_stats_reference(
    logits: torch.Tensor, targets: torch.Tensor, *, check: bool = True, overwrite: bool = False
) -> TokenStats:
    """Plain torch: materializes log_softmax of all rows. Unchecked, a NaN/+inf row gets NaN entropy."""
    check_logits(logits, targets, check)
    z = logits.to(accumulation_dtype(logits.dtype))
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    nll_grad = p.scatter_add(1, targets[:, None], -torch.ones_like(p[:, :1]))
    if not check:  # mark NaN/+inf rows (on the device, no read-back)
        bad = (torch.isnan(z) | torch.isposinf(z)).any(1)
        entropy, logp = entropy.masked_fill(bad, math.nan), logp.masked_fill(bad, math.nan)
    return TokenStats(logp, entropy, nll_grad)


@jit
def _token_stats_partial_kernel(
    logits_ptr, targets_ptr, part_ptr, zy_ptr, V, stride_row, CHUNK, n_chunks, BLOCK_V: tl.constexpr, ACC: tl.constexpr
):
    """One program per (row, vocabulary chunk): the chunk's max m, Σe^(z−m), Σe^(z−m)(z−m) and count of
    NaN/+inf entries into part[row, chunk, :4]; the program whose chunk holds the target stores its logit."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    z_row = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    t = tl.zeros([], ACC)
    bad = tl.zeros([], tl.int32)
    for v0 in range(lo, hi, BLOCK_V):
        z = tl.load(z_row + v0 + cols, mask=v0 + cols < hi, other=float("-inf")).to(ACC)
        bad += tl.sum(((z != z) | (z == float("inf"))).to(tl.int32), 0)
        m_new = tl.maximum(m, tl.max(z, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (−inf) − (−inf) while all is −inf
        x = z - m_ref
        e = tl.exp(x)
        alpha = tl.exp(m - m_ref)
        shift = tl.where(m == float("-inf"), 0.0, m - m_ref)  # s = t = 0 then
        t = alpha * (t + s * shift) + tl.sum(e * tl.where(z == float("-inf"), 0.0, x), 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    y = tl.load(targets_ptr + row)
    if (y >= lo) & (y < hi):
        tl.store(zy_ptr + row, tl.load(z_row + y).to(ACC))
    part = part_ptr + (row * n_chunks + chunk) * 4
    tl.store(part, m)
    tl.store(part + 1, s)
    tl.store(part + 2, t)
    tl.store(part + 3, bad.to(ACC))


@jit
def _token_stats_grad_kernel(
    logits_ptr,
    targets_ptr,
    part_ptr,
    zy_ptr,
    logp_ptr,
    entropy_ptr,
    grad_ptr,
    V,
    stride_row,
    CHUNK,
    n_chunks,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """One program per (row, chunk): combine the row's chunk partials, write softmax − onehot over its
    chunk (in place of the logits when ``grad_ptr`` is ``logits_ptr``); chunk 0 writes logp and entropy."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cs = tl.arange(0, BLOCK_C)
    part = part_ptr + (row * n_chunks + cs) * 4
    c_ok = cs < n_chunks
    m_c = tl.load(part, mask=c_ok, other=float("-inf"))
    s_c = tl.load(part + 1, mask=c_ok, other=0.0)
    t_c = tl.load(part + 2, mask=c_ok, other=0.0)
    bad = tl.sum(tl.load(part + 3, mask=c_ok, other=0.0), 0)
    m = tl.max(m_c, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    f = tl.exp(m_c - m_ref)  # 0 for an all −inf chunk
    s = tl.sum(f * s_c, 0)
    t = tl.sum(f * (t_c + s_c * tl.where(m_c == float("-inf"), 0.0, m_c - m_ref)), 0)
    log_s = tl.log(s)
    if chunk == 0:
        nan = tl.full([], float("nan"), ACC)
        tl.store(entropy_ptr + row, tl.where(bad > 0, nan, log_s - t / s))
        tl.store(logp_ptr + row, tl.where(bad > 0, nan, (tl.load(zy_ptr + row) - m) - log_s))
    y = tl.load(targets_ptr + row)
    z_row = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    for v0 in range(lo, hi, BLOCK_V):
        idx = v0 + cols
        z = tl.load(z_row + idx, mask=idx < hi, other=float("-inf")).to(ACC)
        grad = tl.exp((z - m) - log_s) - tl.where(idx == y, 1.0, 0.0)
        tl.store(grad_ptr + row * V + idx, grad, mask=idx < hi)


# Programs to aim for per launch: enough to fill a large GPU (132 SMs on an H100) several times.
_TARGET_PROGRAMS = 1024


def token_stats_triton(
    logits: torch.Tensor, targets: torch.Tensor, *, check: bool = True, overwrite: bool = False, block_v: int = 1024
) -> TokenStats:
    """Triton, parallel over (rows × vocabulary chunks) in two launches: chunk partials, then their
    combination and the gradient. ``overwrite``: the logits' memory may hold the gradient (when it is
    contiguous in the accumulation dtype), so that one [N, V] buffer serves both."""
    check_logits(logits, targets, check)
    z = logits if logits.stride(1) == 1 else logits.contiguous()
    n, v = z.shape
    acc = accumulation_dtype(z.dtype)
    logp, entropy = z.new_empty(n, dtype=acc), z.new_empty(n, dtype=acc)
    in_place = overwrite and z.dtype == acc and z.is_contiguous()
    grad = z if in_place else z.new_empty(n, v, dtype=acc)
    if n:
        per_chunk = -(-v // -(-_TARGET_PROGRAMS // n))
        chunk = -(-per_chunk // block_v) * block_v
        n_chunks = -(-v // chunk)
        part = z.new_empty(n, n_chunks, 4, dtype=acc)
        zy = z.new_zeros(n, dtype=acc)
        y = targets.contiguous()
        _token_stats_partial_kernel[(n, n_chunks)](
            z, y, part, zy, v, z.stride(0), chunk, n_chunks, BLOCK_V=block_v, ACC=tl_dtype(acc), num_warps=4
        )
        _token_stats_grad_kernel[(n, n_chunks)](
            z,
            y,
            part,
            zy,
            logp,
            entropy,
            grad,
            v,
            z.stride(0),
            chunk,
            n_chunks,
            BLOCK_V=block_v,
            BLOCK_C=max(2, triton.next_power_of_2(n_chunks)),
            ACC=tl_dtype(acc),
            num_warps=4,
        )
    return TokenStats(logp, entropy, grad)


def token_stats_native(
    logits: torch.Tensor, targets: torch.Tensor, *, check: bool = True, overwrite: bool = False
) -> TokenStats:
    """The native op: three streaming passes per row, checking NaN/+inf in the first."""
    return TokenStats(*torch.ops.semgrad.token_stats(logits, targets, check))


if native_loaded():

    @torch.library.register_fake("semgrad::token_stats")
    def _token_stats_fake(logits: torch.Tensor, targets: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, ...]:
        acc = accumulation_dtype(logits.dtype)
        n, v = logits.shape
        return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc), logits.new_empty(n, v, dtype=acc)

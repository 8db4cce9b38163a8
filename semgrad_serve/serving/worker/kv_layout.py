"""Reading a request's keys/values out of vLLM's paged KV cache.

vLLM 0.32 gives every attention layer one cache tensor whose logical shape is
``[num_blocks, kv_heads, block_size, 2 * head_dim]`` (any physical stride order
is hidden behind that view). What the last axis holds depends on the attention
backend:

- ``token_major`` (FlashAttention, FlashInfer, Triton and the other GPU
  backends): per block, head and token, the key (after rotary) then the value;
- ``cpu_transposed_k`` (``CPU_ATTN`` with its ``vec``/``vec16`` kernels): per
  block and head, the keys as ``[head_dim, block_size]`` (transposed), then the
  values as ``[block_size, head_dim]``.

``copy_blocks`` copies a request's blocks as they are (cheap: it runs between
engine steps), ``unpack`` turns them into ``[n_layers, 2, kv_heads, n, head_dim]``,
the form ``Scorer.score`` takes (on the scoring thread).

A quantized cache (``--kv-cache-dtype fp8`` and the like) is never read for
scoring: its keys/values move scores (``benchmarks/results/fp8_kv_scores_cpu.md``),
so the server recomputes the prompt (``quantized_cache`` says when). vLLM
allocates such a cache as bytes; with ``fp8``/``fp8_e4m3`` every GPU backend
stores, per element, the platform's FP8 type (e4m3) of value / scale, with one
scale for the keys and one for the values of each layer (the attention layer's
``_k_scale``/``_v_scale``; vLLM 0.32 refuses any other granularity), which
``dequantize`` reverses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

TOKEN_MAJOR = "token_major"
CPU_TRANSPOSED_K = "cpu_transposed_k"
# CPU_ATTN kernels whose cache layout is known (checked against vLLM's own writer in the tests);
# AMX packs keys differently, so a server using it scores by recompute.
CPU_ISAS = ("vec", "vec16")

# Cache element types holding keys/values as vLLM's attention computed them; any other (uint8, int8, FP8) is quantized.
FULL_PRECISION = (torch.float16, torch.bfloat16, torch.float32)


def quantized_cache(caches: Sequence[torch.Tensor]) -> str | None:
    """Why the per-layer caches cannot be read for scoring (they hold quantized keys/values), or None."""
    quantized = sorted({str(c.dtype).removeprefix("torch.") for c in caches if c.dtype not in FULL_PRECISION})
    return f"the KV cache holds quantized keys/values ({', '.join(quantized)})" if quantized else None


@dataclass(frozen=True)
class KVQuant:
    """How a layer's FP8 cache holds its keys/values: ``dtype`` elements (the cache's bytes viewed so) that times
    ``k_scale`` / ``v_scale`` are the keys / values vLLM attends to."""

    dtype: torch.dtype
    k_scale: float
    v_scale: float


def dequantize(kv: torch.Tensor, quants: Sequence[KVQuant], dtype: torch.dtype) -> torch.Tensor:
    """Keys/values [n_layers, 2, kv_heads, n, head_dim] in ``dtype`` from ``unpack``'s bytes of a quantized cache
    (``quants``: per layer, in the same order)."""
    if len(quants) != kv.shape[0]:
        raise ValueError(f"{len(quants)} quantization scales for {kv.shape[0]} layers")
    out = torch.empty(kv.shape, dtype=dtype, device=kv.device)
    for layer, (stored, quant) in enumerate(zip(kv, quants)):
        values = stored.view(quant.dtype).to(torch.float32)
        out[layer, 0] = values[0] * quant.k_scale
        out[layer, 1] = values[1] * quant.v_scale
    return out


def layout_for(backend_name: str, cpu_isa: str | None = None) -> str | None:
    """The layout of a backend's cache, or None where it is not known (the server then recomputes)."""
    if backend_name == "CPU_ATTN":
        return CPU_TRANSPOSED_K if cpu_isa in CPU_ISAS else None
    if backend_name.startswith(("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "ROCM_ATTN", "FLEX_ATTENTION")):
        return TOKEN_MAJOR
    return None


def copy_blocks(caches: Sequence[torch.Tensor], block_ids: Sequence[int], n: int) -> list[torch.Tensor]:
    """The blocks holding a request's first ``n`` positions, copied as they are stored: per layer
    [n_blocks, kv_heads, block_size, 2 * head_dim]. One contiguous copy per layer, in buffers of a layer each
    (small enough for the allocator to reuse freed memory instead of faulting in fresh pages): this runs on
    the engine's critical path, so the unpacking is left to ``unpack`` (on the scoring thread)."""
    block_size = caches[0].shape[2]
    needed = -(-n // block_size)
    if needed > len(block_ids):
        raise ValueError(f"{n} positions need {needed} blocks, the request holds {len(block_ids)}")
    blocks = torch.tensor(list(block_ids[:needed]), dtype=torch.long, device=caches[0].device)
    return [cache.index_select(0, blocks) for cache in caches]


def unpack(blocks: Sequence[torch.Tensor], layout: str, n: int) -> torch.Tensor:
    """Keys/values [n_layers, 2, kv_heads, n, head_dim] of the first ``n`` positions of ``copy_blocks``'s copy."""
    n_blocks, heads, block_size, two_d = blocks[0].shape
    d = two_d // 2
    out = blocks[0].new_empty(len(blocks), 2, heads, n_blocks, block_size, d)
    for layer, layer_out in zip(blocks, out):
        if layout == TOKEN_MAJOR:
            k, v = layer[..., :d], layer[..., d:]
        elif layout == CPU_TRANSPOSED_K:
            halves = layer.contiguous().view(n_blocks, heads, 2, block_size * d)
            k = halves[:, :, 0].unflatten(-1, (d, block_size)).transpose(-1, -2)
            v = halves[:, :, 1].unflatten(-1, (block_size, d))
        else:
            raise ValueError(f"unknown KV cache layout {layout!r}")
        layer_out[0].copy_(k.transpose(0, 1))
        layer_out[1].copy_(v.transpose(0, 1))
    return out.view(len(blocks), 2, heads, n_blocks * block_size, d)[:, :, :, :n]


def read_prefix(caches: Sequence[torch.Tensor], layout: str, block_ids: Sequence[int], n: int) -> torch.Tensor:
    """Keys/values [n_layers, 2, kv_heads, n, head_dim] of a request's first ``n`` positions, from the
    per-layer caches (in layer order) and the request's block table."""
    return unpack(copy_blocks(caches, block_ids, n), layout, n)

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

``read_prefix`` gathers the first ``n`` positions of a request from its block
table as ``[n_layers, 2, kv_heads, n, head_dim]``, the form ``Scorer.score`` takes.
"""

from __future__ import annotations

from typing import Sequence

import torch

TOKEN_MAJOR = "token_major"
CPU_TRANSPOSED_K = "cpu_transposed_k"
# CPU_ATTN kernels whose cache layout is known (checked against vLLM's own writer in the tests);
# AMX packs keys differently, so a server using it scores by recompute.
CPU_ISAS = ("vec", "vec16")


def layout_for(backend_name: str, cpu_isa: str | None = None) -> str | None:
    """The layout of a backend's cache, or None where it is not known (the server then recomputes)."""
    if backend_name == "CPU_ATTN":
        return CPU_TRANSPOSED_K if cpu_isa in CPU_ISAS else None
    if backend_name.startswith(("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "ROCM_ATTN", "FLEX_ATTENTION")):
        return TOKEN_MAJOR
    return None


def _read_layer(cache: torch.Tensor, layout: str, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """[2, kv_heads, n, head_dim] keys and values of the first n positions stored in ``blocks``."""
    n_blocks = len(blocks)
    _, heads, block_size, two_d = cache.shape
    d = two_d // 2
    picked = cache.index_select(0, blocks)  # [n_blocks, heads, block_size, 2d], a copy
    if layout == TOKEN_MAJOR:
        k, v = picked[..., :d], picked[..., d:]
    elif layout == CPU_TRANSPOSED_K:
        halves = picked.reshape(n_blocks, heads, 2, block_size * d)
        k = halves[:, :, 0].reshape(n_blocks, heads, d, block_size).transpose(-1, -2)
        v = halves[:, :, 1].reshape(n_blocks, heads, block_size, d)
    else:
        raise ValueError(f"unknown KV cache layout {layout!r}")
    kv = torch.stack((k, v))  # [2, n_blocks, heads, block_size, d]
    return kv.permute(0, 2, 1, 3, 4).reshape(2, heads, n_blocks * block_size, d)[:, :, :n]


def read_prefix(caches: Sequence[torch.Tensor], layout: str, block_ids: Sequence[int], n: int) -> torch.Tensor:
    """Keys/values [n_layers, 2, kv_heads, n, head_dim] of a request's first ``n`` positions, from the
    per-layer caches (in layer order) and the request's block table."""
    block_size = caches[0].shape[2]
    needed = -(-n // block_size)
    if needed > len(block_ids):
        raise ValueError(f"{n} positions need {needed} blocks, the request holds {len(block_ids)}")
    blocks = torch.tensor(list(block_ids[:needed]), dtype=torch.long, device=caches[0].device)
    return torch.stack([_read_layer(cache, layout, blocks, n) for cache in caches])

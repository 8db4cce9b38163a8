"""Forward passes without a graph that scoring and calibration share: a prefix's keys/values, right-padded batches.

A prefix that several sequences start with (a chat template's head, a system prompt, an
instruction) runs once, as a batch of one, and enters every layer as constant keys/values
(``prefix_keys_values``); the sequences then run from its end on, right-padded into one batch
(``padded_forward``). Right padding keeps every real token at its position, and attention being
causal, the padding after a sequence is never attended to by its tokens.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .decoder import KeyValue, context_step, embed_tokens, layer_forward, long_rope, rotary, window_masks
from .weights import DecoderWeights


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, asynchronously (no stream sync)."""
    device = torch.device(device)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def right_padded(seqs: Sequence[Sequence[int]], device: torch.device | str, width: int | None = None) -> torch.Tensor:
    """Token ids [len(seqs), width] (default: the longest), each sequence from column 0 and zeros after it;
    built on the host and sent in one copy."""
    width = max(len(s) for s in seqs) if width is None else width
    return to_device(torch.tensor([[*s, *[0] * (width - len(s))] for s in seqs], dtype=torch.long), device)


def valid_mask(lengths: Sequence[int], width: int, device: torch.device | str) -> torch.Tensor:
    """[len(lengths), width], True on each sequence's tokens and False on its right padding."""
    return torch.arange(width, device=device) < torch.tensor(list(lengths), device=device)[:, None]


def common_prefix_length(seqs: Sequence[Sequence[int]], limit: int | None = None) -> int:
    """Length of the longest prefix every sequence starts with, at most ``limit``."""
    first = seqs[0]
    n = min(len(s) for s in seqs) if limit is None else min(limit, *(len(s) for s in seqs))
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


def prefix_keys_values(w: DecoderWeights, ids: Sequence[int], long: bool = False) -> tuple[KeyValue, ...]:
    """Keys/values [1, kv_heads, len(ids), head_dim] of ``ids`` (positions 0..) at every layer, with no graph;
    ``long``: of sequences that take LongRoPE's long frequencies."""
    pos = torch.arange(len(ids), device=w.device)[None]
    rope = rotary(w, pos, w.dtype, torch.tensor([long], device=w.device))
    masks = window_masks(w, range(w.n_layers), pos, pos, None)
    kvs = []
    with torch.no_grad():
        x = embed_tokens(w, to_device(torch.tensor([list(ids)]), w.device))
        for i in range(w.n_layers):
            x, kv = context_step(w, i, x, rope, masks)
            kvs.append(kv)
    return tuple(kvs)


def expand_prefix(prefix: Sequence[KeyValue] | None, batch: int, n_layers: int) -> list[KeyValue | None]:
    """Per layer, a batch-1 prefix's keys/values expanded (not copied) to ``batch`` sequences; None without a prefix."""
    if prefix is None:
        return [None] * n_layers
    return [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefix]


def padded_forward(
    w: DecoderWeights,
    seqs: Sequence[Sequence[int]],
    start: int = 0,
    prefix: Sequence[KeyValue] | None = None,
    n_layers: int | None = None,
    each_state: Callable[[torch.Tensor], None] | None = None,
    long: torch.Tensor | None = None,
) -> torch.Tensor:
    """The residual stream [B, width, d] after the first ``n_layers`` layers (default: all) of ``seqs``, right-padded,
    at positions ``start``, ``start`` + 1, ..., with no graph. ``prefix``: the keys/values of positions [0, start)
    at every layer (``prefix_keys_values``), which every sequence follows. ``each_state`` is handed the embedding
    output and each layer's output in turn. ``long`` [B]: which sequences take LongRoPE's long frequencies
    (default: by each sequence's own length)."""
    n_layers = w.n_layers if n_layers is None else n_layers
    ids = right_padded(seqs, w.device)
    batch, width = ids.shape
    pos = torch.arange(start, start + width, device=w.device).expand(batch, width)
    keys = pos if prefix is None else torch.cat((torch.arange(start, device=w.device).expand(batch, start), pos), dim=1)
    past = expand_prefix(prefix, batch, w.n_layers)
    if long is None:
        long = long_rope(w, [start + len(s) for s in seqs])
    with torch.no_grad():
        x = embed_tokens(w, ids)
        if each_state is not None:
            each_state(x)
        if n_layers > 0:
            rope = rotary(w, pos, w.dtype, long)
            masks = window_masks(w, range(n_layers), pos, keys, None)
            for i, layer in enumerate(w.layers[:n_layers]):
                x, _ = layer_forward(w, layer, x, rope, masks, past=past[i])
                if each_state is not None:
                    each_state(x)
    return x

"""The decoder's maths as plain functions over ``DecoderWeights``.

Mirrors the Hugging Face Llama/Mistral/Qwen2/Qwen3 forward (RMSNorm computed in
float32 or wider, rotary cos/sin computed in float32, SiLU-gated MLP), so that
scores from this forward match the naive Hugging Face computation. Under tensor
parallelism the same code runs on one rank's shards, with the conjugate
collectives of ``tensor_parallel.py`` around the sharded products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tensor_parallel import copy_to_ranks, reduce_from_ranks
from .weights import DecoderWeights, LayerWeights

KeyValue = tuple[torch.Tensor, torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the statistics in float32 (or float64 for float64 input)."""
    dtype = x.dtype
    xf = x.to(torch.promote_types(dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rotary(w: DecoderWeights, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, S, head_dim] for integer positions [B, S]."""
    freqs = positions[..., None].float() * w.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * w.rope_scale).to(dtype)
    sin = (emb.sin() * w.rope_scale).to(dtype)
    return cos[:, None], sin[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None, window: int | None
) -> torch.Tensor:
    """Boolean mask [B, 1, Sq, Sk] (True = attend): causal in absolute positions, optional window and key validity."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    if k_valid is not None:
        allowed &= k_valid[:, None, :]
    return allowed[:, None]


def window_masks(
    w: DecoderWeights, layers: range, q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None
) -> dict[int | None, torch.Tensor | None]:
    """``layer_forward``'s masks for the distinct windows of ``layers``; None (plain causal) where keys and
    queries are the same positions and all keys are valid."""
    plain = k_valid is None and q_pos.shape == k_pos.shape
    windows = {w.layers[i].window for i in layers}
    return {win: None if plain and win is None else attention_mask(q_pos, k_pos, k_valid, win) for win in windows}


def _linear_parts(
    x: torch.Tensor, weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor | None, ...], sizes: list[int]
) -> list[torch.Tensor]:
    """Apply one fused projection and split it, or the separate projections."""
    if len(weights) == 1:
        return list(F.linear(x, weights[0], biases[0] if biases else None).split(sizes, dim=-1))
    return [F.linear(x, wt, b) for wt, b in zip(weights, biases or (None,) * len(weights))]


def _queries_keys_values(
    w: DecoderWeights, layer: LayerWeights, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], queries: bool
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Queries (None unless ``queries``), keys and values [B, heads, S, head_dim] of x [B, S, d], after rotary."""
    batch, seq, _ = x.shape
    h = copy_to_ranks(rms_norm(x, layer.input_norm, w.norm_eps), w.tp)
    q_size, kv_size = w.n_heads * w.head_dim, w.n_kv_heads * w.head_dim
    weights, biases = layer.qkv, layer.qkv_bias
    if queries:
        q, k, v = _linear_parts(h, weights, biases, [q_size, kv_size, kv_size])
    elif len(weights) == 1:  # fused: skip the query rows
        bias = biases[0][q_size:] if biases and biases[0] is not None else None
        q, (k, v) = None, _linear_parts(h, (weights[0][q_size:],), (bias,), [kv_size, kv_size])
    else:
        q, (k, v) = None, _linear_parts(h, weights[1:], biases[1:], [kv_size, kv_size])
    k = k.view(batch, seq, w.n_kv_heads, w.head_dim)
    v = v.view(batch, seq, w.n_kv_heads, w.head_dim).transpose(1, 2)
    if layer.k_norm is not None:
        k = rms_norm(k, layer.k_norm, w.norm_eps)
    cos, sin = rope
    k = _rotate(k.transpose(1, 2), cos, sin)
    if q is not None:
        q = q.view(batch, seq, w.n_heads, w.head_dim)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, w.norm_eps)
        q = _rotate(q.transpose(1, 2), cos, sin)
    return q, k, v


def attention_after_past(q: torch.Tensor, own: KeyValue, past: KeyValue, mask: torch.Tensor) -> torch.Tensor:
    """Attention [B, heads, S, head_dim] of queries q over constant ``past`` keys/values followed by their
    own, as two products under one softmax, so that autograd forms no gradient for the past keys/values
    (over their concatenation, SDPA's backward would, for every past position). ``mask`` [B, 1, S, P + S]
    as ``attention_mask`` builds it; query heads sharing a key/value head are stacked, not the keys repeated."""
    batch, heads, seq, head_dim = q.shape
    kv_heads, n_past = past[0].shape[1], past[0].shape[2]
    group = heads // kv_heads
    qg = q.reshape(batch, kv_heads, group * seq, head_dim) * head_dim**-0.5
    scores = torch.cat((qg @ past[0].transpose(-1, -2), qg @ own[0].transpose(-1, -2)), dim=-1)
    scores = scores.view(batch, kv_heads, group, seq, n_past + seq).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, group * seq, n_past + seq)
    out = probs[..., :n_past] @ past[1] + probs[..., n_past:] @ own[1]
    return out.view(batch, heads, seq, head_dim)


def layer_forward(
    w: DecoderWeights,
    layer: LayerWeights,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    masks: dict[int | None, torch.Tensor],
    past: KeyValue | None = None,
) -> tuple[torch.Tensor, KeyValue]:
    """One decoder layer on x [B, S, d]. ``past`` holds constant keys/values [B, kv_heads, P, head_dim]
    that precede x; ``masks`` maps a window size to the mask over (past + x) keys, or to None
    for plain causal attention without past.
    Returns the layer output and this call's own keys/values (after rotary)."""
    batch, seq, _ = x.shape
    q_size = w.n_heads * w.head_dim
    q, k, v = _queries_keys_values(w, layer, x, rope, queries=True)
    own = (k, v)
    mask = masks[layer.window]
    if past is not None and torch.is_grad_enabled() and q.requires_grad:
        out = attention_after_past(q, (k, v), past, mask)
    else:
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=w.n_heads != w.n_kv_heads
        )
    x = x + reduce_from_ranks(F.linear(out.transpose(1, 2).reshape(batch, seq, q_size), layer.o_proj), w.tp)
    h = copy_to_ranks(rms_norm(x, layer.post_norm, w.norm_eps), w.tp)
    inter = layer.down.shape[1]
    gate, up = _linear_parts(h, layer.gate_up, (), [inter, inter])
    return x + reduce_from_ranks(F.linear(F.silu(gate) * up, layer.down), w.tp), own


def context_step(
    w: DecoderWeights,
    index: int,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    masks: dict[int | None, torch.Tensor],
    past: KeyValue | None = None,
) -> tuple[torch.Tensor | None, KeyValue]:
    """Layer ``index`` on positions that later positions only attend to: its output and its keys/values,
    except at the last layer, whose output nothing reads (None, and only keys/values are computed)."""
    layer = w.layers[index]
    if index == w.n_layers - 1:
        _, k, v = _queries_keys_values(w, layer, x, rope, queries=False)
        return None, (k, v)
    return layer_forward(w, layer, x, rope, masks, past=past)

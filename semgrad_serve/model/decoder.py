"""The decoder's maths as plain functions over ``DecoderWeights``.

Mirrors the transformers forward of every supported family (RMSNorm computed in float32 or
wider, with Gemma's (1 + w) and its norms around attention and MLP; rotary cos/sin computed
in float32, partial and per layer type; gated MLPs, dense or a mixture of experts; Gemma's
query scale and soft-capped attention scores), so that scores from this forward match the
naive transformers computation. Under tensor parallelism the same code runs on one rank's
shards, with the conjugate collectives of ``tensor_parallel.py`` around the sharded products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .expert_layout import expert_linear
from .tensor_parallel import copy_to_ranks, embed, reduce_from_ranks
from .weights import DecoderWeights, LayerWeights, MoEWeights

KeyValue = tuple[torch.Tensor, torch.Tensor]
Ropes = dict[int, tuple[torch.Tensor, torch.Tensor]]  # rotary index → (cos, sin) [B, 1, S, rotary_dim]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm with the statistics in float32 (or float64 for float64 input); ``offset`` 1 is Gemma's (1 + w),
    applied before rounding back, as transformers does."""
    dtype = x.dtype
    xf = x.to(torch.promote_types(dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (xf * (offset + weight.to(xf.dtype))).to(dtype)
    return weight * xf.to(dtype)


def norm(w: DecoderWeights, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm of x with ``weight``."""
    return rms_norm(x, weight, w.norm_eps, w.norm_offset)


def embed_tokens(w: DecoderWeights, ids: torch.Tensor) -> torch.Tensor:
    """The embedding output of token ids: the lookup, times Gemma's sqrt(d) rounded to the weights' dtype."""
    return scale_embedding(w, embed(ids, w.embed, w.tp))


def scale_embedding(w: DecoderWeights, x: torch.Tensor) -> torch.Tensor:
    """Looked-up embedding rows x, scaled as the model's embedding scales them."""
    return x if w.embed_scale is None else x * torch.tensor(w.embed_scale, dtype=x.dtype)


def long_rope(w: DecoderWeights, lengths: torch.Tensor | list[int]) -> torch.Tensor | None:
    """Per sequence of ``lengths`` tokens, whether it takes LongRoPE's long frequencies (transformers chooses by
    the length of the whole forward); None without LongRoPE."""
    after = w.long_rope_after
    if after is None:
        return None
    return torch.as_tensor(lengths, device=w.device) > after


def rotary(w: DecoderWeights, positions: torch.Tensor, dtype: torch.dtype, long: torch.Tensor | None = None) -> Ropes:
    """cos and sin of each of the model's rotaries for integer positions [B, S]; ``long`` [B]: which sequences
    take LongRoPE's long frequencies (``long_rope``)."""
    out = {}
    for index, r in enumerate(w.rotaries):
        inv_freq = r.inv_freq
        if r.long_inv_freq is not None and long is not None:
            inv_freq = torch.where(long[:, None], r.long_inv_freq, r.inv_freq)[:, None, :]
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        out[index] = ((emb.cos() * r.scale).to(dtype)[:, None], (emb.sin() * r.scale).to(dtype)[:, None])
    return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on the first ``cos.shape[-1]`` dims of each head (all of them but for partial rotary)."""
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        return torch.cat((_rotate(x[..., :dim], cos, sin), x[..., dim:]), dim=-1)
    half = dim // 2
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
    w: DecoderWeights, layer: LayerWeights, x: torch.Tensor, ropes: Ropes, queries: bool
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Queries (None unless ``queries``), keys and values [B, heads, S, head_dim] of x [B, S, d], after rotary."""
    batch, seq, _ = x.shape
    h = copy_to_ranks(norm(w, x, layer.input_norm), w.tp)
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
        k = norm(w, k, layer.k_norm)
    cos, sin = ropes[layer.rope]
    k = _rotate(k.transpose(1, 2), cos, sin)
    if q is not None:
        q = q.view(batch, seq, w.n_heads, w.head_dim)
        if layer.q_norm is not None:
            q = norm(w, q, layer.q_norm)
        q = _rotate(q.transpose(1, 2), cos, sin)
    return q, k, v


def attention_after_past(
    w: DecoderWeights, q: torch.Tensor, own: KeyValue, past: KeyValue | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention [B, heads, S, head_dim] of queries q over constant ``past`` keys/values followed by their
    own, as two products under one softmax, so that autograd forms no gradient for the past keys/values
    (over their concatenation, SDPA's backward would, for every past position). ``mask`` [B, 1, S, P + S]
    as ``attention_mask`` builds it, None: causal without past; query heads sharing a key/value head are
    stacked, not the keys repeated. The model's query scale and attention soft-cap apply."""
    batch, heads, seq, head_dim = q.shape
    kv_heads, n_past = own[0].shape[1], 0 if past is None else past[0].shape[2]
    if mask is None:
        pos = torch.arange(seq, device=q.device)[None]
        mask = attention_mask(pos, pos, None, None)
    group = heads // kv_heads
    qg = q.reshape(batch, kv_heads, group * seq, head_dim) * (w.attn_scale or head_dim**-0.5)
    scores = qg @ own[0].transpose(-1, -2)
    if past is not None:
        scores = torch.cat((qg @ past[0].transpose(-1, -2), scores), dim=-1)
    if w.attn_softcap is not None:
        scores = torch.tanh(scores / w.attn_softcap) * w.attn_softcap
    scores = scores.view(batch, kv_heads, group, seq, n_past + seq).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, group * seq, n_past + seq)
    out = probs[..., n_past:] @ own[1]
    if past is not None:
        out = probs[..., :n_past] @ past[1] + out
    return out.view(batch, heads, seq, head_dim)


def _activation(w: DecoderWeights, gate: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) if w.activation == "silu" else F.gelu(gate, approximate="tanh")


def _gated_mlp(
    w: DecoderWeights, gate_up: tuple[torch.Tensor, ...], down: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    inter = down.shape[1]
    gate, up = _linear_parts(h, gate_up, (), [inter, inter])
    return F.linear(_activation(w, gate) * up, down)


def mixture_of_experts(w: DecoderWeights, moe: MoEWeights, h: torch.Tensor) -> torch.Tensor:
    """A sparse MoE MLP on h [..., d]: each token's top-k experts by router softmax (in float32 or wider), their
    outputs weighted by the (renormalised) probabilities, plus the gated shared expert. Autograd reaches the
    selected experts and the routing weights; the choice itself is discrete."""
    x = h.reshape(-1, h.shape[-1])
    logits = F.linear(x, moe.router)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top, chosen = torch.topk(probs, moe.top_k, dim=-1)
    if moe.renormalise:
        top = top / top.sum(-1, keepdim=True)
    top = top.to(x.dtype)
    out = torch.zeros_like(x)
    for expert in chosen.unique().tolist():
        tokens, slot = torch.where(chosen == expert)
        gate, up = expert_linear(x[tokens], moe.gate_up[expert]).chunk(2, dim=-1)
        y = expert_linear(_activation(w, gate) * up, moe.down[expert])
        out = out.index_add(0, tokens, y * top[tokens, slot, None])
    if moe.shared_down is not None:
        shared = _gated_mlp(w, moe.shared_gate_up, moe.shared_down, x)
        out = out + torch.sigmoid(F.linear(x, moe.shared_gate)) * shared
    return out.view(h.shape)


def layer_forward(
    w: DecoderWeights,
    layer: LayerWeights,
    x: torch.Tensor,
    ropes: Ropes,
    masks: dict[int | None, torch.Tensor],
    past: KeyValue | None = None,
) -> tuple[torch.Tensor, KeyValue]:
    """One decoder layer on x [B, S, d]. ``past`` holds constant keys/values [B, kv_heads, P, head_dim]
    that precede x; ``masks`` maps a window size to the mask over (past + x) keys, or to None
    for plain causal attention without past.
    Returns the layer output and this call's own keys/values (after rotary)."""
    batch, seq, _ = x.shape
    q_size = w.n_heads * w.head_dim
    q, k, v = _queries_keys_values(w, layer, x, ropes, queries=True)
    own = (k, v)
    mask = masks[layer.window]
    if w.attn_softcap is not None or (past is not None and torch.is_grad_enabled() and q.requires_grad):
        out = attention_after_past(w, q, (k, v), past, mask)
    else:
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=w.attn_scale, enable_gqa=w.n_heads != w.n_kv_heads
        )
    attn = reduce_from_ranks(F.linear(out.transpose(1, 2).reshape(batch, seq, q_size), layer.o_proj), w.tp)
    x = x + (attn if layer.attn_out_norm is None else norm(w, attn, layer.attn_out_norm))
    h = copy_to_ranks(norm(w, x, layer.post_norm), w.tp)
    if layer.moe is not None:
        mlp = reduce_from_ranks(mixture_of_experts(w, layer.moe, h), w.tp)
    else:
        mlp = reduce_from_ranks(_gated_mlp(w, layer.gate_up, layer.down, h), w.tp)
    return x + (mlp if layer.mlp_out_norm is None else norm(w, mlp, layer.mlp_out_norm)), own


def context_step(
    w: DecoderWeights,
    index: int,
    x: torch.Tensor,
    ropes: Ropes,
    masks: dict[int | None, torch.Tensor],
    past: KeyValue | None = None,
) -> tuple[torch.Tensor | None, KeyValue]:
    """Layer ``index`` on positions that later positions only attend to: its output and its keys/values,
    except at the last layer, whose output nothing reads (None, and only keys/values are computed)."""
    layer = w.layers[index]
    if index == w.n_layers - 1:
        _, k, v = _queries_keys_values(w, layer, x, ropes, queries=False)
        return None, (k, v)
    return layer_forward(w, layer, x, ropes, masks, past=past)

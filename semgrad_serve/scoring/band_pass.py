"""The scoring forward: autograd only where SemGrad needs it.

For a batch of (prompt, answer) sequences, right-padded:
0. a prompt prefix all items share may come as constant keys/values
   (``shared_prefix.py``), or each item's whole prompt before t* may (read
   from vLLM's KV cache); the items then run from its end on;
1. layers below the band run on every position with no graph, unless the
   residual stream entering the band is given for positions t* onwards
   (recorded while vLLM generated): then only the band runs;
2. from the band start on, each sequence is split at t*: the prefix (positions
   before t*) runs with no graph and hands its keys/values to the suffix as
   constants (at the last layer only its keys/values are computed); the suffix
   (t* onwards) runs with autograd;
3. a zero "probe" is added to each band layer's input at t*; the gradient
   w.r.t. a probe is the total derivative of the loss w.r.t. that band hidden
   state at t* (positions before t* cannot see t*, so nothing is lost);
4. only the final-normed states that predict answer tokens are returned.
Weights are detached constants, so the graph holds only the suffix activations.
The last answer token is never fed in: no position that matters attends to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..model.decoder import context_step, embed_tokens, layer_forward, long_rope, norm, rotary, window_masks
from ..model.forward import expand_prefix, padded_forward, right_padded, to_device
from ..model.weights import DecoderWeights
from .given import Given, GivenKind, batch_kind
from .items import PreparedItem
from .shared_prefix import SharedPrefix


@dataclass
class BandPass:
    answer_hidden: torch.Tensor  # [ΣT, d] final-normed states predicting the answer tokens, in the graph
    probes: torch.Tensor  # [n_band, B, d] zero leaves at the band inputs at t*
    targets: torch.Tensor  # [ΣT] answer token ids
    offsets: torch.Tensor  # [B + 1] row offsets of each item's answer in the packed rows
    t_star_hidden: torch.Tensor  # [B, d] the residual stream entering the band's last layer at t* (no graph)


def pad_prefix_kv(prefixes: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Stack per-item prefix keys/values [L, 2, kv_heads, t*_b, head_dim] into [L, 2, B, kv_heads, length, head_dim],
    zero past each item's t* (those keys are masked out)."""
    n_layers, _, kv_heads, _, head_dim = prefixes[0].shape
    if len(prefixes) == 1 and prefixes[0].shape[3] == length:
        return prefixes[0][:, :, None]  # one item: no copy
    out = prefixes[0].new_zeros(n_layers, 2, len(prefixes), kv_heads, length, head_dim)
    for b, kv in enumerate(prefixes):
        out[:, :, b, :, : kv.shape[3]] = kv
    return out


def pad_rows(rows: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Stack per-item states [n_b, d] into [B, length, d], zero past each item's rows."""
    if len(rows) == 1 and rows[0].shape[0] == length:
        return rows[0][None]
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    for b, x in enumerate(rows):
        out[b, : x.shape[0]] = x
    return out


def band_pass(
    w: DecoderWeights,
    items: Sequence[PreparedItem],
    band: range,
    shared: SharedPrefix | None = None,
    given: Sequence[Given] | None = None,
) -> BandPass:
    """Run the batch forward; ``band`` is the range of hidden-state indices whose gradient at t* is wanted.
    ``shared``: a prefix every item starts with (ending at or before each t*), whose keys/values enter
    every layer as constants, so that the items run from its end on.
    ``given``: per item, what it is given (``Given``; its logits are not read here), every item of the same kind:
    with the keys/values of its positions [0, t*) at every layer (e.g. read from vLLM's KV cache), the items run
    from t* on through every layer, with no graph below the band; with the band's inputs too (the keys/values
    then of the layers from ``band.start`` on), only the band runs."""
    dev, dtype, n_layers = w.device, w.dtype, w.n_layers
    kind = batch_kind(given)
    if given is not None and len(given) != len(items):
        raise ValueError("given states need one entry per item")
    if kind is not GivenKind.NOTHING and shared is not None:
        raise ValueError("a shared prefix and per-item prefix keys/values exclude each other")
    prefix_kv = None if given is None or kind is GivenKind.NOTHING else [g.prefix_kv for g in given]
    c = len(shared.ids) if shared is not None else 0
    seqs = [it.prompt_ids + it.answer_ids[:-1] for it in items]
    # Index bookkeeping on the host, each tensor sent once: no device read-back, no per-item copies.
    t_star_h = [it.t_star for it in items]
    s_len_h = [it.length - t for it, t in zip(items, t_star_h)]
    t_star = to_device(torch.tensor(t_star_h), dev)
    batch, n_max = len(items), max(it.length for it in items)
    long = long_rope(w, [it.length + 1 for it in items])  # transformers' choice for prompt + whole answer
    # keys/values of the shared positions [0, c) per layer, the same for every item
    shared_kv = expand_prefix(None if shared is None else shared.keys_values, batch, n_layers)
    shared_pos = torch.arange(c, device=dev).expand(batch, c)

    # Split each sequence at its t*: prefix [c, t*) and suffix [t*, n).
    p_max, s_max = max(t_star_h), max(s_len_h)
    suf_pos = t_star[:, None] + torch.arange(s_max, device=dev)
    pre_pos = torch.arange(c, p_max, device=dev).expand(batch, p_max - c)
    pre_valid = pre_pos < t_star[:, None]

    if prefix_kv is None:
        first = band.start  # layers below the band run on every position, without a graph
        x = padded_forward(
            w, [s[c:] for s in seqs], c, None if shared is None else shared.keys_values, n_layers=first, long=long
        )
        x_suf = x.gather(1, (suf_pos - c).clamp(max=n_max - c - 1)[..., None].expand(-1, -1, x.shape[-1]))
        x_pre = x[:, : p_max - c]
        pre_rope = rotary(w, pre_pos, dtype, long)
        pre_masks = window_masks(w, range(first, n_layers), pre_pos, torch.cat((shared_pos, pre_pos), dim=1), None)
    elif kind is GivenKind.PROMPT_KV:
        first = 0  # only the suffix runs, through every layer, over the given prefix keys/values
        x_suf = embed_tokens(w, right_padded([s[it.t_star :] for s, it in zip(seqs, items)], dev, s_max))
        pre_kv = pad_prefix_kv([kv.to(device=dev, dtype=dtype) for kv in prefix_kv], p_max)
    else:
        first = band.start  # only the band runs, on the suffix, from the given residual stream
        x_suf = pad_rows([g.band_inputs[:n].to(device=dev, dtype=dtype) for g, n in zip(given, s_len_h)], s_max)
        pre_kv = pad_prefix_kv([kv.to(device=dev, dtype=dtype) for kv in prefix_kv], p_max)

    suf_rope = rotary(w, suf_pos, dtype, long)
    suf_masks = window_masks(
        w,
        range(first, n_layers),
        suf_pos,
        torch.cat((shared_pos, pre_pos, suf_pos), dim=1),
        torch.cat(
            (torch.ones_like(shared_pos, dtype=torch.bool), pre_valid, torch.ones_like(suf_pos, dtype=torch.bool)),
            dim=1,
        ),
    )

    probes = torch.zeros(len(band), batch, w.hidden_size, dtype=dtype, device=dev, requires_grad=True)
    at_t_star = (torch.arange(s_max, device=dev) == 0).to(dtype)[None, :, None]  # no host-to-device copy
    grad_on = torch.is_grad_enabled()
    for i in range(first, n_layers):
        past = shared_kv[i]
        if prefix_kv is not None:
            past = (pre_kv[i - first, 0], pre_kv[i - first, 1])
        elif p_max > c:
            with torch.no_grad():
                x_pre, own = context_step(w, i, x_pre, pre_rope, pre_masks, past)
            past = own if past is None else (torch.cat((past[0], own[0]), dim=2), torch.cat((past[1], own[1]), dim=2))
        if i == band.stop - 1:
            t_star_hidden = x_suf[:, 0].detach()
        if i in band:
            x_suf = x_suf + probes[i - band.start][:, None, :] * at_t_star
        with torch.set_grad_enabled(grad_on and i >= band.start):
            x_suf, _ = layer_forward(w, w.layers[i], x_suf, suf_rope, suf_masks, past=past)

    answer_lengths = [len(it.answer_ids) for it in items]
    rows_b = torch.repeat_interleave(torch.arange(batch), torch.tensor(answer_lengths))
    rows_s = torch.cat([torch.arange(s - t, s) for s, t in zip(s_len_h, answer_lengths)])
    answer_hidden = norm(w, x_suf[to_device(rows_b, dev), to_device(rows_s, dev)], w.final_norm)
    targets = to_device(torch.tensor([tok for it in items for tok in it.answer_ids], dtype=torch.long), dev)
    offsets = to_device(torch.tensor([0, *answer_lengths]).cumsum(0), dev)
    return BandPass(answer_hidden, probes, targets, offsets, t_star_hidden)

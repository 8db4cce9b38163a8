"""RAUQ (Vazhentsev et al., arXiv 2505.20045): an unsupervised, single-forward, attention-based uncertainty score.

Implemented from the paper's description as we read it (not from its code): in every layer ℓ the head h_ℓ with the
largest mean attention of each answer token to the token before it is chosen (per answer); a token's confidence is
carried along the answer by a recurrence, ``c_1 = p_1`` and ``c_t = α·p_t + (1 − α)·a_t·c_{t−1}`` with ``p_t``
the probability of answer token t and ``a_t`` head h_ℓ's attention from token t to token t − 1; the layer's uncertainty
is ``−mean_t ln c_t`` and the answer's RAUQ is the largest over a set of layers (here the middle third, where the
paper finds the uncertainty-aware heads), with α = ``ALPHA``. Higher = more uncertain.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..model.logprobs import token_logprobs

ALPHA = 0.2


def layer_uncertainty(probs: np.ndarray, prev_attention: np.ndarray, alpha: float = ALPHA) -> float:
    """``−mean_t ln c_t`` of one layer's chosen head: ``probs`` [T] of the answer tokens, ``prev_attention`` [T]
    (entry t: attention from token t to token t − 1; entry 0 unused)."""
    c = float(probs[0])
    total = np.log(max(c, 1e-300))
    for t in range(1, len(probs)):
        c = alpha * float(probs[t]) + (1 - alpha) * float(prev_attention[t]) * c
        total += np.log(max(c, 1e-300))
    return float(-total / len(probs))


def middle_layers(n_layers: int) -> range:
    """The layers RAUQ takes its maximum over: the middle third."""
    return range(n_layers // 3, max(n_layers // 3 + 1, (2 * n_layers) // 3))


def rauq_from_attentions(probs: np.ndarray, attentions: Sequence[np.ndarray], alpha: float = ALPHA) -> float:
    """RAUQ of one answer from ``probs`` [T] and, per layer, its attention weights ``[heads, T, T]`` among the answer
    tokens' input positions (row t: token t's query)."""
    layers = middle_layers(len(attentions))
    n = len(probs)
    per_layer = []
    for layer in layers:
        a = attentions[layer]
        prev = np.zeros((a.shape[0], n))
        if n > 1:
            prev[:, 1:] = a[:, np.arange(1, n), np.arange(n - 1)]
        head = int(np.argmax(prev[:, 1:].mean(1))) if n > 1 else 0
        per_layer.append(layer_uncertainty(probs, prev[head], alpha))
    return max(per_layer)


def rauq_scores(model: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], progress: bool = True) -> list[float]:
    """RAUQ of each (prompt ids, answer ids) pair: one no-grad forward each, eager attention with its weights."""
    dev = next(model.parameters()).device
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    out = []
    try:
        for prompt, answer in tqdm(pairs, desc="RAUQ forward", unit="answer", disable=not progress):
            n_prompt, n = len(prompt), len(answer)
            ids = torch.tensor([list(prompt) + list(answer)], device=dev)
            with torch.no_grad():
                res = model(input_ids=ids, output_attentions=True, use_cache=False, logits_to_keep=n + 1)
            logp, _ = token_logprobs(res.logits[0, :n], torch.tensor(list(answer), device=dev))
            probs = logp.double().exp().cpu().numpy()
            rows = slice(n_prompt, n_prompt + n)  # the input positions of the answer tokens
            att = [a[0, :, rows, rows].double().cpu().numpy() for a in res.attentions]
            out.append(rauq_from_attentions(probs, att))
    finally:
        model.set_attn_implementation(before)
    return out

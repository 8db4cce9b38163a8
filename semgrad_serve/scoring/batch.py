"""One scoring batch: band forward → closed-form head gradient → one backward → scores.

The head is never differentiated by autograd: its gradient is Σ_t g_t h̃_tᵀ
with g_t = (w_t/T)(softmax(z_t) − onehot(y_t)), reduced to its ℓ1 mean by a
kernel without forming the V×d matrix; the loss gradient w.r.t. h̃ is g W_head,
fed into a single ``autograd.grad`` over the probes of the whole batch. The logits
are formed for a bounded number of answer rows at a time (``HEAD_CHUNK_ELEMENTS``).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

from ..kernels import Kernels
from ..kernels.token_stats import NON_FINITE_LOGITS
from ..model.weights import DecoderWeights
from .band_pass import band_pass
from .items import PreparedItem, ScoreResult, hybrid
from .shared_prefix import SharedPrefix

# Answer rows whose logits [rows, V] are formed at once: bounds the head's memory (256 MiB of float32),
# whatever the batch's answer lengths; an answer longer than that still goes in one piece.
HEAD_CHUNK_ELEMENTS = 1 << 26


def head_groups(bounds: list[int], max_rows: int) -> list[tuple[int, int]]:
    """Consecutive item ranges [lo, hi) whose answer rows (``bounds``: row offsets) fit ``max_rows``."""
    groups, lo = [], 0
    for hi in range(1, len(bounds)):
        if hi - 1 > lo and bounds[hi] - bounds[lo] > max_rows:
            groups.append((lo, hi - 1))
            lo = hi - 1
    groups.append((lo, len(bounds) - 1))
    return groups


def head_logits(w: DecoderWeights, h: torch.Tensor, bounds: list[int], given: Sequence[torch.Tensor | None] | None) -> torch.Tensor:
    """Logits [rows, V] of the answer rows ``h`` of consecutive items (``bounds``: their row offsets): given ones
    copied (never the given tensors themselves: token_stats overwrites its input), the others formed."""
    if given is None or all(g is None for g in given):
        return h @ w.head.T
    parts = []
    for b, g in enumerate(given):
        lo, hi = bounds[b] - bounds[0], bounds[b + 1] - bounds[0]
        parts.append(h[lo:hi] @ w.head.T if g is None else g[: hi - lo].to(device=h.device, dtype=h.dtype))
    return torch.cat(parts)


def score_batch(
    w: DecoderWeights,
    items: Sequence[PreparedItem],
    band: range,
    kernels: Kernels,
    shared: SharedPrefix | None = None,
    exgrad: bool = True,
    prefix_kv: Sequence[torch.Tensor] | None = None,
    band_inputs: Sequence[torch.Tensor] | None = None,
    logits: Sequence[torch.Tensor | None] | None = None,
) -> list[ScoreResult]:
    """Score a batch of prepared items with one forward and one backward (``shared``, ``prefix_kv``,
    ``band_inputs``: see ``band_pass``). ``logits``: per item, the logits [≥ answer length, V] predicting its
    answer tokens where already computed (vLLM's), or None. ``exgrad=False`` skips the ExGrad baseline, a
    second pass over the V×d head gradient."""
    fwd = band_pass(w, items, band, shared, prefix_kv, band_inputs)
    if logits is not None and len(logits) != len(items):
        raise ValueError("logits need one entry per item")
    hidden = fwd.answer_hidden.detach()
    bounds = [0, *itertools.accumulate(len(it.answer_ids) for it in items)]  # on the host: no read-back
    logp, entropy, head_l1, grad_hidden = [], [], [], []
    for lo, hi in head_groups(bounds, max(1, HEAD_CHUNK_ELEMENTS // w.vocab_size)):
        rows = slice(bounds[lo], bounds[hi])
        offsets = fwd.offsets[lo : hi + 1] - bounds[lo]
        h = hidden[rows]
        # the logits' memory holds the gradient softmax − onehot where the dtypes allow: one [rows, V] buffer
        z = head_logits(w, h, bounds[lo : hi + 1], None if logits is None else logits[lo:hi])
        lp, ent, nll_grad = kernels.token_stats(z, fwd.targets[rows], check=False, overwrite=True)
        lengths = offsets.diff()
        inv_len = torch.repeat_interleave(1.0 / lengths.to(ent.dtype), lengths, output_size=bounds[hi] - bounds[lo])
        token_weight = ent * inv_len  # w_t / T
        head_l1.append(kernels.head_grad_l1(nll_grad, h, torch.stack((token_weight, inv_len)[: 1 + exgrad]), offsets))
        # Σ_v (w_t/T) g_tv W_v: the row scale applied after the product, so no scaled [rows, V] copy
        grad_hidden.append((nll_grad.to(w.dtype) @ w.head) * token_weight[:, None].to(w.dtype))
        logp.append(lp)
        entropy.append(ent)
        del nll_grad
    (probe_grads,) = torch.autograd.grad(fwd.answer_hidden, fwd.probes, grad_outputs=torch.cat(grad_hidden))
    semgrad = kernels.band_l1(probe_grads)

    # One read-back for the whole batch; a NaN/+inf logit shows as a NaN entropy (token_stats unchecked).
    head_l1 = torch.cat(head_l1, dim=1).double()
    flat = torch.cat((torch.cat(entropy).double(), torch.cat(logp).double(), head_l1.flatten(), semgrad.double()))
    values = flat.cpu().tolist()
    n_rows, batch = bounds[-1], len(items)
    entropies, logps = values[:n_rows], values[n_rows : 2 * n_rows]
    paragrad = values[2 * n_rows : 2 * n_rows + batch]
    ex = values[2 * n_rows + batch : 2 * n_rows + 2 * batch] if exgrad else [None] * batch
    semgrad = values[-batch:]
    if not all(map(math.isfinite, entropies)):
        raise ValueError(NON_FINITE_LOGITS)

    results = []
    for b, item in enumerate(items):
        s, e = bounds[b], bounds[b + 1]
        mean_entropy = math.fsum(entropies[s:e]) / (e - s)
        para, sem = paragrad[b], semgrad[b]
        results.append(
            ScoreResult(
                semgrad=sem,
                paragrad=para,
                hybridgrad=hybrid(para, sem, mean_entropy),
                exgrad=ex[b],
                mean_entropy=mean_entropy,
                token_entropies=entropies[s:e],
                token_logprobs=logps[s:e],
                t_star=item.t_star,
                t_star_token=item.t_star_token,
                band=(band.start, band.stop - 1),
                prompt_tokens=len(item.prompt_ids),
                answer_tokens=len(item.answer_ids),
            )
        )
    return results

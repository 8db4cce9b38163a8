"""One scoring batch: band forward → closed-form head gradient → one backward → scores.

The head is never differentiated by autograd: its gradient is Σ_t g_t h̃_tᵀ
with g_t = (w_t/T)(softmax(z_t) − onehot(y_t)), reduced to its ℓ1 mean by a
kernel without forming the V×d matrix; the loss gradient w.r.t. h̃ is g W_head,
fed into a single ``autograd.grad`` over the probes of the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from .band_pass import PreparedItem, band_pass
from .kernels import Kernels
from .shared_prefix import SharedPrefix
from .weights import DecoderWeights


@dataclass(frozen=True)
class ScoreResult:
    """All scores of one answer (higher = more uncertain) and what they were computed from."""

    semgrad: float
    paragrad: float
    hybridgrad: float
    exgrad: float | None  # None where not asked for (the server skips it unless it is the flag's score)
    mean_entropy: float
    token_entropies: list[float]
    token_logprobs: list[float]
    t_star: int
    t_star_token: str
    band: tuple[int, int]
    prompt_tokens: int
    answer_tokens: int

    def scores(self) -> dict[str, float]:
        names = ("semgrad", "paragrad", "hybridgrad", "exgrad", "mean_entropy")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hybrid(paragrad: float, semgrad: float, mean_entropy: float) -> float:
    """HybridGrad = α·ParaGrad + (1−α)·SemGrad with α = exp(−mean_entropy)."""
    alpha = math.exp(-mean_entropy)
    return alpha * paragrad + (1 - alpha) * semgrad


def score_batch(
    w: DecoderWeights,
    items: Sequence[PreparedItem],
    band: range,
    kernels: Kernels,
    shared: SharedPrefix | None = None,
    exgrad: bool = True,
) -> list[ScoreResult]:
    """Score a batch of prepared items with one forward and one backward (``shared``: see ``band_pass``).
    ``exgrad=False`` skips the ExGrad baseline, a second pass over the V×d head gradient."""
    fwd = band_pass(w, items, band, shared)
    hidden = fwd.answer_hidden.detach()
    logits = hidden @ w.head.T
    logp, entropy, nll_grad = kernels.token_stats(logits, fwd.targets)
    del logits
    lengths = fwd.offsets.diff()
    inv_len = torch.repeat_interleave(1.0 / lengths.to(entropy.dtype), lengths)
    token_weight = entropy * inv_len  # w_t / T
    paragrad = kernels.head_grad_l1(nll_grad, hidden, token_weight, fwd.offsets)
    ex = kernels.head_grad_l1(nll_grad, hidden, inv_len, fwd.offsets).tolist() if exgrad else [None] * len(items)
    grad_hidden = (nll_grad * token_weight[:, None]).to(w.dtype) @ w.head
    del nll_grad
    (probe_grads,) = torch.autograd.grad(fwd.answer_hidden, fwd.probes, grad_outputs=grad_hidden)
    semgrad = kernels.band_l1(probe_grads)

    results = []
    bounds = fwd.offsets.tolist()
    entropies, logps = entropy.double().tolist(), logp.double().tolist()
    for b, item in enumerate(items):
        s, e = bounds[b], bounds[b + 1]
        mean_entropy = math.fsum(entropies[s:e]) / (e - s)
        para, sem = float(paragrad[b]), float(semgrad[b])
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

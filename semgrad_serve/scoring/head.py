"""The head's part of a scoring batch, over the whole vocabulary or, under tensor parallelism, a rank's rows.

Unsharded, each step is one kernel. Vocabulary-parallel (each rank holds logits
for its rows of the head), the same quantities come from per-rank partials and
all-reduces, as Megatron's vocabulary-parallel cross-entropy forms them:

- log-probs and entropies: a distributed log-softmax (row max and Σ exp all-reduced;
  the target's logit from the rank that holds it); each rank's ``softmax − onehot``
  covers its own rows;
- ParaGrad's ℓ1 mean over the V×d head gradient: each rank's ℓ1 over its rows (the
  kernel, per rank), weighted by its share of the rows and summed;
- the gradient into the final-normed states, Σ_v g_tv W_v: each rank's partial sum, summed.
Every rank ends with the same numbers, up to float rounding.
"""

from __future__ import annotations

import math

import torch

from ..kernels import Kernels
from ..kernels.token_stats import TokenStats, accumulation_dtype
from ..model.tensor_parallel import TensorParallel, all_reduce, vocab_rows
from ..model.weights import DecoderWeights


def vocab_parallel_token_stats(logits: torch.Tensor, targets: torch.Tensor, tp: TensorParallel) -> TokenStats:
    """``token_stats`` of logits [N, V_r] holding this rank's vocabulary columns (targets: whole-vocabulary ids).
    A row with NaN or +inf logits on any rank gets NaN entropy and log-prob, as the unchecked kernels give."""
    z = logits.to(accumulation_dtype(logits.dtype))
    row_max = all_reduce(z.max(-1).values, tp, "max")
    shifted = z - row_max[:, None]
    e = shifted.exp()
    total = all_reduce(e.sum(-1), tp)
    p = e / total[:, None]
    local, mine = vocab_rows(targets, tp, z.shape[1])
    mine = mine.to(z.dtype)
    target_shifted = all_reduce(shifted.gather(1, local[:, None]).squeeze(1) * mine, tp)
    log_total = total.log()
    logp = target_shifted - log_total
    entropy = log_total - all_reduce(torch.where(p > 0, p * shifted, torch.zeros_like(p)).sum(-1), tp)
    bad = all_reduce((torch.isnan(z) | torch.isposinf(z)).any(1).to(z.dtype), tp, "max") > 0
    nll_grad = p.scatter_add(1, local[:, None], -mine[:, None])
    return TokenStats(logp.masked_fill(bad, math.nan), entropy.masked_fill(bad, math.nan), nll_grad)


def logits(w: DecoderWeights, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of final-normed states: the head's product (this rank's rows), soft-capped where the model caps
    its logits (Gemma-2: c·tanh(z / c), as transformers computes it)."""
    z = hidden @ w.head.T
    if w.final_softcap is None:
        return z
    return torch.tanh(z / w.final_softcap) * w.final_softcap


def token_stats(w: DecoderWeights, kernels: Kernels, logits: torch.Tensor, targets: torch.Tensor) -> TokenStats:
    """Log-probs, entropies and ``softmax − onehot`` of answer rows (unchecked; the logits' memory may be reused).
    Where the model soft-caps its logits l = c·tanh(z / c), ``softmax − onehot`` (the NLL's gradient w.r.t. l)
    is multiplied by the cap's derivative dl/dz = 1 − (l / c)², so that it is the gradient w.r.t. the head's
    product z = W h̃, from which the head gradient and the gradient into h̃ follow as without a cap."""
    derivative = None
    if w.final_softcap is not None:
        derivative = 1 - (logits.to(accumulation_dtype(logits.dtype)) / w.final_softcap).square()
    if w.tp is None:
        stats = kernels.token_stats(logits, targets, check=False, overwrite=True)
    else:
        stats = vocab_parallel_token_stats(logits, targets, w.tp)
    if derivative is None:
        return stats
    return TokenStats(stats.logp, stats.entropy, stats.nll_grad * derivative.to(stats.nll_grad.dtype))


def head_grad_l1(
    w: DecoderWeights,
    kernels: Kernels,
    nll_grad: torch.Tensor,
    hidden: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """The kernel's ℓ1 mean of each sequence's head gradient, over the whole vocabulary."""
    l1 = kernels.head_grad_l1(nll_grad, hidden, scales, offsets)
    if w.tp is None:
        return l1
    return all_reduce(l1 * (w.head.shape[0] / w.vocab_size), w.tp)


def grad_hidden(w: DecoderWeights, nll_grad: torch.Tensor) -> torch.Tensor:
    """Σ_v g_tv W_v: the NLL's gradient w.r.t. the final-normed states, before each row's scale."""
    return all_reduce(nll_grad.to(w.dtype) @ w.head, w.tp)

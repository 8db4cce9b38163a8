"""ParaGrad of a tied head as the authors' code computes it ("paragrad_tied"), an opt-in score.

Where the output head is the input embedding matrix E, the authors differentiate E itself: besides
the head's closed-form gradient Σ_t g_t h̃_tᵀ, every position p of prompt + answer adds ∂loss/∂x0[p]
(x0 = the embedding output) to row ids[p] (but for the ``padding_idx`` row, which Hugging Face's
embedding gives no gradient). That needs a backward through every layer and position, so it is off
by default and in serving. Only the rows of tokens present differ from the head-only gradient, so
the ℓ1 mean of the sum is ParaGrad's, corrected on those rows: the V×d matrix is never formed.
"""

from __future__ import annotations

import torch

from ..errors import SemgradError
from ..kernels import Kernels
from ..model.decoder import layer_forward, long_rope, norm, rotary, scale_embedding, window_masks
from ..model.weights import DecoderWeights
from . import head
from .items import PreparedItem

UNTIED = "paragrad_tied needs a model whose output head is its input embedding; this model's head is its own matrix"


def check_tied(w: DecoderWeights) -> None:
    """Refuse untied models: there the embedding-lookup path does not reach the head."""
    if not w.tied:
        raise SemgradError(UNTIED)


def paragrad_tied(w: DecoderWeights, item: PreparedItem, paragrad: float, kernels: Kernels) -> float:
    """mean |∂loss/∂E| over the shared V×d matrix of one item, given its head-only ``paragrad``."""
    n, n_answer = len(item.prompt_ids), len(item.answer_ids)
    ids = torch.tensor(item.prompt_ids + item.answer_ids, device=w.device)
    x0 = w.embed[ids][None].requires_grad_(True)
    positions = torch.arange(len(ids), device=w.device)[None]
    rope = rotary(w, positions, w.dtype, long_rope(w, [len(ids)]))
    masks = window_masks(w, range(w.n_layers), positions, positions, None)
    x = scale_embedding(w, x0)
    for layer in w.layers:
        x, _ = layer_forward(w, layer, x, rope, masks)
    hidden = norm(w, x[0, n - 1 : n + n_answer - 1], w.final_norm)
    stats = head.token_stats(w, kernels, head.logits(w, hidden.detach()), ids[n:])
    logits_grad = stats.nll_grad * (stats.entropy / n_answer)[:, None]  # g_t = (w_t/T)(softmax − onehot)
    (x0_grad,) = torch.autograd.grad(hidden, x0, grad_outputs=logits_grad.to(w.dtype) @ w.head)
    rows, where = torch.unique(ids, return_inverse=True)
    lookup = torch.zeros(len(rows), w.hidden_size, dtype=x0_grad.dtype, device=w.device).index_add_(
        0, where, x0_grad[0]
    )
    if w.padding_idx is not None:
        lookup[rows == w.padding_idx] = 0
    head_rows = logits_grad[:, rows].T.to(w.dtype) @ hidden.detach()  # the head-only gradient's rows of present tokens
    size = w.vocab_size * w.hidden_size
    correction = (head_rows + lookup).double().abs().sum() - head_rows.double().abs().sum()
    return paragrad + float(correction) / size

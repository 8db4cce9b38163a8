"""One scoring batch: band forward → closed-form head gradient → one backward → scores.

The head is never differentiated by autograd: its gradient is Σ_t g_t h̃_tᵀ
with g_t = (w_t/T)(softmax(z_t) − onehot(y_t)), reduced to its ℓ1 mean by a
kernel without forming the V×d matrix; the loss gradient w.r.t. h̃ is g W_head,
fed into a single ``autograd.grad`` over the probes of the whole batch. The logits
are formed for a bounded number of answer rows at a time (``HEAD_CHUNK_ELEMENTS``).

Items with claims also get each claim's scores, the loss restricted to the claim's
tokens (weights w_t/T_c): its head gradient ℓ1 from the same logits gradient, and its
probe gradient from the same backward, batched over seeds (``is_grads_batched``):
seed 0 is every item's whole answer, seed k every item's k-th claim. An item may carry a window of its
answer's claims (consecutive ones, not all): only those are scored. The seeds go through the backward in
groups that fit a memory budget (``claim_budget.py``).

An item scored for its claims only (``whole_answer=False``: an answer so far, for live claims) still runs the band
over all its rows (its claims' tokens attend to the ones before), but the head works on its claims' rows alone and
it gives seed 0 nothing; a batch of such items only has no seed 0 at all.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

from ..kernels import Kernels
from ..kernels.token_stats import NON_FINITE_LOGITS
from ..model.forward import to_device
from ..model.weights import DecoderWeights
from . import head
from .band_pass import band_pass
from .claim_budget import DEFAULT_SEED_BUDGET, seed_bytes, seeds_per_backward
from .given import Given
from .items import ClaimScores, ClaimsResult, PreparedItem, ScoreResult, TStarFeatures, hybrid
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


def head_starts(items: Sequence[PreparedItem]) -> list[int]:
    """Per item, its first answer token the head works on: 0, or its first claim's start where only its claims are
    scored."""
    for it in items:
        if not it.whole_answer and not it.claims:
            raise ValueError("an item scored for its claims only needs claims")
    return [0 if it.whole_answer else it.claims[0].token_start for it in items]


class ClaimRows:
    """Host bookkeeping of a batch's claims over its packed head rows (``bounds``: each item's head-row offset;
    ``starts``: the answer token of each item's first head row)."""

    def __init__(self, items: Sequence[PreparedItem], bounds: list[int], starts: Sequence[int]) -> None:
        for it in items:
            claim_starts, ends = [c.token_start for c in it.claims], [c.token_end for c in it.claims]
            consecutive = claim_starts[1:] == ends[:-1] and all(e > s for s, e in zip(claim_starts, ends))
            if it.claims and not (consecutive and claim_starts[0] >= 0 and ends[-1] <= len(it.answer_ids)):
                raise ValueError("claims must be consecutive, non-empty token runs within the answer")
        self.seeds = 1 + max(len(it.claims) for it in items)  # backward seeds: the whole answers, then claim k
        # per item, the row offsets of its claims (their starts, then its end); [] without claims
        self.offsets = [
            [bounds[b] + c.token_start - starts[b] for c in it.claims] + [bounds[b + 1]] * bool(it.claims)
            for b, it in enumerate(items)
        ]
        self.inv_len = [0.0] * bounds[-1]  # 1/T_c on each claim row, 0 on the rows of items without claims
        self.seed_rows: list[tuple[int, int]] = []  # (seed, row) of every claim row
        for b, it in enumerate(items):
            for k, c in enumerate(it.claims, 1):
                for r in range(bounds[b] + c.token_start - starts[b], bounds[b] + c.token_end - starts[b]):
                    self.inv_len[r] = 1.0 / (c.token_end - c.token_start)
                    self.seed_rows.append((k, r))

    def runs(self, lo: int, hi: int) -> list[list[int]]:
        """The claim row offsets of each run of consecutive items with claims among items [lo, hi)."""
        runs: list[list[int]] = []
        for b in range(lo, hi):
            if not self.offsets[b]:
                continue
            if runs and runs[-1][-1] == self.offsets[b][0]:
                runs[-1] += self.offsets[b][1:]
            else:
                runs.append(list(self.offsets[b]))
        return runs


def head_logits(
    w: DecoderWeights, h: torch.Tensor, bounds: list[int], given: Sequence[Given] | None, starts: Sequence[int]
) -> torch.Tensor:
    """Logits [rows, V] of the head rows ``h`` of consecutive items (``bounds``: their row offsets; ``starts``: the
    answer token of each item's first row): given ones (vLLM's, soft-capped as the model caps them) copied (never
    the given tensors themselves: token_stats overwrites its input), the others formed."""
    if given is None or all(g.logits is None for g in given):
        return head.logits(w, h)
    parts = []
    for b, (g, start) in enumerate(zip(given, starts)):
        lo, hi = bounds[b] - bounds[0], bounds[b + 1] - bounds[0]
        z = g.logits
        parts.append(
            head.logits(w, h[lo:hi]) if z is None else z[start : start + hi - lo].to(device=h.device, dtype=h.dtype)
        )
    return torch.cat(parts)


def score_batch(
    w: DecoderWeights,
    items: Sequence[PreparedItem],
    band: range,
    kernels: Kernels,
    shared: SharedPrefix | None = None,
    exgrad: bool = True,
    given: Sequence[Given] | None = None,
    seed_budget: int = DEFAULT_SEED_BUDGET,
    t_star_features: bool = False,
) -> list[ScoreResult | ClaimsResult]:
    """Score a batch of prepared items with one forward and one backward (``shared``, ``given``: see ``band_pass``;
    an item's given logits are used in place of the head's product). ``exgrad=False`` skips the ExGrad baseline, a
    second pass over the V×d head gradient. Items with ``claims`` also get their claims' scores (one more pass
    over their head gradient), their backward seeds in groups of at most ``seed_budget`` bytes; an item scored for
    its claims only gives a ``ClaimsResult``. ``t_star_features``: each whole answer's result also carries
    ``TStarFeatures`` (one more read-back)."""
    fwd = band_pass(w, items, band, shared, given)
    starts = head_starts(items)
    n_answer_rows = sum(len(it.answer_ids) for it in items)
    # the head works on each item's rows from its start on (all rows, unless only its claims are scored)
    bounds = [0, *itertools.accumulate(len(it.answer_ids) - s for it, s in zip(items, starts))]  # host: no read-back
    hidden, targets, head_offsets = fwd.answer_hidden.detach(), fwd.targets, fwd.offsets
    head_index = None
    if any(starts):
        answer_rows = itertools.accumulate((len(it.answer_ids) for it in items), initial=0)  # each item's first row
        index = [first + r for first, s, it in zip(answer_rows, starts, items) for r in range(s, len(it.answer_ids))]
        head_index = to_device(torch.tensor(index), w.device)
        hidden, targets = hidden[head_index], targets[head_index]
        head_offsets = to_device(torch.tensor(bounds), w.device)
    claims = ClaimRows(items, bounds, starts) if any(it.claims for it in items) else None
    claim_inv_len = to_device(torch.tensor(claims.inv_len, dtype=torch.float64), w.device) if claims else None
    whole = to_device(torch.tensor([float(it.whole_answer) for it in items]), w.device)
    n_scales = 1 + exgrad
    first_seed = 0 if any(it.whole_answer for it in items) else 1  # no whole answer: no seed 0, nor its head work
    logp, entropy, head_l1, grad_hidden, claim_l1, claim_grad = [], [], [], [], [], []
    for lo, hi in head_groups(bounds, max(1, HEAD_CHUNK_ELEMENTS // w.head.shape[0])):
        rows = slice(bounds[lo], bounds[hi])
        offsets = head_offsets[lo : hi + 1] - bounds[lo]
        h = hidden[rows]
        # the logits' memory holds the gradient softmax − onehot where the dtypes allow: one [rows, V] buffer
        z = head_logits(w, h, bounds[lo : hi + 1], None if given is None else given[lo:hi], starts[lo:hi])
        lp, ent, nll_grad = head.token_stats(w, kernels, z, targets[rows])
        lengths = offsets.diff()
        # w_t / T over a whole answer's rows; nothing for an item whose claims only are scored
        item_scale = whole[lo:hi].to(ent.dtype) / lengths.to(ent.dtype)
        inv_len = torch.repeat_interleave(item_scale, lengths, output_size=bounds[hi] - bounds[lo])
        token_weight = ent * inv_len  # w_t / T
        scales = torch.stack((token_weight, inv_len)[:n_scales])
        head_l1.append(
            head.head_grad_l1(w, kernels, nll_grad, h, scales, offsets)
            if first_seed == 0
            else scales.new_zeros(n_scales, hi - lo)
        )
        # Σ_v g_tv W_v, each seed's row scale applied after the product, so no scaled [rows, V] copy
        grad_h = head.grad_hidden(w, nll_grad)
        grad_hidden.append(grad_h * token_weight[:, None].to(w.dtype))
        if claims is not None:
            c_inv = claim_inv_len[rows].to(ent.dtype)
            c_weight = ent * c_inv  # w_t / T_c
            for run in claims.runs(lo, hi):
                r = slice(run[0] - bounds[lo], run[-1] - bounds[lo])
                c_offsets = to_device(torch.tensor(run) - run[0], w.device)
                claim_l1.append(
                    head.head_grad_l1(
                        w, kernels, nll_grad[r], h[r], torch.stack((c_weight[r], c_inv[r])[:n_scales]), c_offsets
                    )
                )
            claim_grad.append(grad_h * c_weight[:, None].to(w.dtype))
        logp.append(lp)
        entropy.append(ent)
        del nll_grad, grad_h

    def on_answer_rows(seeds: torch.Tensor) -> torch.Tensor:
        """Seeds over the head rows [..., rows, d] as seeds over every answer row (zero where the head did not run)."""
        if head_index is None:
            return seeds
        out = seeds.new_zeros(*seeds.shape[:-2], n_answer_rows, seeds.shape[-1])
        return out.index_copy_(-2, head_index, seeds)

    seeds = torch.cat(grad_hidden)
    if claims is None:
        (probe_grads,) = torch.autograd.grad(fwd.answer_hidden, fwd.probes, grad_outputs=on_answer_rows(seeds))
        semgrad = kernels.band_l1(probe_grads)
    else:
        batched = seeds.new_zeros(claims.seeds, *seeds.shape)
        batched[0] = seeds
        seed, row = to_device(torch.tensor(claims.seed_rows).T, w.device)
        batched[seed, row] = torch.cat(claim_grad)[row]
        batched = on_answer_rows(batched[first_seed:])
        n_seeds = len(batched)
        if w.tp is None:
            rows_keys = [(it.length - it.t_star, it.length) for it in items]
            group = seeds_per_backward(seed_bytes(rows_keys, w.n_heads, w.hidden_size, w.dtype.itemsize), seed_budget)
            probe_grads = torch.cat(
                [
                    torch.autograd.grad(
                        fwd.answer_hidden,
                        fwd.probes,
                        grad_outputs=batched[lo : lo + group],
                        is_grads_batched=True,
                        retain_graph=lo + group < n_seeds,
                    )[0]
                    for lo in range(0, n_seeds, group)
                ]
            )
        else:  # vmap cannot batch the collectives in the backward: one backward per seed
            probe_grads = torch.stack(
                [
                    torch.autograd.grad(fwd.answer_hidden, fwd.probes, grad_outputs=seed, retain_graph=True)[0]
                    for seed in batched
                ]
            )
        n_band, batch, d = probe_grads.shape[1:]
        # [seeds, n_band, B, d] → [n_band, seeds·B, d]: seed k of item b at (k − first_seed)·B + b
        semgrad = kernels.band_l1(probe_grads.transpose(0, 1).reshape(n_band, n_seeds * batch, d))

    # One read-back for the whole batch; a NaN/+inf logit shows as a NaN entropy (token_stats unchecked).
    parts = [
        torch.cat(entropy).double(),
        torch.cat(logp).double(),
        torch.cat(head_l1, dim=1).double().flatten(),
        semgrad.double(),
    ]
    if claim_l1:
        parts.append(torch.cat(claim_l1, dim=1).double().flatten())
    values = torch.cat(parts).cpu().tolist()
    n_rows, batch = bounds[-1], len(items)
    entropies, logps = values[:n_rows], values[n_rows : 2 * n_rows]
    values = values[2 * n_rows :]
    paragrad, ex = values[:batch], values[batch : 2 * batch] if exgrad else [None] * batch
    values = values[n_scales * batch :]
    semgrads, values = values[: len(semgrad)], values[len(semgrad) :]
    n_claims = sum(len(it.claims) for it in items)
    claim_para, claim_ex = values[:n_claims], values[n_claims:] if exgrad else [None] * n_claims
    if not all(map(math.isfinite, entropies)):
        raise ValueError(NON_FINITE_LOGITS)

    at_t_star = [None] * len(items)
    if t_star_features and first_seed == 0:
        grads = probe_grads if claims is None else probe_grads[0]  # [n_band, B, d] of the whole answers
        n_band, d = grads.shape[0], grads.shape[2]
        layers = grads.abs().sum(-1, dtype=torch.float64) / d
        flat = torch.cat((layers.T, grads[-1].double(), fwd.t_star_hidden.double()), dim=1).cpu().tolist()
        at_t_star = [TStarFeatures(row[:n_band], row[n_band : n_band + d], row[n_band + d :]) for row in flat]

    results, first_claim = [], 0
    for b, item in enumerate(items):
        s, e = bounds[b] - starts[b], bounds[b + 1]  # row of the item's answer token 0 (its head rows from starts[b])
        scored_claims = None
        if item.claims:
            scored_claims = []
            for k, c in enumerate(item.claims, 1):
                c_entropy = math.fsum(entropies[s + c.token_start : s + c.token_end]) / (c.token_end - c.token_start)
                i = first_claim + k - 1
                c_para, c_sem = claim_para[i], semgrads[(k - first_seed) * batch + b]
                scored_claims.append(
                    ClaimScores(
                        c.text,
                        c.token_start,
                        c.token_end,
                        c_sem,
                        c_para,
                        hybrid(c_para, c_sem, c_entropy),
                        claim_ex[i],
                        c_entropy,
                    )
                )
            first_claim += len(item.claims)
        if not item.whole_answer:
            results.append(ClaimsResult(scored_claims, len(item.answer_ids)))
            continue
        mean_entropy = math.fsum(entropies[s:e]) / (e - s)
        para, sem = paragrad[b], semgrads[b]
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
                t_star_rule=item.t_star_rule,
                band=(band.start, band.stop - 1),
                prompt_tokens=len(item.prompt_ids),
                answer_tokens=len(item.answer_ids),
                claims=scored_claims,
                t_star_features=at_t_star[b],
            )
        )
    return results

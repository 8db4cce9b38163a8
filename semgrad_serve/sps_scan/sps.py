"""SPS — the Semantics-Preserving Score of a (layer, prompt position), and the t*/band it selects (SPEC).

For groups of prompts that say the same thing (a query and its paraphrases), at hidden-state index l and the
p-th prompt position counted from the end:
- S_within(l, p): mean over groups (with ≥ 2 members) of the mean cosine similarity of all pairs of members;
- S_across(l, p): mean cosine similarity over all pairs of prompts from different groups;
- SPS = S_within − S_across.

The accumulator is exact and streams: with unit vectors u, the sum of u_i·u_j over ordered pairs i ≠ j of a set
is |Σu|² − n, so only per-group sums and the grand sum are kept — never the N×N similarity matrix, and never
more than one chunk of hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..errors import SemgradError
from ..model.forward import common_prefix_length, padded_forward, prefix_keys_values
from ..model.weights import DecoderWeights, from_hf_model
from ..scoring.profiles import TStarRule, deeper_half


class SPSAccumulator:
    """Streams groups of hidden states [members, layers, positions, d] into exact S_within / S_across."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None  # Σ of all unit vectors [layers, positions, d], float64
        self.self_dot = None  # Σ of u·u (1, or 0 for an all-zero state) [layers, positions]
        self.within_pairs_dot = None  # Σ over groups of Σ_{i≠j in group} u_i·u_j  [layers, positions]
        self.within_pairs = 0  # Σ n_g (n_g − 1)
        self.group_mean_sum = None  # Σ over groups (n_g ≥ 2) of the group's mean pairwise cosine
        self.groups_with_pairs = 0
        self.count = 0

    def add_group(self, states: torch.Tensor) -> None:
        """One group's states [n_members, layers, positions, d] (any float dtype)."""
        if states.dim() != 4 or states.shape[0] < 1:
            raise SemgradError(f"a group's states must be [members, layers, positions, d], not {tuple(states.shape)}")
        u = torch.nn.functional.normalize(states.double(), dim=-1)
        n = u.shape[0]
        g = u.sum(0)
        self_dot = (u * u).sum(-1).sum(0)
        pair_dot = (g * g).sum(-1) - self_dot  # Σ_{i≠j} u_i·u_j
        if self.total is None:
            self.total = torch.zeros_like(g)
            self.self_dot = torch.zeros_like(pair_dot)
            self.within_pairs_dot = torch.zeros_like(pair_dot)
            self.group_mean_sum = torch.zeros_like(pair_dot)
        elif g.shape != self.total.shape:
            raise SemgradError(
                f"group states {tuple(states.shape[1:])} do not match earlier ones {tuple(self.total.shape)}"
            )
        self.total += g
        self.self_dot += self_dot
        self.within_pairs_dot += pair_dot
        self.within_pairs += n * (n - 1)
        if n >= 2:
            self.group_mean_sum += pair_dot / (n * (n - 1))
            self.groups_with_pairs += 1
        self.count += n

    def result(self) -> "SPSTable":
        if self.total is None or self.groups_with_pairs == 0:
            raise SemgradError("SPS needs at least one query with a paraphrase")
        across_pairs = self.count * (self.count - 1) - self.within_pairs
        if across_pairs == 0:
            raise SemgradError("SPS needs at least two different queries")
        all_pairs_dot = (self.total * self.total).sum(-1) - self.self_dot
        within = self.group_mean_sum / self.groups_with_pairs
        across = (all_pairs_dot - self.within_pairs_dot) / across_pairs
        return SPSTable(within.numpy(), across.numpy(), self.groups_with_pairs, self.count)


@dataclass
class SPSTable:
    """S_within and S_across [layers, positions]; positions run from −P (left) to −1 (the last prompt token)."""

    within: np.ndarray
    across: np.ndarray
    groups: int
    prompts: int

    @property
    def sps(self) -> np.ndarray:
        return self.within - self.across

    @property
    def n_positions(self) -> int:
        return self.sps.shape[1]

    @property
    def offsets(self) -> list[int]:
        """Position of each column counted from the end of the prompt (−1 = last token)."""
        return list(range(-self.n_positions, 0))


def sps_of_groups(groups: Iterable[torch.Tensor]) -> SPSTable:
    """SPS of a list of group states [members, layers, positions, d]."""
    acc = SPSAccumulator()
    for g in groups:
        acc.add_group(g)
    return acc.result()


# -- choosing t* and the band ----------------------------------------------------------------------


def best_position(table: SPSTable, n_layers: int, eligible: Sequence[bool] | None = None) -> int:
    """Column of the highest SPS averaged over the upper half of layers (SPEC: t*), among ``eligible`` columns
    (default: all)."""
    rows = list(deeper_half(n_layers))
    mean = table.sps[rows].mean(0)
    if eligible is not None:
        if not any(eligible):
            raise SemgradError("no eligible prompt position for t*")
        mean = np.where(np.asarray(eligible, dtype=bool), mean, -np.inf)
    return int(np.argmax(mean))


def choose_band(column: np.ndarray, n_layers: int) -> tuple[int, int]:
    """The band at t*: from the first to the last hidden-state index in 1..L−1 whose SPS is at least half-way
    between the lowest and the highest SPS of 1..L−1 at t* (the span of the half-height layers)."""
    values = np.asarray(column, dtype=np.float64)[1:n_layers]
    lo, hi = float(values.min()), float(values.max())
    high = np.flatnonzero(values >= lo + 0.5 * (hi - lo)) + 1
    return int(high[0]), int(high[-1])


def t_star_rule(prompts: Sequence[Sequence[int]], offset_from_end: int, id_to_token: Any) -> TStarRule:
    """A token rule that locates the prompt position ``offset_from_end`` (−1 = last) in every prompt.

    Prefer the token at that position itself (offset 0) when it is the same in every prompt and its last
    occurrence is there; otherwise anchor on the nearest later template token with that property and count
    back from it. Raises if no position of the prompt tail anchors it (t* must be defined by a token, SPEC)."""
    if offset_from_end >= 0:
        raise SemgradError("the t* position must be counted from the end (−1 = last token)")
    candidates = [offset_from_end] + list(range(offset_from_end + 1, 0)) + list(range(offset_from_end - 1, -9, -1))
    for anchor in candidates:
        tokens = {int(p[len(p) + anchor]) for p in prompts if len(p) >= -anchor}
        if len(tokens) != 1 or any(len(p) < -anchor for p in prompts):
            continue
        (token_id,) = tokens
        if all(max(i for i, t in enumerate(p) if t == token_id) == len(p) + anchor for p in prompts):
            return TStarRule(token=str(id_to_token(token_id)), offset=offset_from_end - anchor)
    raise SemgradError(
        f"no token of the prompt tail marks position {offset_from_end} in every prompt; is a chat template applied?"
    )


def position_labels(prompts: Sequence[Sequence[int]], n_positions: int, id_to_token: Any) -> list[str]:
    """Label of each column: the token when it is the same in every prompt, else the commonest one with '*'."""
    labels = []
    for offset in range(-n_positions, 0):
        ids = [int(p[len(p) + offset]) for p in prompts]
        values, counts = np.unique(ids, return_counts=True)
        common = str(id_to_token(int(values[np.argmax(counts)])))
        labels.append(common if len(values) == 1 else common + "*")
    return labels


# -- hidden states of prompts ----------------------------------------------------------------------


def prompt_tail_states(
    model: Any, prompts: Sequence[Sequence[int]], n_positions: int, batch_size: int = 16
) -> torch.Tensor:
    """Hidden states [len(prompts), L + 1, n_positions, d] of the last ``n_positions`` prompt tokens.

    Index 0 is the embedding output, index i the residual stream after layer i, before the final norm (SPEC).
    Runs the scoring forward's no-graph passes (``model/forward.py``) on ``DecoderWeights`` (or a Hugging Face
    model, viewed as such): the prefix that all prompts share (system prompt, instruction) is computed once and
    its keys/values are handed to every batch; the rest is right-padded, so real tokens keep their positions."""
    w = model if isinstance(model, DecoderWeights) else from_hf_model(model)
    short = [i for i, p in enumerate(prompts) if len(p) < n_positions]
    if short:
        raise SemgradError(f"prompt {short[0]} has fewer than {n_positions} tokens")
    n_prefix = max(0, min(common_prefix_length(prompts), min(len(p) for p in prompts) - n_positions))
    prefix = prefix_keys_values(w, prompts[0][:n_prefix]) if n_prefix else None
    out = torch.empty(len(prompts), w.n_layers + 1, n_positions, w.hidden_size, dtype=w.dtype)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        tails = [list(prompts[i][n_prefix:]) for i in idx]
        # gather index of each prompt's last n_positions tokens within its tail
        lengths = torch.tensor([len(t) for t in tails], device=w.device)
        cols = (lengths[:, None] - n_positions + torch.arange(n_positions, device=w.device)).clamp(min=0)
        states: list[torch.Tensor] = []

        def keep_tail(h: torch.Tensor, cols: torch.Tensor = cols, states: list[torch.Tensor] = states) -> None:
            states.append(h.gather(1, cols[..., None].expand(-1, -1, h.shape[-1])).cpu())

        padded_forward(w, tails, n_prefix, prefix, each_state=keep_tail)
        out[idx] = torch.stack(states, dim=1)  # [B, L+1, n_positions, d]
    return out


def scan(
    model: Any,
    groups: Sequence[Sequence[Sequence[int]]],
    n_positions: int,
    batch_size: int = 16,
    groups_per_chunk: int = 8,
    progress: bool = True,
) -> SPSTable:
    """SPS over every hidden-state index and the last ``n_positions`` prompt positions for groups of prompt ids."""
    weights = model if isinstance(model, DecoderWeights) else from_hf_model(model)
    acc = SPSAccumulator()
    total = sum(len(g) for g in groups)
    with tqdm(total=total, desc="SPS scan", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(groups), groups_per_chunk):
            chunk = groups[start : start + groups_per_chunk]
            flat = [p for g in chunk for p in g]
            states = prompt_tail_states(weights, flat, n_positions, batch_size)
            at = 0
            for g in chunk:
                acc.add_group(states[at : at + len(g)])
                at += len(g)
            bar.update(len(flat))
    return acc.result()

"""Scoring in vLLM's tensor-parallel workers: process groups of scoring's own, and rank 0's batches followed.

Under tensor parallelism every worker scores every batch on its own shards, and the
collectives in the forward and backward pair up only if all ranks run the same
batches in the same order, through the same path. Rank 0 (the leader) receives
the answers from the API server, forms each batch and broadcasts it (with the
capture keys the API server has dropped since); the other ranks (followers) score
what they receive and send nothing back. Each rank reads its own captures (its KV
heads): ``agree`` keeps for each answer only what every rank was given, so that
all ranks take the same path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ...scoring.given import NOTHING_GIVEN, Given, GivenKind
from ..messages import Pair


@dataclass(frozen=True)
class PlannedPiece:
    """One piece of a batch as rank 0 formed it: its job, capture key, answers and each answer's claim window."""

    job: int
    key: str | None
    pairs: list[Pair]
    windows: list[range | None]
    so_far: bool = False  # answers still being generated: only the windows' claims are scored


@dataclass(frozen=True)
class Plan:
    """A batch as rank 0 broadcasts it: its pieces, the capture keys dropped since the last batch, and per answer
    (in piece order) what rank 0 was given."""

    pieces: list[PlannedPiece]
    dropped: list[str]
    kinds: list[GivenKind]


@dataclass(frozen=True)
class ScoringGroups:
    """Scoring's own process groups over vLLM's tensor-parallel ranks (never vLLM's groups: scoring runs in a
    thread beside the engine's collectives): ``tensors`` for the forward's and backward's collectives (NCCL on
    GPUs, gloo on CPU), ``host`` (gloo) for the batches and agreements, which are host objects."""

    tensors: Any
    host: Any
    rank: int  # this worker's index in the groups
    size: int


def scoring_groups() -> ScoringGroups:
    """Create scoring's groups; every worker must call this at the same point (``semgrad_setup``, through
    ``collective_rpc``)."""
    from vllm.distributed.parallel_state import get_tp_group

    tp = get_tp_group()
    ranks = list(tp.ranks)
    host = dist.new_group(ranks=ranks, backend="gloo")
    tensors = dist.new_group(ranks=ranks, backend="nccl") if torch.cuda.is_available() else host
    return ScoringGroups(tensors, host, tp.rank_in_group, tp.world_size)


def share_plan(group: Any, plan: Plan | None) -> Plan:
    """Rank 0's plan, on every rank (rank 0 passes it, the others None)."""
    box = [plan]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def agree(group: Any, given: Sequence[Given]) -> list[Given]:
    """Per answer, what this rank was given where every rank was given the same kind, else nothing; never the
    logits (the vocabulary-parallel head forms each rank's own)."""
    kinds = torch.tensor([g.kind for g in given], dtype=torch.int64)
    low, high = -kinds, kinds.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    same = (-low == high).tolist()
    return [g.without_logits() if ok else NOTHING_GIVEN for g, ok in zip(given, same)]

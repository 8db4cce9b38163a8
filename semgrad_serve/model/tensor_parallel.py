"""Tensor parallelism for the scoring forward and backward: which shard a rank holds, and the collectives.

Under vLLM's tensor parallelism each rank holds Megatron-style shards: the query,
key/value and gate/up projections split by output rows (column-parallel), the
output and down projections by input columns (row-parallel), and the embedding and
head by vocabulary rows. The residual stream is the same on every rank. A layer
then needs the Megatron pair of conjugate collectives:

- ``copy_to_ranks`` before a column-parallel product: identity forward, all-reduce
  of the gradient backward (each rank's shard contributes part of it);
- ``reduce_from_ranks`` after a row-parallel product: all-reduce forward (each
  rank holds a partial sum), identity backward (the gradient is already whole).

With both, every rank's autograd gives the same gradient at the band's probes as
the unsharded model. The collectives run on a process group of their own
(gloo on CPU), never on vLLM's, so that scoring in a worker thread cannot
interleave with the engine's own collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group and its share of the vocabulary."""

    group: Any  # a torch.distributed ProcessGroup over the tensor-parallel ranks
    rank: int  # this rank's index in ``group``
    size: int  # ranks in ``group``
    vocab_start: int  # first vocabulary row of this rank's embedding and head shards
    vocab_size: int  # the whole vocabulary


class _CopyToRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()  # never reduce autograd's own buffer in place
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_ranks(x: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """The input of a column-parallel product: x itself; backward, the gradient summed over ranks."""
    return x if tp is None else _CopyToRanks.apply(x, tp.group)


def reduce_from_ranks(x: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """The output of a row-parallel product: the ranks' partial sums added; backward, the gradient as it is."""
    return x if tp is None else _ReduceFromRanks.apply(x, tp.group)


def all_reduce(x: torch.Tensor, tp: TensorParallel | None, op: str = "sum") -> torch.Tensor:
    """x reduced over ranks (``op``: "sum" or "max"), outside autograd; x itself without tensor parallelism."""
    if tp is None:
        return x
    x = x.detach().contiguous().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=tp.group)
    return x


def vocab_rows(ids: torch.Tensor, tp: TensorParallel | None, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids as rows of this rank's vocabulary shard of ``rows`` rows (0 where another rank holds the token),
    and the mask of the ids this rank holds (None without tensor parallelism: every id is local)."""
    if tp is None:
        return ids, None
    local = ids - tp.vocab_start
    mine = (local >= 0) & (local < rows)
    return local.masked_fill(~mine, 0), mine


def embed(ids: torch.Tensor, table: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """Embedding lookup of ``ids`` in a (vocabulary-sharded) table, outside autograd: each rank looks up the ids
    it holds, the others give zeros, and the sum over ranks is the whole lookup."""
    local, mine = vocab_rows(ids, tp, table.shape[0])
    x = torch.nn.functional.embedding(local, table)
    if mine is None:
        return x
    return all_reduce(x * mine[..., None].to(x.dtype), tp)

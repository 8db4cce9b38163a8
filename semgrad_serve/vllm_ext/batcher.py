"""Batching of concurrent scoring requests in the API server: one worker RPC (one backward) per batch.

A single loop sends the batches, so at most one scoring batch runs in the
engine at a time, and generation, which a batch pauses, is never held up
longer than that. A batch takes up to ``max_batch`` answers. While other
scored requests are still generating, it waits for their answers: up to
``WAIT_PER_SCORING`` times as long as the previous batch took (so that under
load generation keeps about two thirds of the engine's time, and batches grow
until they cost little per answer), and never more than ``max_wait_ms`` after
its oldest answer arrived. An answer with nothing else in flight is scored at
once. If a whole batch fails (an error the scorer did not isolate), each
answer is retried alone, so one bad answer cannot sink the others.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, Sequence

from . import metrics
from .config import log

Pair = tuple[list[int], list[int]]
# Scores a batch: (pairs, fault) -> one "semgrad" object per pair.
ScoreRpc = Callable[[list[Pair], bool], Awaitable[list[dict[str, Any]]]]
WAIT_PER_SCORING = 2.0  # generation time allowed between batches, per second the previous batch took


@dataclass
class _Pending:
    pair: Pair
    fault: bool
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class ScoringBatcher:
    """Collects answers from concurrent requests and scores them in bounded batches."""

    def __init__(self, rpc: ScoreRpc, max_batch: int, max_wait_ms: float) -> None:
        self._rpc = rpc
        self._max_batch = max_batch
        self._max_wait = max_wait_ms / 1000
        self._pending: deque[_Pending] = deque()
        self._generating = 0
        self._last_batch = (0.0, 0.0)  # (end, duration) of the previous batch, perf_counter seconds
        self._changed: asyncio.Event | None = None  # set when an answer arrives or a generation ends
        self._loop_task: asyncio.Task | None = None

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    @contextmanager
    def generating(self) -> Iterator[None]:
        """Marks a scored request whose answers are still being generated, so that batches wait for them."""
        self._generating += 1
        try:
            yield
        finally:
            self._generating -= 1
            self._notify()

    async def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], fault: bool = False) -> list[dict[str, Any]]:
        """The ``"semgrad"`` object of each (prompt ids, answer ids) pair; never raises (a failure is ``{"error": ...}``).

        The pairs of one call are queued together, so that they can share a batch."""
        if self._loop_task is None:  # created here so that they live on the server's event loop
            self._changed = asyncio.Event()
            self._loop_task = asyncio.create_task(self._run(), name="semgrad-batcher")
        loop = asyncio.get_running_loop()
        queued = [_Pending((list(p), list(a)), fault, loop.create_future()) for p, a in pairs]
        self._pending.extend(queued)
        self._notify()
        return list(await asyncio.gather(*(q.future for q in queued)))

    async def _wait_for_change(self, timeout: float | None = None) -> bool:
        assert self._changed is not None
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _next_batch(self) -> list[_Pending]:
        while not self._pending:
            await self._wait_for_change()
        end, duration = self._last_batch
        deadline = min(self._pending[0].queued_at + self._max_wait, end + WAIT_PER_SCORING * duration)
        while len(self._pending) < self._max_batch and self._generating > 0:
            if not await self._wait_for_change(max(deadline - time.perf_counter(), 0)):
                break
        batch = [self._pending.popleft() for _ in range(min(self._max_batch, len(self._pending)))]
        return [p for p in batch if not p.future.done()]  # drop answers whose request was cancelled

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            start = time.perf_counter()
            try:
                results = await self._score_batch(batch)
                end = time.perf_counter()
                self._last_batch = (end, end - start)
                metrics.record_batch(results, [end - p.queued_at for p in batch])
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any failure, or requests hang
                results = [{"error": f"scoring failed: {exc}"}] * len(batch)
            for pending, result in zip(batch, results):
                if not pending.future.done():
                    pending.future.set_result(result)

    async def _score_batch(self, batch: list[_Pending]) -> list[dict[str, Any]]:
        try:
            return await self._rpc([p.pair for p in batch], any(p.fault for p in batch))
        except Exception as exc:  # noqa: BLE001 - whatever failed, the completions must still go out
            if len(batch) > 1:
                log.warning("SemGrad scoring batch of %d failed (%s); retrying each answer alone", len(batch), exc)
                return [r for p in batch for r in await self._score_batch([p])]
            log.warning("SemGrad scoring failed: %s", exc)
            return [{"error": f"scoring failed: {exc}"}]

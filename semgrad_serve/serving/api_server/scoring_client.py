"""The API server's end of the scoring service: send answers, await their scores, never lose a request.

One Unix-socket connection to the worker's scoring service (``scoring_service.py``), carrying the
dataclasses of ``messages.py``; a reader thread hands each result to the event loop that asked for it. If the
service goes away, every waiting answer gets ``{"error": ...}`` and the
completions still go out.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import threading
import time
from multiprocessing.connection import Client
from typing import Any, Sequence

from ...scoring import semgrad_object
from ..capture_keys import mint
from ..messages import (
    CancelJob,
    DropCapture,
    JobResult,
    LiveJob,
    ScoreJob,
    StatsReply,
    StatsRequest,
    StoreStats,
    ToApiServer,
    ToWorker,
)
from ..settings import log
from . import prometheus_metrics

SERVICE_GONE = "scoring failed: the scoring service in the vLLM worker is not reachable"


class ScoringClient:
    """Sends (prompt ids, answer ids) pairs to the scoring service and resolves their futures."""

    def __init__(self, address: str, authkey: str, secret: bytes | None, engine: int = 0) -> None:
        """``secret``: what capture keys are minted under; None where the worker captures nothing (scoring then
        recomputes prompts). ``engine``: the data-parallel engine whose worker runs the service
        (``data_parallel.py``)."""
        self._secret = secret
        self.engine = engine
        self._conn = Client(address, family="AF_UNIX", authkey=bytes.fromhex(authkey))
        self._send_lock = threading.Lock()
        self._jobs = itertools.count()
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future, int]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._read, name="semgrad-results", daemon=True).start()

    @property
    def capture(self) -> bool:
        """Whether the worker captures this client's prompt keys/values (else scoring recomputes them)."""
        return self._secret is not None

    def recomputing(self) -> "ScoringClient":
        """This client, over the same connection, for requests whose prompt is not captured (no key)."""
        view = copy.copy(self)
        view._secret = None
        return view

    def new_key(self) -> str | None:
        """A fresh capture key for a scored request's ``kv_transfer_params`` (``capture_keys.py``); None where
        nothing is captured."""
        return mint(self._secret) if self._secret is not None else None

    async def score(
        self,
        key: str | None,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        claims: bool = False,
        windows: Sequence[range] | None = None,
        so_far: bool = False,
    ) -> list[dict[str, Any]]:
        """The ``"semgrad"`` object of each pair (the answers of one request, scored together; ``claims``: with their
        claims' scores); never raises but when cancelled, which cancels the scoring in the worker too. ``windows``:
        a live-claims job (``worker/live_scoring.py``), per pair the window of its answer's claims to score, from
        what vLLM has computed so far; ``so_far``: the answers are still being generated, so only those claims are
        scored (``{"claims": [...]}``) and the answers do not count in the metrics."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        job = next(self._jobs)
        with self._lock:
            if self._closed.is_set():
                return [semgrad_object.error_report(SERVICE_GONE)] * len(pairs)
            self._waiting[job] = (loop, future, len(pairs))
        start = time.perf_counter()
        listed = [(list(p), list(a)) for p, a in pairs]
        if windows is None:
            message: ScoreJob | LiveJob = ScoreJob(job, key, listed, claims)
        else:
            message = LiveJob(job, key, listed, list(windows), so_far)
        if not self._send(message):
            self._fail(job)
        try:
            results = await future
        except asyncio.CancelledError:  # the client of the request has gone: its scoring is dropped
            with self._lock:
                self._waiting.pop(job, None)
            self._send(CancelJob(job))
            raise
        if not so_far:
            prometheus_metrics.record_answers(results, time.perf_counter() - start, self.engine)
        return results

    async def store_stats(self, timeout_s: float) -> StoreStats | None:
        """What the worker's capture store holds now; None where the service does not answer in ``timeout_s``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        job = next(self._jobs)
        with self._lock:
            if self._closed.is_set():
                return None
            self._waiting[job] = (loop, future, 1)
        if not self._send(StatsRequest(job)):
            self._fail(job)
        try:
            stats = await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            with self._lock:
                self._waiting.pop(job, None)
            return None
        return stats if isinstance(stats, StoreStats) else None

    def drop(self, key: str | None) -> None:
        """The request of ``key`` is done: its captured keys/values can go."""
        if key is not None:
            self._send(DropCapture(key))

    def _send(self, message: ToWorker) -> bool:
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError) as exc:
            log.warning("SemGrad: cannot reach the scoring service (%s)", exc)
            return False

    def _fail(self, job: int) -> None:
        with self._lock:
            entry = self._waiting.pop(job, None)
        if entry is not None:
            loop, future, n = entry
            loop.call_soon_threadsafe(_resolve, future, [semgrad_object.error_report(SERVICE_GONE)] * n)

    def _read(self) -> None:
        while True:
            try:
                message: ToApiServer = self._conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, JobResult):
                if message.batch_size:
                    prometheus_metrics.SCORING_BATCH_SIZE.observe(message.batch_size)
                value: Any = message.reports
            elif isinstance(message, StatsReply):
                value = message.stats
            else:
                log.warning("SemGrad: unexpected message from the scoring service: %s", type(message).__name__)
                continue
            with self._lock:
                entry = self._waiting.pop(message.job, None)
            if entry is not None:
                loop, future, _ = entry
                loop.call_soon_threadsafe(_resolve, future, value)
        log.error("SemGrad: the scoring service closed its connection; answers are returned unscored")
        with self._lock:
            self._closed.set()
            jobs = list(self._waiting)
        for job in jobs:
            self._fail(job)


def _resolve(future: asyncio.Future, value: Any) -> None:
    if not future.done():  # a cancelled request (client gone) leaves a cancelled future
        future.set_result(value)

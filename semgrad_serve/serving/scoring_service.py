"""Scoring off the engine's critical path: a thread in the vLLM worker process, fed over a local socket.

``collective_rpc`` calls run between engine steps, so a scoring call made that
way stops every stream for as long as it takes. Instead the worker extension
starts this service once: the API server sends answers to score over a Unix
socket (``scoring_client.py``) and a scoring thread in the worker process
scores them on the weights vLLM holds, while the engine goes on generating.
On CPU the thread is pinned to the cores vLLM's worker threads are not bound
to (on a 2-core machine: the one vLLM leaves to the API server); on a GPU it
runs on its own CUDA stream.

Answers whose request left a capture (``captures.py``) run from t* on over the
captured prompt keys/values (only through the band, where its inputs were
recorded); the others recompute the prompt, with the same scores. Answers that arrive while a batch is scored form the next batch (at
most ``max_batch`` answers, one backward per batch).

Under tensor parallelism (``groups``), every rank's worker runs a service: rank 0's
takes the answers and forms the batches, the others follow them (``rank_sync.py``).

Messages (pickled tuples): API server → worker ``("score", job, key, pairs, claims)``,
``("drop", key)`` and ``("stats", job)``; worker → API server ``("result", job, reports,
batch_size)`` where ``batch_size`` is set on the first job of each batch only, and
``("stats", job, StoreStats, 0)``.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Listener
from typing import Any, Callable, Mapping

import torch

from . import rank_sync
from .captures import CaptureStore, Given
from .config import log

CAPTURE_WAIT_S = 10.0  # longest wait for a request's capture (normally one engine step) before recomputing
SCORING_NICE = 10  # the scoring thread's nice value (Linux: per thread)
IDLE_POLL_S = 0.01  # re-check interval while every queued answer still waits for its capture

Pair = tuple[list[int], list[int]]
# Scores pairs, given per pair what vLLM computed for it and whether to score its claims -> one "semgrad" object
# per pair.
ScoreFn = Callable[[list[Pair], list[Given], list[bool]], list[dict[str, Any]]]


@dataclass
class Job:
    job: int
    key: str | None
    pairs: list[Pair]
    claims: bool = False  # score each answer's claims too
    received: float = field(default_factory=time.monotonic)


# How vLLM names a CPU worker's OpenMP cores in its environment (one core per thread), by OpenMP runtime.
OMP_BINDINGS = (("OMP_PLACES", r"\{([\d,]+)\}"), ("GOMP_CPU_AFFINITY", r"([\d ]+)"), ("KMP_AFFINITY", r".*proclist=\[([\d,]+)\]"))


def generation_cores(env: Mapping[str, str] = os.environ) -> set[int]:
    """The cores vLLM bound this worker's OpenMP threads (generation) to, from the environment vLLM starts the
    worker process with (``OMP_PLACES="{0,1}"``, ``GOMP_CPU_AFFINITY="0 1"`` or ``KMP_AFFINITY``'s
    ``proclist=[0,1]``): the main thread is bound to the first core only, so its own affinity would miss the
    others. Without any, this thread's cores."""
    for name, pattern in OMP_BINDINGS:
        if found := re.fullmatch(pattern, env.get(name, "").strip()):
            return {int(c) for c in re.findall(r"\d+", found.group(1))}
    return os.sched_getaffinity(0)


def scoring_cores(api_cores: set[int], generation: set[int]) -> set[int]:
    """The cores the scoring thread should run on: those the API server may use that generation's threads are
    not bound to; all of the API server's cores where generation is bound to every one of them."""
    return (api_cores - generation) or api_cores


class ScoringService:
    """Receives answers over a Unix socket and scores them in a thread of the worker process. Under tensor
    parallelism (``groups``), only rank 0 listens; the other ranks' services score rank 0's batches (``address``
    and ``authkey`` are None there)."""

    def __init__(
        self, score: ScoreFn, store: CaptureStore, max_batch: int, cores: set[int], groups: rank_sync.ScoringGroups | None = None
    ) -> None:
        self._score, self._store, self._max_batch, self._cores = score, store, max_batch, cores
        self._group = None if groups is None else groups.host
        rank = 0 if groups is None else groups.rank
        self._jobs: deque[Job] = deque()
        self._dropped: list[str] = []  # keys dropped since the last batch, for the followers (tensor parallelism)
        self._arrived = threading.Condition()
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self.address: str | None = None
        self.authkey: str | None = None
        if rank > 0:
            threading.Thread(target=self._run, args=(True,), name="semgrad-score", daemon=True).start()
            return
        self._listener = Listener(family="AF_UNIX", authkey=(authkey := secrets.token_bytes(16)))
        self.address, self.authkey = self._listener.address, authkey.hex()
        threading.Thread(target=self._receive, name="semgrad-receive", daemon=True).start()
        threading.Thread(target=self._run, name="semgrad-score", daemon=True).start()

    def _receive(self) -> None:
        self._conn = self._listener.accept()
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                log.warning("SemGrad: the API server closed the scoring connection")
                return
            if message[0] == "score":
                _, job, key, pairs, claims = message
                with self._arrived:
                    self._jobs.append(Job(job, key, pairs, claims))
                    self._arrived.notify()
            elif message[0] == "stats":
                self._send(("stats", message[1], self._store.stats(), 0))
            elif message[0] == "drop":
                self._store.drop(message[1])
                if self._group is not None:
                    with self._arrived:
                        self._dropped.append(message[1])

    def _ready(self, job: Job) -> bool:
        """Whether the job's answers may be scored: each one's choice is captured, or the wait for it is over."""
        return job.key is None or time.monotonic() - job.received > CAPTURE_WAIT_S or self._captured(job)

    def _next_batch(self) -> list[Job]:
        """Ready jobs, oldest first, up to ``max_batch`` answers (a larger job goes alone)."""
        with self._arrived:
            while True:
                self._arrived.wait_for(lambda: bool(self._jobs))
                batch, size = [], 0
                for job in list(self._jobs):
                    if self._ready(job) and (not batch or size + len(job.pairs) <= self._max_batch):
                        batch.append(job)
                        size += len(job.pairs)
                for job in batch:
                    self._jobs.remove(job)
                if batch:
                    return batch
                self._arrived.wait(IDLE_POLL_S)

    def _given(self, job: Job, pair: Pair) -> Given:
        """What the job's capture gives an answer (nothing without one)."""
        capture = self._store.get(job.key) if job.key is not None else None
        if capture is None or capture.prompt_ids != tuple(pair[0]):
            return Given()
        return capture.given(pair[1])

    def _given_all(self, jobs: list[Job], follower: bool) -> list[list[Given]]:
        """What each job's answers are given; under tensor parallelism, what every rank was given (rank 0 first
        sends the batch, with what it was given, to the other ranks)."""
        given = [[self._given(job, pair) for pair in job.pairs] for job in jobs]
        if self._group is None:
            return given
        flat = [g for per_job in given for g in per_job]
        if not follower:
            self._share(jobs, [rank_sync.given_kind(g) for g in flat])
        agreed = iter(rank_sync.agree(self._group, flat))
        return [[next(agreed) for _ in per_job] for per_job in given]

    def _share(self, jobs: list[Job], kinds: list[int]) -> None:
        """Rank 0: send the batch, what each answer was given here and the keys dropped since the last batch."""
        with self._arrived:
            dropped, self._dropped = self._dropped, []
        rank_sync.share_plan(self._group, ([(j.job, j.key, j.pairs, j.claims) for j in jobs], dropped, kinds))

    def _next_shared(self) -> list[Job]:
        """A rank > 0: the next batch rank 0 shares, once this rank's captures that rank 0 had are in (they come in
        the same engine step, give or take this thread's wake-up) or the wait for them is over."""
        entries, dropped, kinds = rank_sync.share_plan(self._group, None)
        for key in dropped:
            self._store.drop(key)
        jobs = [Job(job, key, pairs, claims) for job, key, pairs, claims in entries]
        wanted = [job for job, kind in zip((j for j in jobs for _ in j.pairs), kinds) if kind > 0]
        deadline = time.monotonic() + CAPTURE_WAIT_S
        while not all(self._captured(job) for job in wanted) and time.monotonic() < deadline:
            time.sleep(IDLE_POLL_S)
        return jobs

    def _captured(self, job: Job) -> bool:
        capture = self._store.get(job.key) if job.key is not None else None
        return capture is not None and all(capture.has_choice(answer) for _, answer in job.pairs)

    def _score_jobs(self, jobs: list[Job], given: list[list[Given]]) -> list[list[dict[str, Any]]]:
        """Reports per job (``given``: per job, what its answers are given); if the batch fails as a whole, each
        job is retried alone."""
        pairs = [pair for job in jobs for pair in job.pairs]
        claims = [job.claims for job in jobs for _ in job.pairs]
        try:
            reports = self._score(pairs, [g for per_job in given for g in per_job], claims)
        except Exception as exc:  # whatever failed, every answer must get a result
            if len(jobs) > 1:
                log.warning("SemGrad scoring batch of %d requests failed (%s); retrying each alone", len(jobs), exc)
                return [self._score_jobs([job], [g])[0] for job, g in zip(jobs, given)]
            log.warning("SemGrad scoring failed: %s", exc)
            return [[{"error": f"scoring failed: {exc}"}] * len(jobs[0].pairs)]
        out, start = [], 0
        for job in jobs:
            out.append(reports[start : start + len(job.pairs)])
            start += len(job.pairs)
        return out

    def _run(self, follower: bool = False) -> None:
        """The scoring thread: batches from the queue (rank 0) or from rank 0 (``follower``), scored one at a time;
        a follower's reports stay here."""
        if self._cores:
            try:
                os.sched_setaffinity(0, self._cores)  # this thread only
            except OSError as exc:
                log.warning("SemGrad: cannot pin the scoring thread to cores %s (%s)", sorted(self._cores), exc)
        try:  # below the API server and engine loop on its core (qa on/off 0.82x vs 0.74x at nice 0)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SCORING_NICE)
        except OSError as exc:
            log.warning("SemGrad: cannot lower the scoring thread's priority (%s)", exc)
        stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        while True:
            jobs = self._next_shared() if follower else self._next_batch()
            try:
                given = self._given_all(jobs, follower)
                with torch.enable_grad(), torch.cuda.stream(stream) if stream is not None else nullcontext():
                    results = self._score_jobs(jobs, given)
                if stream is not None:
                    stream.synchronize()
            except Exception as exc:  # the thread must outlive anything, or requests wait forever
                log.exception("SemGrad: the scoring thread failed on a batch")
                results = [[{"error": f"scoring failed: {exc}"}] * len(job.pairs) for job in jobs]
            if follower:
                continue
            size = sum(len(job.pairs) for job in jobs)
            for i, (job, reports) in enumerate(zip(jobs, results)):
                self._send(("result", job.job, reports, size if i == 0 else 0))

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            if self._conn is not None:
                try:
                    self._conn.send(message)
                except Exception as exc:  # a lost connection must not end the thread
                    log.warning("SemGrad: cannot send scores to the API server (%s)", exc)


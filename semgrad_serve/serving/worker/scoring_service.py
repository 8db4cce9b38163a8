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
recorded); the others recompute the prompt, with the same scores.

Each request is a job of one or more pieces, each piece one scoring pass (its
backward's seeds in groups within a memory budget, ``claim_budget.py``). A job that
asks for claims is long: its answers' claims go in passes of at most
``claims_per_pass`` claims. Every other job is short, one piece, and short jobs
that arrive while a batch is scored form the next batch (at most ``max_batch``
answers, one backward per batch). Long jobs run in a second scoring thread at a
lower priority (on a GPU, a lower-priority stream), long jobs' pieces in turn, so
short answers are scored beside them at nearly their idle speed and never wait for
them. Under tensor parallelism, where every rank must run the same passes in the
same order, one thread alternates between a batch of short jobs and one piece of a
long job. A job whose client has gone is dropped: its pieces not yet scored are
never scored.

Under tensor parallelism (``groups``), every rank's worker runs a service: rank 0's
takes the answers and forms the batches, the others follow them (``rank_sync.py``).

The messages between the API server and this service are the dataclasses of ``messages.py``; a ``LiveJob``
(live claims: each answer so far with the window of its claims to score) is scored from ``live_scoring.py``.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import sys
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Listener
from typing import Any, Callable, Mapping

import torch

from ...scoring import semgrad_object
from ...scoring.given import NOTHING_GIVEN, Given, GivenKind
from ..messages import (
    CancelJob,
    DropCapture,
    JobResult,
    LiveJob,
    Pair,
    ScoreJob,
    StatsReply,
    StatsRequest,
    ToApiServer,
    ToWorker,
)
from ..settings import log
from . import rank_sync
from .captures import CaptureStore

CAPTURE_WAIT_S = 10.0  # longest wait for a request's capture (normally one engine step) before recomputing
SCORING_NICE = 10  # the scoring thread's nice value (Linux: per thread)
IDLE_POLL_S = 0.01  # re-check interval while every queued answer still waits for its capture
LONG_NICE = 19  # the long jobs' thread's nice value: the short jobs' thread takes most of a shared core

# Which of an answer's claims a scoring pass scores: None, none (no claims asked for); a range, those claims.
Window = range | None
# Scores pairs, given per pair what vLLM computed for it, which of its claims to score and whether its answer is
# still being generated (only those claims are scored then: ``{"claims": [...]}``) -> one "semgrad" object per pair.
ScoreFn = Callable[[list[Pair], list[Given], list[Window], list[bool]], list[dict[str, Any]]]
# An answer's scoring passes, given whether its claims are asked for: [None] without, else the claim windows.
PlanFn = Callable[[Pair, bool], list[Window]]
# What a live-claims job's answer is given, from its capture key; None: not computed yet (``live_scoring.py``).
LiveGivenFn = Callable[[str, Pair], Given | None]


def one_pass(pair: Pair, claims: bool) -> list[Window]:
    """The plan without a budget: one pass, with all of the answer's claims where asked for."""
    return [range(0, sys.maxsize)] if claims else [None]


@dataclass
class Job:
    """One request's answers, and their reports as the pieces come back."""

    job: int
    key: str | None
    pairs: list[Pair]
    claims: bool = False  # score each answer's claims too
    received: float = field(default_factory=time.monotonic)
    reports: list[dict[str, Any] | None] = field(default_factory=list)
    pieces: deque["Piece"] = field(default_factory=deque)  # not yet handed to the scoring thread
    left: int = 0  # pieces not yet scored
    cancelled: bool = False
    live: bool = False  # a live-claims job: one pass over answers so far, given what was computed so far
    so_far: bool = False  # a live job whose answers are still being generated: only its windows' claims are scored
    given: list[Given] | None = None  # a live job's, once all of it is computed

    @property
    def long(self) -> bool:
        """Scored in the long jobs' lane: it asks for claims, whose seeds multiply a pass's cost."""
        return self.claims


@dataclass
class Piece:
    """One scoring pass of a job: some of its answers (indices into ``job.pairs``), each with its claim window."""

    job: Job
    answers: list[int]
    windows: list[Window]

    @property
    def pairs(self) -> list[Pair]:
        return [self.job.pairs[i] for i in self.answers]

    @property
    def so_far(self) -> bool:
        return self.job.so_far


def split_job(job: Job, plan: PlanFn) -> None:
    """Cut ``job`` into pieces: one for all its answers where each has one pass, else one per answer and window.
    A job is long (``Job.long``) where it asks for claims."""
    windows = [plan(pair, job.claims) for pair in job.pairs]
    if all(len(w) == 1 for w in windows):
        job.pieces = deque([Piece(job, list(range(len(job.pairs))), [w[0] for w in windows])])
    else:
        job.pieces = deque(Piece(job, [i], [w]) for i, per_answer in enumerate(windows) for w in per_answer)
    job.left, job.reports = len(job.pieces), [None] * len(job.pairs)


def merge(job: Job, piece: Piece, reports: list[dict[str, Any]]) -> None:
    """Add a piece's reports to its job's: an answer's first pass gives its report, later ones add their claims
    (an answer's pieces are scored in order); a failed pass makes the answer's report its error."""
    for i, report in zip(piece.answers, reports):
        have = job.reports[i]
        if have is None or ("error" in report and "error" not in have):
            job.reports[i] = report  # the answer's first pass, or a later one that failed
        elif "error" not in have:
            have["claims"] = [*have.get("claims", []), *report.get("claims", [])]
    job.left -= 1


def trim_allocator() -> None:
    """Hand the C allocator's free memory back to the system (glibc keeps what scoring freed; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# How vLLM names a CPU worker's OpenMP cores in its environment (one core per thread), by OpenMP runtime.
OMP_BINDINGS = (
    ("OMP_PLACES", r"\{([\d,]+)\}"),
    ("GOMP_CPU_AFFINITY", r"([\d ]+)"),
    ("KMP_AFFINITY", r".*proclist=\[([\d,]+)\]"),
)


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
    and ``authkey`` are None there). ``plan`` cuts each answer into scoring passes (default: one). ``lanes``: 2, a
    thread for short jobs and one for long jobs; 1, one thread for both (always so under tensor parallelism)."""

    def __init__(
        self,
        score: ScoreFn,
        store: CaptureStore,
        max_batch: int,
        cores: set[int],
        groups: rank_sync.ScoringGroups | None = None,
        plan: PlanFn = one_pass,
        lanes: int = 2,
        live_given: LiveGivenFn | None = None,
    ) -> None:
        """``live_given``: what a live-claims job's answer is given (default: only a finished choice's capture)."""
        self._score, self._store, self._max_batch, self._cores, self._plan = score, store, max_batch, cores, plan
        self._live_given = live_given or self._finished_given
        self._group = None if groups is None else groups.host
        rank = 0 if groups is None else groups.rank
        self._short: deque[Piece] = deque()  # the pieces of one-piece jobs, oldest first
        self._long: deque[Job] = deque()  # jobs of several pieces with pieces left, the next to serve first
        self._live: dict[int, Job] = {}  # jobs not yet answered, by id
        self._long_last = False  # whether the last batch was a long job's piece
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
        if groups is not None or lanes == 1:
            threading.Thread(target=self._run, name="semgrad-score", daemon=True).start()
            return
        threading.Thread(target=self._run, kwargs={"lane": "short"}, name="semgrad-score", daemon=True).start()
        threading.Thread(target=self._run, kwargs={"lane": "long"}, name="semgrad-score-long", daemon=True).start()

    def _receive(self) -> None:
        self._conn = self._listener.accept()
        while True:
            try:
                message: ToWorker = self._conn.recv()
            except (EOFError, OSError):
                log.warning("SemGrad: the API server closed the scoring connection")
                return
            if isinstance(message, ScoreJob):
                job = Job(message.job, message.key, message.pairs, message.claims)
                try:
                    split_job(job, self._plan)
                except Exception as exc:  # a plan that fails must not end this thread: one pass, as asked
                    log.warning("SemGrad: cannot plan the scoring of request %d (%s)", job.job, exc)
                    split_job(job, one_pass)
                if len(job.pieces) > 1:
                    log.info("SemGrad: scoring job %d in %d passes", job.job, len(job.pieces))
                with self._arrived:
                    self._live[job.job] = job
                    if job.long:
                        self._long.append(job)
                    else:
                        self._short.append(job.pieces.popleft())
                    self._arrived.notify_all()  # each lane waits on it
            elif isinstance(message, LiveJob):  # one pass, short, batched with others
                job = Job(
                    message.job,
                    message.key,
                    message.pairs,
                    live=True,
                    so_far=message.so_far,
                    left=1,
                    reports=[None] * len(message.pairs),
                )
                with self._arrived:
                    self._live[job.job] = job
                    self._short.append(Piece(job, list(range(len(message.pairs))), list(message.windows)))
                    self._arrived.notify_all()
            elif isinstance(message, CancelJob):
                self._cancel(message.job)
            elif isinstance(message, StatsRequest):
                self._send(StatsReply(message.job, self._store.stats()))
            elif isinstance(message, DropCapture):
                self._store.drop(message.key)
                if self._group is not None:
                    with self._arrived:
                        self._dropped.append(message.key)
            else:
                log.warning("SemGrad: unexpected message from the API server: %s", type(message).__name__)

    def _cancel(self, job_id: int) -> None:
        """The client of ``job_id`` has gone: its pieces not yet scored are dropped, and its result is never sent."""
        with self._arrived:
            job = self._live.pop(job_id, None)
            if job is None:
                return
            job.cancelled = True
            waiting = len(job.pieces) + sum(p.job is job for p in self._short)
            job.pieces.clear()
            self._short = deque(p for p in self._short if p.job is not job)
            self._long = deque(j for j in self._long if j is not job)
        log.info(
            "SemGrad: the client of scoring job %d has gone: %d of its %d passes dropped unscored",
            job_id,
            waiting,
            job.left,
        )

    def queued(self) -> int:
        """Jobs received and not yet answered (nor cancelled)."""
        with self._arrived:
            return len(self._live)

    def _ready(self, job: Job) -> bool:
        """Whether the job's answers may be scored: each one's choice is captured (a live job: what it is given is
        computed), or the wait for it is over."""
        if job.key is None or time.monotonic() - job.received > CAPTURE_WAIT_S:
            return True
        if not job.live or self._group is not None and not job.so_far:  # finished choices: their captures
            return self._captured(job.key, job.pairs)
        if self._group is not None:  # the other ranks cannot see a running request's rows: recompute
            job.given = [Given() for _ in job.pairs]
        if job.given is None:
            given = [self._live_given(job.key, pair) for pair in job.pairs]
            job.given = None if any(g is None for g in given) else given
        return job.given is not None

    def _finished_given(self, key: str, pair: Pair) -> Given | None:
        """A live job's answer given only what its finished choice's capture holds."""
        return self._given(key, pair) if self._captured(key, [pair]) else None

    def _next_batch(self, lane: str = "both") -> list[Piece]:
        """The next pieces to score in ``lane`` (short, long or both): ready short jobs, oldest first, up to
        ``max_batch`` answers (a larger job goes alone), answers still being generated before the others (their
        claims alone are cheap to score, and their reader is waiting for them in the stream); or the next piece
        of the long job whose turn it is; alternately where both lanes are this thread's and both wait."""
        short, long = lane != "long", lane != "short"
        with self._arrived:
            while True:
                self._arrived.wait_for(lambda: bool(short and self._short or long and self._long))
                batch, size = [], 0
                ready = [piece for piece in self._short if self._ready(piece.job)] if short else []
                for piece in [p for p in ready if p.so_far] or ready:
                    if not batch or size + len(piece.answers) <= self._max_batch:
                        batch.append(piece)
                        size += len(piece.answers)
                long_job = next((job for job in self._long if self._ready(job)), None) if long else None
                if batch and (long_job is None or self._long_last):
                    self._short = deque(p for p in self._short if p not in batch)
                    self._long_last = False
                    return batch
                if long_job is not None:
                    self._long.remove(long_job)
                    piece = long_job.pieces.popleft()
                    if long_job.pieces:
                        self._long.append(long_job)  # the other long jobs' turn next
                    self._long_last = True
                    return [piece]
                self._arrived.wait(IDLE_POLL_S)

    def _given(self, key: str | None, pair: Pair) -> Given:
        """What a capture gives an answer (nothing without one)."""
        capture = self._store.get(key) if key is not None else None
        if capture is None or capture.prompt_ids != tuple(pair[0]):
            return NOTHING_GIVEN
        return capture.given(pair[1])

    def _given_all(self, pieces: list[Piece], follower: bool) -> list[list[Given]]:
        """What each piece's answers are given; under tensor parallelism, what every rank was given (rank 0 first
        sends the batch, with what it was given, to the other ranks)."""
        given = [piece.job.given or [self._given(piece.job.key, pair) for pair in piece.pairs] for piece in pieces]
        if self._group is None:
            return given
        flat = [g for per_piece in given for g in per_piece]
        if not follower:
            self._share(pieces, [g.kind for g in flat])
        agreed = iter(rank_sync.agree(self._group, flat))
        return [[next(agreed) for _ in per_piece] for per_piece in given]

    def _share(self, pieces: list[Piece], kinds: list[GivenKind]) -> None:
        """Rank 0: send the batch, what each answer was given here and the keys dropped since the last batch."""
        with self._arrived:
            dropped, self._dropped = self._dropped, []
        planned = [rank_sync.PlannedPiece(p.job.job, p.job.key, p.pairs, p.windows, p.so_far) for p in pieces]
        rank_sync.share_plan(self._group, rank_sync.Plan(planned, dropped, kinds))

    def _next_shared(self) -> list[Piece]:
        """A rank > 0: the next batch rank 0 shares, once this rank's captures that rank 0 had are in (they come in
        the same engine step, give or take this thread's wake-up) or the wait for them is over."""
        plan = rank_sync.share_plan(self._group, None)
        for key in plan.dropped:
            self._store.drop(key)
        pieces = [
            Piece(Job(p.job, p.key, p.pairs, so_far=p.so_far), list(range(len(p.pairs))), p.windows)
            for p in plan.pieces
        ]
        per_answer = [p for p in pieces for _ in p.answers]
        wanted = [p for p, kind in zip(per_answer, plan.kinds) if kind is not GivenKind.NOTHING]
        deadline = time.monotonic() + CAPTURE_WAIT_S
        while not all(self._captured(p.job.key, p.pairs) for p in wanted) and time.monotonic() < deadline:
            time.sleep(IDLE_POLL_S)
        return pieces

    def _captured(self, key: str | None, pairs: list[Pair]) -> bool:
        capture = self._store.get(key) if key is not None else None
        return capture is not None and all(capture.has_choice(answer) for _, answer in pairs)

    def _score_pieces(self, pieces: list[Piece], given: list[list[Given]]) -> list[list[dict[str, Any]]]:
        """Reports per piece (``given``: per piece, what its answers are given); if the batch fails as a whole,
        each piece is retried alone."""
        pairs = [pair for piece in pieces for pair in piece.pairs]
        windows = [w for piece in pieces for w in piece.windows]
        so_far = [piece.so_far for piece in pieces for _ in piece.answers]
        try:
            reports = self._score(pairs, [g for per_piece in given for g in per_piece], windows, so_far)
        except Exception as exc:  # whatever failed, every answer must get a result
            if len(pieces) > 1:
                log.warning("SemGrad scoring batch of %d requests failed (%s); retrying each alone", len(pieces), exc)
                return [self._score_pieces([piece], [g])[0] for piece, g in zip(pieces, given)]
            log.warning("SemGrad scoring failed: %s", exc)
            return [[semgrad_object.error_report(f"scoring failed: {exc}") for _ in pieces[0].answers]]
        out, start = [], 0
        for piece in pieces:
            out.append(reports[start : start + len(piece.answers)])
            start += len(piece.answers)
        return out

    def _run(self, follower: bool = False, lane: str = "both") -> None:
        """The scoring thread: batches from the queue (rank 0) or from rank 0 (``follower``), scored one at a time;
        a follower's reports stay here."""
        if self._cores:
            try:
                os.sched_setaffinity(0, self._cores)  # this thread only
            except OSError as exc:
                log.warning("SemGrad: cannot pin the scoring thread to cores %s (%s)", sorted(self._cores), exc)
        try:  # below the API server and engine loop on its core (benchmarks/results/scoring_service_notes.md)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LONG_NICE if lane == "long" else SCORING_NICE)
        except OSError as exc:
            log.warning("SemGrad: cannot lower the scoring thread's priority (%s)", exc)
        # CUDA: a lower number is a higher priority; the long jobs' stream yields to the short jobs'
        stream = torch.cuda.Stream(priority=0 if lane == "long" else -1) if torch.cuda.is_available() else None
        while True:
            pieces = self._next_shared() if follower else self._next_batch(lane)
            try:
                given = self._given_all(pieces, follower)
                with torch.enable_grad(), torch.cuda.stream(stream) if stream is not None else nullcontext():
                    results = self._score_pieces(pieces, given)
                if stream is not None:
                    stream.synchronize()
            except Exception as exc:  # the thread must outlive anything, or requests wait forever
                log.exception("SemGrad: the scoring thread failed on a batch")
                results = [
                    [semgrad_object.error_report(f"scoring failed: {exc}") for _ in piece.answers] for piece in pieces
                ]
            if not follower:
                self._answer(pieces, results)
            pieces, given, results = [], [], []  # nothing of the batch (its captures' tensors) outlives it
            if stream is None and not self._short and not self._long:
                trim_allocator()  # idle: the batch's activations go back to the system

    def _answer(self, pieces: list[Piece], results: list[list[dict[str, Any]]]) -> None:
        """Merge a batch's reports into their jobs and send each job that is complete (and still wanted)."""
        size, sent = sum(len(piece.answers) for piece in pieces), False
        for piece, reports in zip(pieces, results):
            job = piece.job
            with self._arrived:
                merge(job, piece, reports)
                done = job.left == 0 and not job.cancelled
                if done:
                    self._live.pop(job.job, None)
            if done:
                self._send(JobResult(job.job, job.reports, 0 if sent else size))
                sent = True

    def _send(self, message: ToApiServer) -> None:
        with self._send_lock:
            if self._conn is not None:
                try:
                    self._conn.send(message)
                except Exception as exc:  # a lost connection must not end the thread
                    log.warning("SemGrad: cannot send scores to the API server (%s)", exc)

"""What crosses the process line between the API server and the worker (torch-free, so the API server can import it).

The API server's scoring client (``api_server/scoring_client.py``) and the worker's scoring service
(``worker/scoring_service.py``) exchange these frozen dataclasses, pickled over a local Unix socket, and tell them
apart by type: ``ToWorker`` one way, ``ToApiServer`` the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

KV_PARAM = "semgrad_capture"  # the capture key's name in a request's kv_transfer_params
LIVE_PARAM = "semgrad_live"  # true in a scored request's kv_transfer_params: its claims are scored while it runs
# The key of the worker extension's set-up answer (through vLLM's ``collective_rpc``) that says why scoring cannot
# start on this model or layout.
SETUP_REFUSED = "refused"

# (prompt token ids, answer token ids) of one answer
Pair = tuple[list[int], list[int]]


@dataclass(frozen=True)
class StoreStats:
    """What a worker's capture store holds (sent to the API server for ``/v1/semgrad/info``)."""

    captures: int  # entries, with keys/values or without
    bytes: int  # of keys/values, band inputs and logits held
    budget_bytes: int
    done_keys: int  # dropped keys remembered, whose late captures are refused


# -- API server → worker ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreJob:
    """Score the answers of one request together (job ``job``); ``key``: the capture key its prompt's keys/values
    were kept under (None: recompute); ``claims``: score each answer's claims too."""

    job: int
    key: str | None
    pairs: list[Pair]
    claims: bool = False


@dataclass(frozen=True)
class LiveJob:
    """Score the claims of answers still being generated (job ``job``; ``worker/live_scoring.py``): per pair, the
    answer so far and the window of its claims to score, from what vLLM has computed of it so far. ``so_far``: the
    answers are still running, so only those claims are scored; else (a finished choice) its whole answer too."""

    job: int
    key: str | None
    pairs: list[Pair]
    windows: list[range]
    so_far: bool = True


@dataclass(frozen=True)
class CancelJob:
    """The client of job ``job`` has gone: what is not yet scored is dropped and no result is sent."""

    job: int


@dataclass(frozen=True)
class DropCapture:
    """The request of capture key ``key`` is done: its capture goes, and one that arrives later is refused."""

    key: str


@dataclass(frozen=True)
class StatsRequest:
    """Ask for the capture store's figures, answered by a ``StatsReply`` of the same ``job``."""

    job: int


# -- worker → API server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JobResult:
    """The ``"semgrad"`` object of each answer of job ``job``, in order; ``batch_size``: the answers of the scoring
    batch, set on the first job sent of each batch only (0 on the others), for the batch-size histogram."""

    job: int
    reports: list[dict[str, Any]]
    batch_size: int = 0


@dataclass(frozen=True)
class StatsReply:
    job: int
    stats: StoreStats


ToWorker = Union[ScoreJob, LiveJob, CancelJob, DropCapture, StatsRequest]
ToApiServer = Union[JobResult, StatsReply]

"""Data parallelism in one server: a scoring service per vLLM engine, and each request sent to one engine.

With ``--data-parallel-size N`` vLLM runs N engine processes behind one API server;
each engine's worker runs its own scoring service (``semgrad_setup`` is called on
every engine), and a request's prompt keys/values are captured in the engine that
generated it, so that engine must score it. vLLM's load balancer picks an engine
per request and does not tell the route which one; instead the route picks it
(round-robin, or the one a router asked for in vLLM's ``X-data-parallel-rank``
header) and passes it to vLLM in that header, which vLLM's chat and completions
routes obey. vLLM's Responses route does not read the header: its answers are
scored on the next engine in turn without a capture (the prompt is recomputed, same
scores).
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from starlette.requests import Request

from ...errors import SemgradError
from ..messages import SETUP_REFUSED
from .scoring_client import ScoringClient

DP_RANK_HEADER = "x-data-parallel-rank"  # vLLM's header naming the engine of a request (``_get_data_parallel_rank``)
SETUP = "semgrad_setup"  # the worker extension's set-up method


async def setup_engines(engine_client: Any, args: tuple, data_parallel_size: int) -> list[dict[str, Any]]:
    """Call the worker extension's set-up on every engine's workers; per engine, rank 0's answer (whose scoring
    service takes the answers), or a worker's refusal (``SETUP_REFUSED``). ``collective_rpc`` reaches every engine
    but returns engine 0's answers only, so with several engines each is asked through vLLM's per-engine utility
    call."""
    if data_parallel_size == 1:
        per_engine = [await engine_client.collective_rpc(SETUP, args=args)]
    else:
        per_engine = await engine_client.engine_core.call_utility_all_async("collective_rpc", SETUP, None, args, None)
    return [next((info for info in workers if SETUP_REFUSED in info), workers[0]) for workers in per_engine]


def connect(infos: Sequence[dict[str, Any]], secret: bytes | None) -> list[ScoringClient]:
    """A scoring client per engine, in vLLM's engine order (``infos`` lose their address and key); ``secret``: the
    capture secret, handed to the clients of engines whose captures can be used."""
    clients = []
    for engine, info in enumerate(infos):
        address, authkey = info.pop("address"), info.pop("authkey")
        try:
            clients.append(ScoringClient(address, authkey, secret if info["capture"] else None, engine=engine))
        except OSError as exc:
            raise SemgradError(
                f"cannot reach the scoring service of engine {engine} ({exc}): each engine's first worker must run on "
                "the API server's machine (the service listens on a local socket); start one semgrad-serve per machine"
            ) from None
    return clients


def engines_info(infos: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What ``/v1/semgrad/info`` shows about the engines: engine 0's set-up (all engines load the same scorer),
    the data-parallel size, and what differs per engine (the cores its scoring thread runs on)."""
    return {
        **infos[0],
        "data_parallel_size": len(infos),
        "engines": [{"engine": i, "scoring_cores": info["scoring_cores"]} for i, info in enumerate(infos)],
    }


class EngineRouter:
    """The scoring clients of a server's engines (one, or one per data-parallel engine); picks each scored
    request's engine."""

    def __init__(self, clients: Sequence[ScoringClient]) -> None:
        if not clients:
            raise ValueError("EngineRouter needs at least one scoring client")
        self.clients = list(clients)
        self._turn = itertools.count()

    def _next(self) -> int:
        return next(self._turn) % len(self.clients)

    def requested(self, raw_request: Request) -> int | None:
        """The engine the request's ``X-data-parallel-rank`` header names, None without a usable one (vLLM
        ignores a value that is not a whole number); a number out of range is a user mistake."""
        value = raw_request.headers.get(DP_RANK_HEADER)
        try:
            rank = int(value) if value is not None else None
        except ValueError:
            return None
        if rank is not None and not 0 <= rank < len(self.clients):
            raise SemgradError(
                f"X-data-parallel-rank {rank} is out of range: this server runs {len(self.clients)} engines"
            )
        return rank

    def route(self, raw_request: Request, routable: bool = True) -> ScoringClient:
        """The scoring client of the engine that will generate the request. ``routable``: vLLM's route obeys the
        header, which is then set on ``raw_request`` (in place: vLLM's route reads this request's headers);
        otherwise the next engine's client, without a capture."""
        if len(self.clients) == 1:
            return self.clients[0]
        if not routable:
            return self.clients[self._next()].recomputing()
        engine = self.requested(raw_request)
        if engine is None:
            engine = self._next()
            scope = raw_request.scope
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != DP_RANK_HEADER.encode()]
            scope["headers"].append((DP_RANK_HEADER.encode(), str(engine).encode()))
            raw_request.__dict__.pop("_headers", None)  # Starlette's cached view of the headers
        return self.clients[engine]

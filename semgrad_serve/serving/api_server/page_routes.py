"""The page at ``GET /semgrad`` and the JSON it reads.

- ``GET /semgrad``: one static page (``page/semgrad.html`` with ``semgrad.css`` and
  ``semgrad.js``, served from ``/semgrad/``), plain HTML, CSS and JavaScript that
  load nothing from outside the server (its Content-Security-Policy says so). It
  chats through ``/v1/chat/completions`` (streamed), reads ``/metrics`` for the
  counters and the two routes below.
- ``GET /v1/semgrad/info``: the scoring set-up (profile, t* rule, band, score,
  threshold, the request options this server knows) and what the worker's
  capture store holds now (``captures``: entries, bytes, budget, dropped keys
  remembered; null where the scoring service does not answer).
- ``GET /v1/semgrad/recent?flagged=1&limit=N``: the recent scored answers, newest
  first (``recent_answers.py``).

The JSON routes sit under ``/v1`` so that vLLM's ``--api-key`` guards them as it
guards the completions: the recent answers are other people's questions.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from ..settings import PAGE_PATH
from .chat_routes import REQUEST_OPTIONS
from .recent_answers import RecentAnswers

if TYPE_CHECKING:
    from .data_parallel import EngineRouter

page_router = APIRouter()

ASSETS = {"semgrad.css": "text/css; charset=utf-8", "semgrad.js": "text/javascript; charset=utf-8"}
# Everything comes from this server; inline scripts and styles are refused too.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
_FLAG = {"1": True, "true": True, "0": False, "false": False}
STATS_TIMEOUT_S = 5.0  # longest wait for the worker's capture store figures


def asset(name: str) -> bytes:
    """A file of the page, as shipped in the package (read on each request: a few tens of kB)."""
    return (resources.files(__package__) / "page" / name).read_bytes()


@page_router.api_route(PAGE_PATH, methods=["GET", "HEAD"], include_in_schema=False)
async def page() -> Response:
    return Response(
        asset("semgrad.html"),
        media_type="text/html; charset=utf-8",
        headers={**HEADERS, "Content-Security-Policy": CSP},
    )


@page_router.api_route(PAGE_PATH + "/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def page_asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(status_code=404, detail=f"no such file: {name}")
    return Response(asset(name), media_type=ASSETS[name], headers=HEADERS)


def _unavailable() -> JSONResponse:
    return JSONResponse({"error": "SemGrad scoring is not running in this server"}, status_code=503)


@page_router.get("/v1/semgrad/info")
async def info(raw_request: Request) -> JSONResponse:
    """The scoring set-up the page shows beside each answer."""
    state = raw_request.app.state
    setup: dict[str, Any] | None = getattr(state, "semgrad_info", None)
    if setup is None:
        return _unavailable()
    recent: RecentAnswers | None = getattr(state, "semgrad_recent", None)
    engines: EngineRouter | None = getattr(state, "semgrad_engines", None)
    clients = engines.clients if engines is not None else []
    stats = await asyncio.gather(*(client.store_stats(STATS_TIMEOUT_S) for client in clients))
    per_engine = [asdict(s) if s is not None else None for s in stats]
    # the server's whole capture store: every engine's summed; None where an engine did not answer
    total = None if not stats or None in stats else {k: sum(e[k] for e in per_engine) for k in per_engine[0]}
    return JSONResponse(
        {
            **setup,
            "request_options": list(REQUEST_OPTIONS),
            "recent_capacity": recent.capacity if recent is not None else 0,
            "captures": total,
            "engines": [{**e, "captures": c} for e, c in zip(setup.get("engines", []), per_engine)],
        }
    )


@page_router.get("/v1/semgrad/recent")
async def recent_answers(raw_request: Request, flagged: str | None = None, limit: int | None = None) -> JSONResponse:
    """The recent scored answers, newest first; ``flagged=1`` only the flagged ones, ``flagged=0`` only the others."""
    recent: RecentAnswers | None = getattr(raw_request.app.state, "semgrad_recent", None)
    if recent is None:
        return _unavailable()
    if flagged is not None and flagged.lower() not in _FLAG:
        raise HTTPException(status_code=400, detail="flagged must be 1, 0, true or false")
    if limit is not None and limit < 0:
        raise HTTPException(status_code=400, detail="limit must be at least 0")
    wanted = None if flagged is None else _FLAG[flagged.lower()]
    answers = recent.list(wanted, limit)
    return JSONResponse({"capacity": recent.capacity, "total": recent.total, "answers": answers})

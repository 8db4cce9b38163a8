"""vLLM's generating routes that SemGrad does not score: their responses say so.

Chat, completions, responses and ``/invocations`` are scored (``chat_routes.py``, ``responses_route.py``,
``invocations_route.py``). The other routes of vLLM 0.32 that generate text run unchanged, and each response
carries the header ``x-semgrad`` with the reason; a JSON object response also gets ``"semgrad": {"error": ...}``.
"""

from __future__ import annotations

import functools
import json
from http import HTTPStatus
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from ...scoring import semgrad_object

NOTE_HEADER = "x-semgrad"
_USE_CHAT = "send the conversation to /v1/chat/completions to have it scored"
# Path → why it is not scored.
UNSCORED = {
    "/v1/messages": f"not scored: SemGrad does not score the Anthropic Messages API; {_USE_CHAT}",
    "/v1/chat/completions/batch": f"not scored: SemGrad does not score batch chat; {_USE_CHAT} one conversation at a "
    "time",
    "/cohere/v2/chat": f"not scored: SemGrad does not score the Cohere chat API; {_USE_CHAT}",
    "/inference/v1/generate": "not scored: SemGrad does not score token-in/token-out generation; use /v1/completions",
    "/v1/systemone": "not scored: SemGrad does not score structured decisions",
    "/generative_scoring": "not scored: SemGrad does not score generative scoring (it generates no answer)",
}


def noted(endpoint: Callable[..., Awaitable[Any]], note: str) -> Callable[..., Awaitable[Any]]:
    """``endpoint`` whose responses carry ``note`` (same signature, so FastAPI parses its request the same way)."""

    @functools.wraps(endpoint)
    async def with_note(*args: Any, **kwargs: Any) -> Any:
        response = await endpoint(*args, **kwargs)
        if isinstance(response, JSONResponse) and response.status_code == HTTPStatus.OK:
            body = json.loads(response.body)
            if isinstance(body, dict):
                response.body = response.render({**body, "semgrad": semgrad_object.error_report(note)})
                response.headers["content-length"] = str(len(response.body))
        if isinstance(response, Response):
            response.headers[NOTE_HEADER] = note
        elif isinstance(response, dict):
            response = {**response, "semgrad": semgrad_object.error_report(note)}
        return response

    return with_note


def note_unscored_routes(app: FastAPI) -> None:
    """Replace each of the app's unscored generating routes with the same route whose responses say why."""
    router = APIRouter()
    for route in list(app.routes):
        if isinstance(route, APIRoute) and route.path in UNSCORED and "POST" in route.methods:
            router.add_api_route(
                route.path,
                noted(route.endpoint, UNSCORED[route.path]),
                methods=["POST"],
                dependencies=route.dependencies,
                responses=route.responses,
                response_model=None,
            )
    app.include_router(router)

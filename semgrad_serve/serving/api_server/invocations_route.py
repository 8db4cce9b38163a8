"""``POST /invocations`` (SageMaker's inference route): the scored chat and completions routes, behind ``--api-key``.

vLLM's own ``/invocations`` dispatches a chat or completions body to vLLM's unscored handlers and is outside
the paths that ``--api-key`` guards. This one dispatches to the scored routes (``chat_routes.py``), so its answers
carry ``"semgrad"`` as theirs do, and it asks for the same key as ``/v1`` where the server has one.
"""

from __future__ import annotations

import json
from http import HTTPStatus

import pydantic
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware
from vllm.entrypoints.serve.utils.api_utils import validate_json_request

from .chat_routes import create_chat_completion, create_completion

router = APIRouter()

NOT_AUTHORIZED = "Unauthorized: /invocations needs the server's API key (Authorization: Bearer <key>), as /v1 does"
NO_ROUTE = "/invocations takes a chat completions or a completions request"
_ROUTES = (
    (pydantic.TypeAdapter(ChatCompletionRequest), create_chat_completion),
    (pydantic.TypeAdapter(CompletionRequest), create_completion),
)


def api_tokens(api_key: list[str] | str | None, env_key: str | None) -> list[str]:
    """The server's API keys, as vLLM takes them: ``--api-key`` first, else ``VLLM_API_KEY``."""
    keys = [api_key] if isinstance(api_key, str) else api_key
    return [key for key in (keys or [env_key]) if key]


def _error(message: str, status: HTTPStatus) -> JSONResponse:
    error = create_error_response(message)
    return JSONResponse(content=error.model_dump(), status_code=status)


@router.post("/invocations", dependencies=[Depends(validate_json_request)], response_model=None)
async def invocations(raw_request: Request) -> Response | None:
    tokens: list[str] = getattr(raw_request.app.state, "semgrad_api_tokens", [])
    if tokens and not AuthenticationMiddleware(None, tokens).verify_token(Headers(scope=raw_request.scope)):
        return JSONResponse(content={"error": NOT_AUTHORIZED}, status_code=HTTPStatus.UNAUTHORIZED)
    try:
        body = await raw_request.json()
    except json.JSONDecodeError as exc:
        return _error(f"JSON decode error: {exc}", HTTPStatus.BAD_REQUEST)
    for adapter, route in _ROUTES:
        try:
            request = adapter.validate_python(body)
        except pydantic.ValidationError:
            continue
        return await route(request, raw_request)
    return _error(NO_ROUTE, HTTPStatus.BAD_REQUEST)

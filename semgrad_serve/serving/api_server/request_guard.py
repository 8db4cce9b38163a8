"""Refuses, on every route of the server, a request body that would pass the engine what only the server may set.

An ASGI middleware (the plugin adds it to vLLM's app, so it covers vLLM's own
routes too: ``/v1/messages``, ``/inference/v1/generate``, ``/invocations``, ...).
A JSON body is refused with a 400 naming the field where:

- a ``kv_transfer_params`` object anywhere in it (the field itself, or inside
  ``sampling_params.extra_args``) carries the capture key (``semgrad_capture``):
  the server mints that key for the requests it scores (``capture_keys.py``).
  Refused rather than stripped, so that a client relying on it learns at once;
  the capture connector would ignore such a key anyway;
- ``kv_transfer_params`` or ``ec_transfer_params`` inside ``vllm_xargs`` or
  ``extra_args`` is not an object: vLLM passes ``vllm_xargs`` to the engine as
  ``extra_args``, where such a value takes the real field's place and the engine's
  scheduler calls ``.get`` on it.

Other bodies go on unchanged (the body read here is handed on as received).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, Awaitable, Callable, MutableMapping

from ..messages import KV_PARAM

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TRANSFER_FIELDS = ("kv_transfer_params", "ec_transfer_params")  # dicts vLLM hands to the engine's connectors
EXTRA_ARGS_FIELDS = ("vllm_xargs", "extra_args")  # what vLLM hands to the engine as SamplingParams.extra_args
BODY_METHODS = {"POST", "PUT", "PATCH"}


def refusal(body: Any) -> tuple[str, str] | None:
    """(field, one-line message) of the first thing in a parsed JSON body that the server refuses, else None."""
    stack: list[tuple[str, Any, bool]] = [("", body, False)]  # (path, value, inside extra args)
    while stack:
        path, node, in_extra = stack.pop()
        if isinstance(node, list):
            stack.extend((f"{path}[{i}]", v, in_extra) for i, v in enumerate(node) if isinstance(v, (dict, list)))
            continue
        if not isinstance(node, dict):
            continue
        for name, value in node.items():
            field = f"{path}.{name}" if path else str(name)
            if name in TRANSFER_FIELDS and isinstance(value, dict) and KV_PARAM in value:
                return f"{field}.{KV_PARAM}", (
                    f"{field}.{KV_PARAM} is set by the server, for the requests it scores; a request may not carry it"
                )
            if name in TRANSFER_FIELDS and in_extra and not isinstance(value, dict):
                return field, f"{field} must be an object; pass {name} as its own field"
            if isinstance(value, (dict, list)):
                stack.append((field, value, in_extra or name in EXTRA_ARGS_FIELDS))
    return None


def _json_body(scope: Scope) -> bool:
    """Whether the request's body is parsed as JSON by the routes (FastAPI: no content type, or a JSON one)."""
    if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
        return False
    content_type = dict(scope.get("headers") or []).get(b"content-type", b"").split(b";")[0].strip().lower()
    return not content_type or content_type == b"application/json" or content_type.endswith(b"+json")


def _error_body(field: str, message: str) -> bytes:
    """vLLM's error response (``{"error": {"message", "type", "param", "code"}}``)."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    return json.dumps(create_error_response(message, param=field).model_dump()).encode()


class RequestGuard:
    """The middleware: reads a JSON body whole, refuses it (``refusal``) or hands it on as it came."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _json_body(scope):
            await self.app(scope, receive, send)
            return
        chunks, message = [], await receive()
        while message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
            message = await receive()
        if message["type"] != "http.request":  # the client left before its body was sent
            await self.app(scope, _replay([message], receive), send)
            return
        body = b"".join(chunks)
        try:
            found = refusal(json.loads(body)) if body else None
        except (ValueError, RecursionError):
            found = None  # not JSON: the route reports it as it would
        if found is not None:
            content = _error_body(*found)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
            await send({"type": "http.response.start", "status": HTTPStatus.BAD_REQUEST.value, "headers": headers})
            await send({"type": "http.response.body", "body": content})
            return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that first gives back ``messages``, then what the client sends next (its disconnect, which
    vLLM's routes listen for to abort the request)."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed

"""``POST /v1/responses``: vLLM's Responses API route, then the response's SemGrad scores.

The request runs through vLLM's route unchanged except that ``enable_response_messages``
is switched on, so that the response carries the prompt's and the answer's token ids
(``input_messages``, ``output_messages``; hidden again unless the client asked for
them). The response, or the ``response.completed`` event of a stream, then gets
``"semgrad": {...}`` beside its ``output``, with the same options and conventions as a
chat choice (``chat_routes.py``). The answer scored is what the user received: vLLM's ids
less the tokens of a stop string, found from the output text (the Responses API does
not say why generation stopped). Only a one-turn answer as raw tokens can be scored
(not a background response, nor the messages of tool-calling or harmony models).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from vllm.entrypoints.openai.responses import api_router as vllm_responses
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.serve.utils.api_utils import validate_json_request

from ...model.stop_token import tokens_of_text
from ...model.tokens import has_visible_text
from ...scoring import semgrad_object
from ...scoring.items import NOTHING_TO_SCORE
from ..messages import KV_PARAM
from .chat_routes import ScoringOptions, StopTokens, scoring_setup, unless_gone, with_body
from .recent_answers import chat_question
from .scoring_client import ScoringClient

router = APIRouter()

BACKGROUND = "not scored: a background response is not scored"
NOT_ONE_ANSWER = (
    "not scored: the response holds no single answer as tokens (tool calls, several turns or harmony messages)"
)
MESSAGE_FIELDS = ("input_messages", "output_messages")


def answer_of(body: dict[str, Any]) -> tuple[list[int], list[int], str] | None:
    """(prompt ids, answer ids, answer text) of a response with one raw-token input and output message, else None."""
    inputs, outputs = body.get("input_messages"), body.get("output_messages")
    if not (isinstance(inputs, list) and isinstance(outputs, list) and len(inputs) == len(outputs) == 1):
        return None
    (prompt,), (answer,) = inputs, outputs
    if not all(isinstance(m, dict) and isinstance(m.get("tokens"), list) for m in (prompt, answer)):
        return None
    return prompt["tokens"], answer["tokens"], answer.get("message") or ""


class _Response:
    """Scores one response body (whole, or the ``response`` of its ``response.completed`` event) in place."""

    def __init__(
        self,
        request: ResponsesRequest,
        raw_request: Request,
        client: ScoringClient,
        key: str | None,
        options: ScoringOptions,
        keep_messages: bool,
    ) -> None:
        state = raw_request.app.state
        self.client, self.key, self.options, self.keep_messages = client, key, options, keep_messages
        self.stop = StopTokens.of(state)
        self.recent = getattr(state, "semgrad_recent", None)
        self.question = request.input if isinstance(request.input, str) else chat_question(request.input)

    async def score(self, body: dict[str, Any]) -> None:
        found = answer_of(body)
        if not self.keep_messages:
            body.update(dict.fromkeys(MESSAGE_FIELDS))  # as vLLM renders them when the client did not ask
        if found is None:
            body["semgrad"] = semgrad_object.error_report(NOT_ONE_ANSWER)
        else:
            prompt, ids, text = found
            answer = tokens_of_text(self.stop.tokenizer, ids, text)
            if not has_visible_text(self.stop.tokenizer, answer):
                body["semgrad"] = semgrad_object.error_report(NOTHING_TO_SCORE)
            else:
                (result,) = await self.client.score(self.key, [(prompt, answer)], claims=bool(self.options.claims))
                body["semgrad"] = self.stop.report(result, answer, self.stop.ends_on_eos(answer), self.options)
        if self.recent is not None:
            answer_text = found[2] if found is not None else ""
            self.recent.add(
                self.question,
                answer_text,
                body["semgrad"],
                body.get("id"),
                0,
                body.get("model"),
                body.get("status"),
                "responses",
            )


async def _scored_events(events: AsyncIterator[str], response: _Response) -> AsyncIterator[str]:
    """Pass vLLM's SSE events through, scoring the response of the ``response.completed`` event."""
    try:
        async for event in events:
            head, sep, data = event.partition("data: ")
            if not head.startswith("event: response.completed"):
                yield event
                continue
            body = json.loads(data)
            await response.score(body["response"])
            yield f"{head}{sep}{json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"
    finally:
        response.client.drop(response.key)


@router.post("/v1/responses", dependencies=[Depends(validate_json_request)], response_model=None)
async def create_responses(request: ResponsesRequest, raw_request: Request) -> Response | None:
    setup = scoring_setup(request, raw_request, routable=False)  # vLLM's Responses route picks its own engine
    if not isinstance(setup, tuple):
        return setup if setup is not None else await vllm_responses.create_responses(request, raw_request)
    client, options = setup
    if request.background:  # answered before it is generated: nothing to score yet
        response = await vllm_responses.create_responses(request, raw_request)
        if isinstance(response, JSONResponse) and response.status_code == HTTPStatus.OK:
            return with_body(
                response, {**json.loads(response.body), "semgrad": semgrad_object.error_report(BACKGROUND)}
            )
        return response

    keep_messages = request.enable_response_messages
    request.enable_response_messages = True
    key = client.new_key()
    if key is not None:  # the capture connector keeps this request's prompt keys/values for scoring
        request.kv_transfer_params = {**(request.kv_transfer_params or {}), KV_PARAM: key}
    scored = _Response(request, raw_request, client, key, options, keep_messages)
    streaming = False
    try:
        response = await vllm_responses.create_responses(request, raw_request)
        if isinstance(response, StreamingResponse):
            response.body_iterator = _scored_events(response.body_iterator, scored)
            streaming = True
        elif isinstance(response, JSONResponse) and response.status_code == HTTPStatus.OK:
            body = json.loads(response.body)
            if not await unless_gone(raw_request, scored.score(body)):
                return None  # the client has gone: nobody to answer
            return with_body(response, body)
        return response
    finally:
        if not streaming:
            client.drop(key)

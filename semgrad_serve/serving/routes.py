"""``POST /v1/chat/completions`` and ``/v1/completions``: vLLM's own routes, then SemGrad scores per choice.

Each request runs through vLLM's route unchanged (same validation, errors,
headers and streaming) except that ``return_token_ids`` is switched on, so the
response carries the exact prompt and answer ids the engine used. Each choice
then gets ``"semgrad": {...}`` (its final chunk when streaming), and the ids
are hidden again unless the client asked for them. The scored answer follows the
SPEC's stop-token convention (``stop_token.py``), and ``"stop_token"`` says whether
it ended on the EOS token that was scored. ``"semgrad": false`` in the
body (or ``vllm_xargs: {"semgrad": 0}``) turns scoring off for the request.
"""

from __future__ import annotations

import json
from collections import defaultdict
from http import HTTPStatus
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from vllm.entrypoints.openai.chat_completion import api_router as vllm_chat
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion import api_router as vllm_completion
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.utils.api_utils import validate_json_request

from ..errors import SemgradError
from ..model.stop_token import eos_ids, received_tokens
from .captures import KV_PARAM
from .scoring_client import ScoringClient

router = APIRouter()

OPT_OUT_FIELD = "semgrad"
_SWITCH = {"1": True, "0": False, "true": True, "false": False, "on": True, "off": False}
ECHO_WITHOUT_IDS = "not scored: with echo, request the token ids too (\"return_token_ids\": true)"
NO_IDS = "not scored: vLLM returned no token ids for this choice"

VllmRoute = Callable[[Any, Request], Awaitable[Response | None]]


def scoring_wanted(request: ChatCompletionRequest | CompletionRequest) -> bool:
    """Whether the request wants scores: its ``semgrad`` field, else ``vllm_xargs["semgrad"]``, else yes."""
    extra = request.model_extra or {}
    if OPT_OUT_FIELD in extra:
        value = extra[OPT_OUT_FIELD]
        if not isinstance(value, bool):
            raise SemgradError(f'"{OPT_OUT_FIELD}" must be true or false')
        return value
    key = str((request.vllm_xargs or {}).get(OPT_OUT_FIELD, True)).lower()
    if key not in _SWITCH:
        raise SemgradError(f'vllm_xargs["{OPT_OUT_FIELD}"] must be one of 1, 0, "true", "false", "on", "off"')
    return _SWITCH[key]


class StopTokens:
    """The model's EOS ids and tokenizer, which decide the scored answer (built once per server, on first use)."""

    def __init__(self, engine_client: Any) -> None:
        self.tokenizer = engine_client.get_tokenizer()
        config = engine_client.model_config
        generation = config.try_get_generation_config().get("eos_token_id")
        self.eos_ids = set(eos_ids(self.tokenizer.eos_token_id, config.hf_config.eos_token_id, generation))

    @classmethod
    def of(cls, state: Any) -> "StopTokens":
        if getattr(state, "semgrad_stop_tokens", None) is None:
            state.semgrad_stop_tokens = cls(state.engine_client)
        return state.semgrad_stop_tokens

    def scored(self, ids: list[int], stop_reason: int | str | None, include_stop: bool) -> tuple[list[int], bool]:
        """(answer ids to score, whether they end on the EOS token). vLLM's ids end on the EOS token that
        ended generation (checked for vLLM 0.32: chat and completions, streamed or not, n > 1), and on the
        tokens of a stop string or a request's stop token id, which the user does not receive: those are cut."""
        if isinstance(stop_reason, str):
            return received_tokens(self.tokenizer, ids, stop_reason, include_stop), False
        if isinstance(stop_reason, int) and stop_reason not in self.eos_ids and not include_stop:
            ids = ids[:-1]
        return ids, bool(ids) and ids[-1] in self.eos_ids


class _Choices:
    """Token ids per choice, gathered from a response or from stream chunks, and the scoring of each choice."""

    def __init__(
        self, client: ScoringClient, key: str | None, stop: StopTokens, include_stop: bool, keep_ids: bool, scorable: bool
    ) -> None:
        self.client, self.key, self.keep_ids, self.scorable = client, key, keep_ids, scorable
        self.stop, self.include_stop = stop, include_stop
        self.shared_prompt: list[int] | None = None  # chat: one prompt for all choices
        self.prompts: dict[int, list[int]] = {}  # completions: the prompt of each choice
        self.answers: dict[int, list[int]] = defaultdict(list)

    def _take(self, obj: dict[str, Any], key: str) -> list[int] | None:
        ids = obj.get(key)
        if not self.keep_ids and key in obj:
            obj[key] = None  # as vLLM renders it when the client did not ask for ids
        return ids

    def collect(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """Record the ids of a response or chunk; returns its choices that are finished."""
        self.shared_prompt = self._take(body, "prompt_token_ids") or self.shared_prompt
        finished = []
        for choice in body.get("choices") or []:
            index = choice["index"]
            prompt = self._take(choice, "prompt_token_ids")
            if prompt:
                self.prompts[index] = prompt
            self.answers[index] += self._take(choice, "token_ids") or []
            if choice.get("finish_reason") is not None:
                finished.append(choice)
        return finished

    async def score(self, choices: list[dict[str, Any]]) -> None:
        """Attach ``"semgrad"`` to each of ``choices``; the scorable ones are queued together, to share a batch."""
        todo = []
        for choice in choices:
            index = choice["index"]
            prompt = self.prompts.get(index, self.shared_prompt)
            answer, stop_token = self.stop.scored(self.answers.get(index, []), choice.get("stop_reason"), self.include_stop)
            if not self.scorable:
                choice["semgrad"] = {"error": ECHO_WITHOUT_IDS}
            elif not prompt or not answer:
                choice["semgrad"] = {"error": NO_IDS}
            else:
                todo.append((choice, (prompt, answer), stop_token))
        if todo:
            results = await self.client.score(self.key, [pair for _, pair, _ in todo])
            for (choice, _, stop_token), result in zip(todo, results):
                choice["semgrad"] = result if "error" in result else {**result, "stop_token": stop_token}


async def _scored_stream(events: AsyncIterator[str], choices: _Choices) -> AsyncIterator[str]:
    """Pass vLLM's SSE events through, adding scores to each choice's final chunk."""
    try:
        async for event in events:
            if not event.startswith("data: {"):
                yield event  # "[DONE]" and keep-alive comments
                continue
            body = json.loads(event[len("data: ") :])
            finished = choices.collect(body)
            if not finished and choices.keep_ids:
                yield event
                continue
            if finished:
                await choices.score(finished)
            yield f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"
    finally:
        choices.client.drop(choices.key)  # the stream ended, finished or not: its capture can go


async def _scored(vllm_route: VllmRoute, request: ChatCompletionRequest | CompletionRequest, raw_request: Request) -> Response | None:
    client: ScoringClient | None = getattr(raw_request.app.state, "semgrad_client", None)
    try:
        wanted = scoring_wanted(request)
    except SemgradError as exc:
        error = create_error_response(str(exc), param=OPT_OUT_FIELD)
        return JSONResponse(content=error.model_dump(), status_code=HTTPStatus.BAD_REQUEST)
    if client is None or not wanted:
        return await vllm_route(request, raw_request)

    keep_ids = bool(request.return_token_ids)
    # vLLM drops the echoed prompt text when ids are returned, so echo is scored only if the client asked for ids.
    scorable = keep_ids or not getattr(request, "echo", False)
    key = client.new_key() if scorable else None
    if scorable:
        request.return_token_ids = True
    if key is not None:  # the capture connector keeps this request's prompt keys/values for scoring
        request.kv_transfer_params = {**(request.kv_transfer_params or {}), KV_PARAM: key}
    stop = StopTokens.of(raw_request.app.state)
    choices = _Choices(client, key, stop, bool(request.include_stop_str_in_output), keep_ids, scorable)

    streaming = False
    try:
        response = await vllm_route(request, raw_request)
        if isinstance(response, StreamingResponse):
            response.body_iterator = _scored_stream(response.body_iterator, choices)
            streaming = True
        elif isinstance(response, JSONResponse) and response.status_code == HTTPStatus.OK:
            body = json.loads(response.body)
            await choices.score(choices.collect(body))
            response.body = response.render(body)
            response.headers["content-length"] = str(len(response.body))
        return response
    finally:
        if not streaming:
            client.drop(key)


@router.post("/v1/chat/completions", dependencies=[Depends(validate_json_request)], response_model=None)
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response | None:
    return await _scored(vllm_chat.create_chat_completion, request, raw_request)


@router.post("/v1/completions", dependencies=[Depends(validate_json_request)], response_model=None)
async def create_completion(request: CompletionRequest, raw_request: Request) -> Response | None:
    return await _scored(vllm_completion.create_completion, request, raw_request)

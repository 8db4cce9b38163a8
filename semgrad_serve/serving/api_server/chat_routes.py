"""``POST /v1/chat/completions`` and ``/v1/completions``: vLLM's own routes, then SemGrad scores per choice.

Each request runs through vLLM's route unchanged (same validation, errors,
headers and streaming) except that ``return_token_ids`` is switched on, so the
response carries the exact prompt and answer ids the engine used. Each choice
then gets ``"semgrad": {...}`` (its final chunk when streaming), and the ids
are hidden again unless the client asked for them (with ``echo``, completions
then get back the prompt text vLLM leaves out when it returns ids). The scored
answer follows the SPEC's stop-token convention (``stop_token.py``), and
``"stop_token"`` says whether it ended on the EOS token that was scored; an
answer that shows nothing gets ``NOTHING_TO_SCORE``. ``"semgrad": false`` in the
body (or ``vllm_xargs: {"semgrad": 0}``) turns scoring off for the request;
``"semgrad": {"tokens": true}`` adds the answer's per-token texts, entropies and
log-probabilities, ``{"claims": true}`` its sentences' scores (``{"claims": "live"}``, streamed: each sentence's as
soon as it is settled, ``live_claims.py``). Every scored choice is also kept in the recent-answers ring
(``recent_answers.py``) that the page reads.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass, fields
from http import HTTPStatus
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from vllm.entrypoints.openai.chat_completion import api_router as vllm_chat
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion import api_router as vllm_completion
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.utils.api_utils import listen_for_disconnect, validate_json_request

from ...errors import SemgradError
from ...model.stop_token import eos_ids, received_tokens
from ...model.tokens import has_visible_text, token_texts
from ...scoring import semgrad_object
from ...scoring.items import NOTHING_TO_SCORE
from ..messages import KV_PARAM, LIVE_PARAM
from .data_parallel import EngineRouter
from .live_claims import DEFAULT_MAX_CLAIMS, LIVE, LiveClaims, live_stream
from .recent_answers import RecentAnswers, chat_question, prompt_question
from .scoring_client import ScoringClient

router = APIRouter()

OPT_OUT_FIELD = "semgrad"
_SWITCH = {"1": True, "0": False, "true": True, "false": False, "on": True, "off": False}
NO_IDS = "not scored: vLLM returned no prompt token ids for this choice"

VllmRoute = Callable[[Any, Request], Awaitable[Response | None]]


@dataclass(frozen=True)
class ScoringOptions:
    """What a scored request asked for beyond the scores (``"semgrad": {...}`` in its body)."""

    tokens: bool = False  # per-token texts, entropies and log-probabilities of the scored answer
    claims: bool | str = False  # each sentence's scores (``scoring/claims.py``); "live": streamed as they settle

    @property
    def live(self) -> bool:
        """Claims scored while the answer streams (``live_claims.py``)."""
        return self.claims == LIVE


REQUEST_OPTIONS = tuple(f.name for f in fields(ScoringOptions))


def scoring_options(request: ChatCompletionRequest | CompletionRequest | ResponsesRequest) -> ScoringOptions | None:
    """The request's scoring options, None when it turned scoring off: its ``semgrad`` field (true, false or an
    object of options), else ``vllm_xargs["semgrad"]``, else scored with no options."""
    extra = request.model_extra or {}
    if OPT_OUT_FIELD in extra:
        value = extra[OPT_OUT_FIELD]
        if isinstance(value, bool):
            return ScoringOptions() if value else None
        if not isinstance(value, dict):
            raise SemgradError(
                f'"{OPT_OUT_FIELD}" must be true or false, or an object of options such as {{"tokens": true}}'
            )
        unknown = sorted(set(value) - set(REQUEST_OPTIONS))
        if unknown:
            raise SemgradError(
                f'"{OPT_OUT_FIELD}": unknown option {", ".join(map(repr, unknown))}; the options are '
                f"{', '.join(REQUEST_OPTIONS)}"
            )
        if not all(isinstance(v, bool) or k == "claims" and v == LIVE for k, v in value.items()):
            raise SemgradError(f'"{OPT_OUT_FIELD}": each option must be true or false ("claims" also "{LIVE}")')
        return ScoringOptions(**value)
    key = str((request.vllm_xargs or {}).get(OPT_OUT_FIELD, True)).lower()
    if key not in _SWITCH:
        raise SemgradError(f'vllm_xargs["{OPT_OUT_FIELD}"] must be one of 1, 0, "true", "false", "on", "off"')
    return ScoringOptions() if _SWITCH[key] else None


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

    def ends_on_eos(self, ids: list[int]) -> bool:
        """Whether ``ids`` end on one of the model's EOS tokens."""
        return bool(ids) and ids[-1] in self.eos_ids

    def scored(self, ids: list[int], stop_reason: int | str | None, include_stop: bool) -> tuple[list[int], bool]:
        """(answer ids to score, whether they end on the EOS token). vLLM's ids end on the EOS token that
        ended generation (checked for vLLM 0.32: chat and completions, streamed or not, n > 1), and on the
        tokens of a stop string or a request's stop token id, which the user does not receive: those are cut."""
        if isinstance(stop_reason, str):
            return received_tokens(self.tokenizer, ids, stop_reason, include_stop), False
        if isinstance(stop_reason, int) and stop_reason not in self.eos_ids and not include_stop:
            ids = ids[:-1]
        return ids, self.ends_on_eos(ids)

    def report(
        self, result: dict[str, Any], answer: list[int], stop_token: bool, options: ScoringOptions
    ) -> dict[str, Any]:
        """A scored answer's ``"semgrad"`` object: the worker's report (which always carries the per-token
        entropies and log-probs) with ``stop_token``, and the per-token data only where the request asked for it."""
        texts = token_texts(self.tokenizer, answer) if options.tokens and "token_entropies" in result else None
        return semgrad_object.for_response(result, stop_token, texts)


def echoed_text(prompt: Any, index: int, n: int, tokenizer: Any, prompt_ids: list[int]) -> str:
    """The prompt text vLLM's completions echo in choice ``index`` (``n`` choices per prompt): the prompt string as
    given, else its ids decoded, as vLLM decodes them."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompt = prompt[min(index // n, len(prompt) - 1)]
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids)


class _Choices:
    """Token ids per choice, gathered from a response or from stream chunks, and the scoring of each choice."""

    def __init__(
        self,
        client: ScoringClient,
        key: str | None,
        stop: StopTokens,
        include_stop: bool,
        keep_ids: bool,
        options: ScoringOptions = ScoringOptions(),
        recent: RecentAnswers | None = None,
        question: Callable[[int], str] = lambda index: "",
        endpoint: str = "chat",
        echo: Callable[[int, list[int]], str] | None = None,
        generated: bool = True,
    ) -> None:
        """``echo``: for a completions request with ``echo``, the prompt text to echo in a choice (from its index and
        prompt ids): vLLM leaves it out when it returns ids. ``generated=False``: the request generates nothing for
        the user (``max_tokens`` 0, with ``echo`` the prompt only), whatever token vLLM's ids hold."""
        self.client, self.key, self.keep_ids, self.echo, self.generated = client, key, keep_ids, echo, generated
        self.stop, self.include_stop = stop, include_stop
        self.options, self.recent, self.question, self.endpoint = options, recent, question, endpoint
        self.shared_prompt: list[int] | None = None  # chat: one prompt for all choices
        self.prompts: dict[int, list[int]] = {}  # completions: the prompt of each choice
        self.answers: dict[int, list[int]] = defaultdict(list)
        self.texts: dict[int, str] = defaultdict(str)  # the answer text each choice's client received
        self.echoed: dict[int, int] = defaultdict(int)  # characters of it that are the echoed prompt
        self.live: LiveClaims | None = None  # a streamed request's live claims
        self.response_id: str | None = None
        self.model: str | None = None

    def _take(self, obj: dict[str, Any], key: str) -> list[int] | None:
        ids = obj.get(key)
        if not self.keep_ids and key in obj:
            obj[key] = None  # as vLLM renders it when the client did not ask for ids
        return ids

    def progress(self, index: int) -> tuple[list[int], int]:
        """A choice's answer ids so far and the characters of its answer the client received."""
        return self.answers[index], len(self.texts[index]) - self.echoed[index]

    def collect(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """Record the ids of a response or chunk; returns its choices that are finished."""
        self.shared_prompt = self._take(body, "prompt_token_ids") or self.shared_prompt
        self.response_id, self.model = body.get("id") or self.response_id, body.get("model") or self.model
        finished = []
        for choice in body.get("choices") or []:
            index = choice["index"]
            prompt = self._take(choice, "prompt_token_ids")
            if prompt:
                self.prompts[index] = prompt
                if self.echo is not None and not self.keep_ids:  # a choice's first chunk, whose echo vLLM left out
                    echoed = self.echo(index, prompt)
                    choice["text"], self.echoed[index] = echoed + (choice.get("text") or ""), len(echoed)
            self.answers[index] += self._take(choice, "token_ids") or []
            message = choice.get("message") or choice.get("delta")  # chat, whole or streamed
            text = message.get("content") if isinstance(message, dict) else choice.get("text")  # else completions
            if isinstance(text, str):
                self.texts[index] += text
            if choice.get("finish_reason") is not None:
                finished.append(choice)
        return finished

    async def score(self, choices: list[dict[str, Any]]) -> None:
        """Attach ``"semgrad"`` to each of ``choices``; the scorable ones are queued together, to share a batch."""
        todo = []
        for choice in choices:
            index = choice["index"]
            prompt = self.prompts.get(index, self.shared_prompt)
            ids = self.answers.get(index, []) if self.generated else []
            answer, stop_token = self.stop.scored(ids, choice.get("stop_reason"), self.include_stop)
            if not prompt:
                choice["semgrad"] = semgrad_object.error_report(NO_IDS)
            elif not has_visible_text(self.stop.tokenizer, answer):
                choice["semgrad"] = semgrad_object.error_report(NOTHING_TO_SCORE)
            else:
                todo.append((choice, (prompt, answer), stop_token))
        if todo:
            pairs = [pair for _, pair, _ in todo]
            if self.live is not None:
                results = await self.live.final([choice["index"] for choice, _, _ in todo], pairs)
            else:
                results = await self.client.score(self.key, pairs, claims=bool(self.options.claims))
            for (choice, (_, answer), stop_token), result in zip(todo, results):
                choice["semgrad"] = self.stop.report(result, answer, stop_token, self.options)
        if self.recent is not None:
            for choice in choices:
                index = choice["index"]
                self.recent.add(
                    self.question(index),
                    self.texts.get(index, ""),
                    choice["semgrad"],
                    self.response_id,
                    index,
                    self.model,
                    choice.get("finish_reason"),
                    self.endpoint,
                )


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


async def _live_stream(events: AsyncIterator[str], choices: _Choices) -> AsyncIterator[str]:
    """``_scored_stream`` with live claims chunks (``live_claims.py``)."""
    assert choices.live is not None
    try:
        async for event in live_stream(
            events, choices.collect, choices.progress, choices.score, choices.live, choices.keep_ids
        ):
            yield event
    finally:
        choices.client.drop(choices.key)


async def unless_gone(raw_request: Request, scoring: Coroutine[Any, Any, None]) -> bool:
    """Run ``scoring`` unless the client disconnects first, which cancels it (and so its job in the worker);
    whether it ran to the end. vLLM's routes watch for a disconnect while they generate, not after."""
    work, gone = asyncio.ensure_future(scoring), asyncio.ensure_future(listen_for_disconnect(raw_request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, gone):
            task.cancel()
    if not work.done() or work.cancelled():
        return False
    work.result()  # its exception, if any
    return True


def with_body(response: JSONResponse, body: dict[str, Any]) -> JSONResponse:
    """``response`` holding ``body`` instead."""
    response.body = response.render(body)
    response.headers["content-length"] = str(len(response.body))
    return response


def bad_options(exc: SemgradError, param: str | None = OPT_OUT_FIELD) -> JSONResponse:
    """The 400 response to a request whose ``"semgrad"`` options (or ``param``) are wrong, with their one-line
    message."""
    error = create_error_response(str(exc), param=param)
    return JSONResponse(content=error.model_dump(), status_code=HTTPStatus.BAD_REQUEST)


def scoring_setup(
    request: ChatCompletionRequest | CompletionRequest | ResponsesRequest, raw_request: Request, routable: bool = True
) -> tuple[ScoringClient, ScoringOptions] | JSONResponse | None:
    """The scoring client of the engine that generates the request, and the request's options; a 400 response for
    bad options; None where the request goes to vLLM unscored (scoring off for it, or not running in this server).
    ``routable``: vLLM's route sends the request to the engine named in its headers (``data_parallel.py``)."""
    engines: EngineRouter | None = getattr(raw_request.app.state, "semgrad_engines", None)
    try:
        options = scoring_options(request)
    except SemgradError as exc:
        return bad_options(exc)
    if engines is None or options is None:
        return None
    try:
        return engines.route(raw_request, routable), options
    except SemgradError as exc:  # a header naming an engine this server does not run
        return bad_options(exc, param=None)


async def _scored(
    vllm_route: VllmRoute, request: ChatCompletionRequest | CompletionRequest, raw_request: Request
) -> Response | None:
    setup = scoring_setup(request, raw_request)
    if not isinstance(setup, tuple):
        return setup if setup is not None else await vllm_route(request, raw_request)
    client, options = setup

    keep_ids = bool(request.return_token_ids)
    request.return_token_ids = True
    key = client.new_key()
    live = options.live and bool(request.stream)
    if key is not None:  # the capture connector keeps this request's prompt keys/values for scoring
        request.kv_transfer_params = {**(request.kv_transfer_params or {}), KV_PARAM: key, LIVE_PARAM: live}
    stop = StopTokens.of(raw_request.app.state)
    echo, generated = None, True
    if isinstance(request, ChatCompletionRequest):  # chat's echo prepends the last message's text, ids or not
        asked = chat_question(request.messages)
        question, endpoint = (lambda index: asked), "chat"
    else:
        n = request.n or 1
        question, endpoint = (lambda index: prompt_question(request.prompt, index, n)), "completions"
        if request.echo:
            echo = lambda index, ids: echoed_text(request.prompt, index, n, stop.tokenizer, ids)  # noqa: E731
        generated = request.max_tokens != 0  # with echo, vLLM's ids still hold a token the user never receives
    recent = getattr(raw_request.app.state, "semgrad_recent", None)
    choices = _Choices(
        client,
        key,
        stop,
        bool(request.include_stop_str_in_output),
        keep_ids,
        options,
        recent,
        question,
        endpoint,
        echo,
        generated,
    )

    streaming = False
    try:
        response = await vllm_route(request, raw_request)
        if isinstance(response, StreamingResponse):
            if live:
                setup = getattr(raw_request.app.state, "semgrad_info", None) or {}
                choices.live = LiveClaims(
                    client,
                    key,
                    stop.tokenizer,
                    stop.eos_ids,
                    setup.get("max_claims", DEFAULT_MAX_CLAIMS),
                    lambda index: choices.prompts.get(index, choices.shared_prompt),
                )
                response.body_iterator = _live_stream(response.body_iterator, choices)
            else:
                response.body_iterator = _scored_stream(response.body_iterator, choices)
            streaming = True
        elif isinstance(response, JSONResponse) and response.status_code == HTTPStatus.OK:
            body = json.loads(response.body)
            if not await unless_gone(raw_request, choices.score(choices.collect(body))):
                return None  # the client has gone: nobody to answer
            return with_body(response, body)
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

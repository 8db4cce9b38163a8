"""Live claims: each sentence's scores sent in the stream as soon as the sentence is settled.

With ``"semgrad": {"claims": "live"}`` on a streamed chat or completions request, the route watches each choice's
tokens as vLLM streams them. Once a claim is settled (``scoring/claims.py``'s ``settled_claims``: the next claim
has begun in what the user received, and no later text can move its end), the answer up to the claim's end is
sent to the engine's scoring service as a live job with the window of claims settled since the last one
(``worker/live_scoring.py``: scored from what vLLM computed so far). Its claims go out in a chunk of their own,
as soon as they are scored and in order, whose choice carries ``"semgrad": {"claims": [...]}`` and no text. At a
choice's end its last claims (the one holding the stop token among them) are scored on the whole answer with the
usual report, whose ``claims`` are the live ones followed by those: a claim's scores from the answer's prefix up
to its end are its scores on the whole answer (``tests/test_live_claims.py``). Were the final split to differ
from the live claims (it cannot by the settling rule; checked anyway), every claim is scored again at the end.

A client that closes the stream (say after a flagged claim) ends the request: the stream's end cancels vLLM's
generation and every live job still queued, and the request's captures are dropped.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Collection, Sequence

from ...model.tokens import token_texts
from ...scoring.claims import Claim, answer_claims, settled_claims
from .scoring_client import ScoringClient

LIVE = "live"  # the value of ``"claims"`` that asks for live claims
_BREAK = re.compile(r"[.!?…\n]")  # a character after which a claim may end
DEFAULT_MAX_CLAIMS = 64


def sse(body: dict[str, Any]) -> str:
    """One server-sent event holding ``body``, as vLLM writes them."""
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def spans(claims: Sequence[Any]) -> list[tuple[int, int]]:
    """The token ranges of claims (``Claim``s or their reports)."""
    return [(c["token_start"], c["token_end"]) if isinstance(c, dict) else (c.token_start, c.token_end) for c in claims]


@dataclass
class _Choice:
    """One choice's live claims: the jobs in flight (in claim order), the claims sent, whether a claim may settle."""

    asked: int = 0  # claims sent for scoring
    settled: list[Claim] = field(default_factory=list)  # the claims settled so far (at most the server's limit)
    ids: list[int] = field(default_factory=list)  # the answer's ids when they were settled
    jobs: deque[tuple[asyncio.Task, list[Claim]]] = field(default_factory=deque)
    sent: list[dict[str, Any]] = field(default_factory=list)
    may_settle: bool = False  # a sentence end or line break came after the last settled claim
    stopped: bool = False  # a live job failed or disagreed: the rest waits for the end
    ended: bool = False  # the answer has ended: what is not sent yet is scored with it


class LiveClaims:
    """The live claims of one streamed request (all its choices)."""

    def __init__(
        self,
        client: ScoringClient,
        key: str | None,
        tokenizer: Any,
        eos_ids: Collection[int],
        max_claims: int,
        prompt_of: Callable[[int], list[int] | None],
    ) -> None:
        """``prompt_of``: a choice's prompt ids (None until known)."""
        self.client, self.key, self.tokenizer, self.eos_ids = client, key, tokenizer, eos_ids
        self.max_claims, self.prompt_of = max_claims, prompt_of
        self._choices: dict[int, _Choice] = {}
        self.frame: dict[str, Any] = {}  # id, object, created and model of vLLM's chunks

    def _choice(self, index: int) -> _Choice:
        return self._choices.setdefault(index, _Choice())

    def running(self) -> set[asyncio.Task]:
        """The live jobs in flight."""
        return {task for choice in self._choices.values() for task, _ in choice.jobs}

    def advance(self, index: int, delta: str, ids: Sequence[int], received: int) -> None:
        """A chunk of choice ``index`` arrived (its text ``delta``; the choice's ids and received characters so far):
        send the claims it settles for scoring."""
        choice = self._choice(index)
        choice.may_settle = choice.may_settle or bool(_BREAK.search(delta))
        prompt = self.prompt_of(index)
        if (
            choice.stopped
            or choice.ended
            or not choice.may_settle
            or not delta.strip()
            or not prompt
            or choice.asked >= self.max_claims
        ):
            return
        texts = token_texts(self.tokenizer, ids)
        settled = settled_claims(texts, received)[: self.max_claims]
        after = "".join(texts[settled[-1].token_end :]) if settled else "".join(texts)
        choice.may_settle = bool(_BREAK.search(after))
        if len(settled) > len(choice.settled):
            choice.settled, choice.ids = settled, list(ids)
            self._send(index, choice)

    def _send(self, index: int, choice: _Choice) -> None:
        """Send choice ``index``'s claims settled and not yet asked for as one live job, unless one is in flight: a
        job scores all claims settled while the one before it ran (one pass over the answer so far), so the work
        per answer shrinks when scoring falls behind instead of queueing."""
        prompt = self.prompt_of(index)
        if choice.jobs or choice.stopped or choice.ended or not prompt or len(choice.settled) <= choice.asked:
            return
        new = choice.settled[choice.asked :]
        prefix = choice.ids[: new[-1].token_end]
        window = range(choice.asked, len(choice.settled))
        task = asyncio.ensure_future(self.client.score(self.key, [(prompt, prefix)], windows=[window], so_far=True))
        choice.jobs.append((task, new))
        choice.asked = len(choice.settled)

    def ready_chunks(self) -> list[str]:
        """Chunks for the live jobs that are done, in claim order per choice (a job waits for the ones before it)."""
        out = []
        for index, choice in self._choices.items():
            while choice.jobs and choice.jobs[0][0].done():
                task, claims = choice.jobs.popleft()
                chunk = self._chunk(index, choice, task, claims)
                if chunk is not None:
                    out.append(chunk)
                self._send(index, choice)
        return out

    def _chunk(self, index: int, choice: _Choice, task: asyncio.Task, claims: list[Claim]) -> str | None:
        reports = [] if task.cancelled() or task.exception() else task.result()
        got = reports[0].get("claims", []) if reports and "error" not in reports[0] else []
        if choice.stopped or spans(got) != spans(claims):
            choice.stopped = True  # the end scores the claims not sent
            return None
        choice.sent += got
        choices = [
            {"index": index, **self._empty(), "logprobs": None, "finish_reason": None, "semgrad": {"claims": got}}
        ]
        return sse({**self.frame, "choices": choices})

    def _empty(self) -> dict[str, Any]:
        """A choice's empty text, as chat or completions chunks carry it."""
        return {"delta": {}} if self.frame.get("object") == "chat.completion.chunk" else {"text": ""}

    async def settle(self, index: int) -> list[str]:
        """Chunks of choice ``index``'s live job still in flight, once it is done (its answer has ended; the claims
        settled meanwhile are scored with the rest, on the whole answer)."""
        choice = self._choice(index)
        choice.ended = True
        if choice.jobs:
            await asyncio.wait([task for task, _ in choice.jobs])
        return self.ready_chunks()

    async def final(self, indices: Sequence[int], pairs: Sequence[tuple[list[int], list[int]]]) -> list[dict[str, Any]]:
        """The ``"semgrad"`` objects of finished choices: their claims not sent yet are scored on the whole answer,
        after the live ones (all of them again where the whole answer's split does not begin with the live ones)."""
        windows, kept = [], []
        for index, (_, answer) in zip(indices, pairs):
            claims = answer_claims(self.tokenizer, answer, self.eos_ids)
            sent = self._choice(index).sent
            k = len(sent) if spans(sent) == spans(claims[: len(sent)]) else 0
            kept.append(sent[:k])
            windows.append(range(k, max(k, min(len(claims), self.max_claims))))
        results = await self.client.score(self.key, pairs, windows=windows)
        for result, live in zip(results, kept):
            if "error" not in result:
                result["claims"] = [*live, *result.get("claims", [])]
        return results

    def cancel(self) -> None:
        """The stream has ended: live jobs in flight are cancelled (and so dropped by the scoring service)."""
        for task in self.running():
            task.cancel()


async def live_stream(
    events: AsyncIterator[str],
    collect: Callable[[dict[str, Any]], list[dict[str, Any]]],
    progress: Callable[[int], tuple[list[int], int]],
    score: Callable[[list[dict[str, Any]]], Awaitable[None]],
    live: LiveClaims,
    keep_ids: bool,
) -> AsyncIterator[str]:
    """vLLM's SSE events with live claims chunks between them (``collect``: records a chunk, returns its finished
    choices; ``progress``: a choice's ids and received characters so far; ``score``:
    scores finished choices into their chunk); a chunk is never held back for scoring, only a choice's last."""
    pending: asyncio.Future | None = asyncio.ensure_future(anext(events))
    try:
        while pending is not None:
            await asyncio.wait({pending, *live.running()}, return_when=asyncio.FIRST_COMPLETED)
            for chunk in live.ready_chunks():
                yield chunk
            if not pending.done():
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                break
            pending = asyncio.ensure_future(anext(events))
            if not event.startswith("data: {"):
                yield event  # "[DONE]" and keep-alive comments
                continue
            body = json.loads(event[len("data: ") :])
            live.frame = {k: body[k] for k in ("id", "object", "created", "model") if k in body}
            finished = collect(body)
            done = {choice["index"] for choice in finished}
            for choice in body.get("choices") or []:
                message = choice.get("delta")
                delta = message.get("content") if isinstance(message, dict) else choice.get("text")
                if choice["index"] not in done and isinstance(delta, str):
                    live.advance(choice["index"], delta, *progress(choice["index"]))
            for index in sorted(done):
                for chunk in await live.settle(index):
                    yield chunk
            if finished:
                await score(finished)
            elif keep_ids:
                yield event
                continue
            yield sse(body)
    finally:
        if pending is not None and not pending.done():
            pending.cancel()  # vLLM's stream generator aborts the request
            await asyncio.gather(pending, return_exceptions=True)
        live.cancel()

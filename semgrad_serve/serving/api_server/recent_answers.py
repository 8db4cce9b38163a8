"""The recent scored answers, held in the API server's memory for the page (``GET /v1/semgrad/recent``).

A bounded ring, newest first: each scored choice of a chat or completion request
with its question (the last user message, or the prompt), the answer text the
client received and its ``semgrad`` object as returned (per-token arrays left
out). Long texts are cut to ``MAX_TEXT`` characters. Nothing is written to disk;
``SEMGRAD_SERVE_RECENT=0`` (``serve --recent 0``) keeps nothing.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any, Iterable

from ...scoring import semgrad_object
from ..settings import RECENT_ANSWERS

MAX_TEXT = 4000  # characters kept of a question or an answer


def clip(text: str, limit: int = MAX_TEXT) -> tuple[str, bool]:
    """(``text`` cut to ``limit`` characters, whether it was cut)."""
    return (text, False) if len(text) <= limit else (text[: limit - 1] + "…", True)


def message_text(content: Any) -> str:
    """The text of a chat message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable) and not isinstance(content, (bytes, dict)):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") in ("text", "input_text")]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def chat_question(messages: Any) -> str:
    """The last user message of a chat request (its text parts)."""
    for message in reversed(list(messages or [])):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def prompt_question(prompt: Any, index: int, n: int) -> str:
    """The prompt of a completion request's choice ``index`` (``n`` choices per prompt); token ids are not decoded."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt[min(index // max(n, 1), len(prompt) - 1)]
    return "(prompt given as token ids)"


class RecentAnswers:
    """A ring of the last ``capacity`` scored answers, newest first."""

    def __init__(self, capacity: int = RECENT_ANSWERS) -> None:
        if capacity < 0:
            raise ValueError("the number of recent answers kept must be at least 0")
        self.capacity = capacity
        self._ring: deque[dict[str, Any]] = deque(maxlen=capacity or 1)
        self._ids = itertools.count(1)
        self.total = 0  # answers recorded since start, including those the ring has let go

    def add(
        self,
        question: str,
        answer: str,
        semgrad: dict[str, Any],
        completion_id: str | None = None,
        index: int = 0,
        model: str | None = None,
        finish_reason: str | None = None,
        endpoint: str = "chat",
    ) -> dict[str, Any] | None:
        """Record one scored answer; returns the entry (None when nothing is kept)."""
        if self.capacity == 0:
            return None
        question, question_cut = clip(question)
        answer, answer_cut = clip(answer)
        entry = {
            "seq": next(self._ids),
            "time": time.time(),
            "completion_id": completion_id,
            "index": index,
            "model": model,
            "endpoint": endpoint,
            "question": question,
            "answer": answer,
            "truncated": question_cut or answer_cut,
            "finish_reason": finish_reason,
            "semgrad": semgrad_object.for_recent(semgrad),
        }
        self._ring.appendleft(entry)
        self.total += 1
        return entry

    def list(self, flagged: bool | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first; ``flagged=True``: only flagged answers, ``False``: only those not flagged (errors and
        answers without a threshold are neither)."""
        out = []
        for entry in self._ring:
            if limit is not None and len(out) >= limit:
                break
            if flagged is None or entry["semgrad"].get("flagged") is flagged:
                out.append(entry)
        return out

    def __len__(self) -> int:
        return len(self._ring) if self.capacity else 0

"""Copies of finished requests' prompt keys/values, held in the worker process until their answers are scored.

The capture connector (``capture_connector.py``) fills this store one engine
step after a scored request finishes, from the blocks vLLM holds for it, and
then lets vLLM free those blocks at once: what scoring reads later is this
copy, never the paged cache. The scoring service takes a capture by the key
the API server put in the request's ``kv_transfer_params`` and drops it when
the API server says the request is done; captures nobody claims expire.
Every key gets an entry, with keys/values or without (t* not in the prompt,
over the memory budget, layout unknown), so that scoring never waits for a
capture that will not come.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

KV_PARAM = "semgrad_capture"  # the key's name in a request's kv_transfer_params
DEFAULT_BUDGET_BYTES = 2 << 30  # most bytes of keys/values held at once; beyond it answers score by recompute
TTL_S = 300.0  # a capture nobody claimed or dropped is discarded after this long


@dataclass
class Capture:
    """A prompt's keys/values before t*, as copied from the cache (``raw``) and turned by ``unpack``
    into [n_layers, 2, kv_heads, t*, head_dim] when first asked for (on the scoring thread)."""

    prompt_ids: tuple[int, ...]
    raw: Any = None  # a tensor or a list of tensors, as the connector copied it; None: score by recompute
    unpack: Callable[[Any], torch.Tensor] | None = None
    reason: str = ""  # why there are no keys/values
    created: float = field(default_factory=time.monotonic)
    _kv: torch.Tensor | None = None

    @property
    def kv(self) -> torch.Tensor | None:
        if self._kv is None and self.raw is not None:
            self._kv = self.raw if self.unpack is None else self.unpack(self.raw)
        return self._kv

    @property
    def nbytes(self) -> int:
        parts = [] if self.raw is None else [self.raw] if isinstance(self.raw, torch.Tensor) else self.raw
        return sum(t.numel() * t.element_size() for t in parts)


class CaptureStore:
    """Thread-safe map from capture key to ``Capture``, bounded in bytes and in age."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, ttl_s: float = TTL_S) -> None:
        self.budget_bytes, self.ttl_s = budget_bytes, ttl_s
        self._entries: dict[str, Capture] = {}
        self._bytes = 0
        self._changed = threading.Condition()
        # prompt ids -> number of leading positions to keep (t*), or None when the prompt cannot be scored
        self.prefix_length: Callable[[tuple[int, ...]], int | None] | None = None

    def add(
        self,
        key: str,
        prompt_ids: tuple[int, ...],
        read: Callable[[int], Any] | None,
        unpack: Callable[[Any, int], torch.Tensor] | None = None,
    ) -> None:
        """Record the capture of ``key``: ``read(n)`` copies what holds the first n positions' keys/values
        (None: no readable cache) and ``unpack(copy, n)`` turns the copy into them later (None: it already
        is). Called by the connector while vLLM still holds the blocks."""
        with self._changed:
            self._expire()
            if key in self._entries:  # another choice of the same request (n > 1): same prompt, same prefix
                return
            capture = self._capture(prompt_ids, read, unpack)
            self._entries[key] = capture
            self._bytes += capture.nbytes
            self._changed.notify_all()

    def _capture(
        self,
        prompt_ids: tuple[int, ...],
        read: Callable[[int], Any] | None,
        unpack: Callable[[Any, int], torch.Tensor] | None,
    ) -> Capture:
        if read is None:
            return Capture(prompt_ids, None, reason="the KV cache layout of this attention backend is not known")
        n = self.prefix_length(prompt_ids) if self.prefix_length is not None else None
        if n is None:
            return Capture(prompt_ids, None, reason="no t* in the prompt")
        try:
            raw = read(n)
        except Exception as exc:  # runs between engine steps: never fail the step; scoring recomputes
            return Capture(prompt_ids, None, reason=f"copying the keys/values failed: {exc}")
        capture = Capture(prompt_ids, raw, None if unpack is None else (lambda raw: unpack(raw, n)))
        if self._bytes + capture.nbytes > self.budget_bytes:
            return Capture(prompt_ids, None, reason="over the capture memory budget")
        return capture

    def wait(self, key: str, timeout_s: float) -> Capture | None:
        """The capture of ``key``, waiting up to ``timeout_s`` for it to arrive; None if it did not."""
        with self._changed:
            self._changed.wait_for(lambda: key in self._entries, timeout_s)
            return self._entries.get(key)

    def get(self, key: str) -> Capture | None:
        with self._changed:
            return self._entries.get(key)

    def drop(self, key: str) -> None:
        with self._changed:
            capture = self._entries.pop(key, None)
            if capture is not None:
                self._bytes -= capture.nbytes

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, c in self._entries.items() if now - c.created > self.ttl_s]:
            self._bytes -= self._entries.pop(key).nbytes

    @property
    def held_bytes(self) -> int:
        with self._changed:
            return self._bytes

    def __len__(self) -> int:
        with self._changed:
            return len(self._entries)


STORE = CaptureStore()  # the worker process's store, shared by the connector and the scoring service

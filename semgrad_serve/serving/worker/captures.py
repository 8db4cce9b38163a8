"""Copies of finished requests' prompt keys/values, held in the worker process until their answers are scored.

The capture connector (``capture_connector.py``) fills this store one engine
step after a scored request finishes, from the blocks vLLM holds for it, and
then lets vLLM free those blocks at once: what scoring reads later is this
copy, never the paged cache. The scoring service takes a capture by the key
the API server put in the request's ``kv_transfer_params`` and drops it when
the API server says the request is done; captures nobody claims expire. A key
the API server is done with stays refused for as long, so the capture of a request
that ended after its client left (its key dropped first) is never taken.
Every key gets an entry, with keys/values or without (t* not in the prompt,
over the memory budget, layout unknown), so that scoring never waits for a
capture that will not come. Where the band's inputs were recorded for every
position from t* on (``step_recorder.py``), the capture holds them and only the
band's layers' keys/values.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ...scoring.given import NOTHING_GIVEN, Given
from ..messages import StoreStats
from .step_recorder import Recorded

DEFAULT_BUDGET_BYTES = 2 << 30  # most bytes of keys/values held at once; beyond it answers score by recompute
TTL_S = 300.0  # a capture nobody claimed or dropped is discarded after this long
MAX_DONE_KEYS = 1 << 16  # most dropped keys remembered (each refused for TTL_S), oldest forgotten first


@dataclass
class Capture:
    """A prompt's keys/values before t*, as copied from the cache (``raw``) and turned by ``unpack``
    into [n_layers − first_layer, 2, kv_heads, t*, head_dim] when first asked for (on the scoring thread);
    and, per choice whose band inputs were recorded, its output token ids and what was recorded
    (``step_recorder.Recorded``: the residual stream entering layer ``first_layer`` at positions t* onwards,
    the logits predicting the output)."""

    prompt_ids: tuple[int, ...]
    raw: Any = None  # a tensor or a list of tensors, as the connector copied it; None: score by recompute
    unpack: Callable[[Any], torch.Tensor] | None = None
    reason: str = ""  # why there are no keys/values
    t_star: int = 0  # the positions ``raw`` holds
    first_layer: int = 0  # the first layer ``raw`` holds: the band's when its inputs were recorded, else 0
    recorded: list[tuple[tuple[int, ...], Recorded]] = field(default_factory=list)
    outputs: list[tuple[int, ...]] = field(default_factory=list)  # of every choice captured so far
    created: float = field(default_factory=time.monotonic)
    _kv: torch.Tensor | None = None

    @property
    def kv(self) -> torch.Tensor | None:
        if self._kv is None and self.raw is not None:
            self._kv = self.raw if self.unpack is None else self.unpack(self.raw)
        return self._kv

    def has_choice(self, answer_ids: Sequence[int]) -> bool:
        """Whether the choice that gave ``answer_ids`` has been captured (with n > 1, choices end in different
        engine steps, and one's answer must not be scored before its own recording arrives)."""
        return any(continues(output_ids, answer_ids) for output_ids in self.outputs)

    def given(self, answer_ids: Sequence[int]) -> Given:
        """What scoring ``answer_ids`` after this prompt may take as given: the prompt keys/values, and what was
        recorded for a choice whose output starts with the answer (then the keys/values of the band's layers
        only). Nothing where the answer must be scored by recompute."""
        kv = self.kv
        if kv is None:
            return NOTHING_GIVEN
        rows = len(self.prompt_ids) + len(answer_ids) - 1 - self.t_star
        for output_ids, recorded in self.recorded:
            if continues(output_ids, answer_ids) and recorded.band_inputs.shape[0] >= rows:
                logits = recorded.logits
                logits = (
                    logits[: len(answer_ids)] if logits is not None and logits.shape[0] >= len(answer_ids) else None
                )
                return Given(kv, recorded.band_inputs, logits)
        return Given(kv) if self.first_layer == 0 else NOTHING_GIVEN

    @property
    def nbytes(self) -> int:
        parts = [] if self.raw is None else [self.raw] if isinstance(self.raw, torch.Tensor) else list(self.raw)
        parts += [t for _, rec in self.recorded for t in (rec.band_inputs, rec.logits) if t is not None]
        return sum(t.numel() * t.element_size() for t in parts)


def continues(output_ids: tuple[int, ...], answer_ids: Sequence[int]) -> bool:
    """Whether a choice's output gives ``answer_ids`` (the tokens the user received, a stop string cut): its
    band inputs and logits up to the answer's last token depend only on the tokens before that one."""
    return tuple(answer_ids[:-1]) == output_ids[: len(answer_ids) - 1]


# Given t*, the band's first layer and what one choice's run recorded from t* on, or None.
BandInputs = Callable[[int], "tuple[int, Recorded] | None"]


class CaptureStore:
    """Thread-safe map from capture key to ``Capture``, bounded in bytes and in age."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, ttl_s: float = TTL_S) -> None:
        self.budget_bytes, self.ttl_s = budget_bytes, ttl_s
        self._entries: dict[str, Capture] = {}
        self._bytes = 0
        self._done: OrderedDict[str, float] = OrderedDict()  # dropped key -> when
        self._changed = threading.Condition()
        # prompt ids -> number of leading positions to keep (t*), or None when the prompt cannot be scored
        self.prefix_length: Callable[[tuple[int, ...]], int | None] | None = None

    def add(
        self,
        key: str,
        prompt_ids: tuple[int, ...],
        read: Callable[[int, int], Any] | None,
        unpack: Callable[[Any, int], torch.Tensor] | None = None,
        band_inputs: BandInputs | None = None,
        output_ids: tuple[int, ...] = (),
    ) -> bool:
        """Record the capture of one choice of ``key``: ``read(n, first_layer)`` copies what holds the first n
        positions' keys/values from layer ``first_layer`` on (``read`` None: no readable cache) and
        ``unpack(copy, n)`` turns the copy into them later (None: it already is); ``band_inputs`` and
        ``output_ids``: the choice's recorded band inputs and its output. The keys/values are read for a key's
        first choice only (n > 1: the same prompt). Called by the connector while vLLM still holds the blocks.
        False, reading nothing, where ``key`` was dropped already: nobody will claim it."""
        with self._changed:
            self._expire()
            if key in self._done:
                return False
            capture = self._entries.get(key)
            if (
                capture is None or capture.raw is None and not capture.outputs
            ):  # none, or a live one without keys/values
                if capture is not None:
                    self._bytes -= capture.nbytes
                capture = self._capture(prompt_ids, read, unpack, band_inputs, output_ids)
                self._entries[key] = capture
                self._bytes += capture.nbytes
            elif capture.raw is not None and band_inputs is not None:
                recorded = band_inputs(capture.t_star)
                # usable only over the same layers' keys/values as the first choice's
                if recorded is not None and recorded[0] == capture.first_layer:
                    before = capture.nbytes
                    capture.recorded.append((output_ids, recorded[1]))
                    self._bytes += capture.nbytes - before
            capture.outputs.append(output_ids)
            self._changed.notify_all()
            return True

    def add_prompt(
        self,
        key: str,
        prompt_ids: tuple[int, ...],
        read: Callable[[int, int], Any] | None,
        unpack: Callable[[Any, int], torch.Tensor] | None,
        first_layer: int,
    ) -> bool:
        """Record the prompt keys/values (from layer ``first_layer`` on) of a running request of ``key`` whose
        claims are scored while it runs (live claims); ``read`` and ``unpack`` as for ``add``, whose captures of
        the request's choices, when they end, join this one. Called by the connector once the prompt is computed,
        while vLLM holds its blocks. False, reading nothing, where ``key`` was dropped or has a capture already."""
        with self._changed:
            self._expire()
            if key in self._done or key in self._entries:
                return False
            capture = self._capture(prompt_ids, read, unpack, None, (), first_layer)
            self._entries[key] = capture
            self._bytes += capture.nbytes
            self._changed.notify_all()
            return True

    def _capture(
        self,
        prompt_ids: tuple[int, ...],
        read: Callable[[int, int], Any] | None,
        unpack: Callable[[Any, int], torch.Tensor] | None,
        band_inputs: BandInputs | None,
        output_ids: tuple[int, ...],
        first_layer: int | None = None,
    ) -> Capture:
        """``first_layer``: the layers to read from where no recording is handed over (a live capture's)."""
        if read is None:
            return Capture(
                prompt_ids, None, reason="the KV cache is not read (its layout is not known, or it is quantized)"
            )
        n = self.prefix_length(prompt_ids) if self.prefix_length is not None else None
        if n is None:
            return Capture(prompt_ids, None, reason="no t* in the prompt")
        recorded = band_inputs(n) if band_inputs is not None else None
        first_layer = recorded[0] if recorded is not None else first_layer or 0
        try:
            raw = read(n, first_layer)
        except Exception as exc:  # runs between engine steps: never fail the step; scoring recomputes
            return Capture(prompt_ids, None, reason=f"copying the keys/values failed: {exc}")
        capture = Capture(
            prompt_ids,
            raw,
            None if unpack is None else (lambda raw: unpack(raw, n)),
            t_star=n,
            first_layer=first_layer,
            recorded=[] if recorded is None else [(output_ids, recorded[1])],
        )
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
        """The request of ``key`` is done: its capture goes, and one that arrives later is refused."""
        with self._changed:
            capture = self._entries.pop(key, None)
            if capture is not None:
                self._bytes -= capture.nbytes
            self._done[key] = time.monotonic()
            self._done.move_to_end(key)
            while len(self._done) > MAX_DONE_KEYS:
                self._done.popitem(last=False)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, c in self._entries.items() if now - c.created > self.ttl_s]:
            self._bytes -= self._entries.pop(key).nbytes
        while self._done and now - next(iter(self._done.values())) > self.ttl_s:
            self._done.popitem(last=False)

    def stats(self) -> StoreStats:
        with self._changed:
            self._expire()
            return StoreStats(len(self._entries), self._bytes, self.budget_bytes, len(self._done))

    @property
    def held_bytes(self) -> int:
        with self._changed:
            return self._bytes

    def __len__(self) -> int:
        with self._changed:
            return len(self._entries)


STORE = CaptureStore()  # the worker process's store, shared by the connector and the scoring service

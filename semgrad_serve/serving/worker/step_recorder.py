"""What vLLM computes for a scored request while generating it, kept so that scoring does not compute it again.

Scoring runs the band (with autograd) from t* on and needs the answer's logits;
vLLM computes both on the way to each token. Two hooks on vLLM's modules keep,
for the requests the capture connector watches (scored ones), one gather per
engine step:

- the band's inputs: a forward pre-hook on the decoder layer at the band's start
  sees every scheduled token's ``(hidden, residual)`` pair; their sum is the
  residual stream entering the layer (vLLM's layers fuse that add into their
  input norm; the first layer gets no residual). Rows at positions ≥ t* are kept,
  so scoring skips the layers below the band;
- the logits: a forward hook on the logits processor sees one row per request,
  from the request's last scheduled position; rows from the prompt's last
  position on predict the answer's tokens, so scoring skips the head's product.
  Only the first call after each forward is the sampling one: a request's prompt
  logprobs (``prompt_logprobs``, chat's ``echo``) come from a later call over
  prompt positions, which is not recorded.

Positions vLLM never ran (a prefix-cache hit past t*) leave a recording
incomplete: that request is then scored from what it has (every layer, or the
head's product). The hooks run only where the model runs eagerly (a CUDA graph
replay would skip them) and without speculative decoding.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

TTL_S = 600.0  # a recording whose request never reported its end is dropped after this long
LOGITS_BUDGET_BYTES = 1 << 30  # most bytes of logits held at once; beyond it, answers form their own


@dataclass
class Recording:
    t_star: int | None = None  # found on the request's first step; -1: not in the prompt
    prompt_length: int = 0
    inputs: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first position, band input rows [n, d])
    logits: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (position, logits [V]) from the prompt's end
    started: float = field(default_factory=time.monotonic)
    key: str | None = None  # the capture key of a request whose claims are scored while it runs (live claims)
    ids: dict[int, int] = field(default_factory=dict)  # live: the token id at each recorded position


@dataclass(frozen=True)
class Recorded:
    """A finished request's band inputs [n, d] at positions t* onwards, and its logits [k, V] predicting its
    output tokens (None where a row is missing)."""

    band_inputs: torch.Tensor
    logits: torch.Tensor | None


def assemble(parts: list[tuple[int, torch.Tensor]], start: int, stop: int) -> torch.Tensor | None:
    """Rows of positions [start, stop) from (first position, rows) parts in step order (a position recomputed
    after a preemption overwrites); None where one was never recorded. A normal tensor, which autograd may
    save (the parts are inference tensors)."""
    if not parts or stop <= start:
        return None
    with torch.inference_mode(False):
        out = parts[0][1].new_empty(stop - start, *parts[0][1].shape[1:])
    seen = torch.zeros(stop - start, dtype=torch.bool)
    for first, rows in parts:
        lo, hi = max(first, start), min(first + rows.shape[0], stop)
        if lo < hi:
            out[lo - start : hi - start] = rows[lo - first : hi - first]
            seen[lo - start : hi - start] = True
    return out if bool(seen.all()) else None


def positions_ids(state: Any, first: int, n: int) -> list[int]:
    """The token ids at positions [first, first + n) of a request (vLLM's runner state: its prompt, then its
    output so far); fewer where the output is not known here yet."""
    prompt, output = state.prompt_token_ids or (), getattr(state, "output_token_ids", None) or ()
    known = min(first + n, len(prompt) + len(output))
    return [int(prompt[p]) if p < len(prompt) else int(output[p - len(prompt)]) for p in range(first, known)]


class StepRecorder:
    """Per watched request, the band's input rows at positions ≥ t* and the logits rows predicting its output."""

    def __init__(self, logits_budget_bytes: int = LOGITS_BUDGET_BYTES) -> None:
        self.first_layer: int | None = None  # the band's first layer, once the hooks are installed
        self.logits_budget_bytes = logits_budget_bytes
        self._runner: Any = None
        self._t_star_of: Callable[[Sequence[int]], int | None] | None = None
        self._watched: dict[str, Recording] = {}
        self._logits_bytes = 0
        self._sampling_logits_next = False  # set by each forward; the first logits call after it samples
        self._lock = threading.Lock()

    def install(
        self,
        runner: Any,
        layer: torch.nn.Module,
        logits_processor: torch.nn.Module | None,
        first_layer: int,
        t_star_of: Callable[[Sequence[int]], int | None],
    ) -> None:
        """Hook ``layer`` (vLLM's decoder layer ``first_layer``) and ``logits_processor`` (None: record no logits)
        of the model ``runner`` (vLLM's model runner) runs."""
        self._runner, self._t_star_of, self.first_layer = runner, t_star_of, first_layer
        layer.register_forward_pre_hook(self._record_inputs, with_kwargs=True)
        if logits_processor is not None:
            logits_processor.register_forward_hook(self._record_logits)

    def watch(self, request_id: str, key: str | None = None) -> None:
        """Record ``request_id`` from its next step on (called before that step's forward); ``key``: its capture
        key, for a request whose claims are scored while it runs (``peek``)."""
        if self.first_layer is None:
            return
        with self._lock:
            now = time.monotonic()
            for rid in [r for r, rec in self._watched.items() if now - rec.started > TTL_S]:
                self._drop(rid)
            recording = self._watched.setdefault(request_id, Recording())
            recording.key = key or recording.key

    def peek(self, key: str, prompt_length: int, answer: Sequence[int], t_star: int) -> Recorded | None:
        """What was recorded so far, without ending the recording, for the running request of ``key`` whose output
        begins with ``answer`` after a prompt of ``prompt_length`` tokens: the band inputs at positions
        [t*, prompt + answer − 1) and the logits predicting ``answer`` (None where a row is missing). None where
        no recording of ``key`` holds every band input up to there (not computed yet). With several choices of a
        request (n > 1), the one whose recorded tokens are ``answer``'s."""
        stop = prompt_length + len(answer) - 1
        with self._lock:
            candidates = [
                r
                for r in self._watched.values()
                if r.key == key and r.t_star == t_star and r.prompt_length == prompt_length
            ]
            for recording in candidates:
                ids = [recording.ids.get(prompt_length + i) for i in range(len(answer) - 1)]
                if len(candidates) == 1 or ids == list(answer[:-1]):
                    inputs, logits = list(recording.inputs), list(recording.logits)
                    break
            else:
                return None
        if inputs and inputs[0][1].is_cuda:
            torch.cuda.synchronize(inputs[0][1].device)  # the rows were written on the engine's stream
        rows = assemble(inputs, t_star, stop)
        if rows is None:
            return None
        return Recorded(rows, assemble([(p, row[None]) for p, row in logits], prompt_length - 1, stop))

    @property
    def runner(self) -> Any:
        """vLLM's model runner whose steps are recorded (None before ``install``)."""
        return self._runner

    def covers(self, request_id: str, t_star: int) -> bool:
        """Whether every band input of the running ``request_id`` from t* to its positions computed so far was
        recorded (not where a prefix-cache hit skipped positions past t*)."""
        with self._lock:
            recording = self._watched.get(request_id)
            parts = list(recording.inputs) if recording is not None else []
        state = self._runner.requests.get(request_id) if self._runner is not None else None
        if recording is None or recording.t_star != t_star or state is None:
            return False
        return state.num_computed_tokens <= t_star or assemble(parts, t_star, state.num_computed_tokens) is not None

    def unfollow(self, request_id: str) -> None:
        """Stop keeping ``request_id``'s token ids: nothing will be peeked from its recording."""
        with self._lock:
            recording = self._watched.get(request_id)
            if recording is not None:
                recording.key, recording.ids = None, {}

    def take(self, request_id: str, t_star: int, computed: int) -> Recorded | None:
        """What was recorded for ``request_id``, which computed ``computed`` positions: its band inputs at positions
        [t*, computed) (None where one is missing or was recorded from another t*) and its logits; forgets it."""
        with self._lock:
            recording = self._drop(request_id)
        if recording is None or recording.t_star != t_star:
            return None
        inputs = assemble(recording.inputs, t_star, computed)
        if inputs is None:
            return None
        end = recording.prompt_length - 1  # the logits of positions [end, computed) predict the output tokens
        return Recorded(inputs, assemble([(p, row[None]) for p, row in recording.logits], end, computed))

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._drop(request_id)

    def _drop(self, request_id: str) -> Recording | None:
        recording = self._watched.pop(request_id, None)
        if recording is not None:
            self._logits_bytes -= sum(row.numel() * row.element_size() for _, row in recording.logits)
        return recording

    def __len__(self) -> int:
        with self._lock:
            return len(self._watched)

    @property
    def logits_bytes(self) -> int:
        with self._lock:
            return self._logits_bytes

    def _scheduled(self) -> list[tuple[Recording, int, int, int, int]]:
        """(recording, batch row, first row, new positions, first position) of this step's watched requests; the
        token ids of a live request's new positions go into its recording."""
        batch, starts = self._runner.input_batch, self._runner.query_start_loc.np
        out = []
        for rid, recording in self._watched.items():
            index = batch.req_id_to_index.get(rid)
            if index is None or index >= batch.num_reqs:
                continue
            if recording.t_star is None:
                prompt = self._runner.requests[rid].prompt_token_ids
                t_star = self._t_star_of(prompt) if prompt is not None and self._t_star_of else None
                recording.t_star, recording.prompt_length = (-1 if t_star is None else t_star), len(prompt or ())
            lo, hi = int(starts[index]), int(starts[index + 1])
            first = int(batch.num_computed_tokens_cpu[index])
            if recording.key is not None:
                recording.ids.update(
                    zip(range(first, first + hi - lo), positions_ids(self._runner.requests[rid], first, hi - lo))
                )
            out.append((recording, index, lo, hi - lo, first))
        return out

    def _record_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """The pre-hook: keep the watched requests' band input rows at positions ≥ t* of this step."""
        self._sampling_logits_next = True
        if not self._watched:
            return
        hidden, residual = args[1], args[2] if len(args) > 2 else kwargs.get("residual")
        wanted = []  # (recording, first row, rows, first position)
        with self._lock:
            for recording, _, row, n, first in self._scheduled():
                skip = max(0, recording.t_star - first) if recording.t_star >= 0 else n
                if n > skip:
                    wanted.append((recording, row + skip, n - skip, first + skip))
        if not wanted:
            return
        index = torch.cat([torch.arange(row, row + n) for _, row, n, _ in wanted]).to(hidden.device, non_blocking=True)
        rows = hidden.index_select(0, index)
        if residual is not None:
            rows = rows + residual.index_select(0, index)
        for (recording, _, _, first), part in zip(wanted, rows.split([n for _, _, n, _ in wanted])):
            recording.inputs.append((first, part))

    def _record_logits(self, module: torch.nn.Module, args: tuple, logits: torch.Tensor | None) -> None:
        """The hook on the logits processor: keep the rows (one per request) that predict output tokens, from the
        sampling call only (the first after a forward; prompt logprobs' calls follow it)."""
        sampling, self._sampling_logits_next = self._sampling_logits_next, False
        if not sampling or not self._watched or logits is None:
            return
        row_bytes = logits.shape[-1] * logits.element_size()
        with self._lock:
            wanted = [
                (recording, index, first + n - 1)
                for recording, index, _, n, first in self._scheduled()
                if recording.t_star >= 0 and first + n >= recording.prompt_length  # the prompt is done
            ]
            if not wanted or self._logits_bytes + len(wanted) * row_bytes > self.logits_budget_bytes:
                return  # those answers' logits will be formed by scoring
            self._logits_bytes += len(wanted) * row_bytes
        rows = logits.index_select(
            0, torch.tensor([index for _, index, _ in wanted]).to(logits.device, non_blocking=True)
        )
        for (recording, _, position), row in zip(wanted, rows):
            recording.logits.append((position, row))


RECORDER = StepRecorder()  # the worker process's recorder, shared by the connector and the worker extension

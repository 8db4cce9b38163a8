"""The residual stream entering the band, recorded while vLLM generates a scored request.

Scoring runs the band (with autograd) from t* on; the layers below it only feed it
their output, which vLLM computes anyway while generating. A forward pre-hook on
vLLM's decoder layer at the band's start sees, each engine step, every scheduled
token's ``(hidden, residual)`` pair; their sum is the residual stream entering the
layer (vLLM's layers fuse that add into their input norm; the first layer gets
no residual). For the requests the capture connector watches (scored ones), the
rows at positions ≥ t* are kept, one gather per step, so that scoring skips the
lower layers. Positions vLLM never ran (a prefix-cache hit past t*) leave the
recording incomplete: that request is then scored through every layer.
The hook runs only where the model runs eagerly (a CUDA graph replay would skip it).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

TTL_S = 600.0  # a recording whose request never reported its end is dropped after this long


@dataclass
class Recording:
    t_star: int | None = None  # found on the request's first step; None: not located yet
    chunks: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first position, rows [n, d])
    started: float = field(default_factory=time.monotonic)


class BandInputRecorder:
    """Per watched request, the band's input rows at positions ≥ t*, filled by a hook on vLLM's layer."""

    def __init__(self) -> None:
        self.first_layer: int | None = None  # the band's first layer, once the hook is installed
        self._runner: Any = None
        self._t_star_of: Callable[[Sequence[int]], int | None] | None = None
        self._watched: dict[str, Recording] = {}
        self._lock = threading.Lock()

    def install(self, runner: Any, layer: torch.nn.Module, first_layer: int, t_star_of: Callable[[Sequence[int]], int | None]) -> None:
        """Hook ``layer`` (vLLM's decoder layer ``first_layer``) of the model ``runner`` (vLLM's model runner) runs."""
        self._runner, self._t_star_of, self.first_layer = runner, t_star_of, first_layer
        layer.register_forward_pre_hook(self._record, with_kwargs=True)

    def watch(self, request_id: str) -> None:
        """Record ``request_id``'s band inputs from its next step on (called before that step's forward)."""
        if self.first_layer is None:
            return
        with self._lock:
            now = time.monotonic()
            for rid in [r for r, rec in self._watched.items() if now - rec.started > TTL_S]:
                del self._watched[rid]
            self._watched.setdefault(request_id, Recording())

    def take(self, request_id: str, t_star: int, stop: int) -> torch.Tensor | None:
        """The band inputs [stop − t*, d] of positions [t*, stop) and forget the request; None where a position
        was not recorded (or recorded from another t*)."""
        with self._lock:
            recording = self._watched.pop(request_id, None)
        if recording is None or recording.t_star != t_star or not recording.chunks or stop <= t_star:
            return None
        rows = recording.chunks[0][1]
        with torch.inference_mode(False):  # a normal tensor, which autograd may save (the rows are inference tensors)
            out = rows.new_empty(stop - t_star, rows.shape[-1])
        seen = torch.zeros(stop - t_star, dtype=torch.bool)
        for first, rows in recording.chunks:  # in step order: a recomputed position (after preemption) overwrites
            lo, hi = max(first, t_star), min(first + rows.shape[0], stop)
            if lo < hi:
                out[lo - t_star : hi - t_star] = rows[lo - first : hi - first]
                seen[lo - t_star : hi - t_star] = True
        return out if bool(seen.all()) else None

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._watched.pop(request_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._watched)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """The pre-hook: keep the watched requests' rows at positions ≥ t* of this step."""
        if not self._watched:
            return
        hidden, residual = args[1], args[2] if len(args) > 2 else kwargs.get("residual")
        batch = self._runner.input_batch
        starts = self._runner.query_start_loc.np
        wanted: list[tuple[Recording, int, int, int]] = []  # (recording, first row, rows, first position)
        with self._lock:
            for rid, recording in self._watched.items():
                index = batch.req_id_to_index.get(rid)
                if index is None or index >= batch.num_reqs:
                    continue
                computed = int(batch.num_computed_tokens_cpu[index])
                lo, hi = int(starts[index]), int(starts[index + 1])
                if recording.t_star is None:
                    prompt = self._runner.requests[rid].prompt_token_ids
                    recording.t_star = self._t_star_of(prompt) if prompt is not None and self._t_star_of else None
                    if recording.t_star is None:
                        recording.t_star = -1  # nothing to record: the request will be scored by recompute
                if recording.t_star < 0:
                    continue
                skip = max(0, recording.t_star - computed)
                if hi - lo > skip:
                    wanted.append((recording, lo + skip, hi - lo - skip, computed + skip))
        if not wanted:
            return
        index = torch.cat([torch.arange(row, row + n) for _, row, n, _ in wanted]).to(hidden.device, non_blocking=True)
        rows = hidden.index_select(0, index)
        if residual is not None:
            rows = rows + residual.index_select(0, index)
        for (recording, _, n, first), part in zip(wanted, rows.split([n for _, _, n, _ in wanted])):
            recording.chunks.append((first, part))


RECORDER = BandInputRecorder()  # the worker process's recorder, shared by the connector and the worker extension

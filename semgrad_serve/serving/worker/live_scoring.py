"""Live claims in the worker: what scoring a running request's answer so far takes from what vLLM computed.

A request that asks for live claims (``"semgrad": {"claims": "live"}``) is scored several times while it runs:
each time a sentence of its answer is settled, the API server sends the answer up to that sentence's end with the
window of claims to score (a ``LiveJob`` with ``so_far``: only those claims are scored, the head working on their
rows only); at its end, the whole answer with the claims not scored yet. A claim's loss involves only the answer's
tokens up to the claim's end, so its scores from that prefix are its final scores (``tests/test_live_claims.py``).

What such a job is given, all of it computed by vLLM:

- **the prompt's keys/values before t***: copied out of vLLM's KV cache once, by the capture connector at the
  start of the first engine step after the prompt was computed (``LivePrompts``). Those blocks cannot change
  while the request runs, and the copy runs in the engine's own thread between steps, like the copy at a
  request's end, so it never races with vLLM freeing or reusing them. Recomputing them instead would run every
  layer over the whole prompt for each sentence; the copy is ~2 ms per 1k prompt tokens, once, and the request's
  end reuses it (no second copy);
- **the band's inputs and the logits** from t* to the prefix's end: read from the step recorder's rows so far
  (``StepRecorder.peek``), without ending the recording;
- **the answer's own keys/values** up to the claim: computed by the band pass from those inputs, never read
  from the cache of a running request (its last blocks are being written).

A finished choice's job takes its capture as any answer does. Where a part is missing (a prefix-cache hit past
t* left band inputs unrecorded: all layers' prompt keys/values are copied instead; no recording at all), the
job is given less and scoring computes the rest, with the same scores.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ...scoring.given import Given
from .captures import CaptureStore
from .step_recorder import StepRecorder

# Copies a running request's first n positions' keys/values from layer ``first`` on, given vLLM's block ids.
ReadBlocks = Callable[[Sequence[int], int, int], Any]


class LivePrompts:
    """Running live-claims requests whose prompt keys/values are not copied yet (worker side, engine thread)."""

    def __init__(self) -> None:
        self._pending: dict[str, str] = {}  # vLLM request id -> capture key

    def follow(self, request_id: str, key: str) -> None:
        self._pending[request_id] = key

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._pending)

    def copy_computed(
        self,
        recorder: StepRecorder,
        store: CaptureStore,
        read: ReadBlocks | None,
        unpack: Callable[[Any, int], Any] | None,
    ) -> None:
        """Before a step's forward: copy the prompt keys/values of each followed request whose positions before t*
        are all computed into ``store`` (``CaptureStore.add_prompt``), from the band's first layer on where its band
        inputs are recorded from t* (else every layer; ``read`` None: none, scoring recomputes them)."""
        runner = recorder.runner
        for request_id, key in list(self._pending.items()):
            state = runner.requests.get(request_id) if runner is not None else None
            if runner is not None and state is None:
                continue  # not added to the runner yet
            prompt = tuple(int(i) for i in (state.prompt_token_ids or ())) if state is not None else ()
            t_star = store.prefix_length(prompt) if store.prefix_length is not None and prompt else None
            if t_star is not None and state.num_computed_tokens < t_star:
                continue  # its prompt is still being computed (chunked prefill)
            del self._pending[request_id]
            first = recorder.first_layer if t_star is not None and recorder.covers(request_id, t_star) else 0
            if first == 0:
                recorder.unfollow(request_id)  # its band inputs are not all there: nothing to peek at
            blocks = list(state.block_ids[0]) if state is not None else []
            reader = None if read is None or state is None else (lambda n, layer, b=blocks: read(b, n, layer))
            store.add_prompt(key, prompt, reader, unpack, first or 0)


def live_given(
    store: CaptureStore, recorder: StepRecorder, key: str, pair: tuple[Sequence[int], Sequence[int]]
) -> Given | None:
    """What scoring ``pair`` (a prompt and the answer so far of a live request of ``key``) takes as given; None
    where it should wait (the prompt not copied yet, or the band inputs not all recorded yet)."""
    prompt, answer = pair
    capture = store.get(key)
    if capture is None:
        return None
    if capture.prompt_ids != tuple(prompt):
        return Given()
    if capture.has_choice(answer):  # its choice has ended: its capture holds what was recorded
        return capture.given(answer)
    kv = capture.kv
    if kv is None:
        return Given()
    if capture.first_layer == 0:
        return Given(kv)
    recorded = recorder.peek(key, len(prompt), answer, capture.t_star)
    return None if recorded is None else Given(kv, recorded.band_inputs, recorded.logits)

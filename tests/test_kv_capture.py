"""Prompt keys/values from vLLM's KV cache: the layouts, the capture store and the capture connector."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.request import RequestStatus

from semgrad_serve.serving import capture_keys
from semgrad_serve.serving.messages import KV_PARAM
from semgrad_serve.serving.worker.captures import CaptureStore
from semgrad_serve.serving.worker.kv_layout import CPU_TRANSPOSED_K, TOKEN_MAJOR, layout_for, read_prefix


def paged(n: int, heads: int, d: int, block_size: int, dtype: torch.dtype, seed: int = 0):
    """Random keys/values [n, heads, d] of one request and a shuffled block table over 6 blocks."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(n, heads, d, generator=g).to(dtype), torch.randn(n, heads, d, generator=g).to(dtype)
    blocks = torch.randperm(6, generator=g)[: -(-n // block_size)].tolist()
    slots = torch.tensor([blocks[i // block_size] * block_size + i % block_size for i in range(n)])
    return k, v, blocks, slots


@pytest.mark.parametrize("isa", ["vec", "vec16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_layout_reads_what_vllms_cpu_writer_stored(isa: str, dtype: torch.dtype) -> None:
    """vLLM's own CPU cache writer fills the cache; reading it back gives the keys and values written."""
    from vllm import _custom_ops as ops

    heads, d, block_size, n = 3, 64, 32, 75
    k, v, blocks, slots = paged(n, heads, d, block_size, dtype)
    cache = torch.zeros(6, heads, block_size, 2 * d, dtype=dtype)
    key_cache, value_cache = cache.view(6, heads, 2 * block_size, d).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
    assert layout_for("CPU_ATTN", isa) == CPU_TRANSPOSED_K
    got = read_prefix([cache, cache * 2], CPU_TRANSPOSED_K, blocks, 70)
    assert got.shape == (2, 2, heads, 70, d)
    assert torch.equal(got[0, 0], k[:70].transpose(0, 1)) and torch.equal(got[0, 1], v[:70].transpose(0, 1))
    assert torch.equal(got[1, 0], 2 * k[:70].transpose(0, 1))


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (0, 2, 1, 3), (1, 0, 2, 3)])
def test_token_major_layout_under_any_physical_stride_order(order: tuple[int, ...]) -> None:
    """GPU backends: per block, head and token the key then the value, whatever the physical order."""
    heads, d, block_size, n = 2, 8, 16, 40
    k, v, blocks, _ = paged(n, heads, d, block_size, torch.float32, seed=3)
    logical = (6, heads, block_size, 2 * d)
    cache = torch.zeros([logical[i] for i in order]).permute(*[order.index(i) for i in range(4)])
    assert cache.shape == logical
    for i in range(n):
        cache[blocks[i // block_size], :, i % block_size] = torch.cat((k[i], v[i]), dim=-1)
    got = read_prefix([cache], TOKEN_MAJOR, blocks, n)
    assert torch.equal(got[0, 0], k.transpose(0, 1)) and torch.equal(got[0, 1], v.transpose(0, 1))
    assert layout_for("FLASH_ATTN") == TOKEN_MAJOR and layout_for("CPU_ATTN", "amx") is None
    with pytest.raises(ValueError, match="need 3 blocks"):
        read_prefix([cache], TOKEN_MAJOR, blocks[:2], n)


def test_capture_store_budget_age_and_missing_t_star() -> None:
    store = CaptureStore(budget_bytes=1000, ttl_s=0.2)
    store.prefix_length = lambda ids: None if 99 in ids else 3
    store.add("a", (1, 2, 3, 4), lambda n, first: torch.ones(1, 2, 1, n, 4))  # 96 bytes
    store.add("a", (1, 2, 3, 4), lambda n, first: pytest.fail("a second choice of a request reads nothing"))
    store.add("big", (1, 2, 3, 4), lambda n, first: torch.ones(1, 2, 1, n, 400))
    store.add("no-t*", (99, 1), lambda n, first: torch.ones(1))
    store.add("no-layout", (1, 2, 3), None)
    assert store.get("a").kv.shape == (1, 2, 1, 3, 4) and store.held_bytes == 96
    assert (
        "budget" in store.get("big").reason
        and "t*" in store.get("no-t*").reason
        and "layout" in store.get("no-layout").reason
    )
    store.drop("a")
    assert store.held_bytes == 0 and store.get("a") is None and store.wait("a", 0.05) is None
    time.sleep(0.25)
    store.add("b", (5,), None)  # adding expires what nobody claimed
    assert len(store) == 1


SECRET = b"test-capture-secret"
MINTED: dict[str, str] = {}


def minted(name: str) -> str:
    """The capture key the API server minted (under ``SECRET``) for the request called ``name`` in a test."""
    return MINTED.setdefault(name, capture_keys.mint(SECRET))


def make_connector(role: KVConnectorRole, secret: bytes | None = SECRET):
    from semgrad_serve.serving.worker.capture_connector import SemgradCaptureConnector

    config = SimpleNamespace(kv_transfer_config=SimpleNamespace(is_kv_producer=True))
    connector = SemgradCaptureConnector(config, role, None)
    connector._secret = secret  # as read from the environment vLLM's engine was started with
    return connector


def fresh_recorder_and_store(monkeypatch) -> tuple:
    """A step recorder and a capture store (t* = 3 for every prompt) in place of the connector's own."""
    from semgrad_serve.serving.worker import capture_connector, step_recorder

    recorder = step_recorder.StepRecorder()
    monkeypatch.setattr(capture_connector, "RECORDER", recorder)
    store = CaptureStore()
    store.prefix_length = lambda ids: 3
    monkeypatch.setattr(capture_connector, "STORE", store)
    return recorder, store


def finished(
    request_id: str,
    status: RequestStatus,
    key: str | None,
    prompt: list[int],
    computed: int = 1000,
    output: tuple[int, ...] = (),
) -> SimpleNamespace:
    """A request as the connector sees it; ``key``: the name of the minted key it carries."""
    params = {KV_PARAM: minted(key), "other": 1} if key else None
    return SimpleNamespace(
        request_id=request_id,
        status=status,
        kv_transfer_params=params,
        prompt_token_ids=prompt,
        num_computed_tokens=computed,
        output_token_ids=list(output),
    )


def test_connector_holds_only_finished_scored_requests_for_one_step(monkeypatch) -> None:
    """Scheduler side: scored requests that ended (aborted too: stop strings end requests that way) are held
    and handed to the worker; unscored and failed ones are freed at once. Worker side: the prompt up to t* is
    copied before the step's forward, and every handed request is released in the same step."""
    from semgrad_serve.serving.worker import capture_connector

    scheduler = make_connector(KVConnectorRole.SCHEDULER)
    assert scheduler.request_finished(finished("r0", RequestStatus.FINISHED_STOPPED, None, [1, 2]), [0]) == (
        False,
        None,
    )
    assert scheduler.request_finished(finished("r1", RequestStatus.FINISHED_IGNORED, "k1", [1, 2]), [0]) == (
        False,
        None,
    )
    assert scheduler.request_finished(finished("r2", RequestStatus.FINISHED_ERROR, "k2", [1, 2]), [0]) == (False, None)
    prompt = list(range(10, 50))
    assert scheduler.request_finished(finished("r3", RequestStatus.FINISHED_STOPPED, "k3", prompt), [4, 1]) == (
        True,
        None,
    )
    assert scheduler.request_finished(finished("r4", RequestStatus.FINISHED_LENGTH_CAPPED, "k4", [7] * 5), [2]) == (
        True,
        None,
    )
    aborted_in_prefill = finished("r5", RequestStatus.FINISHED_ABORTED, "k5", prompt, computed=20)
    assert scheduler.request_finished(aborted_in_prefill, [3]) == (True, None)
    meta = scheduler.build_connector_meta(SimpleNamespace())
    assert [o.request_id for o in meta.orders] == ["r3", "r4", "r5"] and meta.orders[0].block_ids == (4, 1)
    assert scheduler.build_connector_meta(SimpleNamespace()).orders == []  # handed over once

    store = CaptureStore()
    store.prefix_length = lambda ids: 37 if ids[0] == 10 else None
    monkeypatch.setattr(capture_connector, "STORE", store)
    worker = make_connector(KVConnectorRole.WORKER)
    block_size, heads, d = 32, 2, 4
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(6, heads, block_size, 2 * d) for i in (1, 0, 2)}
    worker.register_kv_caches(caches)
    worker._layout, worker._layout_known = TOKEN_MAJOR, True
    worker.bind_connector_metadata(meta)
    assert worker.get_finished(set()) == ({"r3", "r4", "r5"}, None)
    assert worker.get_finished(set()) == (None, None)  # released once
    kv = store.get(minted("k3")).kv
    assert kv.shape == (3, 2, heads, 37, d) and store.get(minted("k4")).kv is None
    assert store.get(minted("k5")).kv is None and "computing 20 of the 37" in store.get(minted("k5")).reason
    layer0 = caches["model.layers.0.self_attn.attn"]
    position = 33  # the second position of the request's second block (block 1)
    assert torch.equal(kv[0, 0, :, position], layer0[1, :, 1, :d]) and torch.equal(
        kv[0, 1, :, position], layer0[1, :, 1, d:]
    )
    assert torch.equal(kv[2, 1, :, 0], caches["model.layers.2.self_attn.attn"][4, :, 0, d:])


class FakeLayer(torch.nn.Module):
    """Stands in for a vLLM decoder layer: called as ``layer(positions, hidden, residual)``."""

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        return None


class FakeLogits(torch.nn.Module):
    """Stands in for vLLM's logits processor: one row per request, from its last scheduled position."""

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


VOCAB = 5


class FakeRunner:
    """The parts of vLLM's model runner the recorder reads, and one engine step over fake modules."""

    def __init__(self, prompts: dict[str, list[int]]) -> None:
        self.requests = {rid: SimpleNamespace(prompt_token_ids=p) for rid, p in prompts.items()}
        self.input_batch = SimpleNamespace(req_id_to_index={}, num_reqs=0, num_computed_tokens_cpu=[])
        self.query_start_loc = SimpleNamespace(np=[0])
        self.layer, self.logits = FakeLayer(), FakeLogits()

    def step(self, scheduled: list[tuple[str, int, int]], d: int, prompt_logprobs: bool = False) -> None:
        """One step of (request, computed before, new tokens) rows. The stream entering the layer is
        position + 1000 * request number (split into hidden + residual as vLLM's layers pass it on), and the
        logits row of a request is its last position + 1000 * request number + the vocabulary index / 10.
        ``prompt_logprobs``: then the logits of every scheduled position, as vLLM computes prompt logprobs after
        sampling."""
        batch = self.input_batch
        batch.req_id_to_index = {rid: i for i, (rid, _, _) in enumerate(scheduled)}
        batch.num_reqs, batch.num_computed_tokens_cpu = len(scheduled), [c for _, c, _ in scheduled]
        self.query_start_loc.np = [0, *torch.tensor([n for _, _, n in scheduled]).cumsum(0).tolist()]
        stream = torch.cat([stream_value(rid, torch.arange(c, c + n)) for rid, c, n in scheduled])
        stream = stream[:, None].expand(-1, d).contiguous()
        residual = torch.randn_like(stream)
        last = torch.stack([stream_value(rid, torch.tensor(c + n - 1)) for rid, c, n in scheduled])
        with torch.inference_mode():
            self.layer(torch.zeros(len(stream)), stream - residual, residual)
            self.logits(last[:, None] + torch.arange(VOCAB) / 10)
            if prompt_logprobs:
                self.logits(-stream[:, :1] + torch.arange(VOCAB) / 10)


def stream_value(rid: str, positions: torch.Tensor) -> torch.Tensor:
    return 1000.0 * int(rid[1:]) + positions.to(torch.float64)


def test_step_recorder_keeps_watched_band_inputs_and_logits() -> None:
    """The hooks keep, for watched requests only, hidden + residual at positions ≥ t* and the logits rows from
    the prompt's last position on, over chunked prefill and decode steps; a preempted request's recomputed rows
    overwrite; a position never run leaves no band inputs, a missing logits row no logits; a full logits budget
    records no more logits; the prompt logprobs' logits call after the sampling one is not recorded."""
    from semgrad_serve.serving.worker.step_recorder import StepRecorder

    recorder, d = StepRecorder(), 4
    runner = FakeRunner({"r1": [5] * 12, "r2": [6] * 12, "r3": [7] * 12, "r4": [1] * 12})
    recorder.watch("r1")  # not installed yet: nothing watched
    assert len(recorder) == 0
    recorder.install(runner, runner.layer, runner.logits, 7, lambda ids: None if ids[0] == 1 else 9)
    for rid in ("r1", "r3", "r4"):
        recorder.watch(rid)
    runner.step([("r1", 0, 8), ("r2", 0, 12), ("r3", 0, 12), ("r4", 0, 12)], d)  # r1: chunked prefill
    runner.step([("r2", 12, 1), ("r1", 8, 4), ("r3", 12, 1)], d, prompt_logprobs=True)  # not recorded as logits
    runner.step([("r1", 12, 1), ("r3", 13, 1)], d)
    runner.step([("r3", 14, 1)], d)
    got = recorder.take("r1", 9, 13)  # 12 prompt tokens, 2 output tokens: 13 positions computed
    assert got is not None and not got.band_inputs.is_inference()
    assert torch.equal(got.band_inputs, stream_value("r1", torch.arange(9, 13))[:, None].expand(-1, d))
    assert torch.equal(got.logits, stream_value("r1", torch.arange(11, 13))[:, None] + torch.arange(VOCAB) / 10)
    assert recorder.take("r1", 9, 13) is None  # taken once
    assert recorder.take("r3", 9, 16) is None  # position 15 never ran
    assert recorder.take("r2", 9, 13) is None and recorder.take("r4", 9, 13) is None  # unwatched; no t*
    recorder.watch("r3")
    runner.step([("r3", 0, 8)], d)  # resumed after a preemption: recomputed from the start, in chunks
    runner.step([("r3", 8, 6)], d)  # (its logits row of position 11 was not computed again)
    got = recorder.take("r3", 9, 14)
    assert (
        torch.equal(got.band_inputs, stream_value("r3", torch.arange(9, 14))[:, None].expand(-1, d))
        and got.logits is None
    )
    recorder.watch("r3")
    runner.step([("r3", 0, 12)], d)
    assert recorder.take("r3", 8, 12) is None  # recorded from another t*
    recorder.watch("r2")
    recorder.forget("r2")
    assert len(recorder) == 0 and recorder.logits_bytes == 0

    small = StepRecorder(logits_budget_bytes=2 * VOCAB * 8)  # two float64 rows
    runner = FakeRunner({"r1": [5] * 12})
    small.install(runner, runner.layer, runner.logits, 7, lambda ids: 9)
    small.watch("r1")
    for step in ([("r1", 0, 12)], [("r1", 12, 1)], [("r1", 13, 1)]):
        runner.step(step, d)
    got = small.take("r1", 9, 14)
    assert got.band_inputs.shape == (5, d) and got.logits is None  # the third row was over the budget
    assert small.logits_bytes == 0


def test_connector_captures_band_layers_only_where_band_inputs_were_recorded(monkeypatch) -> None:
    """A scored request is watched when given blocks; at its end what was recorded goes into the capture with
    the band layers' keys/values only; each choice of a request (n > 1) gives its own answer its own band
    inputs and logits; a request whose recording is incomplete gets every layer's keys/values; one that ended
    without a capture is forgotten."""

    recorder, store = fresh_recorder_and_store(monkeypatch)
    scheduler = make_connector(KVConnectorRole.SCHEDULER)
    keys = {"r1": "k1", "r4": "k1", "r2": "k2", "r3": "k3"}  # r1 and r4: two choices of one request
    for rid, key in keys.items():
        scheduler.update_state_after_alloc(finished(rid, RequestStatus.RUNNING, key, [5] * 4), None, 0)
    scheduler.update_state_after_alloc(finished("u", RequestStatus.RUNNING, None, [5] * 4), None, 0)
    meta = scheduler.build_connector_meta(SimpleNamespace())
    assert meta.watch == list(keys) and meta.orders == []

    worker = make_connector(KVConnectorRole.WORKER)
    block_size, heads, d, n_layers, first = 8, 2, 4, 4, 2
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(3, heads, block_size, 2 * d) for i in range(n_layers)}
    worker.register_kv_caches(caches)
    worker._layout, worker._layout_known = TOKEN_MAJOR, True
    runner = FakeRunner({rid: [5] * 4 for rid in keys})
    recorder.install(runner, runner.layer, runner.logits, first, lambda ids: 3)
    worker.bind_connector_metadata(meta)
    runner.step([("r1", 0, 4), ("r4", 0, 4), ("r2", 0, 2), ("r3", 0, 4)], 8)  # r2's positions 2, 3 never run
    runner.step([("r1", 4, 1), ("r4", 4, 1), ("r3", 4, 1)], 8)
    outputs = {"r1": (7, 8), "r4": (9, 8), "r2": (7, 8)}
    for rid in ("r1", "r4", "r2"):
        request = finished(rid, RequestStatus.FINISHED_STOPPED, keys[rid], [5] * 4, computed=5, output=outputs[rid])
        assert scheduler.request_finished(request, [0]) == (True, None)
    assert scheduler.request_finished(finished("r3", RequestStatus.FINISHED_ERROR, "k3", [5] * 4, computed=5), [2]) == (
        False,
        None,
    )
    worker.bind_connector_metadata(scheduler.build_connector_meta(SimpleNamespace()))
    a, b = store.get(minted("k1")), store.get(minted("k2"))
    assert a.first_layer == first and a.kv.shape == (n_layers - first, 2, heads, 3, d)
    assert torch.equal(a.kv[0, 0], caches[f"model.layers.{first}.self_attn.attn"][0, :, :3, :d])
    for rid in ("r1", "r4"):
        given = a.given([outputs[rid][0], 2])  # an answer that ends on another token than the output's second
        assert torch.equal(given.prefix_kv, a.kv)
        assert torch.equal(given.band_inputs, stream_value(rid, torch.arange(3, 5))[:, None].expand(-1, 8))
        assert torch.equal(given.logits, stream_value(rid, torch.arange(3, 5))[:, None] + torch.arange(VOCAB) / 10)
    assert torch.equal(a.given([2]).logits, a.given([7, 2]).logits[:1])  # a one-token answer: the first row
    assert a.given([7, 8, 9, 2]).prefix_kv is None  # longer than any recording; band-only keys/values: recompute
    assert b.first_layer == 0 and b.recorded == [] and b.kv.shape == (n_layers, 2, heads, 3, d)
    assert torch.equal(b.given([7, 8]).prefix_kv, b.kv) and b.given([7, 8]).band_inputs is None
    assert len(recorder) == 0  # r1, r4, r2 taken; r3 forgotten

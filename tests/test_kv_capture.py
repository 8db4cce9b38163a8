"""Prompt keys/values from vLLM's KV cache: the layouts, the capture store and the capture connector."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.request import RequestStatus

from semgrad_serve.serving.captures import KV_PARAM, CaptureStore
from semgrad_serve.serving.kv_layout import CPU_TRANSPOSED_K, TOKEN_MAJOR, layout_for, read_prefix


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
    store.add("a", (1, 2, 3, 4), lambda n: torch.ones(1, 2, 1, n, 4))  # 96 bytes
    store.add("a", (1, 2, 3, 4), lambda n: pytest.fail("a second choice of a request reads nothing"))
    store.add("big", (1, 2, 3, 4), lambda n: torch.ones(1, 2, 1, n, 400))
    store.add("no-t*", (99, 1), lambda n: torch.ones(1))
    store.add("no-layout", (1, 2, 3), None)
    assert store.get("a").kv.shape == (1, 2, 1, 3, 4) and store.held_bytes == 96
    assert "budget" in store.get("big").reason and "t*" in store.get("no-t*").reason and "layout" in store.get("no-layout").reason
    store.drop("a")
    assert store.held_bytes == 0 and store.get("a") is None and store.wait("a", 0.05) is None
    time.sleep(0.25)
    store.add("b", (5,), None)  # adding expires what nobody claimed
    assert len(store) == 1


def make_connector(role: KVConnectorRole):
    from semgrad_serve.serving.capture_connector import SemgradCaptureConnector

    config = SimpleNamespace(kv_transfer_config=SimpleNamespace(is_kv_producer=True))
    return SemgradCaptureConnector(config, role, None)


def finished(request_id: str, status: RequestStatus, key: str | None, prompt: list[int], computed: int = 1000) -> SimpleNamespace:
    params = {KV_PARAM: key, "other": 1} if key else None
    return SimpleNamespace(request_id=request_id, status=status, kv_transfer_params=params, prompt_token_ids=prompt, num_computed_tokens=computed)


def test_connector_holds_only_finished_scored_requests_for_one_step(monkeypatch) -> None:
    """Scheduler side: scored requests that ended (aborted too: stop strings end requests that way) are held
    and handed to the worker; unscored and failed ones are freed at once. Worker side: the prompt up to t* is
    copied before the step's forward, and every handed request is released in the same step."""
    from semgrad_serve.serving import capture_connector

    scheduler = make_connector(KVConnectorRole.SCHEDULER)
    assert scheduler.request_finished(finished("r0", RequestStatus.FINISHED_STOPPED, None, [1, 2]), [0]) == (False, None)
    assert scheduler.request_finished(finished("r1", RequestStatus.FINISHED_IGNORED, "k1", [1, 2]), [0]) == (False, None)
    assert scheduler.request_finished(finished("r2", RequestStatus.FINISHED_ERROR, "k2", [1, 2]), [0]) == (False, None)
    prompt = list(range(10, 50))
    assert scheduler.request_finished(finished("r3", RequestStatus.FINISHED_STOPPED, "k3", prompt), [4, 1]) == (True, None)
    assert scheduler.request_finished(finished("r4", RequestStatus.FINISHED_LENGTH_CAPPED, "k4", [7] * 5), [2]) == (True, None)
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
    kv = store.get("k3").kv
    assert kv.shape == (3, 2, heads, 37, d) and store.get("k4").kv is None
    assert store.get("k5").kv is None and "computing 20 of the 37" in store.get("k5").reason
    layer0 = caches["model.layers.0.self_attn.attn"]
    position = 33  # the second position of the request's second block (block 1)
    assert torch.equal(kv[0, 0, :, position], layer0[1, :, 1, :d]) and torch.equal(kv[0, 1, :, position], layer0[1, :, 1, d:])
    assert torch.equal(kv[2, 1, :, 0], caches["model.layers.2.self_attn.attn"][4, :, 0, d:])

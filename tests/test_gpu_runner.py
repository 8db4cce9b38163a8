"""The vLLM runner and caches scoring accepts (docs/gpu.md): V1 selected by serve, anything else refused at
start-up in one line; FP8 caches read back to known values, and never read for scoring."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.config import CompilationMode, CUDAGraphMode
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.request import RequestStatus

from semgrad_serve.errors import SemgradError
from semgrad_serve.serving.capture_keys import SECRET_ENV, mint
from semgrad_serve.serving.messages import KV_PARAM, SETUP_REFUSED
from semgrad_serve.serving.settings import ScoringSettings
from semgrad_serve.serving.worker.captures import CaptureStore
from semgrad_serve.serving.worker.kv_layout import (
    TOKEN_MAJOR,
    KVQuant,
    copy_blocks,
    dequantize,
    quantized_cache,
    unpack,
)
from semgrad_serve.serving.worker.runner_check import V2_REFUSED, V2_RUNNER_ENV, check_runner

V1_RUNNER = SimpleNamespace(model=None, input_batch=None, query_start_loc=None, requests={})


def test_serve_selects_vllms_v1_runner_unless_the_user_chose(monkeypatch) -> None:
    """serve's environment selects V1, which vLLM's own config then reads as "not V2"; a user's choice stays."""
    import vllm.envs as envs
    from vllm.config import VllmConfig

    from semgrad_serve.commands.serve import server_env

    monkeypatch.delenv(V2_RUNNER_ENV, raising=False)
    for cpu_workers in (0, 1):  # a GPU, the CPU
        assert server_env(ScoringSettings(), cpu_workers)[V2_RUNNER_ENV] == "0"
    monkeypatch.setenv(V2_RUNNER_ENV, "0")
    config = SimpleNamespace(attention_config=SimpleNamespace(hisparse_config=None))
    assert envs.VLLM_USE_V2_MODEL_RUNNER is False and VllmConfig.use_v2_model_runner.fget(config) is False
    monkeypatch.setenv(V2_RUNNER_ENV, "1")
    assert server_env(ScoringSettings())[V2_RUNNER_ENV] == "1"
    assert VllmConfig.use_v2_model_runner.fget(config) is True  # then the extension refuses (below)


def test_extension_refuses_model_runner_v2_at_setup() -> None:
    """semgrad_setup refuses V2 first, in one line, before it reads anything of the runner."""
    from semgrad_serve.serving.worker.extension import SemgradWorkerExtension

    worker = SemgradWorkerExtension()
    worker.vllm_config = SimpleNamespace(use_v2_model_runner=True)  # type: ignore[attr-defined]
    worker.model_runner = SimpleNamespace()  # type: ignore[attr-defined]
    with pytest.raises(SemgradError) as refused:
        worker.start_scoring(None, 4, [0])
    assert str(refused.value) == V2_REFUSED and "\n" not in V2_REFUSED
    # through vLLM's RPC, as an answer the API server reads (an exception would cross as text only)
    assert worker.semgrad_setup(None, 4, [0]) == {SETUP_REFUSED: V2_REFUSED}


def test_check_runner_accepts_v1_and_names_what_another_runner_lacks() -> None:
    check_runner(SimpleNamespace(use_v2_model_runner=False), V1_RUNNER)
    check_runner(SimpleNamespace(), V1_RUNNER)  # a config without the property: an older vLLM, V1 only
    with pytest.raises(SemgradError, match="V1 model runner, and this server runs Model Runner V2"):
        check_runner(SimpleNamespace(use_v2_model_runner=True), V1_RUNNER)

    class ModelRunnerV2:  # vLLM 0.32's V2 keeps per-request state in req_states, not these fields
        model = req_states = None

    with pytest.raises(SemgradError, match="ModelRunnerV2 has no input_batch, query_start_loc, requests$"):
        check_runner(SimpleNamespace(use_v2_model_runner=False), ModelRunnerV2())


@pytest.mark.parametrize(
    "eager, mode, graphs, speculative, expected",
    [
        (True, CompilationMode.NONE, CUDAGraphMode.NONE, None, True),
        (False, CompilationMode.NONE, CUDAGraphMode.NONE, None, True),  # -cc.mode=none -cc.cudagraph_mode=none
        (False, CompilationMode.NONE, CUDAGraphMode.FULL_AND_PIECEWISE, None, False),  # graphs replay, hooks skipped
        (False, CompilationMode.VLLM_COMPILE, CUDAGraphMode.FULL_AND_PIECEWISE, None, False),  # vLLM's GPU default
        (True, CompilationMode.NONE, CUDAGraphMode.NONE, object(), False),  # speculative decoding
    ],
)
def test_band_inputs_are_recorded_only_where_the_hooks_run(eager, mode, graphs, speculative, expected) -> None:
    from semgrad_serve.serving.worker.extension import records_band_inputs

    config = SimpleNamespace(
        model_config=SimpleNamespace(enforce_eager=eager),
        compilation_config=SimpleNamespace(mode=mode, cudagraph_mode=graphs),
        speculative_config=speculative,
    )
    assert records_band_inputs(config) is expected


def e4m3(byte: int) -> float:
    """The value of an e4m3fn byte, from its bits: 1 sign, 4 exponent (bias 7; 0: subnormal), 3 mantissa."""
    sign, exponent, mantissa = byte >> 7, (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0:
        return (-1.0) ** sign * mantissa / 8 * 2.0**-6
    return (-1.0) ** sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def test_e4m3_bytes_read_back_as_their_values() -> None:
    """Hand-made bytes: 0x38 = 1.0, 0x48 = 4.0, 0xB4 = -0.75, 0x7E = 448 (e4m3fn's largest)."""
    assert [e4m3(b) for b in (0x38, 0x48, 0xB4, 0x7E, 0x01)] == [1.0, 4.0, -0.75, 448.0, 2.0**-9]
    stored = torch.tensor([0x38, 0x48, 0xB4, 0x7E], dtype=torch.uint8).view(1, 1, 1, 4)
    kv = torch.cat([stored, stored])[None]  # [1 layer, 2, 1 head, 1 position, 4]
    got = dequantize(kv, [KVQuant(torch.float8_e4m3fn, 0.5, 3.0)], torch.float32)
    assert got[0, 0, 0, 0].tolist() == [0.5, 2.0, -0.375, 224.0] and got[0, 1, 0, 0].tolist() == [
        3.0,
        12.0,
        -2.25,
        1344.0,
    ]


def test_fp8_paged_cache_reads_back_to_the_dequantized_values() -> None:
    """A token-major FP8 cache (bytes, as vLLM allocates it) filled as vLLM's writer does (e4m3 of value / scale,
    per-tensor scales per layer): copied, unpacked and dequantized, it gives back every byte's value × its scale."""
    heads, d, block_size, n = 2, 8, 16, 37
    g = torch.Generator().manual_seed(1)
    blocks = [4, 0, 2]
    scales = [(0.25, 2.0), (1.5, 0.125)]
    caches, expected = [], []
    for _ in scales:
        stored = torch.randint(0, 256, (6, heads, block_size, 2 * d), generator=g, dtype=torch.uint8)
        stored[(stored & 0x7F) == 0x7F] = 0x38  # no NaN bytes (e4m3fn's only non-finite values)
        caches.append(stored)
    for stored, (ks, vs) in zip(caches, scales):
        rows = torch.cat([stored[b] for b in blocks], dim=1)[:, :n]  # [heads, n, 2d] in position order
        value = torch.tensor([[[e4m3(x) for x in row] for row in head] for head in rows.tolist()])
        expected.append(torch.stack([value[..., :d] * ks, value[..., d:] * vs]))
    assert quantized_cache(caches) == "the KV cache holds quantized keys/values (uint8)"
    raw = unpack(copy_blocks(caches, blocks, n), TOKEN_MAJOR, n)
    got = dequantize(raw, [KVQuant(torch.float8_e4m3fn, ks, vs) for ks, vs in scales], torch.float32)
    assert got.shape == (2, 2, heads, n, d)
    assert torch.equal(got, torch.stack(expected).to(torch.float32))
    with pytest.raises(ValueError, match="1 quantization scales for 2 layers"):
        dequantize(raw, [KVQuant(torch.float8_e4m3fn, 1.0, 1.0)], torch.float32)


def test_only_full_precision_caches_are_readable() -> None:
    assert quantized_cache([torch.zeros(1, dtype=t) for t in (torch.bfloat16, torch.float16, torch.float32)]) is None
    assert quantized_cache([torch.zeros(1, dtype=torch.float8_e4m3fn), torch.zeros(1, dtype=torch.int8)]) == (
        "the KV cache holds quantized keys/values (float8_e4m3fn, int8)"
    )


SECRET = b"capture-secret-of-these-tests"


def test_connector_never_reads_a_quantized_cache(monkeypatch) -> None:
    """With an FP8 cache the finished request is still released in the same step, but its capture holds no
    keys/values (scoring recomputes the prompt, as offline) and what was recorded for it is dropped."""
    from semgrad_serve.serving.worker import capture_connector
    from semgrad_serve.serving.worker.capture_connector import SemgradCaptureConnector

    monkeypatch.setenv(SECRET_ENV, SECRET.decode())  # the API server's and the engine's capture secret
    key = mint(SECRET)
    config = SimpleNamespace(kv_transfer_config=SimpleNamespace(is_kv_producer=True))
    scheduler = SemgradCaptureConnector(config, KVConnectorRole.SCHEDULER, None)
    prompt = list(range(10, 50))
    request = SimpleNamespace(
        request_id="r1",
        status=RequestStatus.FINISHED_STOPPED,
        kv_transfer_params={KV_PARAM: key},
        prompt_token_ids=prompt,
        num_computed_tokens=45,
        output_token_ids=[7, 8],
    )
    assert scheduler.request_finished(request, [1, 3]) == (True, None)
    meta = scheduler.build_connector_meta(SimpleNamespace())

    store = CaptureStore()
    store.prefix_length = lambda ids: 37
    forgotten: list[str] = []
    monkeypatch.setattr(capture_connector, "STORE", store)
    monkeypatch.setattr(capture_connector.RECORDER, "forget", forgotten.append)
    worker = SemgradCaptureConnector(config, KVConnectorRole.WORKER, None)
    worker.register_kv_caches(
        {f"model.layers.{i}.self_attn.attn": torch.zeros(6, 2, 32, 16, dtype=torch.uint8) for i in (0, 1)}
    )
    worker._layout, worker._layout_known = TOKEN_MAJOR, True  # a known layout: the dtype alone keeps it unread
    worker.bind_connector_metadata(meta)
    assert worker.get_finished(set()) == ({"r1"}, None)
    capture = store.get(key)
    assert capture is not None and capture.kv is None and "quantized" in capture.reason
    assert forgotten == ["r1"]

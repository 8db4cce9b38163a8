"""The serving pieces that need no server: vLLM's weight layout, the scoring service and its client, settings,
the serve command."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from semgrad_serve.cli import main
from semgrad_serve.errors import ItemError, SemgradError
from semgrad_serve.kernels import select_kernels
from semgrad_serve.model.weights import from_hf_model
from semgrad_serve.scoring.batch import score_batch
from semgrad_serve.scoring.items import PreparedItem
from semgrad_serve.serving.captures import CaptureStore
from semgrad_serve.serving.config import (
    CAPTURE_KV_TRANSFER_CONFIG,
    MAX_BATCH_ENV,
    PLUGIN_NAME,
    TEST_FAULT_MARKER,
    WORKER_EXTENSION,
    ScoringSettings,
)
from semgrad_serve.serving.scoring_client import SERVICE_GONE, ScoringClient
from semgrad_serve.serving.scoring_service import ScoringService
from semgrad_serve.serving.weights import from_vllm_model

from tiny_models import FAMILIES, random_items, tiny_model

# -- vLLM's module layout ----------------------------------------------------------------------------


def _padded(weight: torch.Tensor, rows: int = 7) -> torch.Tensor:
    """vLLM pads the vocabulary dimension of the embedding and head."""
    return torch.cat([weight, torch.full((rows, weight.shape[1]), float("nan"), dtype=weight.dtype)])


def vllm_layout(model: torch.nn.Module) -> SimpleNamespace:
    """The module tree vLLM builds for a Hugging Face model: fused qkv_proj and gate_up_proj, padded vocabulary."""

    def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(weight=weight, bias=bias)

    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        bias = None if attn.q_proj.bias is None else torch.cat([p.bias for p in projs])
        layers.append(
            SimpleNamespace(
                self_attn=SimpleNamespace(
                    qkv_proj=linear(torch.cat([p.weight for p in projs]), bias),
                    o_proj=linear(attn.o_proj.weight),
                    q_norm=getattr(attn, "q_norm", None),
                    k_norm=getattr(attn, "k_norm", None),
                ),
                mlp=SimpleNamespace(
                    gate_up_proj=linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    down_proj=linear(mlp.down_proj.weight),
                ),
                input_layernorm=layer.input_layernorm,
                post_attention_layernorm=layer.post_attention_layernorm,
            )
        )
    embed = linear(_padded(model.model.embed_tokens.weight))
    head = embed if model.config.tie_word_embeddings else linear(_padded(model.lm_head.weight))
    return SimpleNamespace(model=SimpleNamespace(embed_tokens=embed, layers=layers, norm=model.model.norm), lm_head=head)


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_layout_scores_equal_hugging_face_layout(family: str) -> None:
    model = tiny_model(family)
    band = range(3, 5)
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in random_items(4)]
    kernels = select_kernels("torch")
    expected = score_batch(from_hf_model(model), items, band, kernels)
    got = score_batch(from_vllm_model(vllm_layout(model), model.config), items, band, kernels)
    for ours, theirs in zip(got, expected):
        for key, value in theirs.scores().items():
            assert getattr(ours, key) == pytest.approx(value, rel=1e-12), key


def test_vllm_layout_errors_name_the_problem() -> None:
    model = tiny_model("llama-tied")
    layout = vllm_layout(model)
    layout.model.layers[2].self_attn.o_proj.weight = torch.empty(0)  # what vLLM leaves after repacking on CPU
    with pytest.raises(SemgradError, match="layer 2 o_proj in a packed or quantized form"):
        from_vllm_model(layout, model.config)
    del layout.model.layers[2].mlp
    with pytest.raises(SemgradError, match="module layout"):
        from_vllm_model(layout, model.config)
    with pytest.raises(SemgradError, match="'gemma2' is not supported"):
        from_vllm_model(layout, SimpleNamespace(model_type="gemma2"))


# -- the scoring service and its client ---------------------------------------------------------------


class FakeScore:
    """Scores each pair as its prompt's first id (plus 1000 when its prefix keys/values were given); fails a
    whole batch holding a negative id; records batch sizes; takes ``delay`` seconds per batch."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay = delay

    def __call__(self, pairs: list, prefixes: list) -> list[dict]:
        self.batches.append(len(pairs))
        time.sleep(self.delay)
        if any(p[0] < 0 for p, _ in pairs):
            raise RuntimeError("boom")
        return [{"semgrad": float(p[0] + (1000 if kv is not None else 0))} for (p, _), kv in zip(pairs, prefixes)]


def service_and_client(score: FakeScore, store: CaptureStore | None = None, max_batch: int = 8):
    service = ScoringService(score, store if store is not None else CaptureStore(), max_batch, cores=set())
    return service, ScoringClient(service.address, service.authkey, capture=True)


def score_concurrently(client: ScoringClient, jobs: list[tuple[str | None, list[int]]]) -> list[list[dict]]:
    async def go() -> list[list[dict]]:
        calls = [client.score(key, [([p], [1]) for p in prompts]) for key, prompts in jobs]
        return await asyncio.gather(*calls)

    return asyncio.run(go())


def test_service_batches_what_arrives_while_it_scores_and_keeps_each_answer_its_result() -> None:
    score = FakeScore(delay=0.2)
    _, client = service_and_client(score, max_batch=8)
    jobs = [(None, [i]) for i in range(12)] + [(None, [20, 21, 22])]
    results = score_concurrently(client, jobs)
    assert [[r["semgrad"] for r in rs] for rs in results] == [[i] for i in range(12)] + [[20, 21, 22]]
    assert sum(score.batches) == 15 and max(score.batches) <= 8 and len(score.batches) >= 2


def test_a_failing_request_does_not_sink_its_batch() -> None:
    """Two failing requests (one by the test seam the server tests use) in a batch of five: the others are scored."""
    from semgrad_serve.serving.worker import with_test_faults

    marked = SimpleNamespace(decode=lambda ids: TEST_FAULT_MARKER if 4 in ids else "a prompt")
    _, client = service_and_client(with_test_faults(FakeScore(delay=0.1), marked))
    results = score_concurrently(client, [(None, [0]), (None, [1]), (None, [-1]), (None, [3]), (None, [4])])
    assert [r[0].get("semgrad") for r in results] == [0, 1, None, 3, None]
    assert "scoring failed: boom" in results[2][0]["error"] and "injected" in results[4][0]["error"]


def test_answers_use_their_requests_capture_and_recompute_without_one(monkeypatch) -> None:
    """An answer waits for its request's capture (it arrives one engine step after the request ends) and
    runs over it; a capture of another prompt, one without keys/values, or none at all means recompute."""
    from semgrad_serve.serving import scoring_service

    monkeypatch.setattr(scoring_service, "CAPTURE_WAIT_S", 0.3)
    store = CaptureStore()
    store.prefix_length = lambda ids: 1
    _, client = service_and_client(FakeScore(), store)
    store.add("other-prompt", (9,), lambda n: torch.zeros(1))
    store.add("no-kv", (4,), None)

    async def go() -> list[list[dict]]:
        late = asyncio.create_task(client.score("late", [([5], [1]), ([5], [2])]))
        await asyncio.sleep(0.1)
        store.add("late", (5,), lambda n: torch.zeros(1))  # the capture lands after the answer arrived
        start = time.perf_counter()
        missing = await client.score("never", [([6], [1])])
        assert time.perf_counter() - start >= 0.3
        return [await late, missing, await client.score("other-prompt", [([7], [1])]), await client.score("no-kv", [([4], [1])])]

    late, missing, other, no_kv = asyncio.run(go())
    assert [r["semgrad"] for r in late] == [1005, 1005] and missing[0]["semgrad"] == 6
    assert other[0]["semgrad"] == 7 and no_kv[0]["semgrad"] == 4
    client.drop("late")
    deadline = time.monotonic() + 5
    while store.get("late") is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.get("late") is None and store.get("other-prompt") is not None


def test_answers_get_an_error_when_the_service_is_gone() -> None:
    service, client = service_and_client(FakeScore())
    assert score_concurrently(client, [(None, [2])]) == [[{"semgrad": 2.0}]]
    service._conn.close()  # the worker side of the connection goes away
    time.sleep(0.2)
    assert score_concurrently(client, [(None, [3]), (None, [4, 5])]) == [[{"error": SERVICE_GONE}], [{"error": SERVICE_GONE}] * 2]


# -- settings, reports, the serve command -------------------------------------------------------------


def test_settings_from_environment() -> None:
    settings = ScoringSettings(profile="/p.json", max_batch=4)
    assert ScoringSettings.from_env(settings.to_env()) == settings
    assert ScoringSettings.from_env({}) == ScoringSettings()
    with pytest.raises(SemgradError, match="must be a whole number"):
        ScoringSettings.from_env({MAX_BATCH_ENV: "many"})
    with pytest.raises(SemgradError, match="at least 1"):
        ScoringSettings.from_env({MAX_BATCH_ENV: "0"})


def test_answer_report_turns_nan_and_item_errors_into_errors(default_scorer) -> None:
    from semgrad_serve.serving.worker import REPORTED, answer_report

    scorer = default_scorer
    prompt = scorer.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    (result,) = scorer.score([(prompt, scorer.answer_ids("Paris."))])
    report = answer_report(scorer, result)
    assert tuple(report) == REPORTED and report["score"] == report["hybridgrad"] > 0
    broken = type(result)(**{**result.to_dict(), "semgrad": math.nan})
    assert answer_report(scorer, broken) == {"error": "scoring produced a non-finite value (NaN or inf)"}
    assert answer_report(scorer, ItemError("the answer is empty")) == {"error": "the answer is empty"}


def test_serve_command_line_and_environment(monkeypatch) -> None:
    from semgrad_serve.cli import build_parser
    from semgrad_serve.commands.serve import server_command, server_env

    args = build_parser().parse_args(["serve", "--port", "9000", "--", "--gpu-memory-utilization", "0.5"])
    command = server_command(args, Path("/m/tiny"), on_cpu=True)
    assert command[command.index("--worker-extension-cls") + 1] == WORKER_EXTENSION
    assert command[command.index("--kv-transfer-config") + 1] == CAPTURE_KV_TRANSFER_CONFIG
    assert command[command.index("--dtype") + 1] == "float32" and "--enforce-eager" in command
    assert command[-2:] == ["--gpu-memory-utilization", "0.5"]  # the user's vLLM options come last and win
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    env = server_env(ScoringSettings(max_batch=3))
    assert env["VLLM_PLUGINS"] == f"other,{PLUGIN_NAME}" and env[MAX_BATCH_ENV] == "3"


def test_serve_on_a_gpu_keeps_the_scoring_reserve_outside_vllm() -> None:
    """SmolLM2-135M in float32: 15 band layers × (12·576 + 2·3·64 + 4·1536) values × 4 bytes per token,
    × 4096 batch tokens, plus one 2^26-element head chunk (float32 + its float32 cast): 3.58 GiB of 80."""
    from semgrad_serve.cli import build_parser
    from semgrad_serve.commands.serve import server_command
    from semgrad_serve.model.default_model import default_model_dir

    args = build_parser().parse_args(["serve", "--dtype", "float32"])
    command = server_command(args, default_model_dir(), on_cpu=False, gpu_bytes=80 * 2**30)
    reserve = 15 * (12 * 576 + 2 * 3 * 64 + 4 * 1536) * 4 * 4096 + 2**26 * 8
    share = float(command[command.index("--gpu-memory-utilization") + 1])
    assert share == pytest.approx(0.9 - reserve / (80 * 2**30), abs=5e-4) and "--enforce-eager" not in command
    with pytest.raises(SemgradError, match="more than this GPU's 4 GiB allows"):
        server_command(args, default_model_dir(), on_cpu=False, gpu_bytes=4 * 2**30)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["serve", "--model", "/tmp"], "not a Hugging Face model directory"),
        (["serve", "--profile", "/nonexistent.json"], "cannot read profile"),
        (["serve", "--max-batch", "0"], "at least 1"),
        (["serve", "--", "--kv-transfer-config", "{}"], "runs its own KV connector"),
    ],
)
def test_serve_mistakes_print_one_line(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_data_parallel_is_refused_at_start_up() -> None:
    """With --data-parallel-size > 1 scoring would reach only engine 0: the plugin refuses to start."""
    from semgrad_serve.serving.plugin import SemgradPlugin

    class NoRpc:
        async def collective_rpc(self, *args: object, **kwargs: object) -> list:
            pytest.fail("no worker is asked to set up")

    state = SimpleNamespace()
    with pytest.raises(SemgradError, match="data-parallel size must be 1"):
        asyncio.run(SemgradPlugin().init_state(NoRpc(), state, SimpleNamespace(data_parallel_size=2)))


def test_a_foreign_kv_connector_is_refused_and_none_means_recompute() -> None:
    from semgrad_serve.serving.config import CAPTURE_CONNECTOR_MODULE
    from semgrad_serve.serving.worker import capture_state

    assert capture_state(None) is False
    assert capture_state(SimpleNamespace(kv_connector=None, kv_connector_module_path=None)) is False
    assert capture_state(SimpleNamespace(kv_connector="SemgradCaptureConnector", kv_connector_module_path=CAPTURE_CONNECTOR_MODULE))
    with pytest.raises(SemgradError, match="drop --kv-transfer-config"):
        capture_state(SimpleNamespace(kv_connector="LMCacheConnectorV1", kv_connector_module_path=None))

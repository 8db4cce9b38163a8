"""The serving pieces that need no server: vLLM's weight layout, the batcher, settings, the serve command."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from semgrad_serve.band_pass import PreparedItem
from semgrad_serve.cli import main
from semgrad_serve.errors import ItemError, SemgradError
from semgrad_serve.kernels import select_kernels
from semgrad_serve.scoring import score_batch
from semgrad_serve.vllm_ext.batcher import ScoringBatcher
from semgrad_serve.vllm_ext.config import MAX_BATCH_ENV, PLUGIN_NAME, WORKER_EXTENSION, ScoringSettings
from semgrad_serve.vllm_ext.weights import from_vllm_model
from semgrad_serve.weights import from_hf_model

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


# -- the batcher --------------------------------------------------------------------------------------


class FakeRpc:
    """Scores each pair as its prompt's first id; fails a whole batch holding a negative id; records batches."""

    def __init__(self, delay: float = 0.01) -> None:
        self.batches: list[int] = []
        self.in_flight = self.most_in_flight = 0
        self.delay = delay

    async def __call__(self, pairs: list, fault: bool) -> list[dict]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.batches.append(len(pairs))
        await asyncio.sleep(self.delay)
        self.in_flight -= 1
        if fault or any(p[0] < 0 for p, _ in pairs):
            raise RuntimeError("boom")
        return [{"semgrad": float(p[0])} for p, _ in pairs]


def run_concurrently(batcher: ScoringBatcher, prompts: list[int], faults: set[int] = frozenset()) -> list[dict]:
    async def one(i: int, prompt: int) -> dict:
        (result,) = await batcher.score([([prompt], [1])], i in faults)
        return result

    async def go() -> list[dict]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(go())


def test_batches_are_bounded_serial_and_keep_each_answer_its_result() -> None:
    rpc = FakeRpc()
    results = run_concurrently(ScoringBatcher(rpc, max_batch=8, max_wait_ms=50), list(range(20)))
    assert [r["semgrad"] for r in results] == list(range(20))
    assert rpc.batches == [8, 8, 4] and rpc.most_in_flight == 1


def test_a_failing_answer_does_not_sink_its_batch() -> None:
    rpc = FakeRpc()
    results = run_concurrently(ScoringBatcher(rpc, max_batch=8, max_wait_ms=50), [0, 1, -1, 3, 4], faults={4})
    assert [r.get("semgrad") for r in results] == [0, 1, None, 3, None]
    assert "scoring failed: boom" in results[2]["error"] and "boom" in results[4]["error"]
    assert rpc.batches == [5, 1, 1, 1, 1, 1]  # the failed batch, then each answer alone


def test_batches_wait_for_answers_still_being_generated_within_bounds() -> None:
    rpc = FakeRpc(delay=0.1)  # each batch takes 0.1 s, so the next one may wait up to 0.2 s after it

    async def generate_then_score(batcher: ScoringBatcher, prompt: int, seconds: float) -> float:
        with batcher.generating():
            await asyncio.sleep(seconds)
        (result,) = await batcher.score([([prompt], [1])])
        return result["semgrad"]

    async def go() -> None:
        batcher = ScoringBatcher(rpc, max_batch=8, max_wait_ms=5000)
        await batcher.score([([0], [1])])  # nothing generating: scored at once
        assert await asyncio.gather(generate_then_score(batcher, 1, 0), generate_then_score(batcher, 2, 0.1)) == [1, 2]
        assert rpc.batches == [1, 2]  # the first answer waited for the second
        start = time.perf_counter()
        assert await asyncio.gather(generate_then_score(batcher, 3, 0), generate_then_score(batcher, 4, 1.0)) == [3, 4]
        assert rpc.batches == [1, 2, 1, 1] and time.perf_counter() - start < 1.5  # waited 0.2 s, not for 4

        capped = ScoringBatcher(rpc, max_batch=8, max_wait_ms=50)
        await capped.score([([5], [1])])
        with capped.generating():  # a generation that never ends holds a batch for max_wait only
            start = time.perf_counter()
            await capped.score([([6], [1])])
            assert 0.05 + 0.1 <= time.perf_counter() - start < 0.2 + 0.1

    asyncio.run(go())


def test_cancelled_answers_are_not_scored() -> None:
    rpc = FakeRpc(delay=0.05)
    batcher = ScoringBatcher(rpc, max_batch=2, max_wait_ms=0)

    async def go() -> list[dict]:
        first = asyncio.create_task(batcher.score([([0], [1])]))
        await asyncio.sleep(0.01)  # the first batch is in flight; the next two wait
        dropped = asyncio.create_task(batcher.score([([1], [1])]))
        kept = asyncio.create_task(batcher.score([([2], [1])]))
        await asyncio.sleep(0)
        dropped.cancel()
        await first
        return await kept

    assert asyncio.run(go()) == [{"semgrad": 2.0}]
    assert rpc.batches == [1, 1]


# -- settings, reports, the serve command -------------------------------------------------------------


def test_settings_from_environment() -> None:
    settings = ScoringSettings(profile="/p.json", max_batch=4, max_wait_ms=2.5)
    assert ScoringSettings.from_env(settings.to_env()) == settings
    assert ScoringSettings.from_env({}) == ScoringSettings()
    with pytest.raises(SemgradError, match="must be numbers"):
        ScoringSettings.from_env({MAX_BATCH_ENV: "many"})
    with pytest.raises(SemgradError, match="at least 1"):
        ScoringSettings.from_env({MAX_BATCH_ENV: "0"})


def test_answer_report_turns_nan_and_item_errors_into_errors(default_scorer) -> None:
    from semgrad_serve.vllm_ext.worker import REPORTED, answer_report

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
    assert command[command.index("--dtype") + 1] == "float32" and "--enforce-eager" in command
    assert command[-2:] == ["--gpu-memory-utilization", "0.5"]  # the user's vLLM options come last and win
    assert "--enforce-eager" not in server_command(args, Path("/m/tiny"), on_cpu=False)
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    env = server_env(ScoringSettings(max_batch=3))
    assert env["VLLM_PLUGINS"] == f"other,{PLUGIN_NAME}" and env[MAX_BATCH_ENV] == "3"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["serve", "--model", "/tmp"], "not a Hugging Face model directory"),
        (["serve", "--profile", "/nonexistent.json"], "cannot read profile"),
        (["serve", "--max-batch", "0"], "at least 1"),
    ],
)
def test_serve_mistakes_print_one_line(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

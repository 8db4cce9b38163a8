"""Serving the families beyond the Llama layout, end to end: ``semgrad-serve serve`` on a small random Gemma-3
(sliding and full layers with their own rotaries, four norms per layer, tied head) and a small Qwen3-MoE (8 experts,
top 2, a dense layer between sparse ones; on CPU vLLM repacks the experts, which scoring reads where they lie),
and the Gemma-3 split over two tensor-parallel workers, queried with the official ``openai`` client. Every answer is
scored; its scores equal the offline scorer's over transformers' model (float32), and ``reused`` shows that the
prompt keys/values, band inputs and logits came from vLLM (under tensor parallelism each rank forms its own logits
rows). One server start per case (about a minute each on two cores)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import openai
import pytest
from test_serving import REQUEST_TIMEOUT_S, assert_prompts_served_as_offline

from semgrad_serve.scoring.scorer import Scorer
from semgrad_serve.testing.family_checkpoints import save_family_checkpoint
from semgrad_serve.testing.launch_server import checkout_env, semgrad_server

pytestmark = pytest.mark.slow  # starts a vLLM server per family

# (family, tensor-parallel size) per server
CASES = [("gemma3_text", 1), ("qwen3_moe", 1), ("gemma3_text", 2)]
ALL_REUSED = ["prompt_kv", "band_inputs", "logits"]
SHARDED_REUSED = ["prompt_kv", "band_inputs"]  # vLLM gathers the logits to rank 0 only


@pytest.fixture(scope="module", params=CASES, ids=[f"{family}-tp{size}" for family, size in CASES])
def family_server(request, tmp_path_factory) -> Iterator[tuple[str, str, Path, list[str]]]:
    """(served model name, server URL, checkpoint, what each answer reuses) of one case's server."""
    family, size = request.param
    name = family.replace("_", "-")
    model_dir = save_family_checkpoint(family, tmp_path_factory.mktemp(name) / name)
    env = checkout_env()
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # serve binds one core per worker itself
    args = [
        "--model",
        str(model_dir),
        "--max-batch",
        "4",
        "--tensor-parallel-size",
        str(size),
        "--",
        "--kv-cache-memory-bytes",
        str(256 << 20),
        "--max-model-len",
        "4096",
    ]
    log = tmp_path_factory.mktemp(f"{name}-server") / "server.log"
    with semgrad_server(log, *args, env=env) as server:
        yield name, server.url, model_dir, ALL_REUSED if size == 1 else SHARDED_REUSED


def test_served_scores_equal_offline_and_reuse_vllm(family_server: tuple[str, str, Path, list[str]]) -> None:
    """A short prompt and a ~1.5k-token one (far past Gemma-3's 32-token sliding window: its sliding layers' keys
    are read from blocks vLLM kept), two sampled answers each: every answer scored from what vLLM computed, equal to
    the offline scorer's recompute."""
    name, url, model_dir, reused = family_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    scorer = Scorer.from_pretrained(model_dir)
    assert_prompts_served_as_offline(client, name, scorer, reused)

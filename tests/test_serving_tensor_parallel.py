"""Serving with tensor parallelism, end to end: ``semgrad-serve serve --tensor-parallel-size 2`` on a small random
Llama (8 query heads, 4 key/value heads: one shard of each per worker; SmolLM2's tokenizer and chat template),
queried with the official ``openai`` client; every answer's scores equal the unsharded offline scorer's (float32).
The suite's one tensor-parallel server start (about a minute on two cores)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import openai
import pytest
import torch
from test_serving import REQUEST_TIMEOUT_S, ask, assert_prompts_served_as_offline, semgrad_of
from test_serving_live_claims import LIVE, assert_live, read
from transformers import LlamaConfig, LlamaForCausalLM

from semgrad_serve.model.loading import resolve_model
from semgrad_serve.scoring.scorer import Scorer
from semgrad_serve.testing.launch_server import checkout_env, semgrad_server

pytestmark = pytest.mark.slow  # starts a vLLM server with two workers

MODEL = "tiny-llama-tp"


def save_tiny_llama(target: Path) -> Path:
    """A random float32 Llama that splits over two ranks, with the default model's tokenizer and chat template."""
    source = resolve_model(None)
    vocab = len(json.loads((source / "tokenizer.json").read_text())["model"]["vocab"])
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,  # peaked enough that answers differ in confidence
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, target / name)
    return target


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tp") / MODEL)


@pytest.fixture(scope="module")
def tp_url(tiny_dir: Path, tmp_path_factory) -> Iterator[str]:
    env = checkout_env()
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # serve binds one core per worker itself
    args = [
        "--model",
        str(tiny_dir),
        "--tensor-parallel-size",
        "2",
        "--max-batch",
        "4",
        "--",
        "--kv-cache-memory-bytes",
        str(256 << 20),
        "--max-model-len",
        "4096",
    ]
    log = tmp_path_factory.mktemp("tp-server") / "server.log"
    with semgrad_server(log, *args, env=env) as server:
        text = server.log.read_text(errors="replace")
        assert "world_size=2" in text and "'tensor_parallel_size': 2" in text
        yield server.url


def test_two_workers_score_like_one(tp_url: str, tiny_dir: Path) -> None:
    """Short and ~1.5k-token prompts, two choices each: every rank scores its shards over its own KV heads and the
    band inputs recorded while generating; rank 0's answer equals the unsharded offline scores."""
    client = openai.OpenAI(base_url=f"{tp_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    scorer = Scorer.from_pretrained(tiny_dir)
    # the logits are not reused: each rank forms its own rows
    assert_prompts_served_as_offline(client, MODEL, scorer, ["prompt_kv", "band_inputs"])
    # a raw completion (t* falls back to the last prompt token) and scoring off, through the same workers
    response = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert semgrad_of(response.choices[0])["t_star_rule"] == "last_prompt_token"
    off = client.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=4, extra_body={"semgrad": False})
    assert semgrad_of(off.choices[0]) is None


# Sentences the random model is held to (vLLM's structured outputs): it writes none of its own.
SENTENCES = r"(?:[A-Z][a-z]{1,3}(?: [a-z]{1,3}){6}\. ){15}[A-Z][a-z]{1,3}(?: [a-z]{1,3}){6}\."


def test_live_claims_through_two_workers(tp_url: str, tiny_dir: Path) -> None:
    """Live claims with tensor parallelism: each rank scores its shards of a running answer's claims (recomputing
    the prompt: the other ranks do not see a running request's rows), sent while the answer streams and equal to
    the unsharded offline claims of the final answer; the finished answer is scored from what vLLM computed."""
    client = openai.OpenAI(base_url=f"{tp_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    scorer = Scorer.from_pretrained(tiny_dir)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ask("Tell me sixteen things."),
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={**LIVE, "structured_outputs": {"regex": SENTENCES}},
    )
    prompt, choices = read(stream)
    (got,) = choices.values()
    assert got.live_claims and len(got.final["claims"]) == 16, got.text
    assert_live(got, scorer, prompt, got.ids, reused=["prompt_kv", "band_inputs"])

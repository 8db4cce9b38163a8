"""Serving with data parallelism, end to end: ``semgrad-serve serve --data-parallel-size 2`` (default model, float32,
two vLLM engines, one CPU core each), queried with the official ``openai`` client: answers spread over both engines,
each scored by the engine that generated it over what that engine computed, equal to the offline scorer's scores.
The suite's one data-parallel server start (about a minute on two cores)."""

from __future__ import annotations

import asyncio
import os
from typing import Iterator

import httpx
import openai
import pytest
from test_serving import (
    ALL_REUSED,
    LONG_CONTEXT,
    MODEL,
    REQUEST_TIMEOUT_S,
    ask,
    assert_equals_offline,
    assert_scored,
    metrics,
    semgrad_of,
)

from semgrad_serve.commands.serve import cpu_thread_binding
from semgrad_serve.testing.launch_server import (
    RunningServer,
    checkout_env,
    semgrad_server,
)

pytestmark = pytest.mark.slow  # starts a vLLM server with two engines

ENGINES = 2
QUESTIONS = [
    "What is the capital of France?",
    "Who wrote the novel Moby-Dick?",
    "Name a planet of the solar system.",
    "What gas do plants take in?",
    f"{LONG_CONTEXT}\nHow many crates does the warehouse in district 3 store?",
    "What is 2 + 2?",
    "Which ocean is the largest?",
    "What is the boiling point of water in Celsius?",
]


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory) -> Iterator[RunningServer]:
    env = checkout_env()
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # serve binds one core per engine itself
    args = [
        "--dtype",
        "float32",
        "--data-parallel-size",
        str(ENGINES),
        "--max-batch",
        "4",
        "--",
        "--kv-cache-memory-bytes",
        str(256 << 20),
        "--max-model-len",
        "4096",
    ]
    log = tmp_path_factory.mktemp("dp-server") / "server.log"
    with semgrad_server(log, *args, env=env) as server:
        text = server.log.read_text(errors="replace")
        assert "EngineCore_DP0" in text and "EngineCore_DP1" in text
        yield server


def engine_counts(url: str, outcome: str = "scored") -> list[float]:
    found = metrics(url)
    return [found.get(f'semgrad_engine_answers_total{{engine="{e}",outcome="{outcome}"}}', 0.0) for e in range(ENGINES)]


def test_info_shows_each_engine_and_its_scoring_cores(dp_server: RunningServer) -> None:
    info = httpx.get(f"{dp_server.url}/v1/semgrad/info", timeout=30).json()
    assert info["data_parallel_size"] == ENGINES and info["capture"] and info["records"]
    cores = sorted(os.sched_getaffinity(0))
    groups = [{int(c) for c in g.split(",")} for g in cpu_thread_binding(ENGINES, cores).split("|")]
    # each engine's scoring thread runs beside its own generation, on the cores the other engine generates on
    engines = [{k: v for k, v in e.items() if k != "captures"} for e in info["engines"]]
    assert engines == [
        {"engine": e, "scoring_cores": sorted((set(cores) - groups[e]) or cores)} for e in range(ENGINES)
    ]
    # each engine's capture store, and the server's as their sum
    stores = [e["captures"] for e in info["engines"]]
    assert all(s is not None and s["captures"] >= 0 and s["bytes"] >= 0 for s in stores), stores
    assert info["captures"] == {k: sum(s[k] for s in stores) for k in stores[0]}


def test_answers_spread_over_both_engines_each_scored_equal_to_offline(
    dp_server: RunningServer, default_scorer
) -> None:
    before = engine_counts(dp_server.url)

    async def ask_all() -> list:
        async with openai.AsyncOpenAI(
            base_url=f"{dp_server.url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0
        ) as client:
            return await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=MODEL,
                        messages=ask(q),
                        max_tokens=24,
                        temperature=0,
                        extra_body={"return_token_ids": True},
                    )
                    for q in QUESTIONS
                )
            )

    for question, response in zip(QUESTIONS, asyncio.run(ask_all())):
        (choice,) = response.choices
        prompt_ids = response.model_extra["prompt_token_ids"]
        assert prompt_ids == default_scorer.prompt_ids(ask(question))
        assert_scored(semgrad_of(choice))
        # scored over the prompt keys/values, band inputs and logits of the engine that generated the answer
        assert_equals_offline(
            semgrad_of(choice), default_scorer, prompt_ids, choice.model_extra["token_ids"], ALL_REUSED
        )
    added = [after - b for after, b in zip(engine_counts(dp_server.url), before)]
    assert added == [len(QUESTIONS) / ENGINES] * ENGINES  # round-robin over the engines


def test_a_router_pins_requests_to_an_engine(dp_server: RunningServer, default_scorer) -> None:
    """vLLM's ``X-data-parallel-rank`` header picks the engine; scoring follows it. Out of range: a 400."""
    client = openai.OpenAI(base_url=f"{dp_server.url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    before = engine_counts(dp_server.url)
    prompt = default_scorer.tokenizer.apply_chat_template(
        ask("What is 3 + 4?"), add_generation_prompt=True, tokenize=False
    )
    for _ in range(2):
        response = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=1.0,
            seed=5,
            n=2,
            extra_body={"return_token_ids": True},
            extra_headers={"X-data-parallel-rank": "1"},
        )
        for choice in response.choices:
            prompt_ids, answer_ids = choice.model_extra["prompt_token_ids"], choice.model_extra["token_ids"]
            assert_equals_offline(semgrad_of(choice), default_scorer, prompt_ids, answer_ids, ALL_REUSED)
    assert [after - b for after, b in zip(engine_counts(dp_server.url), before)] == [0, 4]
    with pytest.raises(
        openai.BadRequestError, match="X-data-parallel-rank 2 is out of range: this server runs 2 engines"
    ):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_headers={"X-data-parallel-rank": "2"})


def test_responses_are_recomputed_on_an_engine_and_equal_offline(dp_server: RunningServer, default_scorer) -> None:
    """vLLM's Responses route picks its own engine, unseen by the route: the answer is scored without a capture."""
    client = openai.OpenAI(base_url=f"{dp_server.url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    before = sum(engine_counts(dp_server.url))
    question = "Tell me about Paris in two sentences."
    for _ in range(ENGINES):
        whole = client.responses.create(
            model=MODEL,
            input=question,
            max_output_tokens=40,
            temperature=0,
            extra_body={"enable_response_messages": True},
        )
        answer_ids = whole.model_extra["output_messages"][0]["tokens"]
        assert_equals_offline(
            whole.model_extra["semgrad"], default_scorer, default_scorer.prompt_ids(ask(question)), answer_ids, []
        )
    assert sum(engine_counts(dp_server.url)) == before + ENGINES

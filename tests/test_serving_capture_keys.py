"""Through the real server (the session's ``semgrad-serve serve``, conftest.py): a client cannot make the worker
hold memory it never asked to have scored. Client-set capture keys are refused with a 400 on every route, the
worker's capture store stays empty and vLLM's KV cache at its idle use, and scored requests before and after
still reuse their prompt's keys/values."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import psutil
import pytest
from test_serving import MODEL, REQUEST_TIMEOUT_S, ask, kv_usage_after_probe, semgrad_of

from semgrad_serve.serving.messages import KV_PARAM

pytestmark = pytest.mark.slow  # starts the vLLM server

FIELD = f"kv_transfer_params.{KV_PARAM}"
PROMPT_3000_WORDS = " ".join(
    ("the", "river", "carries", "stones", "down", "to", "sea")[i % 7] for i in range(3000)
)  # 3000 tokens


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)


def captures(base_url: str) -> dict[str, Any]:
    """What the worker's capture store holds, from ``/v1/semgrad/info``."""
    held = httpx.get(f"{base_url}/v1/semgrad/info", timeout=30).json()["captures"]
    assert held is not None, "the scoring service did not report its capture store"
    return held


def worker_rss_mib(pid: int) -> float:
    """Resident memory of vLLM's worker process (which holds the capture store), MiB."""
    [worker] = [p for p in psutil.Process(pid).children(recursive=True) if "Worker" in p.name()]
    return worker.memory_info().rss / 2**20


def reused(client: openai.OpenAI, question: str, **extra: Any) -> list[str]:
    response = client.chat.completions.create(
        model=MODEL, messages=ask(question), max_tokens=8, temperature=0, extra_body=extra or None
    )
    return semgrad_of(response.choices[0])["reused"]


def test_forged_capture_keys_are_refused_on_every_route_and_leave_the_worker_holding_nothing(
    served, client, base_url
) -> None:
    assert reused(client, "What is the capital of France?")[:1] == ["prompt_kv"]
    idle, before = kv_usage_after_probe(client, base_url), captures(base_url)
    assert (before["captures"], before["bytes"]) == (0, 0)
    rss_before = worker_rss_mib(served.pid)

    forged = {"semgrad": False, "kv_transfer_params": {KV_PARAM: "foreign-0"}}
    for i in range(12):  # the load of the issue: unscored, one token, 3000-word prompts
        forged["kv_transfer_params"][KV_PARAM] = f"foreign-{i}"
        with pytest.raises(openai.BadRequestError, match=FIELD) as refused:
            client.chat.completions.create(
                model=MODEL, messages=ask(f"{i} {PROMPT_3000_WORDS}"), max_tokens=1, extra_body=forged
            )
        assert refused.value.body["param"] == FIELD
    with pytest.raises(openai.BadRequestError, match=FIELD):
        client.completions.create(model=MODEL, prompt=PROMPT_3000_WORDS, max_tokens=1, extra_body=forged)
    with pytest.raises(openai.BadRequestError, match=FIELD):
        client.responses.create(model=MODEL, input=PROMPT_3000_WORDS, max_output_tokens=16, extra_body=forged)
    # vLLM's own routes that reach the engine, which SemGrad does not score
    for path, body in (
        (
            "/v1/messages",
            {
                "model": MODEL,
                "max_tokens": 1,
                "messages": ask(PROMPT_3000_WORDS),
                "kv_transfer_params": {KV_PARAM: "x"},
            },
        ),
        (
            "/inference/v1/generate",
            {
                "model": MODEL,
                "token_ids": [1, 2, 3],
                "sampling_params": {"max_tokens": 1, "extra_args": {"kv_transfer_params": {KV_PARAM: "x"}}},
            },
        ),
    ):
        response = httpx.post(f"{base_url}{path}", json=body, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 400 and response.json()["error"]["param"].endswith(FIELD), (path, response.text)
    # vLLM would hand this string to the engine in kv_transfer_params's place, where its scheduler calls .get on it
    with pytest.raises(openai.BadRequestError, match="vllm_xargs.kv_transfer_params must be an object"):
        client.chat.completions.create(
            model=MODEL,
            messages=ask("Hi!"),
            max_tokens=1,
            extra_body={"semgrad": False, "vllm_xargs": {"kv_transfer_params": "x"}},
        )
    assert httpx.get(f"{base_url}/health", timeout=30).status_code == 200

    after = captures(base_url)
    rss_after = worker_rss_mib(served.pid)
    print(
        f"\nworker resident memory around 12 forged-key requests: {rss_before:.0f} MiB -> {rss_after:.0f} MiB "
        f"({rss_after - rss_before:+.0f} MiB); capture store {before} -> {after}"
    )
    assert (after["captures"], after["bytes"]) == (0, 0)
    assert kv_usage_after_probe(client, base_url) == pytest.approx(idle, abs=1e-9)

    # The same key on a scored request is refused too: it can neither displace nor collide with the server's key.
    with pytest.raises(openai.BadRequestError, match=FIELD):
        client.chat.completions.create(
            model=MODEL, messages=ask("Hi!"), max_tokens=4, extra_body={"kv_transfer_params": {KV_PARAM: "x"}}
        )
    # Other kv_transfer_params go through, beside the server's own key.
    assert reused(client, "Name a planet.", kv_transfer_params={"note": "mine"})[:1] == ["prompt_kv"]
    assert reused(client, "What is the capital of Italy?")[:1] == ["prompt_kv"]


def test_a_request_whose_client_left_leaves_no_capture(client, base_url) -> None:
    """A stream abandoned after its first chunk: its route is done with the key before vLLM ends the request,
    so its capture, taken one engine step later, is refused instead of kept until it expires."""
    stream = client.chat.completions.create(
        model=MODEL, messages=ask("Write a long story."), max_tokens=200, stream=True
    )
    next(iter(stream))
    stream.close()
    time.sleep(2)  # vLLM aborts the request and the connector hands over its capture
    kv_usage_after_probe(client, base_url)  # a few more engine steps
    held = captures(base_url)
    assert (held["captures"], held["bytes"]) == (0, 0) and held["done_keys"] >= 1

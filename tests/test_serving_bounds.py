"""No request holds scoring hostage, through a real server: claims in bounded passes and up to a limit, short
answers scored between a long job's passes, a gone client's scoring dropped, every generating route scored or
marked, echo with ``max_tokens`` 0 unscored, ``/invocations`` behind the API key, a busy port in one line.

The server here is its own (``semgrad-serve serve --max-claims 3 --claims-per-pass 1 -- --api-key ...``), with the
test seams on: a prompt holding ``TEST_SLOW_MARKER`` makes each of its scoring passes slower, standing in for a
long answer's claims without the minutes of generation."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from typing import Iterator

import httpx
import openai
import pytest
from test_serving import EOS, MODEL, REQUEST_TIMEOUT_S, ask, assert_equals_offline, assert_scored, semgrad_of

from semgrad_serve.errors import SemgradError
from semgrad_serve.scoring.items import NOTHING_TO_SCORE
from semgrad_serve.serving.api_server.invocations_route import NOT_AUTHORIZED
from semgrad_serve.serving.api_server.unscored_routes import NOTE_HEADER, UNSCORED
from semgrad_serve.serving.settings import TEST_FAULTS_ENV, TEST_SLOW_MARKER
from semgrad_serve.serving.worker.extension import over_limit_error
from semgrad_serve.testing.launch_server import (
    RunningServer,
    checkout_env,
    semgrad_server,
    serve_command,
)

pytestmark = pytest.mark.slow  # starts the vLLM server

KEY = "bounds-test-key"
MAX_CLAIMS = 3
FOUR_SENTENCES = ask("Write five short sentences about cats.")  # the default model answers in four


@pytest.fixture(scope="module")
def bounded(tmp_path_factory) -> Iterator[RunningServer]:
    """A server with a claim limit of 3, every claim a pass of its own and one backward per seed (the smallest
    memory budget), and an API key."""
    log = tmp_path_factory.mktemp("bounds") / "server.log"
    env = checkout_env(**{TEST_FAULTS_ENV: "1"})
    args = [
        "--dtype",
        "float32",
        "--max-claims",
        str(MAX_CLAIMS),
        "--claims-per-pass",
        "1",
        "--claim-memory",
        "1",
        "--",
        "--kv-cache-memory-bytes",
        str(1 << 30),
        "--api-key",
        KEY,
    ]
    try:
        with semgrad_server(log, *args, env=env) as server:
            yield server
    except SemgradError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def client(bounded: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{bounded.url}/v1", api_key=KEY, timeout=REQUEST_TIMEOUT_S, max_retries=0)


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def log_lines(server: RunningServer, pattern: str) -> list[re.Match]:
    return list(re.finditer(pattern, server.log.read_text(errors="replace")))


def test_claims_are_scored_in_passes_up_to_the_limit(client, bounded, default_scorer) -> None:
    """Four claims, a limit of three: the first three in a pass each, equal to the offline scorer's claims (so the
    passes' reports were put together right), the fourth with the limit's error; the whole answer as without."""
    before = len(log_lines(bounded, r"scoring job \d+ in 3 passes"))
    response = client.chat.completions.create(
        model=MODEL,
        messages=FOUR_SENTENCES,
        max_tokens=100,
        temperature=0,
        extra_body={"return_token_ids": True, "semgrad": {"claims": True}},
    )
    (choice,) = response.choices
    prompt_ids, answer_ids = response.model_extra["prompt_token_ids"], choice.model_extra["token_ids"]
    semgrad = semgrad_of(choice)
    assert_equals_offline({k: v for k, v in semgrad.items() if k != "claims"}, default_scorer, prompt_ids, answer_ids)
    (offline,) = default_scorer.score([(prompt_ids, answer_ids)], claims=True)
    expected = default_scorer.report(offline)["claims"]
    assert len(expected) > MAX_CLAIMS and len(semgrad["claims"]) == len(expected)
    for got, want in zip(semgrad["claims"][:MAX_CLAIMS], expected):
        assert (got["text"], got["token_start"], got["token_end"]) == (
            want["text"],
            want["token_start"],
            want["token_end"],
        )
        for key in ("semgrad", "paragrad", "hybridgrad", "mean_entropy", "confidence"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), key
    for got, want in zip(semgrad["claims"][MAX_CLAIMS:], expected[MAX_CLAIMS:]):
        assert got == {
            "text": want["text"],
            "token_start": want["token_start"],
            "token_end": want["token_end"],
            "error": over_limit_error(MAX_CLAIMS),
        }
    assert semgrad["claims"][-1]["token_end"] == len(answer_ids) and answer_ids[-1] == EOS
    assert len(log_lines(bounded, r"scoring job \d+ in 3 passes")) == before + 1


def test_a_short_answer_is_scored_beside_a_long_claims_job(bounded) -> None:
    """A slow claims job (three passes of seconds each) and, once it is being scored, a short scored request: the
    short one is answered first (scored beside it, not behind it), and the long one still gets all its claims."""
    long_messages = ask(f"{TEST_SLOW_MARKER}: write five short sentences about cats.")

    async def go() -> tuple[list[str], dict, dict]:
        finished: list[str] = []
        async with httpx.AsyncClient(
            base_url=f"{bounded.url}/v1", headers=headers(), timeout=REQUEST_TIMEOUT_S
        ) as http:

            async def chat(name: str, messages: list, max_tokens: int, options: dict) -> dict:
                body = {
                    "model": MODEL,
                    "messages": messages,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "semgrad": options,
                }
                response = (await http.post("/chat/completions", json=body)).json()
                finished.append(name)
                return response

            passes = len(log_lines(bounded, r"scoring job \d+ in \d+ passes"))
            long = asyncio.create_task(chat("long", long_messages, 100, {"claims": True}))
            while len(log_lines(bounded, r"scoring job \d+ in \d+ passes")) == passes:  # its passes are queued
                await asyncio.sleep(0.05)
            short = await chat("short", ask("Name a planet."), 8, True)
            return finished, await long, short

    finished, long, short = asyncio.run(go())
    assert finished == ["short", "long"]
    assert_scored(short["choices"][0]["semgrad"])
    claims = long["choices"][0]["semgrad"]["claims"]
    assert len(claims) > MAX_CLAIMS and all("semgrad" in c for c in claims[:MAX_CLAIMS])


def test_a_client_that_leaves_drops_its_scoring(client, bounded) -> None:
    """A client that leaves while its slow claims job is scored: the worker drops the passes not yet run, and the
    server goes on scoring other requests."""
    messages = ask(f"{TEST_SLOW_MARKER}: write five short sentences about cats, once more.")
    body = {"model": MODEL, "messages": messages, "max_tokens": 100, "temperature": 0, "semgrad": {"claims": True}}
    passes = len(log_lines(bounded, r"scoring job \d+ in 3 passes"))
    gone = len(log_lines(bounded, r"client of scoring job \d+ has gone"))

    async def leave_while_scored() -> None:
        async with httpx.AsyncClient(
            base_url=f"{bounded.url}/v1", headers=headers(), timeout=REQUEST_TIMEOUT_S
        ) as http:
            request = asyncio.create_task(http.post("/chat/completions", json=body))
            while len(log_lines(bounded, r"scoring job \d+ in 3 passes")) == passes:  # generated, now being scored
                await asyncio.sleep(0.05)
            request.cancel()  # the connection closes: the client has gone
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(leave_while_scored())
    deadline = time.monotonic() + 30
    while len(log_lines(bounded, r"client of scoring job \d+ has gone")) == gone and time.monotonic() < deadline:
        time.sleep(0.2)
    (dropped,) = log_lines(bounded, r"client of scoring job \d+ has gone: (\d+) of its (\d+) passes dropped")[gone:]
    assert 1 <= int(dropped[1]) <= int(dropped[2]) <= 3
    response = client.chat.completions.create(model=MODEL, messages=ask("Name a color."), max_tokens=8, temperature=0)
    assert_scored(semgrad_of(response.choices[0]))


def test_echo_with_max_tokens_0_scores_nothing(client) -> None:
    """The user receives the prompt and no generated token: nothing is scored."""
    response = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=0, echo=True, temperature=0
    )
    (choice,) = response.choices
    assert choice.text == "The capital of France is"
    assert semgrad_of(choice) == {"error": NOTHING_TO_SCORE}


def test_invocations_are_scored_and_need_the_api_key(bounded, default_scorer) -> None:
    """SageMaker's /invocations: chat and completions bodies are scored as on /v1; without the key, refused."""
    chat = {
        "model": MODEL,
        "messages": ask("What is the capital of France?"),
        "max_tokens": 16,
        "temperature": 0,
        "return_token_ids": True,
    }
    refused = httpx.post(f"{bounded.url}/invocations", json=chat, timeout=REQUEST_TIMEOUT_S)
    assert refused.status_code == 401 and refused.json() == {"error": NOT_AUTHORIZED}
    assert (
        httpx.post(
            f"{bounded.url}/invocations", json=chat, headers={"Authorization": "Bearer wrong"}, timeout=60
        ).status_code
        == 401
    )
    body = httpx.post(f"{bounded.url}/invocations", json=chat, headers=headers(), timeout=REQUEST_TIMEOUT_S).json()
    (choice,) = body["choices"]
    assert_scored(choice["semgrad"])
    assert_equals_offline(choice["semgrad"], default_scorer, body["prompt_token_ids"], choice["token_ids"])
    completion = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    body = httpx.post(
        f"{bounded.url}/invocations", json=completion, headers=headers(), timeout=REQUEST_TIMEOUT_S
    ).json()
    assert_scored(body["choices"][0]["semgrad"])
    assert body["choices"][0]["token_ids"] is None  # hidden, as on /v1, unless asked for


def test_unscored_generating_routes_say_so(bounded) -> None:
    """/v1/messages and batch chat generate but are not scored: their responses say why (body and header)."""
    messages = httpx.post(
        f"{bounded.url}/v1/messages",
        headers=headers(),
        timeout=REQUEST_TIMEOUT_S,
        json={"model": MODEL, "max_tokens": 8, "messages": ask("Name a planet.")},
    )
    assert messages.status_code == 200 and messages.json()["content"][0]["text"]
    assert messages.json()["semgrad"] == {"error": UNSCORED["/v1/messages"]}
    assert messages.headers[NOTE_HEADER] == UNSCORED["/v1/messages"]
    batch = httpx.post(
        f"{bounded.url}/v1/chat/completions/batch",
        headers=headers(),
        timeout=REQUEST_TIMEOUT_S,
        json={"model": MODEL, "max_tokens": 8, "messages": [ask("Name a planet."), ask("Name a color.")]},
    )
    assert batch.status_code == 200, batch.text
    assert batch.headers[NOTE_HEADER] == UNSCORED["/v1/chat/completions/batch"]
    assert batch.json()["semgrad"] == {"error": UNSCORED["/v1/chat/completions/batch"]}


def test_a_busy_port_is_one_line(bounded) -> None:
    """A second server on the port of a running one, or of any listening socket: one line naming the port."""
    port = int(bounded.url.rsplit(":", 1)[1])
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        for busy in (port, other.getsockname()[1]):
            done = subprocess.run(serve_command(busy), capture_output=True, text=True, timeout=120)
            assert done.returncode == 2 and done.stdout == ""
            assert done.stderr.splitlines() == [
                f"semgrad-serve serve: error: cannot listen on 127.0.0.1 port {busy}: Address already in use; "
                "stop the server there or choose another --port"
            ]

"""Live claims through the real server (``"semgrad": {"claims": "live"}``), read with the official ``openai``
client's streaming: each sentence's scores arrive in the stream before the answer ends, in order, and equal
``score --claims`` on the final answer; n = 2, a stop string, one sentence, a cut at max_tokens, completions; a
client that leaves after a flagged claim leaves nothing held. One server for the session (conftest's ``served``)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from test_serving import (
    ALL_REUSED,
    MODEL,
    REQUEST_TIMEOUT_S,
    ask,
    assert_claims_equal_offline,
    assert_equals_offline,
    kv_usage_after_probe,
    semgrad_of,
)

from conftest import CLAIM_FIELDS

pytestmark = pytest.mark.slow  # starts the vLLM server

LIVE = {"return_token_ids": True, "semgrad": {"claims": "live"}}
PARIS = ask("Tell me about Paris in three sentences.")


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)


@dataclass
class Streamed:
    """One choice of a streamed request, as its client saw it."""

    ids: list[int] = field(default_factory=list)
    text: str = ""
    live: list[tuple[int, list[dict[str, Any]]]] = field(default_factory=list)  # (chunk number, claims)
    texts_at: list[int] = field(default_factory=list)  # chunk numbers that carried text
    final: dict[str, Any] | None = None
    final_at: int = -1
    finish_reason: str | None = None

    @property
    def live_claims(self) -> list[dict[str, Any]]:
        return [c for _, claims in self.live for c in claims]


def read(stream: Any) -> tuple[list[int], dict[int, Streamed]]:
    """The prompt ids and each choice of a stream of chat or completions chunks."""
    prompt, choices = [], {}
    for number, chunk in enumerate(stream):
        prompt = (chunk.model_extra or {}).get("prompt_token_ids") or prompt
        for c in chunk.choices:
            got = choices.setdefault(c.index, Streamed())
            prompt = (c.model_extra or {}).get("prompt_token_ids") or prompt
            got.ids += (c.model_extra or {}).get("token_ids") or []
            text = c.delta.content if hasattr(c, "delta") else c.text
            if text:
                got.text += text
                got.texts_at.append(number)
            semgrad = semgrad_of(c)
            if c.finish_reason is not None:
                got.final, got.final_at, got.finish_reason = semgrad, number, c.finish_reason
            elif semgrad is not None:
                assert list(semgrad) == ["claims"] and not text, semgrad
                got.live.append((number, semgrad["claims"]))
    return prompt, choices


def assert_live(
    got: Streamed,
    scorer: Any,
    prompt: list[int],
    answer: list[int],
    live_before_text: bool = True,
    reused: list[str] = ALL_REUSED,
) -> None:
    """Live claims came before the final chunk, in order, each once; the final chunk's claims begin with them, equal
    and all of them equal ``score --claims`` on the final answer; the whole answer's scores equal the offline ones
    (``reused``: what the final answer's scoring took from vLLM)."""
    live = got.live_claims
    assert got.final is not None and "error" not in got.final, got.final
    assert all(number < got.final_at for number, _ in got.live)
    assert [c["token_start"] for c in live] == [0, *[c["token_end"] for c in live[:-1]]]  # in order, consecutive
    assert all(list(c) == list(CLAIM_FIELDS) for c in live)
    assert got.final["claims"][: len(live)] == live  # the very same numbers
    assert len(got.final["claims"]) > len(live)  # the last claim (with the stop token, if any) comes at the end
    if live_before_text:  # not held back: the first claim's scores came while the answer was still streaming
        assert got.live and got.live[0][0] < got.texts_at[-1]
    if len(got.final["claims"]) >= 2:
        assert_claims_equal_offline(got.final, scorer, prompt, answer)
    assert_equals_offline({k: v for k, v in got.final.items() if k != "claims"}, scorer, prompt, answer, reused)


def test_live_claims_arrive_while_streaming_and_equal_the_final_answers(client, default_scorer) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=PARIS, max_tokens=120, temperature=0, stream=True, extra_body=LIVE
    )
    prompt, choices = read(stream)
    (got,) = choices.values()
    assert len(got.live_claims) >= 2 and got.finish_reason == "stop"
    assert_live(got, default_scorer, prompt, got.ids)
    assert " ".join(c["text"] for c in got.final["claims"]) == got.text.strip()


def test_live_claims_of_two_choices_and_of_completions(client, default_scorer) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=PARIS, max_tokens=90, temperature=1.0, seed=7, n=2, stream=True, extra_body=LIVE
    )
    prompt, choices = read(stream)
    assert sorted(choices) == [0, 1] and choices[0].ids != choices[1].ids
    for got in choices.values():
        assert_live(got, default_scorer, prompt, got.ids, live_before_text=False)
    assert any(got.live for got in choices.values())
    stream = client.completions.create(
        model=MODEL,
        prompt="Facts about the Moon. The Moon orbits the Earth.",
        max_tokens=80,
        temperature=0,
        stream=True,
        extra_body=LIVE,
    )
    prompt, (got,) = read_all(stream)
    assert got.live
    assert_live(got, default_scorer, prompt, got.ids, live_before_text=False)


def test_a_stop_string_one_sentence_and_a_cut_at_max_tokens(client, default_scorer) -> None:
    """A stop string in the third sentence (the tokens the user does not receive are not scored); an answer of one
    sentence (no live claim, its claim at the end); an answer cut mid-sentence (its last claim scored at the end)."""
    whole = client.chat.completions.create(
        model=MODEL,
        messages=PARIS,
        max_tokens=120,
        temperature=0,
        extra_body={"return_token_ids": True, "semgrad": {"claims": "live"}},
    )
    claims = semgrad_of(whole.choices[0])["claims"]  # without stream, "live" is "true"
    assert len(claims) >= 3
    stop_word = claims[2]["text"].split()[2]
    prompt, (got,) = read_all(
        client.chat.completions.create(
            model=MODEL, messages=PARIS, max_tokens=120, temperature=0, stop=[stop_word], stream=True, extra_body=LIVE
        )
    )
    assert got.finish_reason == "stop" and not got.final["stop_token"] and stop_word not in got.text
    assert got.final["claims"][-1]["token_end"] < len(got.ids)  # the stop string's tokens are not scored
    assert_live(got, default_scorer, prompt, got.ids[: got.final["claims"][-1]["token_end"]], live_before_text=False)

    prompt, (got,) = read_all(
        client.chat.completions.create(
            model=MODEL,
            messages=ask("Say hello."),
            max_tokens=40,
            temperature=0,
            stop=[".", "!", "?", "\n"],
            stream=True,
            extra_body=LIVE,
        )
    )
    assert got.live == [] and len(got.final["claims"]) == 1 and got.final["claims"][0]["text"] == got.text.strip()
    answer = got.ids[: got.final["claims"][0]["token_end"]]  # the stop string's tokens cut
    assert_equals_offline({k: v for k, v in got.final.items() if k != "claims"}, default_scorer, prompt, answer)

    cut = claims[1]["token_start"] + 4  # four tokens into the second sentence
    prompt, (got,) = read_all(
        client.chat.completions.create(
            model=MODEL, messages=PARIS, max_tokens=cut, temperature=0, stream=True, extra_body=LIVE
        )
    )
    assert got.finish_reason == "length" and len(got.ids) == cut and not got.final["stop_token"]
    assert [c["text"] for c in got.live_claims] == [claims[0]["text"]]
    assert got.final["claims"][-1]["token_end"] == cut
    assert_live(got, default_scorer, prompt, got.ids, live_before_text=False)


def read_all(stream: Any) -> tuple[list[int], list[Streamed]]:
    prompt, choices = read(stream)
    return prompt, [choices[i] for i in sorted(choices)]


def test_a_bad_live_value_is_a_one_line_400(client) -> None:
    with pytest.raises(openai.BadRequestError, match='"claims" also "live"'):
        client.chat.completions.create(
            model=MODEL, messages=PARIS, max_tokens=4, stream=True, extra_body={"semgrad": {"claims": "later"}}
        )


def test_a_client_that_leaves_after_a_flagged_claim_leaves_nothing_held(client, base_url) -> None:
    """The client closes the stream at the first flagged live claim (at the first live claim where none is
    flagged): generation stops, its live jobs are dropped, and KV-cache usage returns to idle."""
    idle = kv_usage_after_probe(client, base_url)

    async def leave() -> tuple[int, int]:
        async with openai.AsyncOpenAI(
            base_url=f"{base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0
        ) as aclient:
            stream = await aclient.chat.completions.create(
                model=MODEL,
                messages=ask("Write a long story about a dragon, in many sentences."),
                max_tokens=400,
                temperature=0,
                stream=True,
                extra_body=LIVE,
            )
            tokens, live = 0, 0
            async for chunk in stream:
                for c in chunk.choices:
                    tokens += len((c.model_extra or {}).get("token_ids") or [])
                    claims = (semgrad_of(c) or {}).get("claims") or []
                    live += bool(claims) and c.finish_reason is None
                    if claims and c.finish_reason is None and (any(claim["flagged"] for claim in claims) or live == 2):
                        await stream.close()
                        return tokens, live
            return tokens, 0

    tokens, live = asyncio.run(leave())
    assert live and tokens < 400  # it left mid-answer, after a live claim
    time.sleep(3)
    assert kv_usage_after_probe(client, base_url) == pytest.approx(idle, abs=1e-9)
    assert httpx.get(f"{base_url}/v1/semgrad/info", timeout=30).json()["captures"]["captures"] == 0  # its key dropped

"""The vLLM server with SemGrad scoring, end to end: one real ``semgrad-serve serve`` process (default model,
float32, CPU settings; the session's ``base_url`` in conftest.py, shared with test_serving_page.py), queried with
the official ``openai`` client."""

from __future__ import annotations

import asyncio
import os
import re
import time
from typing import Any

import httpx
import openai
import pytest

from semgrad_serve.errors import ItemError
from semgrad_serve.scoring.items import NOTHING_TO_SCORE
from semgrad_serve.scoring.semgrad_object import SERVED_FIELDS
from semgrad_serve.serving.settings import TEST_FAULT_MARKER

from conftest import CLAIM_FIELDS

MODEL = "smollm2-135m-instruct"  # the served name of the default model
REQUEST_TIMEOUT_S = 180
SCORE_KEYS = ("semgrad", "paragrad", "hybridgrad", "mean_entropy", "score")
EOS = 2  # <|im_end|>, the default model's end-of-turn token

pytestmark = pytest.mark.slow  # starts the vLLM server


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)


def semgrad_of(choice: Any) -> dict[str, Any] | None:
    return (choice.model_extra or {}).get("semgrad")


def assert_scored(semgrad: dict[str, Any] | None) -> None:
    assert semgrad is not None and tuple(semgrad) == SERVED_FIELDS + ("stop_token",), semgrad
    assert all(semgrad[k] > 0 for k in SCORE_KEYS) and semgrad["score"] == semgrad["hybridgrad"]
    assert 0 < semgrad["confidence"] < 1 and semgrad["flagged"] == (semgrad["confidence"] < semgrad["min_confidence"])


ALL_REUSED = ["prompt_kv", "band_inputs", "logits"]


def assert_equals_offline(
    semgrad: dict[str, Any], scorer, prompt_ids: list[int], answer_ids: list[int], reused: list[str] = ALL_REUSED
) -> None:
    """The served scores (over what vLLM computed: the prompt keys/values, band inputs, logits) equal the offline
    scorer's recompute."""
    assert semgrad["reused"] == reused, semgrad
    (offline,) = scorer.score([(prompt_ids, answer_ids)])
    assert not isinstance(offline, ItemError), offline
    expected = scorer.report(offline)
    for key in SCORE_KEYS:
        assert semgrad[key] == pytest.approx(expected[key], rel=1e-4), key
    assert semgrad["flagged"] == expected["flagged"] and semgrad["threshold"] == expected["threshold"]
    if expected["confidence"] is None:  # a profile without a calibration (a random model's)
        assert semgrad["confidence"] is None
    else:  # the calibrated confidence of the built-in profile, from the served answer's own scores and length
        assert (
            semgrad["confidence"] == pytest.approx(expected["confidence"], rel=1e-4) and 0 < semgrad["confidence"] < 1
        )
        assert semgrad["min_confidence"] == expected["min_confidence"] is not None
        assert semgrad["flagged"] == (semgrad["confidence"] < semgrad["min_confidence"])
    assert semgrad["stop_token"] == offline.stop_token == (answer_ids[-1] == EOS)


def assert_ids_follow_finish(ids: list[int], finish_reason: str, max_tokens: int) -> None:
    """vLLM's token ids end on the EOS token when generation stopped on it, and have none when cut at the limit."""
    if finish_reason == "stop":
        assert ids[-1] == EOS and EOS not in ids[:-1], ids
    else:
        assert finish_reason == "length" and len(ids) == max_tokens and EOS not in ids, (finish_reason, ids)


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def metrics(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(semgrad_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def kv_usage_after_probe(client: openai.OpenAI, base_url: str) -> float:
    """vLLM's KV-cache usage reported while one fixed unscored request ran (the gauge updates on engine steps)."""
    client.chat.completions.create(
        model=MODEL, messages=ask("Say OK."), max_tokens=2, temperature=0, extra_body={"semgrad": False}
    )
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return float(re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", text, re.M)[1])


# -- tests ----------------------------------------------------------------------------------------------


# ~1.5k prompt tokens: a retrieved context before the question
LONG_CONTEXT = " ".join(
    f"Fact {i}: the warehouse in district {i % 17} stores {i * 7} crates of item {i * 13 % 101}." for i in range(70)
)


def assert_prompts_served_as_offline(client: openai.OpenAI, model: str, scorer, reused: list[str]) -> None:
    """A short prompt and a ~1.5k-token one, two sampled answers each: every answer scored from what vLLM computed
    (``reused``), equal to the offline scorer's recompute (1e-4)."""
    for question in ("What is the capital of France?", f"{LONG_CONTEXT}\nHow many crates does district 3 store?"):
        messages = ask(question)
        response = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=12,
            temperature=1.0,
            seed=3,
            n=2,
            extra_body={"return_token_ids": True},
        )
        prompt_ids = response.model_extra["prompt_token_ids"]
        assert prompt_ids == scorer.prompt_ids(messages)
        for choice in response.choices:
            semgrad = semgrad_of(choice)
            assert semgrad is not None and "error" not in semgrad, semgrad
            assert semgrad["reused"] == reused, semgrad
            (offline,) = scorer.score([(prompt_ids, choice.model_extra["token_ids"])])
            assert not isinstance(offline, ItemError), offline
            expected = scorer.report(offline)
            for key in SCORE_KEYS:
                assert semgrad[key] == pytest.approx(expected[key], rel=1e-4), key


def test_chat_scores_equal_the_offline_scorer(client, default_scorer) -> None:
    """Short and ~1.5k-token prompts: scored over the prompt keys/values vLLM computed, equal to the offline
    scorer's recompute of them."""
    for question in (
        "What is the capital of France?",
        "Who wrote the novel Moby-Dick? Answer in one sentence.",
        f"{LONG_CONTEXT}\nHow many crates does the warehouse in district 3 store?",
    ):
        messages = ask(question)
        response = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=32, temperature=0, extra_body={"return_token_ids": True}
        )
        (choice,) = response.choices
        prompt_ids = response.model_extra["prompt_token_ids"]
        assert prompt_ids == default_scorer.prompt_ids(messages)  # vLLM templates and tokenizes as the scorer does
        assert_scored(semgrad_of(choice))
        assert_ids_follow_finish(choice.model_extra["token_ids"], choice.finish_reason, 32)
        assert_equals_offline(semgrad_of(choice), default_scorer, prompt_ids, choice.model_extra["token_ids"])
    assert len(prompt_ids) > 1400
    # Without return_token_ids the ids stay hidden, as vLLM renders them.
    response = client.chat.completions.create(model=MODEL, messages=ask("Name a planet."), max_tokens=8, temperature=0)
    assert response.model_extra["prompt_token_ids"] is None and response.choices[0].model_extra["token_ids"] is None
    assert_scored(semgrad_of(response.choices[0]))


def test_completions_are_scored(client, default_scorer) -> None:
    messages = ask("What is 2 + 2?")
    prompt = default_scorer.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body={"return_token_ids": True}
    )
    (choice,) = response.choices
    assert choice.finish_reason == "stop"
    assert_ids_follow_finish(choice.model_extra["token_ids"], choice.finish_reason, 16)
    assert_equals_offline(
        semgrad_of(choice), default_scorer, choice.model_extra["prompt_token_ids"], choice.model_extra["token_ids"]
    )

    assert semgrad_of(choice)["t_star_rule"] == "template"


def test_a_raw_completions_prompt_falls_back_to_its_last_token(client, default_scorer) -> None:
    """A prompt without the chat template's t* token (vLLM's benchmark client sends such prompts): t* is its last
    token, the response says so, and the scores equal the offline scorer's with the same rule."""
    response = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, extra_body={"return_token_ids": True}
    )
    (choice,) = response.choices
    semgrad, prompt_ids = semgrad_of(choice), choice.model_extra["prompt_token_ids"]
    assert choice.text and semgrad["t_star_rule"] == "last_prompt_token"
    assert_equals_offline(semgrad, default_scorer, prompt_ids, choice.model_extra["token_ids"])
    assert default_scorer.prepare(prompt_ids, choice.model_extra["token_ids"]).t_star == len(prompt_ids) - 1


def test_echo_is_scored_with_the_text_vllm_echoes(client, default_scorer) -> None:
    """Completions with echo: scored as without it, the prompt text still echoed (vLLM leaves it out when it returns
    ids); chat with echo (a continued assistant message): the generated tokens scored after the prompt that holds it."""
    prompt = "Once upon a time"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0]
    for stream in (False, True):
        echoed = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True, stream=stream
        )
        choices = [c for chunk in echoed for c in chunk.choices] if stream else echoed.choices
        assert "".join(c.text for c in choices) == prompt + plain.text
        assert semgrad_of(choices[-1]) == semgrad_of(plain)

    messages = [ask("What is the capital of France?")[0], {"role": "assistant", "content": "The capital"}]
    extra = {"add_generation_prompt": False, "continue_final_message": True, "echo": True}
    without_ids = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, extra_body=extra
    ).choices[0]
    response = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, extra_body={**extra, "return_token_ids": True}
    )
    (choice,) = response.choices
    assert choice.message.content.startswith("The capital") and without_ids.message.content == choice.message.content
    prompt_ids = response.model_extra["prompt_token_ids"]
    assert default_scorer.tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\nThe capital")
    assert_equals_offline(semgrad_of(choice), default_scorer, prompt_ids, choice.model_extra["token_ids"])
    assert semgrad_of(without_ids) == semgrad_of(choice)
    # echo asks vLLM for the prompt's logprobs, computed after the answer's logits: only the latter are reused
    asked = client.chat.completions.create(
        model=MODEL,
        messages=messages[:1],
        max_tokens=16,
        temperature=0,
        extra_body={"return_token_ids": True, "prompt_logprobs": 0},
    )
    choice = asked.choices[0]
    assert_equals_offline(
        semgrad_of(choice), default_scorer, asked.model_extra["prompt_token_ids"], choice.model_extra["token_ids"]
    )


def test_streaming_n2_scores_each_choice_in_its_final_chunk(client, default_scorer) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ask("Name three colors."),
        max_tokens=24,
        temperature=1.0,
        seed=7,
        n=2,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    prompt_ids, answers, scored, finish = None, {0: [], 1: []}, {}, {}
    for chunk in stream:
        prompt_ids = chunk.model_extra.get("prompt_token_ids") or prompt_ids
        for choice in chunk.choices:
            answers[choice.index] += choice.model_extra.get("token_ids") or []
            if semgrad_of(choice) is not None:
                assert choice.finish_reason is not None and choice.index not in scored
                scored[choice.index], finish[choice.index] = semgrad_of(choice), choice.finish_reason
            else:
                assert choice.finish_reason is None
    assert sorted(scored) == [0, 1] and answers[0] != answers[1]
    for index, semgrad in scored.items():
        assert_ids_follow_finish(answers[index], finish[index], 24)
        assert_equals_offline(semgrad, default_scorer, prompt_ids, answers[index])


def test_n2_scores_every_choice(client, default_scorer) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=ask("Tell me a fun fact."),
        max_tokens=24,
        temperature=1.0,
        seed=3,
        n=2,
        extra_body={"return_token_ids": True},
    )
    assert len(response.choices) == 2
    for choice in response.choices:
        assert_ids_follow_finish(choice.model_extra["token_ids"], choice.finish_reason, 24)
        assert_equals_offline(
            semgrad_of(choice),
            default_scorer,
            response.model_extra["prompt_token_ids"],
            choice.model_extra["token_ids"],
        )


def test_a_prefix_cache_hit_past_t_star_scores_through_every_layer(client, default_scorer) -> None:
    """The same prompt twice, its t* in the last full block (vLLM's block size: 128): the second time vLLM takes
    that block from its prefix cache and never runs the positions from t* to the block's end, so the band's inputs
    are incomplete; that answer runs through every layer over the cached keys/values, with the same scores."""
    for words in range(90, 400):
        messages = ask("hello " * words + "Summarize that.")
        prompt = default_scorer.prompt_ids(messages)
        t_star = default_scorer.prepare(prompt, [EOS]).t_star
        if t_star // 128 < (len(prompt) - 1) // 128:  # a block boundary between t* and the last prompt position
            break
    else:
        pytest.fail("no prompt length puts a block boundary after t*")
    first, second = (
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_body={"return_token_ids": True}
        )
        for _ in range(2)
    )
    for response, reused in ((first, ALL_REUSED), (second, ["prompt_kv"])):
        (choice,) = response.choices
        assert response.model_extra["prompt_token_ids"] == prompt
        assert_equals_offline(semgrad_of(choice), default_scorer, prompt, choice.model_extra["token_ids"], reused)


def test_stop_token_counted_on_eos_not_at_the_limit_nor_for_a_stop_string(client, default_scorer) -> None:
    """The scored answer: through the EOS token when generation ended on it (as the offline scorer scores a given
    answer text), no EOS when cut at max_tokens, and the tokens the user receives when a stop string ended it."""
    messages = ask("What is the capital of France?")
    prompt_ids = default_scorer.prompt_ids(messages)

    def chat(max_tokens: int, **extra) -> Any:
        response = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"return_token_ids": True, **extra},
        )
        return response.choices[0]

    ended, cut = chat(32), chat(3)
    assert ended.finish_reason == "stop" and cut.finish_reason == "length"
    assert_ids_follow_finish(ended.model_extra["token_ids"], "stop", 32)
    assert_ids_follow_finish(cut.model_extra["token_ids"], "length", 3)
    assert semgrad_of(ended)["stop_token"] and not semgrad_of(cut)["stop_token"]
    assert_equals_offline(
        semgrad_of(ended), default_scorer, prompt_ids, default_scorer.answer_ids(ended.message.content)
    )
    assert_equals_offline(
        semgrad_of(cut), default_scorer, prompt_ids, default_scorer.answer_ids(cut.message.content, stop_token=False)
    )
    # a stop string is not a token: the answer is what the user receives ("The capital of France ")
    stopped = chat(32, stop=["is"])
    assert stopped.finish_reason == "stop" and stopped.message.content.endswith("France ")
    received = default_scorer.answer_ids(stopped.message.content.rstrip(), stop_token=False)
    assert_equals_offline(semgrad_of(stopped), default_scorer, prompt_ids, received)


def test_a_stop_string_in_a_stream_scores_what_the_user_receives(client, default_scorer) -> None:
    messages = ask("What is the capital of France?")
    for include in (False, True):
        stream = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=32,
            temperature=0,
            stream=True,
            stop=["France"],
            extra_body={"include_stop_str_in_output": include},
        )
        chunks = [c for chunk in stream for c in chunk.choices]
        text, semgrad = "".join(c.delta.content or "" for c in chunks), semgrad_of(chunks[-1])
        assert text.endswith("France" if include else "of ") and not semgrad["stop_token"]
        received = default_scorer.answer_ids(text if include else text.rstrip(), stop_token=False)
        assert_equals_offline(semgrad, default_scorer, default_scorer.prompt_ids(messages), received)


def test_an_answer_that_shows_nothing_is_not_scored(client, default_scorer) -> None:
    """A stop string at the start of the answer: nothing reaches the user, so nothing is scored, and the offline
    scorer says the same of the empty answer that is left."""
    (choice,) = client.chat.completions.create(
        model=MODEL, messages=ask("What is the capital of France?"), max_tokens=16, temperature=0, stop=["The"]
    ).choices
    assert choice.message.content == "" and semgrad_of(choice) == {"error": NOTHING_TO_SCORE}
    prompt = default_scorer.prompt_ids(ask("What is the capital of France?"))
    assert str(default_scorer.score([(prompt, [])])[0]) == NOTHING_TO_SCORE


def assert_claims_equal_offline(semgrad: dict[str, Any], scorer, prompt_ids: list[int], answer_ids: list[int]) -> None:
    """Served claims equal the offline scorer's claims of the same answer (float32, 1e-4)."""
    (offline,) = scorer.score([(prompt_ids, answer_ids)], claims=True)
    expected = scorer.report(offline)["claims"]
    assert len(semgrad["claims"]) == len(expected) >= 2
    calibrated = expected[0]["confidence"] is not None  # not a random model's profile
    for got, want in zip(semgrad["claims"], expected):
        assert list(got) == list(CLAIM_FIELDS) and (
            0 < got["confidence"] < 1 if calibrated else got["confidence"] is None
        )
        assert (got["text"], got["token_start"], got["token_end"], got["flagged"]) == (
            want["text"],
            want["token_start"],
            want["token_end"],
            want["flagged"],
        )
        for key in ("semgrad", "paragrad", "hybridgrad", "mean_entropy", *["confidence"] * calibrated):
            assert got[key] == pytest.approx(want[key], rel=1e-4), key
    assert semgrad["claims"][-1]["token_end"] == len(answer_ids)


def test_claims_when_asked_equal_the_offline_claims(client, default_scorer) -> None:
    """``"semgrad": {"claims": true}``: each sentence's scores, equal to ``score --claims``'s; not there unless
    asked."""
    messages = ask("Tell me about Paris in three sentences.")
    response = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=80,
        temperature=0,
        extra_body={"return_token_ids": True, "semgrad": {"claims": True}},
    )
    (choice,) = response.choices
    semgrad, answer_ids = semgrad_of(choice), choice.model_extra["token_ids"]
    assert tuple(semgrad) == SERVED_FIELDS + ("claims", "stop_token")
    assert_claims_equal_offline(semgrad, default_scorer, response.model_extra["prompt_token_ids"], answer_ids)
    assert " ".join(c["text"] for c in semgrad["claims"]) == choice.message.content.strip()
    stream = client.completions.create(
        model=MODEL,
        prompt="The water cycle is",
        max_tokens=60,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True, "semgrad": {"claims": True, "tokens": True}},
    )
    chunks = [c for chunk in stream for c in chunk.choices]
    prompt_ids = next(c.model_extra["prompt_token_ids"] for c in chunks if c.model_extra.get("prompt_token_ids"))
    answer_ids = [t for c in chunks for t in c.model_extra.get("token_ids") or []]
    assert_claims_equal_offline(semgrad_of(chunks[-1]), default_scorer, prompt_ids, answer_ids)
    assert "claims" not in semgrad_of(
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8).choices[0]
    )
    with pytest.raises(openai.BadRequestError, match="unknown option 'claim'"):
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=4, extra_body={"semgrad": {"claim": True}}
        )


def test_responses_are_scored(client, default_scorer) -> None:
    """``/v1/responses``, whole or streamed: the response carries ``semgrad`` (claims when asked), equal to the
    offline scores of the same prompt and answer; a stop string cuts what the user does not receive."""
    question = "Tell me about Paris in three sentences."
    prompt_ids = default_scorer.prompt_ids(ask(question))
    whole = client.responses.create(
        model=MODEL,
        input=question,
        max_output_tokens=80,
        temperature=0,
        extra_body={"enable_response_messages": True, "semgrad": {"claims": True}},
    )
    semgrad = whole.model_extra["semgrad"]
    answer_ids = whole.model_extra["output_messages"][0]["tokens"]
    assert whole.model_extra["input_messages"][0]["tokens"] == prompt_ids
    assert_scored({k: v for k, v in semgrad.items() if k != "claims"})
    assert_equals_offline(semgrad, default_scorer, prompt_ids, answer_ids)
    assert_claims_equal_offline(semgrad, default_scorer, prompt_ids, answer_ids)

    events = list(
        client.responses.create(model=MODEL, input=ask(question), max_output_tokens=80, temperature=0, stream=True)
    )
    (completed,) = [e for e in events if e.type == "response.completed"]
    streamed = completed.response.model_extra["semgrad"]
    assert completed.response.model_extra["output_messages"] is None  # hidden again: the client did not ask
    assert_equals_offline(streamed, default_scorer, prompt_ids, answer_ids)

    stopped = client.responses.create(
        model=MODEL, input=question, max_output_tokens=80, temperature=0, extra_body={"stop": ["city"]}
    )
    text = stopped.output_text
    assert text and "city" not in text and not stopped.model_extra["semgrad"]["stop_token"]
    received = default_scorer.answer_ids(text.rstrip(), stop_token=False)
    assert_equals_offline(stopped.model_extra["semgrad"], default_scorer, prompt_ids, received)
    nothing = client.responses.create(
        model=MODEL,
        input="What is the capital of France?",
        max_output_tokens=16,
        temperature=0,
        extra_body={"stop": ["The"]},
    )
    assert nothing.model_extra["semgrad"] == {"error": NOTHING_TO_SCORE}
    assert (
        "semgrad"
        not in client.responses.create(
            model=MODEL, input=question, max_output_tokens=4, extra_body={"semgrad": False}
        ).model_extra
    )


def test_scoring_can_be_turned_off(client) -> None:
    for extra in ({"semgrad": False}, {"vllm_xargs": {"semgrad": "off"}}):
        response = client.chat.completions.create(model=MODEL, messages=ask("Hi!"), max_tokens=4, extra_body=extra)
        assert response.choices[0].message.content and semgrad_of(response.choices[0]) is None
    stream = client.chat.completions.create(
        model=MODEL, messages=ask("Hi!"), max_tokens=4, stream=True, extra_body={"semgrad": False}
    )
    assert all(semgrad_of(c) is None for chunk in stream for c in chunk.choices)
    with pytest.raises(openai.BadRequestError, match="must be true or false"):
        client.chat.completions.create(model=MODEL, messages=ask("Hi!"), max_tokens=4, extra_body={"semgrad": "no"})


def test_generation_and_scoring_run_on_cores_of_their_own(served, client) -> None:
    """vLLM binds its worker's OpenMP threads to cores and reserves the rest for its front end; it reserves one
    more per worker when a KV connector is set, which on a 2-core machine left none and put generation on every
    core. The scoring thread must be bound to cores that generation's threads are not."""
    import psutil

    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        pytest.skip("one core: generation and scoring share it")
    client.chat.completions.create(model=MODEL, messages=ask("Hi!"), max_tokens=2)  # the scoring thread has started
    scoring = set(httpx.get(f"{served.url}/v1/semgrad/info", timeout=30).json()["scoring_cores"])
    [worker] = [p for p in psutil.Process(served.pid).children(recursive=True) if "Worker" in p.name()]
    bindings = [os.sched_getaffinity(t.id) for t in worker.threads()]
    assert scoring in bindings  # the scoring thread is pinned there
    # vLLM's OpenMP threads are bound to generation's cores; threads it did not bind keep every core
    generation = set().union(*(b for b in bindings if b != scoring and b != cores))
    assert generation and generation < cores, f"generation is bound to every core: {sorted(generation)}"
    assert scoring and not scoring & generation, (scoring, generation)


def test_32_concurrent_requests_are_answered_scored_and_batched(base_url) -> None:
    before = metrics(base_url)

    async def run() -> list:
        async with openai.AsyncOpenAI(
            base_url=f"{base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0
        ) as aclient:
            return await asyncio.gather(
                *(
                    aclient.chat.completions.create(
                        model=MODEL, messages=ask(f"Give me a fact about the number {i}."), max_tokens=16, temperature=0
                    )
                    for i in range(32)
                )
            )

    responses = asyncio.run(run())
    for response in responses:
        assert response.choices[0].message.content
        assert_scored(semgrad_of(response.choices[0]))
    after = metrics(base_url)
    batches = after["semgrad_scoring_batch_size_count"] - before["semgrad_scoring_batch_size_count"]
    answers = after["semgrad_scoring_batch_size_sum"] - before["semgrad_scoring_batch_size_sum"]
    assert answers == 32 and batches >= 4  # at most 8 (--max-batch) at a time; how many share one depends on timing


def test_a_scoring_failure_returns_the_completion_with_the_error(client) -> None:
    async def run() -> list:
        async with openai.AsyncOpenAI(
            base_url=client.base_url, api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0
        ) as aclient:
            return await asyncio.gather(
                *(
                    aclient.chat.completions.create(
                        model=MODEL,
                        messages=ask(f"Count to {i + 3}." + (f" {TEST_FAULT_MARKER}" if i == 1 else "")),
                        max_tokens=12,
                        temperature=0,
                    )
                    for i in range(4)
                )
            )

    responses = asyncio.run(run())
    assert all(r.choices[0].message.content for r in responses)
    assert "injected scoring fault" in semgrad_of(responses[1].choices[0])["error"]
    for i in (0, 2, 3):
        assert_scored(semgrad_of(responses[i].choices[0]))
    assert_scored(semgrad_of(client.chat.completions.create(model=MODEL, messages=ask("Hi!"), max_tokens=4).choices[0]))


def test_metrics_count_answers_latency_and_batches(client, base_url) -> None:
    before = metrics(base_url)
    client.chat.completions.create(model=MODEL, messages=ask("Name a fruit."), max_tokens=8)
    after = metrics(base_url)
    assert after["semgrad_answers_scored_total"] == before["semgrad_answers_scored_total"] + 1
    assert after["semgrad_scoring_latency_seconds_count"] == before["semgrad_scoring_latency_seconds_count"] + 1
    assert after["semgrad_scoring_batch_size_count"] == before["semgrad_scoring_batch_size_count"] + 1
    assert "semgrad_answers_flagged_total" in after and after["semgrad_scoring_errors_total"] >= 1  # the failure above


@pytest.mark.parametrize(
    "request_args,message",
    [
        ({"messages": []}, "empty conversation"),
        ({"messages": ask("Hi!"), "max_tokens": 0}, "max_tokens"),
        ({"messages": ask("word " * 9000)}, "maximum context length"),
        ({"messages": ask("Hi!"), "max_tokens": "many"}, "max_tokens"),
    ],
)
def test_bad_requests_get_vllm_errors_and_the_server_stays_up(
    client, base_url, request_args: dict, message: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model=MODEL, **request_args)
    assert httpx.get(f"{base_url}/health", timeout=30).status_code == 200


def test_unknown_fields_are_ignored_as_vllm_does(client) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=ask("Hi!"), max_tokens=4, extra_body={"no_such_field": 1}
    )
    assert_scored(semgrad_of(response.choices[0]))


def test_scoring_holds_no_block_after_a_burst_with_disconnects_and_failures(client, base_url) -> None:
    """Blocks kept for scoring go back to vLLM: after scored, streamed, n=2, failed, cut-off and abandoned
    requests, KV-cache usage returns to its idle value."""
    idle = kv_usage_after_probe(client, base_url)

    async def abandoned_stream(aclient: openai.AsyncOpenAI) -> None:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=ask("Write a long story."), max_tokens=200, stream=True
        )
        async for _ in stream:
            break  # the client goes away after the first chunk
        await stream.close()

    async def timed_out(aclient: openai.AsyncOpenAI) -> None:
        with pytest.raises(openai.APITimeoutError, match="timed out"):
            await aclient.with_options(timeout=0.5).chat.completions.create(
                model=MODEL, messages=ask(LONG_CONTEXT), max_tokens=200
            )

    async def run() -> list:
        async with openai.AsyncOpenAI(
            base_url=f"{base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0
        ) as aclient:
            chat = aclient.chat.completions.create
            return await asyncio.gather(
                *(
                    chat(model=MODEL, messages=ask(f"{LONG_CONTEXT[: 200 * i]} Question {i}?"), max_tokens=12)
                    for i in range(6)
                ),
                chat(model=MODEL, messages=ask("Two answers, please."), max_tokens=12, n=2, temperature=1.0),
                chat(model=MODEL, messages=ask(f"Fail this one. {TEST_FAULT_MARKER}"), max_tokens=8),
                chat(model=MODEL, messages=ask("Unscored."), max_tokens=8, extra_body={"semgrad": False}),
                abandoned_stream(aclient),
                timed_out(aclient),
            )

    responses = asyncio.run(run())
    assert all(semgrad_of(c) is not None for r in responses[:7] for c in r.choices)
    time.sleep(5)  # the timed-out request finishes generating and is scored with nobody waiting
    assert kv_usage_after_probe(client, base_url) == pytest.approx(idle, abs=1e-9)

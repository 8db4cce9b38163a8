"""The page's server side without a server: the recent-answers ring, the ``"semgrad"`` request options, the
per-token texts, the page's files and what a scored choice carries (fake scoring client)."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import pytest

from semgrad_serve.errors import SemgradError
from semgrad_serve.model.tokens import token_texts
from semgrad_serve.serving.api_server.recent_answers import MAX_TEXT, RecentAnswers, chat_question, prompt_question

# -- the recent-answers ring ---------------------------------------------------------------------------


def scored(value: float, flagged: bool | None) -> dict:
    return {"semgrad": value, "score": value, "threshold": 1.0, "flagged": flagged}


def test_recent_answers_are_bounded_newest_first_and_filterable() -> None:
    ring = RecentAnswers(capacity=5)
    for i in range(8):
        ring.add(f"q{i}", f"a{i}", scored(i, flagged=i % 3 == 0), completion_id=f"chatcmpl-{i}")
    ring.add("broken", "", {"error": "scoring failed: boom"}, completion_id="chatcmpl-err")
    assert len(ring) == 5 and ring.total == 9
    assert [e["question"] for e in ring.list()] == ["broken", "q7", "q6", "q5", "q4"]
    assert [e["seq"] for e in ring.list()] == [9, 8, 7, 6, 5]
    assert [e["question"] for e in ring.list(flagged=True)] == ["q6"]  # 3 and 0 have left the ring
    assert [e["question"] for e in ring.list(flagged=False)] == ["q7", "q5", "q4"]  # the error is neither
    assert [e["question"] for e in ring.list(limit=2)] == ["broken", "q7"]
    entry = ring.list()[1]
    assert entry["completion_id"] == "chatcmpl-7" and entry["answer"] == "a7" and entry["semgrad"] == scored(7, False)
    assert entry["time"] > 0 and entry["truncated"] is False


def test_recent_answers_keep_no_token_arrays_and_cut_long_texts() -> None:
    ring = RecentAnswers(capacity=3)
    sg = {**scored(0.5, False), "token_texts": ["a"], "token_entropies": [0.1], "token_logprobs": [-0.2]}
    ring.add("x" * (MAX_TEXT + 10), "short", sg)
    (entry,) = ring.list()
    assert entry["semgrad"] == scored(0.5, False) and "token_texts" in sg  # the response's object is untouched
    assert len(entry["question"]) == MAX_TEXT and entry["question"].endswith("…") and entry["truncated"] is True


def test_recent_answers_off_keeps_nothing() -> None:
    ring = RecentAnswers(capacity=0)
    assert ring.add("q", "a", scored(1, True)) is None and ring.list() == [] and len(ring) == 0
    with pytest.raises(ValueError, match="must be at least 0"):
        RecentAnswers(capacity=-1)


def test_the_question_of_a_request() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "Yes."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Second,"},
                {"type": "image_url", "image_url": {}},
                {"type": "text", "text": "please."},
            ],
        },
    ]
    assert chat_question(messages) == "Second,\nplease."
    assert chat_question(messages[:2]) == "First?" and chat_question([]) == ""
    assert prompt_question("Once upon", 1, 2) == "Once upon"
    assert (
        prompt_question(["p0", "p1"], 3, 2) == "p1" and prompt_question([[1, 2]], 0, 1) == "(prompt given as token ids)"
    )


# -- request options -------------------------------------------------------------------------------------


def request(**extra) -> SimpleNamespace:
    xargs = extra.pop("vllm_xargs", None)
    return SimpleNamespace(model_extra=extra, vllm_xargs=xargs)


def test_semgrad_request_field_turns_scoring_off_or_asks_for_tokens() -> None:
    from semgrad_serve.serving.api_server.chat_routes import ScoringOptions, scoring_options

    assert scoring_options(request()) == ScoringOptions(tokens=False)
    assert scoring_options(request(semgrad=True)) == ScoringOptions()
    assert scoring_options(request(semgrad=False)) is None
    assert scoring_options(request(semgrad={"tokens": True})) == ScoringOptions(tokens=True)
    assert scoring_options(request(semgrad={})) == ScoringOptions()
    assert scoring_options(request(vllm_xargs={"semgrad": "off"})) is None
    with pytest.raises(SemgradError, match="must be true or false"):
        scoring_options(request(semgrad="no"))
    with pytest.raises(SemgradError, match="unknown option 'token'; the options are tokens"):
        scoring_options(request(semgrad={"token": True}))
    with pytest.raises(SemgradError, match="each option must be true or false"):
        scoring_options(request(semgrad={"tokens": 1}))


# -- per-token texts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["The capital of France is Paris.", "Café ☕ 日本語 😀 naïve", "  two  spaces\nand a newline", "x"],
)
def test_token_texts_join_into_the_decoded_answer(default_scorer, text: str) -> None:
    tokenizer = default_scorer.tokenizer
    ids = default_scorer.answer_ids(text)  # ends on <|im_end|>
    texts = token_texts(tokenizer, ids)
    assert len(texts) == len(ids) and texts[-1] == "<|im_end|>"
    assert "".join(texts) == tokenizer.decode(ids, skip_special_tokens=False) == text + "<|im_end|>"
    for i, piece in enumerate(texts):  # a token that completes characters alone decodes to its text
        alone = tokenizer.decode([ids[i]])
        if "\ufffd" not in alone and piece:
            assert piece == alone
    assert token_texts(tokenizer, []) == []


def test_token_texts_of_a_character_cut_at_the_end(default_scorer) -> None:
    tokenizer = default_scorer.tokenizer
    ids = tokenizer("日本", add_special_tokens=False).input_ids
    cut = ids[:-1]  # an answer cut at max_tokens inside a character
    texts = token_texts(tokenizer, cut)
    assert "".join(texts) == tokenizer.decode(cut) and len(texts) == len(cut)


# -- a scored choice's "semgrad" object, with a fake scoring client --------------------------------------


class FakeClient:
    def __init__(self) -> None:
        self.dropped: list = []

    async def score(self, key, pairs, claims=False) -> list[dict]:
        return [
            {
                "semgrad": 1e-5,
                "score": 1e-5,
                "threshold": 2e-5,
                "flagged": False,
                "reused": ["prompt_kv"],
                "token_entropies": [0.5] * len(a),
                "token_logprobs": [-0.25] * len(a),
            }
            for _, a in pairs
        ]

    def drop(self, key) -> None:
        self.dropped.append(key)


def choices_for(default_scorer, options, recent) -> object:
    from semgrad_serve.serving.api_server.chat_routes import StopTokens, _Choices

    stop = StopTokens.__new__(StopTokens)
    stop.tokenizer, stop.eos_ids = default_scorer.tokenizer, {2}
    return _Choices(FakeClient(), "k", stop, False, False, options, recent, lambda i: "What is the capital of France?")


def test_a_streamed_choice_gets_tokens_only_when_asked_and_is_kept_in_the_ring(default_scorer) -> None:
    from semgrad_serve.serving.api_server.chat_routes import ScoringOptions, _scored_stream

    tokenizer = default_scorer.tokenizer
    prompt = default_scorer.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    answer = default_scorer.answer_ids("Paris.")
    pieces = [tokenizer.decode([i]) for i in answer[:-1]]

    def events() -> list[str]:
        import json

        out = [f"data: {json.dumps({'id': 'chatcmpl-1', 'model': 'm', 'prompt_token_ids': prompt, 'choices': []})}\n\n"]
        for i, token in enumerate(answer):
            last = i == len(answer) - 1
            choice = {
                "index": 0,
                "delta": {"content": "" if last else pieces[i]},
                "token_ids": [token],
                "finish_reason": "stop" if last else None,
                "stop_reason": None,
            }
            out.append(f"data: {json.dumps({'id': 'chatcmpl-1', 'model': 'm', 'choices': [choice]})}\n\n")
        return out + ["data: [DONE]\n\n"]

    async def run(options: ScoringOptions) -> tuple[dict, RecentAnswers]:
        import json

        async def source():
            for event in events():
                yield event

        recent = RecentAnswers(10)
        chunks = [e async for e in _scored_stream(source(), choices_for(default_scorer, options, recent))]
        final = [json.loads(c[6:]) for c in chunks if c.startswith("data: {")][-1]
        return final["choices"][0]["semgrad"], recent

    plain, recent = asyncio.run(run(ScoringOptions()))
    assert (
        list(plain) == ["semgrad", "score", "threshold", "flagged", "reused", "stop_token"]
        and plain["stop_token"] is True
    )
    with_tokens, _ = asyncio.run(run(ScoringOptions(tokens=True)))
    assert with_tokens["token_texts"] == ["Paris", ".", "<|im_end|>"]
    assert with_tokens["token_entropies"] == [0.5] * 3 and with_tokens["token_logprobs"] == [-0.25] * 3
    (entry,) = recent.list()
    assert entry["question"] == "What is the capital of France?" and entry["answer"] == "Paris."
    assert entry["completion_id"] == "chatcmpl-1" and entry["model"] == "m" and entry["finish_reason"] == "stop"
    assert entry["semgrad"] == plain


# -- the page's files ---------------------------------------------------------------------------------------


def test_the_page_loads_nothing_from_elsewhere() -> None:
    from semgrad_serve.serving.api_server.page_routes import ASSETS, CSP, asset

    html = asset("semgrad.html").decode()
    for name in ASSETS:
        assert f'"/semgrad/{name}"' in html
    for text in [html] + [asset(name).decode() for name in ASSETS]:
        assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", text), "an external resource"
        assert "http://" not in text and "https://" not in text
    assert "<script>" not in html and "style=" not in html  # the CSP allows no inline script or style
    assert "default-src 'none'" in CSP and "connect-src 'self'" in CSP


def test_an_answer_that_shows_nothing_is_not_sent_to_score(default_scorer) -> None:
    """The stop token alone, or whitespace and it: "nothing to score", without asking the scoring service."""
    from semgrad_serve.scoring.items import NOTHING_TO_SCORE
    from semgrad_serve.serving.api_server.chat_routes import ScoringOptions

    prompt = default_scorer.prompt_ids([{"role": "user", "content": "Say nothing."}])
    choices = choices_for(default_scorer, ScoringOptions(), None)
    choices.client.score = None  # any call would fail
    body = {
        "prompt_token_ids": prompt,
        "choices": [
            {
                "index": i,
                "message": {"content": text},
                "token_ids": default_scorer.answer_ids(text),
                "finish_reason": "stop",
                "stop_reason": None,
            }
            for i, text in enumerate(("", " \n "))
        ],
    }
    finished = choices.collect(body)
    asyncio.run(choices.score(finished))
    assert [c["semgrad"] for c in finished] == [{"error": NOTHING_TO_SCORE}] * 2

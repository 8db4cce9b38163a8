"""The stop-token convention (SPEC, Inputs) and the opt-in tied-head ParaGrad, against the naive computation."""

from __future__ import annotations

import pytest
import torch

from semgrad_serve.errors import SemgradError
from semgrad_serve.model.stop_token import eos_ids, received_tokens
from semgrad_serve.model.weights import from_hf_model
from semgrad_serve.scoring.profiles import ModelProfile, TStarRule
from semgrad_serve.scoring.scorer import Scorer
from semgrad_serve.scoring.tied_head import UNTIED
from semgrad_serve.testing.naive import naive_paragrad_tied, naive_scores

from tiny_models import random_items, tiny_model

T_STAR_ID, EOS = 7, 3
SCORES = ("semgrad", "paragrad", "hybridgrad", "exgrad", "mean_entropy")


class TinyTokenizer:
    """The little of a tokenizer the scorer needs for token-id input: t*'s token, the EOS id, and text."""

    eos_token_id, unk_token_id = EOS, None

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i == EOS))

    def convert_tokens_to_ids(self, token: str) -> int:
        return T_STAR_ID

    def convert_ids_to_tokens(self, i: int) -> str:
        return f"<{i}>"


def tiny_scorer(model: torch.nn.Module, paragrad_tied: bool = False) -> Scorer:
    profile = ModelProfile(name="tiny", t_star=TStarRule("<7>"))
    return Scorer(from_hf_model(model), TinyTokenizer(), profile, eos_ids=[EOS], paragrad_tied=paragrad_tied)


def with_t_star(prompt: list[int]) -> list[int]:
    return [i for i in prompt if i not in (T_STAR_ID, EOS)] + [T_STAR_ID, 11, 12]


def cases() -> list[tuple[str, list[int], list[int]]]:
    """Answers that ended on EOS, were cut at the limit, and single-token ones (EOS alone, one plain token)."""
    (p1, a1, _), (p2, a2, _), (p3, _, _), (p4, _, _) = random_items(4, seed=21)
    plain = [[i for i in a if i != EOS] or [5] for a in (a1, a2)]
    return [
        ("ended on EOS", with_t_star(p1), plain[0] + [EOS]),
        ("cut at the limit", with_t_star(p2), plain[1]),
        ("EOS alone", with_t_star(p3), [EOS]),
        ("one token, no EOS", with_t_star(p4), [42]),
    ]


@pytest.mark.parametrize("family", ["llama-tied", "mistral-window", "qwen3-untied"])
def test_stop_token_is_scored_as_given_and_matches_naive(family: str) -> None:
    model = tiny_model(family)
    scorer = tiny_scorer(model)
    items = cases()
    results = scorer.score([(p, a) for _, p, a in items], batch_size=4)
    for (name, prompt, answer), result in zip(items, results):
        naive = naive_scores(model, prompt, answer, len(prompt) - 3, scorer.band)
        for key in SCORES:
            assert result.scores()[key] == pytest.approx(naive[key], rel=1e-9, abs=0), (name, key)
        assert result.answer_tokens == len(answer) and result.stop_token == (answer[-1] == EOS), name
    # counting the stop token changes the scores: the old convention (EOS dropped) gives other numbers
    ended, dropped = results[0], scorer.score([(items[0][1], scorer.without_stop_token(items[0][2]))])[0]
    assert not dropped.stop_token and dropped.answer_tokens == ended.answer_tokens - 1
    assert abs(dropped.semgrad / ended.semgrad - 1) > 1e-3 and abs(dropped.mean_entropy / ended.mean_entropy - 1) > 1e-3


@pytest.mark.parametrize("family,pad", [("llama-tied", None), ("qwen2-tied", 5), ("qwen3-tied", EOS)])
def test_paragrad_tied_matches_naive_differentiation_of_the_shared_matrix(family: str, pad: int | None) -> None:
    """``pad``: the embedding's ``padding_idx`` row gets no lookup gradient (5 is in every prompt below)."""
    model = tiny_model(family, pad_token_id=pad)
    scorer = tiny_scorer(model, paragrad_tied=True)
    assert scorer.weights.tied and scorer.weights.padding_idx == pad == model.model.embed_tokens.padding_idx
    items = [(name, [5] + p, a) for name, p, a in cases()]
    for (name, prompt, answer), result in zip(items, scorer.score([(p, a) for _, p, a in items], batch_size=4)):
        expected = naive_paragrad_tied(model, prompt, answer)
        assert result.paragrad_tied == pytest.approx(expected, rel=1e-9, abs=0), name
        assert result.paragrad_tied != pytest.approx(result.paragrad, rel=1e-3)  # the lookup path adds to it
        assert result.paragrad == pytest.approx(
            naive_scores(model, prompt, answer, len(prompt) - 3, scorer.band)["paragrad"], rel=1e-9
        )


def test_paragrad_tied_is_off_by_default_and_refused_for_untied_models() -> None:
    model = tiny_model("llama3-untied")
    (result,) = tiny_scorer(model).score([cases()[0][1:]])
    assert result.paragrad_tied is None and "paragrad_tied" not in result.scores()
    with pytest.raises(SemgradError, match="output head is its input embedding") as err:
        tiny_scorer(model, paragrad_tied=True)
    assert str(err.value) == UNTIED and "\n" not in UNTIED
    doc = {"name": "p", "t_star": {"token": "<7>"}, "paragrad_tied": True}
    assert (
        ModelProfile.from_dict(doc).paragrad_tied
        and not ModelProfile.from_dict({**doc, "paragrad_tied": False}).paragrad_tied
    )


def test_given_answer_text_is_complete_unless_turned_off(default_scorer) -> None:
    scorer = default_scorer
    text_ids = scorer.tokenizer("Paris.", add_special_tokens=False).input_ids
    assert scorer.eos_ids == [2] and scorer.tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert scorer.answer_ids("Paris.") == text_ids + [2] and scorer.answer_ids("Paris.", stop_token=False) == text_ids
    prompt = scorer.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    counted, plain = scorer.score([(prompt, scorer.answer_ids("Paris.")), (prompt, scorer.answer_ids("Paris.", False))])
    assert counted.stop_token and not plain.stop_token and counted.answer_tokens == plain.answer_tokens + 1
    assert counted.token_logprobs[:-1] == pytest.approx(
        plain.token_logprobs, rel=1e-4
    )  # same text tokens, one more scored


def test_eos_ids_and_the_tokens_a_stop_string_leaves(default_scorer) -> None:
    assert eos_ids(2, [2, 5], None, (7,)) == [2, 5, 7] and eos_ids(None) == []
    tok = default_scorer.tokenizer
    ids = tok("The capital of France is Paris.", add_special_tokens=False).input_ids + [2]

    def words(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    assert received_tokens(tok, ids, "is", include_stop=False) == words("The capital of France")
    assert received_tokens(tok, ids, "is", include_stop=True) == words("The capital of France is")
    assert received_tokens(tok, ids, "Par", include_stop=False) == words("The capital of France is")
    assert received_tokens(tok, ids, "nowhere", include_stop=False) == ids

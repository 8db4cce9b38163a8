"""Live claims in the scoring core: a claim scored from the answer's prefix up to its end (with the band inputs and
logits of that prefix only) equals the same claim scored on the final answer and the naive computation; claims a
partial answer settles are the final answer's."""

from __future__ import annotations

import os
from dataclasses import replace

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors; must precede the first triton import

import pytest
import torch

from semgrad_serve.kernels import select_kernels
from semgrad_serve.model.weights import from_hf_model
from semgrad_serve.scoring.batch import score_batch
from semgrad_serve.scoring.claims import settled_claims, split_claims
from semgrad_serve.scoring.given import Given
from semgrad_serve.scoring.items import ClaimsResult, PreparedItem, ScoreResult
from semgrad_serve.testing.naive import naive_scores

from test_claims import CLAIM_SCORES, claimed_items, words
from test_exactness import deeper_half, generation_states, prefix_keys_values
from tiny_models import tiny_model

EOS = 2  # the tiny models' EOS id

TEXTS = (
    "Paris is the capital of France. It has 2.1 million people! Is it big? Yes.",
    "Dr. Smith met Mr. Jones in the U.S. last year. J. K. Rowling wrote it, e.g. Harry Potter.",
    "It costs $3.50 or 3.5 euros. The value is 3. The next is 4.",
    "Fruits:\n1. Apples\n2. Pears.\n3. Plums\n\nThat is all, etc. and more. See www.example.com. Done",
    "Use this:\n```python\nx = a.b()\nprint(x)\n```\nCall `os.path.join()`. It works. Try `a. B` too. End.",
    'He said "Stop." Then he left... Why?! Because. Call `x. Y. z` now. Done.',
)


@pytest.mark.parametrize("text", TEXTS)
def test_settled_claims_of_every_prefix_are_the_final_claims(text: str) -> None:
    """Whatever text follows, a claim a prefix settles is the final answer's claim (same text and tokens); every
    claim but the last is settled once the whole answer is there; nothing is settled past what was received."""
    tokens = words(text)
    final = split_claims(tokens)
    for n in range(len(tokens) + 1):
        settled = settled_claims(tokens[:n])
        assert settled == final[: len(settled)], tokens[:n]
    assert settled_claims(tokens) == final[:-1]
    received = len("".join(tokens[: final[1].token_start]))  # the second claim's first token not received yet
    assert settled_claims(tokens, received) == []


@pytest.mark.parametrize("family", ["llama3-untied", "qwen2-tied", "mistral-window"])
def test_float64_a_claim_from_its_prefix_equals_it_on_the_final_answer(family: str) -> None:
    """Each claim scored on the answer up to its end, given only that prefix's band inputs and logits (what vLLM
    has computed when the claim's last token is out), equals the claim scored on the whole answer and the naive
    computation restricted to its tokens; the last claim holds the stop token. One batch of several prefixes."""
    model = tiny_model(family)
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    items = [it for it in claimed_items(seed=13, n=6) if len(it.claims) > 1]
    items = [PreparedItem(it.prompt_ids, (*it.answer_ids[:-1], EOS), it.t_star, claims=it.claims) for it in items]
    assert items
    whole = score_batch(weights, items, band, select_kernels("torch"))
    prefixes, kvs, xs, zs, expected = [], [], [], [], []
    for item, result in zip(items, whole):
        prompt, answer, t_star = list(item.prompt_ids), list(item.answer_ids), item.t_star
        for claim, scores in zip(item.claims, result.claims):
            prefix = answer[: claim.token_end]
            x, z = generation_states(model, prompt, prefix, t_star, band)  # the prefix's own states, nothing later
            prefixes.append(PreparedItem(item.prompt_ids, tuple(prefix), t_star, claims=(claim,)))
            kvs.append(prefix_keys_values(weights, prompt, t_star)[band.start :])
            xs.append(x)
            zs.append(z)
            naive = naive_scores(model, prompt, answer, t_star, band, tokens=range(claim.token_start, claim.token_end))
            expected.append((claim, scores, naive))
    assert any(c.token_end == len(it.answer_ids) for it in items for c in it.claims)  # a last claim, with the EOS
    given = [Given(kv, x, z) for kv, x, z in zip(kvs, xs, zs)]
    # as live jobs score them: the claim alone (a batch of those has no whole-answer seed), or beside whole answers
    alone = [replace(it, whole_answer=False) for it in prefixes]
    mixed = [it if i % 2 else replace(it, whole_answer=False) for i, it in enumerate(prefixes)]
    for batch in (prefixes, alone, mixed):
        live = score_batch(weights, batch, band, select_kernels("torch"), given=given)
        for (claim, scores, naive), result, item in zip(expected, live, batch):
            assert isinstance(result, ScoreResult if item.whole_answer else ClaimsResult)
            (got,) = result.claims
            assert (got.token_start, got.token_end) == (claim.token_start, claim.token_end)
            for key in CLAIM_SCORES:
                assert got.scores()[key] == pytest.approx(scores.scores()[key], rel=1e-9, abs=0), (claim, key)
                assert got.scores()[key] == pytest.approx(naive[key], rel=1e-9, abs=0), (claim, key)
    # a window of several claims, the head on their rows only (a live job that fell behind)
    later = [replace(it, claims=it.claims[1:], whole_answer=False) for it in items]
    for result, scores in zip(score_batch(weights, later, band, select_kernels("torch")), whole):
        assert len(result.claims) == len(scores.claims) - 1
        for got, want in zip(result.claims, scores.claims[1:]):
            for key in CLAIM_SCORES:
                assert got.scores()[key] == pytest.approx(want.scores()[key], rel=1e-9, abs=0), key


def test_float32_a_claim_from_its_prefix_equals_it_on_the_final_answer() -> None:
    model = tiny_model("qwen2-tied", dtype=torch.float32)
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    item = next(it for it in claimed_items(seed=8, n=6) if len(it.claims) > 1)
    (whole,) = score_batch(weights, [item], band, select_kernels())
    prefixes = [
        PreparedItem(item.prompt_ids, item.answer_ids[: c.token_end], item.t_star, claims=(c,), whole_answer=False)
        for c in item.claims
    ]
    for result, scores in zip(score_batch(weights, prefixes, band, select_kernels()), whole.claims):
        for key in CLAIM_SCORES:
            assert result.claims[0].scores()[key] == pytest.approx(scores.scores()[key], rel=1e-4, abs=0), key


def test_scorer_scores_an_answer_so_far_for_its_claims_only(default_scorer) -> None:
    """``Scorer.score(..., whole_answer=False)`` on an answer so far gives a ``ClaimsResult`` whose report is
    ``{"claims": [...]}``, the same entries (1e-4) as the final answer's report gives those claims; an empty
    window gives no claims, unscored."""
    prompt = default_scorer.prompt_ids([{"role": "user", "content": "Tell me about Paris."}])
    answer = default_scorer.answer_ids("Paris is in France. It has a tower. It is large.")
    claims = default_scorer.claims(answer)
    (final,) = default_scorer.score([(prompt, answer)], claims=True)
    prefix = answer[: claims[1].token_end]
    so_far, empty = default_scorer.score(
        [(prompt, prefix), (prompt, prefix)], claims=[range(1, 2), range(1, 1)], whole_answer=False
    )
    assert isinstance(so_far, ClaimsResult) and empty == ClaimsResult([], len(prefix))
    (got,) = default_scorer.report(so_far)["claims"]
    want = default_scorer.report(final)["claims"][1]
    assert list(default_scorer.report(so_far)) == ["claims"] and got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == (pytest.approx(value, rel=1e-4) if isinstance(value, float) else value), key

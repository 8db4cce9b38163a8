"""Per-claim scores: the sentence splitter on hand cases, and each claim's scores against the naive computation
with the loss restricted to the claim's tokens."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors; must precede the first triton import

import re

import pytest
import torch

from semgrad_serve.kernels import select_kernels
from semgrad_serve.model.weights import from_hf_model
from semgrad_serve.scoring import batch as scoring
from semgrad_serve.scoring.batch import score_batch
from semgrad_serve.scoring.claims import Claim, split_claims
from semgrad_serve.scoring.given import Given
from semgrad_serve.scoring.items import PreparedItem
from semgrad_serve.scoring.shared_prefix import PrefixCache
from semgrad_serve.testing.naive import naive_scores

from test_exactness import deeper_half, prefix_keys_values
from tiny_models import FAMILY_PARAMS, random_items, tiny_model

CLAIM_SCORES = ("semgrad", "paragrad", "hybridgrad", "exgrad", "mean_entropy")

# -- the splitter ---------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """``text`` as word-like tokens, each with the whitespace before it."""
    return re.findall(r"\s*\S+|\s+", text)


@pytest.mark.parametrize(
    "text,claims",
    [
        (
            "Paris is the capital of France. It has 2.1 million people! Is it big? Yes.",
            ["Paris is the capital of France.", "It has 2.1 million people!", "Is it big?", "Yes."],
        ),
        (
            "Dr. Smith met Mr. Jones in the U.S. last year. J. K. Rowling wrote it, e.g. Harry Potter.",
            ["Dr. Smith met Mr. Jones in the U.S. last year.", "J. K. Rowling wrote it, e.g. Harry Potter."],
        ),
        (
            "It costs $3.50 or 3.5 euros. The value is 3. The next is 4.",
            ["It costs $3.50 or 3.5 euros.", "The value is 3.", "The next is 4."],
        ),
        (
            "Fruits:\n1. Apples\n2. Pears.\n3. Plums\n\nThat is all, etc. and more. See www.example.com. Done",
            [
                "Fruits:",
                "1. Apples",
                "2. Pears.",
                "3. Plums",
                "That is all, etc. and more.",
                "See www.example.com.",
                "Done",
            ],
        ),
        ("- one item.\n- another one", ["- one item.", "- another one"]),
        (
            "Use this:\n```python\nx = a.b()\nprint(x)\n```\nCall `os.path.join()`. It works.",
            ["Use this:", "```python\nx = a.b()\nprint(x)\n```", "Call `os.path.join()`.", "It works."],
        ),
        ('He said "Stop." Then he left... Why?! Because.', ['He said "Stop."', "Then he left...", "Why?!", "Because."]),
        ("No sentence end", ["No sentence end"]),
    ],
)
def test_splitter_hand_cases(text: str, claims: list[str]) -> None:
    got = split_claims(words(text))
    assert [c.text for c in got] == claims
    assert got[0].token_start == 0 and got[-1].token_end == len(words(text))
    assert all(a.token_end == b.token_start for a, b in zip(got, got[1:]))  # consecutive, covering every token


def test_splitter_token_ownership() -> None:
    """Whitespace joins the claim before it, a token with no text (a cut character) the next one, a stop token
    past the texts the last claim; nothing visible, one claim with no text."""
    assert split_claims(["  ", "Hi", ".", "\n\n", " Yo", "", "é", "."], n_tokens=9) == [
        Claim("Hi.", 0, 4),
        Claim("Yoé.", 4, 9),
    ]
    assert split_claims(["A", " b.c", " d"]) == [Claim("A b.c d", 0, 3)]  # a sentence inside a token: merged
    assert split_claims([]) == [] and split_claims([" ", "\n"], n_tokens=3) == [Claim("", 0, 3)]


def test_claims_of_real_tokens(default_scorer) -> None:
    """On the default model's tokens: the stop token joins the last claim; each claim's text is its tokens'."""
    text = "The capital of France is Paris. It is known for the Eiffel Tower.\n\nDr. Smith agrees."
    ids = default_scorer.answer_ids(text)
    claims = default_scorer.claims(ids)
    assert [c.text for c in claims] == [
        "The capital of France is Paris.",
        "It is known for the Eiffel Tower.",
        "Dr. Smith agrees.",
    ]
    assert claims[-1].token_end == len(ids) and ids[-1] in default_scorer.eos_ids
    for c in claims:
        assert (
            default_scorer.tokenizer.decode(ids[c.token_start : c.token_end], skip_special_tokens=True).strip()
            == c.text
        )


# -- the scores ---------------------------------------------------------------------------------------


def cut(n_tokens: int, starts: list[int]) -> tuple[Claim, ...]:
    """Claims of an ``n_tokens`` answer that start at ``starts`` (0 first), texts unused."""
    ends = [*starts[1:], n_tokens]
    return tuple(Claim(f"claim {k}", s, e) for k, (s, e) in enumerate(zip(starts, ends)))


def claimed_items(seed: int, n: int = 6) -> list[PreparedItem]:
    """Items with longer answers; every other one split into 1 to 4 claims, the others without claims."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for b, (prompt, answer, t_star) in enumerate(random_items(n, seed=seed)):
        answer = answer + torch.randint(0, 101, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        claims = ()
        if b % 2 == 0:
            k = int(torch.randint(1, 5, (1,), generator=g))
            claims = cut(
                len(answer), [0, *sorted(torch.randperm(len(answer) - 1, generator=g)[: k - 1].add(1).tolist())]
            )
        items.append(PreparedItem(tuple(prompt), tuple(answer), t_star, claims=claims))
    return items


def assert_claims_match_naive(model, items: list[PreparedItem], results, band: range, rel: float) -> None:
    for item, result in zip(items, results):
        whole = naive_scores(model, item.prompt_ids, item.answer_ids, item.t_star, band)
        for key in CLAIM_SCORES:
            assert result.scores()[key] == pytest.approx(whole[key], rel=rel, abs=0), key
        if not item.claims:
            assert result.claims is None
            continue
        assert [(c.text, c.token_start, c.token_end) for c in result.claims] == [
            (c.text, c.token_start, c.token_end) for c in item.claims
        ]
        for claim, scores in zip(item.claims, result.claims):
            naive = naive_scores(
                model,
                item.prompt_ids,
                item.answer_ids,
                item.t_star,
                band,
                tokens=range(claim.token_start, claim.token_end),
            )
            for key in CLAIM_SCORES:
                assert scores.scores()[key] == pytest.approx(naive[key], rel=rel, abs=0), (claim, key)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_float64_claims_match_naive_in_a_mixed_batch(family: str) -> None:
    """Several claims per item, batched with items without claims: one backward, each claim exact."""
    model = tiny_model(family)
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    items = claimed_items(seed=2)
    assert max(len(it.claims) for it in items) > 1
    assert_claims_match_naive(model, items, score_batch(weights, items, band, select_kernels("torch")), band, rel=1e-9)


def test_the_naive_restriction_to_every_token_is_the_whole_answer() -> None:
    model = tiny_model("qwen3-untied")
    prompt, answer, t_star = random_items(1, seed=3)[0]
    band = deeper_half(5)
    whole = naive_scores(model, prompt, answer, t_star, band)
    assert naive_scores(model, prompt, answer, t_star, band, tokens=range(len(answer))) == whole
    assert naive_scores(model, prompt, answer, t_star, band, paper_style=True, tokens=range(1, len(answer)))[
        "semgrad"
    ] == pytest.approx(
        naive_scores(model, prompt, answer, t_star, band, tokens=range(1, len(answer)))["semgrad"], rel=1e-12
    )


@pytest.mark.parametrize("choice", ["native", "triton"])
def test_claims_with_every_kernel_choice(choice: str) -> None:
    model = tiny_model("llama3-untied")
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    items = claimed_items(seed=5, n=4)
    assert_claims_match_naive(model, items, score_batch(weights, items, band, select_kernels(choice)), band, rel=1e-9)


def test_claims_over_cached_and_shared_prefixes_and_head_chunks(monkeypatch) -> None:
    """Given prefix keys/values (vLLM's cache), a shared prefix and logits formed a few rows at a time: same claims."""
    model = tiny_model("mistral-window")
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    items = claimed_items(seed=7)
    kvs = [prefix_keys_values(weights, list(it.prompt_ids), it.t_star) for it in items]
    torch_kernels = select_kernels("torch")
    given = [Given(kv) for kv in kvs]
    assert_claims_match_naive(
        model, items, score_batch(weights, items, band, torch_kernels, given=given), band, rel=1e-9
    )
    head = [(5 * i + 1) % 64 for i in range(6)]
    shared_items = [
        PreparedItem((*head, *it.prompt_ids), it.answer_ids, len(head) + it.t_star, claims=it.claims) for it in items
    ]
    shared = PrefixCache(min_tokens=4).for_batch(weights, shared_items)
    assert shared is not None
    assert_claims_match_naive(
        model, shared_items, score_batch(weights, shared_items, band, torch_kernels, shared), band, rel=1e-9
    )
    monkeypatch.setattr(scoring, "HEAD_CHUNK_ELEMENTS", 5 * weights.vocab_size)
    assert_claims_match_naive(model, items, score_batch(weights, items, band, torch_kernels), band, rel=1e-9)


def test_claims_that_are_not_consecutive_runs_of_the_answer_are_refused() -> None:
    weights = from_hf_model(tiny_model("qwen3-untied"))
    prompt, answer, t_star = random_items(1, seed=3)[0]
    answer = answer + [5, 6, 7]
    n = len(answer)
    for bad in (
        (Claim("a", 0, 2), Claim("b", 3, n)),  # a gap
        (Claim("a", 0, 2), Claim("b", 2, 2), Claim("c", 2, n)),  # an empty claim
        (Claim("a", 1, n + 1),),  # past the answer
    ):
        with pytest.raises(ValueError, match="claims must be consecutive"):
            score_batch(
                weights,
                [PreparedItem(tuple(prompt), tuple(answer), t_star, claims=bad)],
                deeper_half(5),
                select_kernels("torch"),
            )


def test_windows_of_claims_in_seed_groups_match_naive() -> None:
    """Items carrying a window of their claims (not the first, not the last), scored with a seed budget so small
    that every seed has a backward of its own: each claim still equals the naive computation."""
    model = tiny_model("llama3-untied")
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    items = []
    for it in claimed_items(seed=11, n=4):
        answer = it.answer_ids
        claims = cut(len(answer), [0, 2, 4, 6, len(answer) - 2])
        items.append(PreparedItem(it.prompt_ids, answer, it.t_star, claims=claims[1:4]))
    assert all(it.claims[-1].token_end < len(it.answer_ids) for it in items)
    results = score_batch(weights, items, band, select_kernels("torch"), seed_budget=1)
    assert_claims_match_naive(model, items, results, band, rel=1e-9)


def test_float32_claims_match_naive() -> None:
    model = tiny_model("qwen2-tied", dtype=torch.float32)
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    items = claimed_items(seed=8, n=4)
    assert_claims_match_naive(model, items, score_batch(weights, items, band, select_kernels()), band, rel=1e-4)

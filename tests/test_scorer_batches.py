"""How the scorer forms batches: length-sorted, bounded in items and padded tokens, order kept."""

from __future__ import annotations

import pytest

from semgrad_serve.errors import ItemError, SemgradError

from conftest import FLOAT32_BATCH_REL


def test_batches_bounded_by_items_and_tokens(default_scorer, monkeypatch) -> None:
    scorer = default_scorer
    # prompts of different lengths, so that the results' prompt lengths show their order
    questions = [
        "Hi?",
        "What is the capital of France? " * 3,
        "Who wrote Hamlet?",
        "Why is the sky blue? " * 6,
        "What is 2+2?",
    ]
    pairs = [
        (scorer.prompt_ids([{"role": "user", "content": q}]), scorer.answer_ids("A short answer.")) for q in questions
    ]
    batches: list[list[int]] = []
    original = scorer.score_prepared

    def record(items, *given):
        batches.append([it.length for it in items])
        return original(items, *given)

    monkeypatch.setattr(scorer, "score_prepared", record)
    budget = 2 * max(len(p) + len(a) - 1 for p, a in pairs) - 1  # never two of the longest
    results = scorer.score(pairs, batch_size=3, max_batch_tokens=budget)
    assert sorted(n for b in batches for n in b) == sorted(len(p) + len(a) - 1 for p, a in pairs)
    for lengths in batches:
        assert lengths == sorted(lengths) and len(lengths) <= 3
        assert len(lengths) == 1 or len(lengths) * lengths[-1] <= budget
    assert len(batches) >= 2
    # results in input order (scores of an item alone or batched: test_exactness.py's test_batch_invariance)
    assert len({len(p) for p, _ in pairs}) == len(pairs)
    assert [r.prompt_tokens for r in results] == [len(p) for p, _ in pairs]


def test_bad_items_keep_their_place(default_scorer) -> None:
    scorer = default_scorer
    good = (scorer.prompt_ids([{"role": "user", "content": "Hi?"}]), scorer.answer_ids("Hello."))
    results = scorer.score([good, (good[0], []), good, (good[0], [10**9])])
    assert [type(r).__name__ for r in results] == ["ScoreResult", "ItemError", "ScoreResult", "ItemError"]
    assert "empty" in str(results[1]) and "vocabulary" in str(results[3])
    assert isinstance(results[1], ItemError)


def test_batch_bounds_must_be_positive(default_scorer) -> None:
    for bounds in ({"batch_size": 0}, {"max_batch_tokens": 0}):
        with pytest.raises(SemgradError, match="batch size and batch tokens must be at least 1"):
            default_scorer.score([], **bounds)


def test_exgrad_can_be_left_out(default_scorer) -> None:
    """Without ExGrad (the server's default) every other score is the same, computed in the same batch."""
    from semgrad_serve.scoring.scorer import Scorer

    full = default_scorer
    lean = Scorer(full.weights, full.tokenizer, full.profile, full.kernels, exgrad=False)
    pairs = [
        (full.prompt_ids([{"role": "user", "content": q}]), full.answer_ids("Paris, I think."))
        for q in ("Capital of France?", "Where is the Louvre?")
    ]
    for a, b in zip(full.score(pairs), lean.score(pairs)):
        assert b.exgrad is None and "exgrad" not in b.scores() and a.exgrad > 0
        assert b.scores() == pytest.approx(
            {k: v for k, v in a.scores().items() if k != "exgrad"}, rel=FLOAT32_BATCH_REL
        )

"""Claims within a memory budget: the windows, the seeds per backward, the server's plan of an answer's passes
and its limit's entries (on the default model's tokenizer)."""

from __future__ import annotations

import pytest

from semgrad_serve.errors import SemgradError
from semgrad_serve.scoring.claim_budget import claim_windows, seed_bytes, seeds_per_backward
from semgrad_serve.serving.settings import ScoringSettings
from semgrad_serve.serving.worker.extension import claim_plan, over_limit, over_limit_error


def test_claim_windows_cut_consecutive_runs() -> None:
    assert claim_windows(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert claim_windows(2, 5) == [range(0, 2)]
    assert claim_windows(3, 0) == [range(0, 1), range(1, 2), range(2, 3)]  # at least one claim per window
    assert claim_windows(0, 4) == [range(0, 0)]


def test_seed_bytes_by_hand() -> None:
    # 2 items padded to 10 rows, 30 keys; 4 heads, hidden 8, float32: 4 * (3*4*20*30 + 24*8*20)
    assert seed_bytes([(10, 30), (6, 12)], n_heads=4, hidden=8, element_bytes=4) == 4 * (3 * 4 * 20 * 30 + 24 * 8 * 20)
    assert seeds_per_backward(100, 1000) == 10 and seeds_per_backward(1000, 999) == 1 and seeds_per_backward(0, 5) == 5


def test_scorer_scores_a_window_of_claims_as_in_the_whole(default_scorer) -> None:
    prompt = default_scorer.prompt_ids([{"role": "user", "content": "Tell me about Paris."}])
    answer = default_scorer.answer_ids("Paris is in France. It has a tower. It is old. People visit it.")
    (whole,) = default_scorer.score([(prompt, answer)], claims=True)
    (window,) = default_scorer.score([(prompt, answer)], claims=[range(1, 3)])
    assert len(whole.claims) == 4 and [c.text for c in window.claims] == [c.text for c in whole.claims[1:3]]
    for got, want in zip(window.claims, whole.claims[1:3]):
        assert got.scores() == pytest.approx(want.scores(), rel=1e-4)
    assert window.semgrad == pytest.approx(whole.semgrad, rel=1e-4)


def test_the_servers_plan_and_limit(default_scorer) -> None:
    prompt = default_scorer.prompt_ids([{"role": "user", "content": "Tell me about Paris."}])
    answer = default_scorer.answer_ids("Paris is in France. It has a tower. It is old. People visit it. It is big.")
    pair = (prompt, answer)
    assert claim_plan(default_scorer, 64, 16)(pair, False) == [None]
    assert claim_plan(default_scorer, 64, 16)(pair, True) == [range(0, 5)]
    assert claim_plan(default_scorer, 64, 2)(pair, True) == [range(0, 2), range(2, 4), range(4, 5)]
    assert claim_plan(default_scorer, 3, 16)(pair, True) == [range(0, 3)]
    assert claim_plan(default_scorer, 3, 1)(pair, True) == [range(0, 1), range(1, 2), range(2, 3)]
    assert claim_plan(default_scorer, 0, 16)(pair, True) == [range(0, 0)]
    claims = default_scorer.claims(answer)
    entries = over_limit(default_scorer, answer, range(2, 3), 3)
    assert [(e["text"], e["token_start"], e["token_end"]) for e in entries] == [
        (c.text, c.token_start, c.token_end) for c in claims[3:]
    ]
    assert all(e["error"] == over_limit_error(3) for e in entries)
    assert over_limit(default_scorer, answer, range(0, 2), 3) == []  # not the last window
    assert over_limit(default_scorer, answer, range(0, 5), 64) == []  # under the limit


def test_claim_settings_travel_by_environment() -> None:
    settings = ScoringSettings(max_claims=5, claims_per_pass=2, claim_memory_mib=32)
    assert ScoringSettings.from_env(settings.to_env()) == settings
    for bad in ({"max_claims": -1}, {"claims_per_pass": 0}, {"claim_memory_mib": 0}):
        with pytest.raises(SemgradError, match="at least"):
            ScoringSettings(**bad)

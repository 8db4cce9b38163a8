"""SPS: the streaming accumulator against brute-force cosines, synthetic states whose best (layer, position) is
known by construction, the t* token rule and band, and the hidden states of prompt tails."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from semgrad_serve.errors import SemgradError
from semgrad_serve.sps_scan import sps


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def brute_force(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """S_within and S_across from every pair of states, one (layer, position) at a time."""
    layers, positions = groups[0].shape[1:3]
    within = np.zeros((layers, positions))
    across = np.zeros((layers, positions))
    items = [(g, m) for g, members in enumerate(groups) for m in range(len(members))]
    for layer, p in itertools.product(range(layers), range(positions)):
        means = []
        for members in groups:
            if len(members) >= 2:
                pairs = itertools.combinations(range(len(members)), 2)
                means.append(np.mean([cosine(members[i, layer, p], members[j, layer, p]) for i, j in pairs]))
        within[layer, p] = np.mean(means)
        across[layer, p] = np.mean(
            [
                cosine(groups[g1][m1, layer, p], groups[g2][m2, layer, p])
                for (g1, m1), (g2, m2) in itertools.combinations(items, 2)
                if g1 != g2
            ]
        )
    return within, across


def test_accumulator_matches_brute_force():
    rng = np.random.default_rng(0)
    sizes = [3, 1, 4, 2, 5]  # a group without pairs counts only in S_across
    groups = [rng.normal(size=(n, 3, 4, 6)) + rng.normal(size=(1, 3, 4, 6)) for n in sizes]
    table = sps.sps_of_groups(torch.tensor(g, dtype=torch.float32) for g in groups)
    within, across = brute_force(groups)
    assert np.allclose(table.within, within, atol=1e-6) and np.allclose(table.across, across, atol=1e-6)
    assert np.allclose(table.sps, within - across, atol=1e-6)
    assert table.groups == 4 and table.prompts == sum(sizes) and table.offsets == [-4, -3, -2, -1]


def test_accumulator_needs_pairs_and_two_queries():
    with pytest.raises(SemgradError, match="at least one query with a paraphrase"):
        sps.sps_of_groups([torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)])
    with pytest.raises(SemgradError, match="at least two different queries"):
        sps.sps_of_groups([torch.randn(3, 2, 3, 4)])


def synthetic_groups(best_layer: int, best_pos: int, n_layers: int = 12, n_pos: int = 8, d: int = 32, seed: int = 0):
    """States = a shared component + noise; at (best_layer, best_pos) a strong per-query direction is added, and
    in the layers around it a weaker one, so SPS is highest exactly there."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n_layers + 1, n_pos, d)) * 3
    groups = []
    for _ in range(10):
        query = rng.normal(size=d)
        members = shared + rng.normal(size=(6, n_layers + 1, n_pos, d))
        for layer in range(n_layers + 1):
            strength = 6.0 if layer == best_layer else 2.0 / (1 + abs(layer - best_layer))
            members[:, layer, best_pos] += strength * query
        groups.append(torch.tensor(members, dtype=torch.float32))
    return groups


@pytest.mark.parametrize("best_layer,best_pos", [(9, 5), (7, 7), (11, 0)])
def test_synthetic_best_layer_and_position(best_layer, best_pos):
    table = sps.sps_of_groups(synthetic_groups(best_layer, best_pos))
    layer, p = np.unravel_index(np.argmax(table.sps), table.sps.shape)
    assert (layer, p) == (best_layer, best_pos)
    assert sps.best_position(table, n_layers=12) == best_pos  # upper half of 12 layers: 6..11
    first, last = sps.choose_band(table.sps[:, best_pos], n_layers=12)
    assert first <= best_layer <= last or best_layer == 12


def test_best_position_respects_eligibility():
    table = sps.sps_of_groups(synthetic_groups(9, 5))
    eligible = [True] * 8
    eligible[5] = False
    assert sps.best_position(table, 12, eligible) != 5
    with pytest.raises(SemgradError, match="no eligible prompt position"):
        sps.best_position(table, 12, [False] * 8)


def test_choose_band_is_the_half_height_span():
    column = np.array([9.0, 0.0, 0.1, 0.2, 0.6, 0.4, 0.7, 1.0, 0.5, 0.2, 0.55])  # L = 10: indices 0..10
    # over 1..9: min 0, max 1 → half height 0.5: indices 4, 6, 7, 8 → span 4..8 (index 0 and L are never in it)
    assert sps.choose_band(column, n_layers=10) == (4, 8)


def test_t_star_rule_by_construction():
    tok = {1: "A", 2: "B", 3: "<s>", 4: "\n", 5: "x", 6: "y"}.get
    prompts = [[3, 5, 6, 5, 4, 3, 1, 2, 4], [3, 6, 6, 4, 3, 1, 2, 4], [3, 5, 4, 3, 1, 2, 4]]
    # the last "<s>" is 4th from the end in every prompt
    rule = sps.t_star_rule(prompts, -4, tok)
    assert (rule.token, rule.offset) == ("<s>", 0)
    # "\n" at −6 (last-but-one "\n") is not its last occurrence: anchored on the next template token instead
    rule = sps.t_star_rule(prompts, -5, tok)
    assert (rule.token, rule.offset) == ("<s>", -1)
    for offset, p in [(-5, prompts[0])]:
        idx = max(i for i, t in enumerate(p) if t == 3) + rule.offset
        assert idx == len(p) + offset
    # a question token (differs between prompts) is located relative to the template token after it
    rule = sps.t_star_rule(prompts, -7, tok)
    assert rule.token == "<s>" and rule.offset == -3
    with pytest.raises(SemgradError, match="no token of the prompt tail marks position -1 in every prompt"):
        sps.t_star_rule([[5, 6], [6, 5]], -1, tok)


def test_position_labels_mark_varying_tokens():
    tok = {1: "A", 2: "B", 5: "x", 6: "y"}.get
    assert sps.position_labels([[5, 1, 2], [6, 1, 2], [5, 1, 2]], 3, tok) == ["x*", "A", "B"]


@pytest.mark.parametrize("family", ["llama-tied", "mistral-window", "qwen3-untied"])
def test_prompt_tail_states_match_hugging_face(family):
    """Batched, right-padded, shared-prefix states = Hugging Face's hidden states of each prompt alone
    (index L: the final norm's input, checked through the norm)."""
    from tiny_models import tiny_model

    model = tiny_model(family)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 100, (5,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, 100, (n,), generator=g).tolist() for n in (6, 9, 7, 12, 8)]
    prompts.append(torch.randint(0, 100, (10,), generator=g).tolist())  # no shared prefix with the others
    k = 6
    for group in (prompts[:5], prompts):
        got = sps.prompt_tail_states(model, group, k, batch_size=3)
        n_layers = model.config.num_hidden_layers
        assert got.shape == (len(group), n_layers + 1, k, model.config.hidden_size)
        for i, p in enumerate(group):
            with torch.no_grad():
                hs = model(torch.tensor([p]), output_hidden_states=True).hidden_states
            for layer in range(n_layers):
                torch.testing.assert_close(got[i, layer], hs[layer][0, -k:], rtol=1e-9, atol=1e-9)
            normed = model.model.norm(got[i, n_layers][None])[0]
            torch.testing.assert_close(normed, hs[n_layers][0, -k:], rtol=1e-9, atol=1e-9)


def test_prompt_tail_states_rejects_short_prompts():
    from tiny_models import tiny_model

    with pytest.raises(SemgradError, match="prompt 0 has fewer than 8 tokens"):
        sps.prompt_tail_states(tiny_model("llama-tied"), [[1, 2, 3]], 8)

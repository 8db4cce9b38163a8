"""Our band-only, batched, closed-form scores against the naive full-autograd computation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from semgrad_serve.kernels import select_kernels
from semgrad_serve.model.weights import from_hf_model
from semgrad_serve.scoring.band_pass import band_pass
from semgrad_serve.scoring.batch import score_batch
from semgrad_serve.scoring.given import Given
from semgrad_serve.scoring.items import PreparedItem
from semgrad_serve.scoring.scorer import Scorer
from semgrad_serve.scoring.shared_prefix import PrefixCache
from semgrad_serve.testing.naive import naive_scores, naive_t_star_features

from tiny_models import FAMILY_PARAMS, GIVEN_STATE_PARAMS, random_items, tiny_model

SCORES = ("semgrad", "paragrad", "hybridgrad", "exgrad", "mean_entropy")


def deeper_half(n_layers: int) -> range:
    return range(n_layers - n_layers // 2, n_layers)


def assert_close(ours: dict[str, float], naive: dict[str, float], rel: float) -> None:
    for key in SCORES:
        assert ours[key] == pytest.approx(naive[key], rel=rel, abs=0), key


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_float64_matches_naive_in_mixed_batch(family: str) -> None:
    model = tiny_model(family)
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    triples = random_items(6)
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in triples]
    results = score_batch(weights, items, band, select_kernels("torch"))
    for (prompt, answer, t_star), result in zip(triples, results):
        assert_close(result.scores(), naive_scores(model, prompt, answer, t_star, band), rel=1e-9)
        assert result.answer_tokens == len(answer) and result.band == (band.start, band.stop - 1)


@pytest.mark.parametrize("family", ["llama-tied", "qwen3-untied"])
def test_t_star_features_match_naive(family: str) -> None:
    """Per-layer SemGrad, the gradient and the hidden state at t* against full autograd, with and without claims
    in the batch (claims batch the backward over seeds) and with a shared prompt prefix."""
    from semgrad_serve.scoring.claims import Claim

    model = tiny_model(family)
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    head = [(5 * i + 2) % 64 for i in range(6)]
    triples = [(head + p, a, len(head) + t) for p, a, t in random_items(4, seed=7)]
    for with_claims in (False, True):
        items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in triples]
        if with_claims:
            a0 = items[0].answer_ids
            items[0] = dataclasses.replace(items[0], claims=(Claim("a", 0, 1), Claim("b", 1, len(a0))))
        shared = PrefixCache(min_tokens=4).for_batch(weights, items)
        results = score_batch(weights, items, band, select_kernels("torch"), shared, t_star_features=True)
        for (prompt, answer, t_star), result in zip(triples, results):
            naive = naive_t_star_features(model, prompt, answer, t_star, band)
            ours = result.t_star_features
            assert ours.semgrad_layers == pytest.approx(naive["semgrad_layers"], rel=1e-9, abs=0)
            assert sum(ours.semgrad_layers) / len(band) == pytest.approx(result.semgrad, rel=1e-12)
            assert ours.gradient == pytest.approx(naive["gradient"], rel=1e-9, abs=1e-15)
            assert ours.hidden == pytest.approx(naive["hidden"], rel=1e-9, abs=1e-15)
    assert score_batch(weights, items[:1], band, select_kernels("torch"))[0].t_star_features is None


def test_paper_style_naive_gives_the_same_numbers() -> None:
    model = tiny_model("llama-tied")
    band = deeper_half(5)
    for prompt, answer, t_star in random_items(2, seed=9):
        assert_close(
            naive_scores(model, prompt, answer, t_star, band, paper_style=True),
            naive_scores(model, prompt, answer, t_star, band),
            rel=1e-12,
        )


def test_custom_band_and_t_star_at_prompt_start() -> None:
    """A band that ends below the last layer still takes the total derivative through the layers above it."""
    model = tiny_model("qwen2-window-untied")
    weights = from_hf_model(model)
    band = range(1, 3)
    triples = [(p, a, 0) for p, a, _ in random_items(3, seed=5)]
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in triples]
    for (prompt, answer, t_star), result in zip(triples, score_batch(weights, items, band, select_kernels("torch"))):
        assert_close(result.scores(), naive_scores(model, prompt, answer, t_star, band), rel=1e-9)


@pytest.mark.parametrize("family", GIVEN_STATE_PARAMS)
def test_shared_prefix_matches_naive(family: str) -> None:
    """Items that share a prompt prefix run from its end, its keys/values computed once, with the same scores;
    the prefix (9 tokens) is longer than the sliding windows (5, 6) of the windowed families."""
    model = tiny_model(family)
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    head = [(7 * i + 3) % 64 for i in range(9)]
    triples = [(head + p, a, len(head) + t) for p, a, t in random_items(4, seed=11)]
    triples[0] = (triples[0][0], triples[0][1], len(head))  # t* right at the prefix's end
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in triples]
    cache = PrefixCache(min_tokens=4)
    shared = cache.for_batch(weights, items)
    assert shared is not None and shared.ids == tuple(head)
    for (prompt, answer, t_star), result in zip(
        triples, score_batch(weights, items, band, select_kernels("torch"), shared)
    ):
        assert_close(result.scores(), naive_scores(model, prompt, answer, t_star, band), rel=1e-9)
    # a lone item that starts with the prefix reuses it; one that does not, or whose t* lies inside it, does not
    assert cache.for_batch(weights, items[2:3]) is shared
    other = PreparedItem((head[0] + 1, *head[1:], 5, 6), (1, 2), 9)
    early = PreparedItem(items[1].prompt_ids, items[1].answer_ids, 4)
    assert cache.for_batch(weights, [other]) is None and cache.for_batch(weights, [early]) is None
    # a batch with a shorter common prefix replaces it, ending at the earliest t*
    assert cache.for_batch(weights, [items[1], PreparedItem(items[2].prompt_ids, items[2].answer_ids, 6)]).ids == tuple(
        head[:6]
    )
    assert PrefixCache(min_tokens=10).for_batch(weights, items) is None


def test_head_in_row_chunks_gives_the_same_scores(monkeypatch) -> None:
    """Logits formed a few answer rows at a time (one answer longer than a chunk) change nothing."""
    from semgrad_serve.scoring import batch as scoring

    assert scoring.head_groups([0, 3, 5, 12, 13], max_rows=5) == [(0, 2), (2, 3), (3, 4)]
    assert scoring.head_groups([0, 3, 5], max_rows=100) == [(0, 2)]
    weights = from_hf_model(tiny_model("qwen3-untied"))
    band = deeper_half(weights.n_layers)
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in random_items(6, seed=4)]
    whole = score_batch(weights, items, band, select_kernels("torch"))
    monkeypatch.setattr(scoring, "HEAD_CHUNK_ELEMENTS", 4 * weights.vocab_size)
    for a, b in zip(whole, score_batch(weights, items, band, select_kernels("torch"))):
        assert_close(b.scores(), a.scores(), rel=1e-12)
        assert b.token_logprobs == pytest.approx(a.token_logprobs, rel=1e-12)


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_batch_invariance(dtype: torch.dtype, rel: float) -> None:
    """An item's scores do not depend on its batch-mates or on padding."""
    weights = from_hf_model(tiny_model("llama3-untied", dtype=dtype))
    band = deeper_half(weights.n_layers)
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in random_items(7, seed=3)]
    together = score_batch(weights, items, band, select_kernels("torch"))
    for item, batched in zip(items, together):
        (alone,) = score_batch(weights, [item], band, select_kernels("torch"))
        for key in SCORES:
            assert batched.scores()[key] == pytest.approx(alone.scores()[key], rel=rel), key
        assert batched.token_logprobs == pytest.approx(alone.token_logprobs, rel=rel)


@pytest.mark.slow
def test_default_model_float32_matches_naive(default_scorer) -> None:
    scorer = default_scorer
    questions = [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Who wrote Hamlet?", "William Shakespeare wrote it."),
        ("What is the boiling point of water in Fahrenheit?", "It boils at 100 degrees, like everything."),
    ]
    pairs = [(scorer.prompt_ids([{"role": "user", "content": q}]), scorer.answer_ids(a)) for q, a in questions]
    model = scorer.model
    for (prompt, answer), result in zip(pairs, scorer.score(pairs, batch_size=3)):
        with torch.enable_grad():
            naive = naive_scores(model, prompt, answer, result.t_star, scorer.band)
        assert_close(result.scores(), naive, rel=1e-4)
        assert result.t_star == len(prompt) - 4 and result.t_star_token == "<|im_start|>"


def graph_leaves(root: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a backward from ``root`` accumulates gradients into (the graph's AccumulateGrad nodes)."""
    leaves, seen, todo = [], set(), [root.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        todo += [child for child, _ in node.next_functions]
    return leaves


def weight_tensors(value: object) -> list[torch.Tensor]:
    """Every tensor of a weights view, its layers' included."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple):
        return [t for v in value for t in weight_tensors(v)]
    if dataclasses.is_dataclass(value):
        return [t for f in dataclasses.fields(value) for t in weight_tensors(getattr(value, f.name))]
    return []


@pytest.mark.parametrize("family", ["qwen3-untied", "llama-tied"])
def test_only_probes_get_gradients(family: str) -> None:
    """A backward from the answer states fills the probes' gradients and reaches no weight: the graph's only
    leaf is the probes, and after the backward no weight has a gradient."""
    weights = from_hf_model(tiny_model(family))
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in random_items(3, seed=5)]
    fwd = band_pass(weights, items, deeper_half(weights.n_layers))
    assert [leaf is fwd.probes for leaf in graph_leaves(fwd.answer_hidden)] == [True]
    fwd.answer_hidden.square().sum().backward()
    assert fwd.probes.grad.shape == (weights.n_layers // 2, len(items), weights.hidden_size)
    assert (fwd.probes.grad.abs().sum(-1) > 0).all()  # every band layer of every item
    tensors = weight_tensors(weights)
    assert any(t is weights.layers[-1].down for t in tensors)  # the layers' tensors are among them
    assert all(t.grad is None and not t.requires_grad for t in tensors)


@pytest.mark.slow
def test_bfloat16_default_model_within_rounding_of_float32(default_scorer) -> None:
    """bfloat16 (vLLM's CPU default) keeps 8 mantissa bits: on the real model scores stay within ~10%."""
    low = Scorer.from_pretrained(dtype="bfloat16")
    questions = [("What is the capital of France?", "Paris."), ("Who wrote Hamlet?", "Shakespeare wrote Hamlet.")]
    pairs = [(low.prompt_ids([{"role": "user", "content": q}]), low.answer_ids(a)) for q, a in questions]
    for result, exact in zip(low.score(pairs), default_scorer.score(pairs)):
        assert low.weights.dtype == torch.bfloat16
        for key in SCORES:
            assert result.scores()[key] == pytest.approx(exact.scores()[key], rel=0.15), key


def scorer_over(weights, band: range, triples: list) -> Scorer:
    """A ``Scorer`` over bare weights (no tokenizer or profile) whose items take their t* from ``triples``."""
    scorer = Scorer.__new__(Scorer)
    scorer.weights, scorer.band, scorer.kernels, scorer.exgrad = weights, band, select_kernels("torch"), True
    scorer.paragrad_tied, scorer.eos_ids = False, set()
    scorer.prefix_cache = PrefixCache()
    t_stars = {tuple(p): t for p, _, t in triples}
    scorer.prepare = lambda p, a, claims=False, whole_answer=True: PreparedItem(
        tuple(p), tuple(a), t_stars[tuple(p)], whole_answer=whole_answer
    )
    return scorer


def prefix_keys_values(weights, prompt: list[int], t_star: int) -> torch.Tensor:
    """[n_layers, 2, kv_heads, t*, head_dim] keys/values of the prompt before t*, as vLLM's cache holds them."""
    from semgrad_serve.scoring.shared_prefix import shared_prefix

    if t_star == 0:
        return torch.zeros(weights.n_layers, 2, weights.n_kv_heads, 0, weights.head_dim, dtype=weights.dtype)
    kvs = shared_prefix(weights, prompt[:t_star]).keys_values
    return torch.stack([torch.stack((k[0], v[0])) for k, v in kvs])


@pytest.mark.parametrize("family", GIVEN_STATE_PARAMS)
def test_given_prefix_keys_values_match_naive(family: str) -> None:
    """Items whose keys/values before t* are given (as read from vLLM's KV cache) run only from t* on,
    through every layer, with the same scores; mixed with items that recompute them, in any order."""

    model = tiny_model(family)
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    triples = random_items(5, seed=21)
    triples[0] = (triples[0][0], triples[0][1], 0)  # t* at the first position: an empty prefix
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in triples]
    kvs = [prefix_keys_values(weights, p, t) for p, _, t in triples]
    results = score_batch(weights, items, band, select_kernels("torch"), given=[Given(kv) for kv in kvs])
    for (prompt, answer, t_star), result in zip(triples, results):
        assert_close(result.scores(), naive_scores(model, prompt, answer, t_star, band), rel=1e-9)
    # through the scorer: items with and without keys/values, batched apart, results in input order
    scorer = scorer_over(weights, band, triples)
    given = [Given(kvs[0]), Given(), Given(kvs[2]), Given(), Given(kvs[4])]
    mixed = scorer.score([(p, a) for p, a, _ in triples], batch_size=2, given=given)
    for a, b in zip(results, mixed):
        assert_close(b.scores(), a.scores(), rel=1e-9)
    wrong = scorer.score([(triples[1][0], triples[1][1])], given=[Given(kvs[2])])[0]
    assert "prefix keys/values of shape" in str(wrong)


def generation_states(
    model, prompt: list[int], answer: list[int], t_star: int, band: range
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream entering layer ``band.start`` at positions t* onwards of prompt + answer[:-1] and the
    logits predicting the answer's tokens, from the Hugging Face model's own forward (what vLLM computes while
    generating)."""
    ids = torch.tensor([prompt + answer[:-1]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.hidden_states[band.start][0, t_star:], out.logits[0, len(prompt) - 1 :]


@pytest.mark.parametrize("family", GIVEN_STATE_PARAMS)
def test_given_band_inputs_and_logits_match_naive(family: str) -> None:
    """Items given their band's inputs (the residual stream vLLM computed), the band layers' prefix keys/values and,
    for some, the answer's logits run only the band and form only the missing logits, with the same scores; a
    longer recording is cut to the item; mixed with other kinds."""

    model = tiny_model(family)
    weights = from_hf_model(model)
    band = deeper_half(weights.n_layers)
    triples = random_items(4, seed=23)
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in triples]
    kvs = [prefix_keys_values(weights, p, t)[band.start :] for p, _, t in triples]
    states = [generation_states(model, p, a, t, band) for p, a, t in triples]
    xs, zs = [x for x, _ in states], [z for _, z in states]
    xs[1] = torch.cat((xs[1], torch.randn(3, xs[1].shape[1], dtype=xs[1].dtype)))  # recorded past the answer
    zs[2] = torch.cat((zs[2], torch.randn(2, zs[2].shape[1], dtype=zs[2].dtype)))
    zs[0] = None  # formed by scoring
    kept = [z.clone() for z in zs[1:]]
    given = [Given(kv, x, z) for kv, x, z in zip(kvs, xs, zs)]
    results = score_batch(weights, items, band, select_kernels("torch"), given=given)
    assert all(torch.equal(a, b) for a, b in zip(kept, zs[1:]))  # the given logits are not overwritten
    for (prompt, answer, t_star), result in zip(triples, results):
        assert_close(result.scores(), naive_scores(model, prompt, answer, t_star, band), rel=1e-9)
    scorer = scorer_over(weights, band, triples)
    full_kv = prefix_keys_values(weights, triples[2][0], triples[2][2])
    mixed = scorer.score(
        [(p, a) for p, a, _ in triples],
        batch_size=2,
        given=[Given(kvs[0], xs[0]), Given(kvs[1], xs[1], zs[1]), Given(full_kv, None, zs[2]), Given(logits=zs[3])],
    )
    for a, b in zip(results, mixed):
        assert_close(b.scores(), a.scores(), rel=1e-9)
    pair = [(triples[0][0], triples[0][1])]
    assert "prefix keys/values of shape" in str(scorer.score(pair, given=[Given(full_kv, xs[0])])[0])
    assert "band inputs of shape" in str(scorer.score(pair, given=[Given(kvs[0], xs[0][:1])])[0])
    assert "logits of shape" in str(scorer.score(pair, given=[Given(logits=zs[1][:1])])[0])
    with pytest.raises(ValueError, match="band inputs need"):
        Given(band_inputs=xs[0])
    # a batch runs one forward: items given different kinds of states are never batched together
    with pytest.raises(ValueError, match="the same states"):
        score_batch(weights, items[:2], band, select_kernels("torch"), given=[Given(kvs[0], xs[0]), Given()])

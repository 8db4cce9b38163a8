"""Correctness judges and the sampling baselines' building blocks on hand-made cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from semgrad_serve.evaluation import baselines, judges, reference_judge


def test_normalize():
    assert judges.normalize("  The Sun's  RADIATION, (mostly)!  ") == "sun s radiation mostly"
    assert judges.normalize("An apple a day") == "apple day"
    assert judges.normalize("") == ""


@pytest.mark.parametrize(
    "answer,gold,expected",
    [
        ("Charles Darwin", "darwin", True),
        ("It was Charles Darwin.", "Darwin", True),
        ("Each polypeptide has a unique sequence of amino acids.", "amino", True),
        ("The Sun", "the sun", True),
        ("cells", "cell", False),  # whole words only
        ("cell", "cell wall", False),  # the gold must be in the answer, not the reverse
        ("a desert", "wetland", False),
        ("", "darwin", False),
        ("anything", "the", False),  # a gold that normalises to nothing matches nothing
    ],
)
def test_containment(answer, gold, expected):
    assert judges.contains(answer, gold) is expected
    assert judges.judge_containment(answer, [gold, "zzz"]).correct is expected


@pytest.mark.parametrize(
    "answer,gold,question,expected",
    [
        (
            "Periodic is something that does it by repeating itself.",
            "repeat",
            "Periodic refers to something that does what?",
            True,
        ),
        (
            "Bielefeld is a city in the heart of Germany.",
            "Bielefeld is in Germany",
            "Where is the city of Bielefeld?",
            True,
        ),
        ("Pigs cannot fly.", "No, pigs cannot fly", "Can pigs fly?", True),
        (
            "Can people be possessed by evil spirits?",
            "No, people cannot be possessed by evil spirits",
            "Can people be possessed by evil spirits?",
            False,
        ),  # the question restated, not negated
        (
            "Brown sugar is healthier than white sugar.",
            "No, brown sugar is not healthier than white sugar",
            "Is brown sugar healthier than white sugar?",
            False,
        ),
        (
            "A uterus can grow back, but it's not a permanent solution.",
            "No, a human uterus cannot grow back",
            "Can a human uterus grow back after a full hysterectomy?",
            False,
        ),  # only the part before "but" is the claim
        (
            "water vapor is denser than air",
            "Air is denser than water vapor",
            "Which is denser, water vapor or air?",
            False,
        ),
        (
            "The affordability of food in Canada has been increasing.",
            "The affordability of food in Canada has increased since 1970",
            "What has happened to the affordability of food in Canada since 1970?",
            True,
        ),
        (
            "Amaranthine",
            "Nothing in particular happens to coaches at midnight",
            "What happens to coaches at midnight?",
            False,
        ),
    ],
)
def test_reference_judge(answer, gold, question, expected):
    assert judges.judge_reference(answer, ["zzz", gold], question).correct is expected


def test_stem_keeps_three_letters_and_double_s():
    assert [
        reference_judge.stem(w) for w in ("gases", "gas", "glass", "repeating", "stories", "charged", "charge")
    ] == ["gas", "gas", "glass", "repeat", "story", "charg", "charg"]


def brute_lcs(a, b) -> int:
    """Longest common subsequence by trying every subsequence of the shorter list."""
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    for k in range(len(short), 0, -1):
        for sub in itertools.combinations(short, k):
            it = iter(long_)
            if all(any(x == y for y in it) for x in sub):
                return k
    return 0


def test_lcs_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(60):
        a = list(rng.integers(0, 4, rng.integers(0, 8)))
        b = list(rng.integers(0, 4, rng.integers(0, 8)))
        assert judges.lcs_length(a, b) == brute_lcs(a, b)


def test_rouge_l_by_hand():
    # "cat sat on mat" vs "cat on mat" after normalisation: LCS 3, P = 3/4, R = 1 → F = 6/7
    assert judges.rouge_l("The cat sat on the mat", "the cat on mat") == pytest.approx(6 / 7)
    assert judges.rouge_l("nothing happens", "Nothing happens.") == 1.0
    assert judges.rouge_l("blue", "red") == 0.0 and judges.rouge_l("", "red") == 0.0
    got = judges.judge_rouge("You will get sick", ["Nothing happens", "You will not get sick"], threshold=0.3)
    assert got.correct and got.similarity == pytest.approx(2 * 1 * 0.8 / 1.8)
    assert not judges.judge_rouge("Fortune cookies come from Japan", ["Nothing happens"]).correct


@pytest.fixture(scope="module")
def embedder():
    return judges.default_embedder()


def test_embedder_gives_unit_vectors(embedder):
    v = embedder.encode(["Charles Darwin", "a swamp", "Charles Darwin"])
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5) and np.allclose(v[0], v[2])
    assert embedder.similarity(["photosynthesis"], ["photosynthesis"])[0, 0] == pytest.approx(1, abs=1e-5)


def test_embedding_judge(embedder):
    assert judges.judge_embedding("Charles Darwin", ["darwin"], embedder=embedder).correct
    assert judges.judge_embedding("the stomata", ["stomata"], embedder=embedder).correct
    assert not judges.judge_embedding("Isaac Newton", ["darwin"], embedder=embedder).correct
    assert not judges.judge_embedding("Quantum mechanics", ["thermodynamics"], embedder=embedder).correct
    assert not judges.judge_embedding("", ["darwin"], embedder=embedder).correct
    # the best gold counts
    assert (
        judges.judge_embedding("Nothing happens", ["You digest them", "Nothing happens"], embedder=embedder).similarity
        > 0.99
    )


def test_judge_all_batches_every_judge(embedder):
    answers = ["Charles Darwin", "Isaac Newton", ""]
    golds = [["darwin"], ["darwin"], ["darwin"]]
    out = judges.judge_all(answers, golds, ["Who proposed evolution?"] * 3, embedder=embedder)
    assert set(out) == set(judges.JUDGES)
    assert [j.correct for j in out["containment"]] == [True, False, False]
    assert [j.correct for j in out["reference"]] == [True, False, False]
    assert [j.correct for j in out["embedding"]] == [True, False, False]
    assert [j.correct for j in out["rouge"]] == [True, False, False]


# -- sampling baselines ----------------------------------------------------------------------------


def test_lexical_similarity_score():
    assert baselines.lexical_similarity_score(["Paris", "paris.", "Paris!"]) == pytest.approx(0)
    assert baselines.lexical_similarity_score(["red", "blue", "green"]) == pytest.approx(1)
    # pairs: (x y, x z) → F1 ½, (x y, w) → 0, (x z, w) → 0 → mean 1/6
    assert baselines.lexical_similarity_score(["x y", "x z", "w"]) == pytest.approx(1 - 1 / 6)
    assert baselines.lexical_similarity_score(["a b", "a c"]) == pytest.approx(1)  # "a" is an article: b vs c
    assert math.isnan(baselines.lexical_similarity_score(["only one"]))


def test_cluster_and_semantic_entropy_by_hand():
    sim = np.array([[1, 0.9, 0.1, 0.85], [0.9, 1, 0.2, 0.3], [0.1, 0.2, 1, 0.1], [0.85, 0.3, 0.1, 1]])
    assert baselines.cluster(sim, 0.8) == [0, 0, 1, 0]  # item 3 joins item 0's cluster (its first member)
    assert baselines.cluster(sim, 0.95) == [0, 1, 2, 3]
    # equal sequence probabilities: clusters of 3 and 1 → entropy of (3/4, 1/4)
    h = baselines.semantic_entropy([0, 0, 1, 0], [-1.0] * 4)
    assert h == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert baselines.semantic_entropy([0, 0, 0], [-0.1, -3.0, -2.0]) == 0
    # weights are exp(mean log-prob): cluster masses e^0 and e^-ln3 = 1/3 → (3/4, 1/4)
    assert baselines.semantic_entropy([0, 1], [0.0, -math.log(3)]) == pytest.approx(h)


def test_sampling_scores_on_hand_made_samples(embedder):
    from semgrad_serve.evaluation.generation import Generation

    same = [
        Generation([1], "Charles Darwin", [-0.5]),
        Generation([1], "Darwin", [-0.7]),
        Generation([1], "Charles Darwin.", [-0.4]),
    ]
    mixed = [
        Generation([1], "Charles Darwin", [-0.5]),
        Generation([1], "a volcano erupting", [-0.5]),
        Generation([1], "blue whales", [-0.5]),
    ]
    lexical, entropy, counts, _, _ = baselines.sampling_scores([same, mixed], embedder, progress=False)
    assert counts == [1, 3]
    assert entropy[0] == pytest.approx(0) and entropy[1] == pytest.approx(math.log(3))
    assert lexical[0] < lexical[1]

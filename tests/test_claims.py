"""Per-claim scores: the sentence splitter on hand cases."""

from __future__ import annotations

import re

import pytest

from semgrad_serve.scoring.claims import Claim, split_claims

# -- the splitter ---------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """``text`` as word-like tokens, each with the whitespace before it."""
    return re.findall(r"\s*\S+|\s+", text)


@pytest.mark.parametrize(
    "text,claims",
    [
        ("Paris is the capital of France. It has 2.1 million people! Is it big? Yes.",
         ["Paris is the capital of France.", "It has 2.1 million people!", "Is it big?", "Yes."]),
        ("Dr. Smith met Mr. Jones in the U.S. last year. J. K. Rowling wrote it, e.g. Harry Potter.",
         ["Dr. Smith met Mr. Jones in the U.S. last year.", "J. K. Rowling wrote it, e.g. Harry Potter."]),
        ("It costs $3.50 or 3.5 euros. The value is 3. The next is 4.",
         ["It costs $3.50 or 3.5 euros.", "The value is 3.", "The next is 4."]),
        ("Fruits:\n1. Apples\n2. Pears.\n3. Plums\n\nThat is all, etc. and more. See www.example.com. Done",
         ["Fruits:", "1. Apples", "2. Pears.", "3. Plums", "That is all, etc. and more.", "See www.example.com.", "Done"]),
        ("- one item.\n- another one", ["- one item.", "- another one"]),
        ("Use this:\n```python\nx = a.b()\nprint(x)\n```\nCall `os.path.join()`. It works.",
         ["Use this:", "```python\nx = a.b()\nprint(x)\n```", "Call `os.path.join()`.", "It works."]),
        ('He said "Stop." Then he left... Why?! Because.', ['He said "Stop."', "Then he left...", "Why?!", "Because."]),
        ("No sentence end", ["No sentence end"]),
    ],
)  # fmt: skip
def test_splitter_hand_cases(text: str, claims: list[str]) -> None:
    got = split_claims(words(text))
    assert [c.text for c in got] == claims
    assert got[0].token_start == 0 and got[-1].token_end == len(words(text))
    assert all(a.token_end == b.token_start for a, b in zip(got, got[1:]))  # consecutive, covering every token


def test_splitter_token_ownership() -> None:
    """Whitespace joins the claim before it, a token with no text (a cut character) the next one, a stop token
    past the texts the last claim; nothing visible, no claim."""
    assert split_claims(["  ", "Hi", ".", "\n\n", " Yo", "", "é", "."], n_tokens=9) == [
        Claim("Hi.", 0, 4), Claim("Yoé.", 4, 9),
    ]  # fmt: skip
    assert split_claims(["A", " b.c", " d"]) == [Claim("A b.c d", 0, 3)]  # a sentence inside a token: merged
    assert split_claims([]) == [] and split_claims([" ", "\n"], n_tokens=3) == []

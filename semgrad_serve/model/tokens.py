"""The text of each token of a scored answer (the opt-in per-token data, ``"semgrad": {"tokens": true}``, and the
claims), and whether an answer shows the user anything.

Decoding token by token would break characters that span several byte-level
tokens, so each token's text is what it adds to the decoded answer (the way vLLM
detokenizes a stream): a token that ends inside a character gets ``""`` and the
token that completes the character carries it. Joined, the texts are the decoded
answer, special tokens (the stop token) included as their text.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

WINDOW = 8  # tokens decoded before the pending ones: enough context for any tokenizer's spacing rules
INCOMPLETE = "\ufffd"  # what a decoder gives for a character cut in the middle


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """One string per id of ``ids``; ``"".join`` of them equals the decoded ids."""
    ids = [int(i) for i in ids]

    def decode(lo: int, hi: int) -> str:
        return tokenizer.decode(ids[lo:hi], skip_special_tokens=False) if hi > lo else ""

    texts: list[str] = []
    pending = 0  # the first token whose text is not out yet
    for i in range(len(ids)):
        start = max(0, pending - WINDOW)
        before, through = decode(start, pending), decode(start, i + 1)
        last = i == len(ids) - 1
        if (through.endswith(INCOMPLETE) or not through.startswith(before)) and not last:
            texts.append("")  # its character is not complete yet: the token that completes it carries it
            continue
        texts.append(through[len(os.path.commonprefix([before, through])) :])
        pending = i + 1
    return texts


def has_visible_text(tokenizer: Any, ids: Sequence[int]) -> bool:
    """Whether ``ids`` show the user anything: their text without special tokens (the stop token among them) is
    more than whitespace."""
    return bool(tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip())

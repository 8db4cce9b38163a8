"""The stop-token convention (SPEC, Inputs): which tokens of a generated answer are scored.

An answer that ended on the model's end-of-turn / EOS token (any id of its ``eos_token_id`` list) has
that token as its last scored token, as the authors' code counts it; an answer cut at the token limit
has none; a stop string is not a token: the answer is the tokens the user receives.
"""

from __future__ import annotations

from typing import Any, Sequence

EosValue = int | Sequence[int] | None


def eos_ids(*values: EosValue) -> list[int]:
    """The model's EOS ids, in order, from ``eos_token_id`` values (tokenizer, config, generation config)."""
    ids: list[Any] = []
    for value in values:
        ids += value if isinstance(value, (list, tuple)) else [value]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))


def hf_eos_ids(tokenizer: Any, model: Any) -> list[int]:
    """``eos_ids`` of a Hugging Face model: its tokenizer's, its config's and its generation config's."""
    return eos_ids(
        tokenizer.eos_token_id, model.config.eos_token_id, getattr(model.generation_config, "eos_token_id", None)
    )


def received_tokens(tokenizer: Any, ids: Sequence[int], stop: str, include_stop: bool) -> list[int]:
    """The tokens of an answer stopped by the stop string ``stop`` that the user receives: those of its text up to
    the stop string (and through it with ``include_stop``)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = text.find(stop)
    return tokens_of_text(tokenizer, ids, text if cut < 0 else text[: cut + len(stop) if include_stop else cut])


def tokens_of_text(tokenizer: Any, ids: Sequence[int], received: str) -> list[int]:
    """The longest prefix of ``ids`` whose text (special tokens skipped, so an EOS token after it is kept) is a
    prefix of ``received``, the answer text the user got."""
    k = len(ids)
    while k and not received.startswith(tokenizer.decode(ids[:k], skip_special_tokens=True)):
        k -= 1
    return list(ids[:k])

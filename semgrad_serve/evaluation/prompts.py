"""The evaluation prompt (SPEC): the paper's user message for one question, and its decoding limit.

The SPS scan (``sps_scan/``) wraps its paraphrases in the same prompt, so that the prompt tail it scans is the one
that is scored.
"""

from __future__ import annotations

PAPER_PROMPT = "Please directly answer the following question with one or few words:\n{query}"
MAX_NEW_TOKENS = 150


def paper_messages(query: str) -> list[dict[str, str]]:
    """The chat the paper's evaluation sends for one question."""
    return [{"role": "user", "content": PAPER_PROMPT.format(query=query)}]

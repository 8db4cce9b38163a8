"""A prompt prefix that every item of a batch starts with, run once instead of once per item.

Chat prompts share their template's head, a system prompt and often an instruction
(the paper's "Please directly answer ..."). Those positions lie before t*, so the
scoring forward needs only their keys/values at every layer, as constants:
``shared_prefix`` computes them once (``model/forward.py``) and ``band_pass`` runs each
item from the end of the prefix on. ``PrefixCache`` keeps the last one while batches
keep starting with it, as a server's requests do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..model.decoder import KeyValue
from ..model.forward import common_prefix_length, prefix_keys_values
from ..model.weights import DecoderWeights
from .items import PreparedItem

MIN_SHARED_TOKENS = 16  # below this, one more forward call costs more than it saves


@dataclass(frozen=True)
class SharedPrefix:
    """Token ids of the prefix and its keys/values [1, kv_heads, len, head_dim] at every layer."""

    ids: tuple[int, ...]
    keys_values: tuple[KeyValue, ...]

    def fits(self, item: PreparedItem) -> bool:
        """Whether the item starts with this prefix and its t* lies at or after the prefix's end."""
        return len(self.ids) <= item.t_star and item.prompt_ids[: len(self.ids)] == self.ids


def shared_prefix(w: DecoderWeights, ids: Sequence[int]) -> SharedPrefix:
    """Run ``ids`` through every layer without a graph and keep each layer's keys/values."""
    return SharedPrefix(tuple(ids), prefix_keys_values(w, ids))


class PrefixCache:
    """The most recent shared prefix of the batches one set of weights scores.

    A batch that starts with the cached prefix reuses it (a lone item included); otherwise a
    batch of two or more computes its own common prefix, if it is long enough, and keeps it.
    """

    def __init__(self, min_tokens: int = MIN_SHARED_TOKENS) -> None:
        self.min_tokens = min_tokens
        self.entry: SharedPrefix | None = None

    def for_batch(self, w: DecoderWeights, items: Sequence[PreparedItem]) -> SharedPrefix | None:
        long_after = w.long_rope_after
        if long_after is not None and any(it.length + 1 > long_after for it in items):
            return None  # LongRoPE's long frequencies: the prefix's keys/values are not those of short sequences
        if self.entry is not None and all(self.entry.fits(it) for it in items):
            return self.entry
        if len(items) < 2:
            return None
        # the prefix must end at or before every item's t*
        n = common_prefix_length([it.prompt_ids for it in items], limit=min(it.t_star for it in items))
        if n < self.min_tokens:
            return None
        self.entry = shared_prefix(w, items[0].prompt_ids[:n])
        return self.entry

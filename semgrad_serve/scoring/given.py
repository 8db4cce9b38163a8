"""What scoring an answer may take as already computed (by vLLM while it generated), and which path that selects.

The serving worker fills a ``Given`` per answer from its capture (``serving/worker/captures.py``); ``Scorer.score``
groups answers by ``Given.kind``, since every item of a batch must run the same forward (``band_pass.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

import torch


class GivenKind(enum.IntEnum):
    """Which forward an answer's scoring runs, from what it is given (an int, so that ranks can compare kinds with
    one all-reduce)."""

    NOTHING = 0  # the whole prompt is recomputed
    PROMPT_KV = 1  # the prompt's keys/values before t* at every layer: the answer runs from t* on through every layer
    BAND_INPUTS = 2  # the band layers' keys/values and the band's inputs from t* on: only the band runs


# The names of what was reused, in data-path order, as the ``"reused"`` field of a served answer lists them.
REUSED_NAMES = ("prompt_kv", "band_inputs", "logits")


@dataclass(frozen=True)
class Given:
    """What scoring one answer takes as computed; None: computed by scoring.

    ``prefix_kv``: its prompt's keys/values before t* ([layers, 2, kv_heads, t*, head_dim], as vLLM's KV cache holds
    them), at every layer, or with ``band_inputs`` at the band's layers only; ``band_inputs``: the residual stream
    entering the band's first layer at positions t* onwards ([≥ length − t*, d]); ``logits``: the logits
    [≥ answer length, V] predicting its answer tokens."""

    prefix_kv: torch.Tensor | None = None
    band_inputs: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.band_inputs is not None and self.prefix_kv is None:
            raise ValueError("band inputs need the prefix keys/values of the band's layers")

    @property
    def kind(self) -> GivenKind:
        """The forward these states select."""
        if self.prefix_kv is None:
            return GivenKind.NOTHING
        return GivenKind.PROMPT_KV if self.band_inputs is None else GivenKind.BAND_INPUTS

    def without_logits(self) -> Given:
        return Given(self.prefix_kv, self.band_inputs)

    def reused(self) -> list[str]:
        """What is given, by name (``REUSED_NAMES``)."""
        values = self.prefix_kv, self.band_inputs, self.logits
        return [name for name, value in zip(REUSED_NAMES, values) if value is not None]


NOTHING_GIVEN = Given()


def batch_kind(given: Sequence[Given] | None) -> GivenKind:
    """The one kind of a batch's ``given`` (None: nothing given); a ``ValueError`` where the items' kinds differ."""
    kinds = {g.kind for g in given or ()} or {GivenKind.NOTHING}
    if len(kinds) > 1:
        raise ValueError(f"a batch's items must be given the same states, not {sorted(k.name for k in kinds)}")
    return kinds.pop()

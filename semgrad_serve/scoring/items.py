"""What the scoring layer takes and gives: a prepared item, the scores of one answer, and the scores' names.

No torch here: the CLI, the profiles and the server's reports use these without loading the maths.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .claims import Claim

# The scores of an answer (higher = more uncertain), in the order results and reports list them.
GRADIENT_SCORES = ("semgrad", "paragrad", "hybridgrad", "exgrad")  # from one batched gradient pass (``batch.py``)
FLAG_SCORES = (*GRADIENT_SCORES, "mean_entropy")  # what a profile may compare with its flag threshold
SCORE_NAMES = (*FLAG_SCORES, "paragrad_tied")  # every score; ``paragrad_tied`` is opt-in (``tied_head.py``)
DEFAULT_SCORE = "hybridgrad"  # the SPEC's flag score

# How t* was found: the profile's template token, or (a prompt built without the chat template) the last prompt
# token, the paper's ablation
T_STAR_RULES = ("template", "last_prompt_token")

# The error of an answer with no tokens; the server also gives it for one that shows the user nothing (only
# whitespace and special tokens, ``has_visible_text``)
NOTHING_TO_SCORE = "nothing to score: the answer is empty"

# Most tokens per scoring batch, padding included (``Scorer.score``); a longer item goes alone.
DEFAULT_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class PreparedItem:
    """Token ids of one prompt and answer, with the prompt position of t* and its token."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    t_star: int
    t_star_token: str = ""
    t_star_rule: str = T_STAR_RULES[0]
    claims: tuple[Claim, ...] = ()  # consecutive token runs that cover the answer, each scored on its own; () = none
    whole_answer: bool = True  # False: only its claims are scored (an answer still being generated)

    @property
    def length(self) -> int:
        """Tokens the scoring forward runs on (the last answer token is never fed in)."""
        return len(self.prompt_ids) + len(self.answer_ids) - 1


def hybrid(paragrad: float, semgrad: float, mean_entropy: float) -> float:
    """HybridGrad = α·ParaGrad + (1−α)·SemGrad with α = exp(−mean_entropy)."""
    alpha = math.exp(-mean_entropy)
    return alpha * paragrad + (1 - alpha) * semgrad


@dataclass(frozen=True)
class ClaimScores:
    """The scores of one claim: the SPEC's loss restricted to its tokens (``mean_entropy`` over them too)."""

    text: str
    token_start: int
    token_end: int  # exclusive
    semgrad: float
    paragrad: float
    hybridgrad: float
    exgrad: float | None
    mean_entropy: float

    def scores(self) -> dict[str, float]:
        """The scores that were computed, by name (``FLAG_SCORES`` order)."""
        return {k: getattr(self, k) for k in FLAG_SCORES if getattr(self, k) is not None}


@dataclass(frozen=True)
class ClaimsResult:
    """The scores of an answer's claims alone: an answer still being generated, whose whole-answer scores would
    change with what comes next while its settled claims' scores cannot."""

    claims: list[ClaimScores]
    answer_tokens: int  # the answer's tokens so far
    stop_token: bool = False

    def scores(self) -> dict[str, float]:
        """Every claim's scores, by claim index and name (``"2.semgrad"``)."""
        return {f"{i}.{k}": v for i, c in enumerate(self.claims) for k, v in c.scores().items()}


@dataclass(frozen=True)
class TStarFeatures:
    """What the scoring pass finds at t* besides SemGrad, kept where asked for (the confidence probe's inputs):
    per band layer the mean |∂loss/∂h| at t* (SemGrad is their mean), and at the band's last layer the gradient
    ∂loss/∂h and the residual stream h itself at t*."""

    semgrad_layers: list[float]
    gradient: list[float]
    hidden: list[float]


@dataclass(frozen=True)
class ScoreResult:
    """All scores of one answer (higher = more uncertain) and what they were computed from."""

    semgrad: float
    paragrad: float
    hybridgrad: float
    exgrad: float | None  # None where not asked for (the server skips it unless it is the flag's score)
    mean_entropy: float
    token_entropies: list[float]
    token_logprobs: list[float]
    t_star: int
    t_star_token: str
    t_star_rule: str
    band: tuple[int, int]
    prompt_tokens: int
    answer_tokens: int  # the stop token included where counted
    stop_token: bool = False  # the answer's last token is the model's end-of-turn / EOS token, and was scored
    paragrad_tied: float | None = None  # the authors' tied-head ParaGrad (``tied_head.py``), where asked for
    claims: list[ClaimScores] | None = None  # per claim, where the item had claims
    t_star_features: TStarFeatures | None = None  # where asked for (``score_batch(..., t_star_features=True)``)

    def scores(self) -> dict[str, float]:
        """The scores that were computed, by name (``SCORE_NAMES`` order)."""
        return {k: getattr(self, k) for k in SCORE_NAMES if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

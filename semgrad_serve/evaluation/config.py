"""The settings of one evaluation run (``semgrad-serve eval``) and their defaults.

No torch here: the CLI builds its options from these without loading the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .prompts import MAX_NEW_TOKENS

GENERATORS = ("vllm", "hf")
DEFAULT_CLUSTER_THRESHOLD = 0.8  # cosine similarity that puts two samples in one meaning cluster (semantic entropy)


@dataclass
class EvalConfig:
    datasets: list[str]
    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"  # where the scorer's model runs (vLLM places its own)
    profile: str | None = None
    compare_profiles: list[str] = field(default_factory=list)
    limit: int | None = None
    samples: int = 5
    temperature: float = 1.0
    max_tokens: int = MAX_NEW_TOKENS
    generator: str = "vllm"
    judge: str = "reference"
    judge_threshold: float | None = None
    cluster_threshold: float = DEFAULT_CLUSTER_THRESHOLD
    flag_target: str = "precision:0.95"
    out: str = "eval_results"
    prefix: str = "eval"
    profile_out: str | None = None
    batch_size: int = 8
    cache_dir: str | None = None
    seed: int = 0
    stop_token: bool = True  # score the EOS token that ended an answer (SPEC); False: the old convention
    paragrad_tied: bool | None = None  # also the tied-head ParaGrad; None: the profile's setting
    # NLL and entropy baselines from the gradient pass's own log-probs and entropies (the same answer tokens; no
    # second forward, so their cost is not measured) and no P(True): for models whose extra forwards take hours
    cheap_baselines: bool = False
    from_items: str | None = None  # re-judge, re-measure and re-fit the items of an earlier run instead of generating
    rauq: bool = True  # the RAUQ baseline (one more forward per answer, with attention weights)
    rescore: bool = False  # with from_items: run the gradient pass (the probe's features) and RAUQ again on its answers
    progress: bool = True

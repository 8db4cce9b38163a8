"""Log-probabilities and entropies of next-token distributions, as the SPEC defines them.

Softmax statistics are computed in float32, or float64 for float64 logits, and 0·log 0 counts as 0
(a −inf logit adds nothing to an entropy). The scoring kernels (``kernels/token_stats.py``) compute the
same per-row values fused with the loss gradient; this is the plain version for everything else: the
baselines' forward passes, generated tokens' log-probabilities and the naive reference in tests/.
"""

from __future__ import annotations

import torch


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the last axis, in float32 or wider."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy) of each distribution: logits [..., V], targets [...] (differentiable)."""
    logp = log_softmax(logits)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), entropy

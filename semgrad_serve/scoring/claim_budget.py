"""How many backward seeds (the whole answer, then one per claim) fit one backward's memory budget.

Claims are scored by seeding the band's backward once per claim (``batch.py``): every seed carries its own
copy of the suffix's activation gradients, so a backward's memory grows with seeds × rows × keys (attention)
and seeds × rows × hidden size (the rest). Cutting the seeds into groups that each fit ``budget`` bytes keeps
the memory of one backward bounded whatever the answer's length and number of sentences; the time is the
same (each seed is computed once).
"""

from __future__ import annotations

from typing import Sequence

# Default memory budget of one backward's seeds, in bytes.
DEFAULT_SEED_BUDGET = 256 << 20
# Per seed, per (query row, key) of a band layer's attention: its probabilities' gradient and two temporaries.
_ATTENTION_COPIES = 3
# Per seed and suffix row, in hidden-size units: the gradients of a layer's inputs, norms, q/k/v, attention
# output and its MLP's (about three hidden sizes wide) gate, up and product.
_ROW_HIDDEN_UNITS = 24


def seed_bytes(rows_keys: Sequence[tuple[int, int]], n_heads: int, hidden: int, element_bytes: int) -> int:
    """Bytes one backward seed needs over a batch whose items run ``rows`` suffix rows against ``keys`` keys."""
    rows = max(r for r, _ in rows_keys) * len(rows_keys)  # the batch is padded to its longest suffix
    keys = max(k for _, k in rows_keys)
    return element_bytes * (_ATTENTION_COPIES * n_heads * rows * keys + _ROW_HIDDEN_UNITS * hidden * rows)


def seeds_per_backward(per_seed: int, budget: int) -> int:
    """How many seeds of ``per_seed`` bytes one backward takes within ``budget`` bytes (at least one)."""
    return max(1, budget // max(per_seed, 1))


def claim_windows(n_claims: int, per_window: int) -> list[range]:
    """Claims ``[0, n_claims)`` cut into consecutive windows of at most ``per_window``; ``[range(0, 0)]`` for none."""
    if n_claims <= 0:
        return [range(0, 0)]
    step = max(1, per_window)
    return [range(s, min(s + step, n_claims)) for s in range(0, n_claims, step)]

"""Shared fixtures: the embedded default model, loaded once per session."""

from __future__ import annotations

import os

# Triton's CPU interpreter must be chosen before triton is first imported (by any test module).
os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Relative agreement of float32 scores of the same item scored beside different batch-mates (or alone):
# padding changes the float32 rounding of every matmul, and for a confident token 1 - p(y_t) sits near
# float32's resolution of the logit margin, so runs differ by up to ~1e-4. Exact batch invariance is
# tested in float64 (test_exactness.py).
FLOAT32_BATCH_REL = 5e-4


@pytest.fixture(scope="session")
def default_scorer():
    from semgrad_serve.scorer import Scorer

    return Scorer.from_pretrained()

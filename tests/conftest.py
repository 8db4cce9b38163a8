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


@pytest.fixture(scope="session")
def default_scorer():
    from semgrad_serve.scorer import Scorer

    return Scorer.from_pretrained()

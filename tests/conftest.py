"""Shared fixtures: the embedded default model, loaded once per session."""

from __future__ import annotations

import os

# Triton's CPU interpreter must be chosen before triton is first imported (by any test module).
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    from semgrad_serve.testing.launch_server import RunningServer

# The project's QA data ships in the repository (data/, sources and licences in its README).
DATA_DIR = Path(os.environ.get("SEMGRAD_SERVE_DATA", Path(__file__).resolve().parents[1] / "data"))

# Relative agreement of float32 scores of the same item scored beside different batch-mates (or alone):
# padding changes the float32 rounding of every matmul, and for a confident token 1 - p(y_t) sits near
# float32's resolution of the logit margin, so runs differ by up to ~1e-4. Exact batch invariance is
# tested in float64 (test_exactness.py).
FLOAT32_BATCH_REL = 5e-4

# The fields of a scored claim, in order, wherever claims are reported (CLI, served answers, live chunks).
CLAIM_FIELDS = (
    "text",
    "token_start",
    "token_end",
    "semgrad",
    "paragrad",
    "hybridgrad",
    "mean_entropy",
    "confidence",
    "flagged",
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The QA data (``{sciq,truthfulqa}/{test,paraphrase}.jsonl``); a clear failure where it is missing."""
    if not (DATA_DIR / "sciq" / "test.jsonl").is_file():
        pytest.fail(f"the QA data is not at {DATA_DIR}: it ships in the repository's data/ (or set SEMGRAD_SERVE_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def default_scorer():
    from semgrad_serve.scoring.scorer import Scorer

    return Scorer.from_pretrained()


SERVER_START_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Iterator["RunningServer"]:
    """One real ``semgrad-serve serve`` for the whole session (default model, float32, CPU settings, the scoring
    fault hook on), shared by test_serving.py and test_serving_page.py: a start costs about a minute."""
    from semgrad_serve.errors import SemgradError
    from semgrad_serve.serving.settings import TEST_FAULTS_ENV
    from semgrad_serve.testing.launch_server import checkout_env, semgrad_server

    log = tmp_path_factory.mktemp("serving") / "server.log"
    env = checkout_env(**{TEST_FAULTS_ENV: "1"})
    # A small KV cache: the tests need little of it, and the server starts faster with an explicit size.
    args = ["--dtype", "float32", "--max-batch", "8", "--", "--kv-cache-memory-bytes", str(1 << 30)]
    try:
        with semgrad_server(log, *args, env=env, timeout_s=SERVER_START_TIMEOUT_S) as server:
            yield server
    except SemgradError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def base_url(served: "RunningServer") -> str:
    return served.url

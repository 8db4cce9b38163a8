"""Names vLLM needs to find the extension, and the scoring settings read from the environment.

vLLM owns the server's command line, so the scoring options travel as
environment variables; ``semgrad-serve serve`` sets them from its own flags.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping

from ..errors import SemgradError

# Under vLLM's logger, so that our messages share its format and level.
log = logging.getLogger("vllm.semgrad")

PLUGIN_NAME = "semgrad"  # the endpoint plugin's entry point name, allowlisted through VLLM_PLUGINS
WORKER_EXTENSION = "semgrad_serve.vllm_ext.worker.SemgradWorkerExtension"

PROFILE_ENV = "SEMGRAD_SERVE_PROFILE"
MAX_BATCH_ENV = "SEMGRAD_SERVE_MAX_BATCH"
MAX_WAIT_ENV = "SEMGRAD_SERVE_MAX_WAIT_MS"
# Test hook: when "1", a request field ``semgrad_test_fault: true`` makes its scoring fail.
TEST_FAULTS_ENV = "SEMGRAD_SERVE_TEST_FAULTS"


@dataclass(frozen=True)
class ScoringSettings:
    """How the API server batches scoring: at most ``max_batch`` answers per backward; a batch
    waits for answers still being generated at most ``max_wait_ms`` (see ``batcher.py``)."""

    profile: str | None = None
    max_batch: int = 16
    max_wait_ms: float = 2000.0
    test_faults: bool = False

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise SemgradError("the scoring batch size must be at least 1")
        if not 0 <= self.max_wait_ms <= 60_000:
            raise SemgradError("the scoring batch wait must be between 0 and 60000 ms")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "ScoringSettings":
        try:
            return cls(
                profile=env.get(PROFILE_ENV) or None,
                max_batch=int(env.get(MAX_BATCH_ENV) or cls.max_batch),
                max_wait_ms=float(env.get(MAX_WAIT_ENV) or cls.max_wait_ms),
                test_faults=env.get(TEST_FAULTS_ENV) == "1",
            )
        except ValueError as exc:
            raise SemgradError(f"{MAX_BATCH_ENV} / {MAX_WAIT_ENV} must be numbers: {exc}") from None

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in the server."""
        env = {MAX_BATCH_ENV: str(self.max_batch), MAX_WAIT_ENV: str(self.max_wait_ms)}
        if self.profile:
            env[PROFILE_ENV] = self.profile
        return env

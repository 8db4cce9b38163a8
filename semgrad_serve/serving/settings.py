"""Names vLLM needs to find the extension, and the scoring settings read from the environment.

vLLM owns the server's command line, so the scoring options travel as
environment variables; ``semgrad-serve serve`` sets them from its own flags.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Mapping

from ..errors import SemgradError

# Under vLLM's logger, so that our messages share its format and level.
log = logging.getLogger("vllm.semgrad")

PLUGIN_NAME = "semgrad"  # the endpoint plugin's entry point name, allowlisted through VLLM_PLUGINS
WORKER_EXTENSION = "semgrad_serve.serving.worker.extension.SemgradWorkerExtension"
CAPTURE_CONNECTOR_MODULE = "semgrad_serve.serving.worker.capture_connector"
# vLLM's --kv-transfer-config that makes finished scored requests hand their prompt keys/values to scoring
CAPTURE_KV_TRANSFER_CONFIG = json.dumps(
    {
        "kv_connector": "SemgradCaptureConnector",
        "kv_connector_module_path": CAPTURE_CONNECTOR_MODULE,
        "kv_role": "kv_both",
    }
)

PAGE_PATH = "/semgrad"  # the page (``page_routes.py``)

# Parallel layouts scoring refuses, said by ``serve`` before vLLM starts and by the extension under vLLM's own launcher
PIPELINE_REFUSED = (
    "SemGrad scoring does not support pipeline parallelism (--pipeline-parallel-size > 1): "
    "split the model with --tensor-parallel-size instead"
)
API_SERVERS_REFUSED = (
    "SemGrad scoring needs one API server, which connects to every engine's scoring service: "
    "use --api-server-count 1 (semgrad-serve serve does)"
)
# Families whose sharded scoring is checked against unsharded scores (tests/test_serving_tensor_parallel.py,
# tests/test_serving_families.py); the others are served by one worker until theirs is.
TENSOR_PARALLEL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

RECENT_ANSWERS = 200  # answers the page's recent list keeps by default


def check_tensor_parallel(family: str, size: int) -> None:
    """Refuse, in one line, tensor parallelism for a family whose sharded scoring is not checked."""
    if size > 1 and family not in TENSOR_PARALLEL_FAMILIES:
        raise SemgradError(
            f"SemGrad scoring of {family} models does not support tensor parallelism yet (supported for "
            f"{', '.join(TENSOR_PARALLEL_FAMILIES)}): serve it with --tensor-parallel-size 1"
        )


def server_url(host: str | None, port: int) -> str:
    """``http://host:port`` of a server listening on ``host`` (vLLM's default, None, is every address)."""
    host = host or "0.0.0.0"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


PROFILE_ENV = "SEMGRAD_SERVE_PROFILE"
MAX_BATCH_ENV = "SEMGRAD_SERVE_MAX_BATCH"
RECENT_ENV = "SEMGRAD_SERVE_RECENT"  # recent answers kept in memory for the page (0: none)
MAX_CLAIMS_ENV = "SEMGRAD_SERVE_MAX_CLAIMS"  # most claims (sentences) scored per answer
CLAIMS_PER_PASS_ENV = "SEMGRAD_SERVE_CLAIMS_PER_PASS"  # most claims per scoring pass of a long job
CLAIM_MEMORY_ENV = "SEMGRAD_SERVE_CLAIM_MEMORY_MIB"  # memory budget of one backward's claim seeds, MiB
# Test seam, read once by the worker extension (``worker.with_test_faults``): when "1", scoring fails for a
# batch holding a prompt that contains TEST_FAULT_MARKER. Never set in production.
TEST_FAULTS_ENV = "SEMGRAD_SERVE_TEST_FAULTS"
TEST_FAULT_MARKER = "semgrad-test-fault"
# ... and each scoring pass of a batch holding a prompt that contains TEST_SLOW_MARKER takes TEST_SLOW_S longer.
TEST_SLOW_MARKER = "semgrad-test-slow"
TEST_SLOW_S = 2.0


@dataclass(frozen=True)
class ScoringSettings:
    """The scoring profile and batching: at most ``max_batch`` answers per backward (see ``scoring_service.py``);
    ``recent``: how many recent answers the API server keeps for the page (``recent_answers.py``); ``max_claims``: the
    most claims scored per answer (the others get an error); ``claims_per_pass``: the most claims one scoring pass
    takes (a pass is what a gone client's job can stop after); ``claim_memory_mib``: the memory budget of one
    backward's claim seeds (``claim_budget.py``)."""

    profile: str | None = None
    max_batch: int = 16
    recent: int = RECENT_ANSWERS
    max_claims: int = 64
    claims_per_pass: int = 16
    claim_memory_mib: int = 256

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise SemgradError("the scoring batch size must be at least 1")
        if self.recent < 0:
            raise SemgradError("the number of recent answers kept must be at least 0")
        if self.max_claims < 0:
            raise SemgradError("the most claims scored per answer must be at least 0")
        if self.claims_per_pass < 1:
            raise SemgradError("the claims per scoring pass must be at least 1")
        if self.claim_memory_mib < 1:
            raise SemgradError("the claims' memory budget must be at least 1 MiB")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "ScoringSettings":
        def number(name: str, default: int) -> int:
            try:
                return int(env.get(name) or default)
            except ValueError as exc:
                raise SemgradError(f"{name} must be a whole number: {exc}") from None

        return cls(
            profile=env.get(PROFILE_ENV) or None,
            max_batch=number(MAX_BATCH_ENV, cls.max_batch),
            recent=number(RECENT_ENV, cls.recent),
            max_claims=number(MAX_CLAIMS_ENV, cls.max_claims),
            claims_per_pass=number(CLAIMS_PER_PASS_ENV, cls.claims_per_pass),
            claim_memory_mib=number(CLAIM_MEMORY_ENV, cls.claim_memory_mib),
        )

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in the server."""
        env = {
            MAX_BATCH_ENV: str(self.max_batch),
            RECENT_ENV: str(self.recent),
            MAX_CLAIMS_ENV: str(self.max_claims),
            CLAIMS_PER_PASS_ENV: str(self.claims_per_pass),
            CLAIM_MEMORY_ENV: str(self.claim_memory_mib),
        }
        if self.profile:
            env[PROFILE_ENV] = self.profile
        return env

"""``semgrad-serve serve``: vLLM's OpenAI-compatible server with SemGrad scores on every completion.

Checks the model and profile first (a mistake is one line, not a vLLM
traceback), then replaces this process with vLLM's API server, started with
the worker extension, the endpoint plugin and defaults that suit the machine.
Options after ``--`` go to vLLM unchanged and override ours.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import SemgradError
from ..vllm_ext.config import CAPTURE_KV_TRANSFER_CONFIG, PAGE_PATH, PLUGIN_NAME, WORKER_EXTENSION, ScoringSettings, server_url

VLLM_SERVER = "vllm.entrypoints.openai.api_server"
CPU_DEFAULTS = ["--gpu-memory-utilization", "0.3", "--enforce-eager"]  # on CPU: a share of RAM; no 3-minute compile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="local Hugging Face model directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--profile", metavar="FILE", help="model profile JSON (t*, band, threshold); default: built-in")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and scoring dtype (default: float32 on CPU, where scores then equal `score`'s; vLLM's auto on GPU)",
    )
    parser.add_argument("--max-batch", type=int, default=ScoringSettings.max_batch, metavar="N", help="most answers per scoring batch (default: %(default)s)")
    parser.add_argument(
        "--recent", type=int, default=ScoringSettings.recent, metavar="N",
        help="recent answers kept in memory for the page at /semgrad (default: %(default)s; 0: none)",
    )  # fmt: skip
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: options passed to vLLM's server as they are")


def _check_model(model_dir: Path, profile: str | None) -> None:
    """The scorer's start-up checks, done here so that a mistake is reported before vLLM starts."""
    from transformers import AutoConfig, AutoTokenizer

    from ..profiles import resolve_profile
    from ..weights import check_family

    if not (model_dir / "config.json").is_file():
        raise SemgradError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(model_dir)
    check_family(config)
    resolve_profile(config, AutoTokenizer.from_pretrained(model_dir).chat_template, model_dir, profile)


def vllm_options(args: argparse.Namespace) -> list[str]:
    """The options after ``--``, refusing those scoring cannot work with."""
    extra = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    if any(a == "--kv-transfer-config" or a.startswith("--kv-transfer-config=") for a in extra):
        raise SemgradError("--kv-transfer-config: SemGrad scoring runs its own KV connector, which cannot be combined with another")
    return extra


def server_command(args: argparse.Namespace, model_dir: Path, on_cpu: bool) -> list[str]:
    """The vLLM server's command line."""
    dtype = args.dtype or ("float32" if on_cpu else "auto")
    extra = vllm_options(args)
    return [
        sys.executable, "-W", "ignore::DeprecationWarning", "-m", VLLM_SERVER,
        "--model", str(model_dir), "--served-model-name", model_dir.name,
        "--host", args.host, "--port", str(args.port), "--dtype", dtype,
        "--worker-extension-cls", WORKER_EXTENSION,
        "--kv-transfer-config", CAPTURE_KV_TRANSFER_CONFIG,
        *(CPU_DEFAULTS if on_cpu else []),
        *extra,
    ]  # fmt: skip


def server_env(settings: ScoringSettings) -> dict[str, str]:
    """This process's environment plus the plugin allowlist and the scoring settings."""
    env = dict(os.environ)
    plugins = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*plugins, PLUGIN_NAME]))
    return {**env, **settings.to_env()}


def run(args: argparse.Namespace) -> int:
    import torch

    from ..default_model import default_model_dir

    profile = str(Path(args.profile).resolve()) if args.profile else None
    settings = ScoringSettings(profile=profile, max_batch=args.max_batch, recent=args.recent)
    vllm_options(args)  # refuse what scoring cannot work with before anything loads
    if not any(ep.name == PLUGIN_NAME for ep in entry_points(group="vllm.endpoint_plugins")):
        raise SemgradError("vLLM finds the SemGrad plugin through this package's entry points: install it (pip install -e .)")
    model_dir = Path(args.model).resolve() if args.model else default_model_dir()
    _check_model(model_dir, profile)
    command = server_command(args, model_dir, on_cpu=not torch.cuda.is_available())
    url = server_url(args.host, args.port)
    print(f"semgrad-serve: starting vLLM on {url}/v1 with SemGrad scoring; the page: {url}{PAGE_PATH}", file=sys.stderr, flush=True)
    os.execve(sys.executable, command, server_env(settings))

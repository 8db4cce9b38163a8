"""``semgrad-serve serve``: vLLM's OpenAI-compatible server with SemGrad scores on every completion.

Checks the model and profile first (a mistake is one line, not a vLLM
traceback), then replaces this process with vLLM's API server, started with
the worker extension, the endpoint plugin and defaults that suit the machine.
Options after ``--`` go to vLLM unchanged and override ours.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import SemgradError
from ..serving.capture_keys import SECRET_ENV, new_secret
from ..serving.settings import (
    API_SERVERS_REFUSED,
    CAPTURE_KV_TRANSFER_CONFIG,
    PAGE_PATH,
    PIPELINE_REFUSED,
    PLUGIN_NAME,
    WORKER_EXTENSION,
    ScoringSettings,
    check_tensor_parallel,
    server_url,
)
from ..serving.worker.runner_check import V2_RUNNER_ENV
from .common import add_model_arguments

VLLM_SERVER = "vllm.entrypoints.openai.api_server"
CPU_DEFAULTS = ["--gpu-memory-utilization", "0.3", "--enforce-eager"]  # on CPU: a share of RAM; no 3-minute compile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, serve=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        metavar="N",
        help="split the model over N workers (GPUs, or CPU core groups), scoring on each worker's shards (default: 1)",
    )
    parser.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=1,
        metavar="N",
        help="run N vLLM engines, each scoring the answers it generates (default: 1; see docs/scale-out.md)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=ScoringSettings.max_batch,
        metavar="N",
        help="most answers per scoring batch (default: %(default)s)",
    )
    parser.add_argument(
        "--max-claims",
        type=int,
        default=ScoringSettings.max_claims,
        metavar="N",
        help="most claims (sentences) scored per answer that asks for claims; the rest get an error (default: "
        "%(default)s)",
    )
    parser.add_argument(
        "--claims-per-pass",
        type=int,
        default=ScoringSettings.claims_per_pass,
        metavar="N",
        help="most claims of an answer scored in one pass; a client that leaves stops its scoring after a pass "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--claim-memory",
        type=int,
        default=ScoringSettings.claim_memory_mib,
        metavar="MIB",
        help="memory budget of one backward over claims, in MiB: claims beyond it wait for a backward of their own "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--recent",
        type=int,
        default=ScoringSettings.recent,
        metavar="N",
        help="recent answers kept in memory for the page at /semgrad (default: %(default)s; 0: none)",
    )
    parser.add_argument(
        "vllm_args", nargs=argparse.REMAINDER, help="after --: options passed to vLLM's server as they are"
    )


def _check_model(model_dir: Path, profile: str | None, tensor_parallel: int = 1) -> None:
    """The scorer's start-up checks, done here so that a mistake is reported before vLLM starts: a given profile
    file first, then the model directory's files (neither needs transformers or torch), its family, that its
    heads split over ``tensor_parallel`` ranks and (without a given profile) a profile that fits."""
    from ..model.loading import check_model_dir
    from ..scoring.profiles import ModelProfile, resolve_profile

    explicit = ModelProfile.load(profile) if profile is not None else None
    check_model_dir(model_dir)
    from transformers import AutoConfig, AutoTokenizer

    from ..model.weights import check_family

    config = AutoConfig.from_pretrained(model_dir)
    check_family(config)
    check_tensor_parallel(config.model_type, tensor_parallel)
    heads = config.num_attention_heads
    if heads % tensor_parallel:
        raise SemgradError(
            f"--tensor-parallel-size {tensor_parallel}: the model's {heads} attention heads do not split over "
            f"{tensor_parallel} ranks"
        )
    if explicit is None:
        resolve_profile(config, AutoTokenizer.from_pretrained(model_dir).chat_template, model_dir, None)


# vLLM options that scoring cannot work with, and why
REFUSED_OPTIONS = {
    ("--kv-transfer-config",): "SemGrad scoring runs its own KV connector, which cannot be combined with another",
    ("--pipeline-parallel-size", "-pp"): PIPELINE_REFUSED,
    ("--api-server-count", "-asc"): API_SERVERS_REFUSED,
}


def _named_options(extra: list[str]) -> list[tuple[str, str]]:
    """(name, value) of each option among vLLM's, given as ``--name=value`` or ``--name value`` (the next argument)."""
    out = []
    for i, arg in enumerate(extra):
        name, sep, value = arg.partition("=")
        out.append((name, value if sep else (extra[i + 1] if i + 1 < len(extra) else "")))
    return out


def vllm_options(args: argparse.Namespace) -> list[str]:
    """The options after ``--``, refusing those scoring cannot work with (a parallel size of 1 is harmless)."""
    extra = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    for name, value in _named_options(extra):
        for names, why in REFUSED_OPTIONS.items():
            if name in names and not (names[0].endswith(("-parallel-size", "-count")) and value == "1"):
                raise SemgradError(f"{name}: {why}")
    return extra


def check_port(args: argparse.Namespace) -> None:
    """Refuse, in one line, an address where another server listens (vLLM would end in a traceback); the
    ``--host``/``--port`` after ``--`` win, as vLLM reads them last."""
    host, port = args.host, str(args.port)
    for name, value in _named_options(vllm_options(args)):
        host, port = (value, port) if name == "--host" else (host, value) if name == "--port" else (host, port)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a listening port still fails
        try:
            probe.bind((host, int(port)))
        except OSError as exc:
            raise SemgradError(
                f"cannot listen on {host} port {port}: {exc.strerror}; stop the server there or choose another --port"
            ) from None
        except ValueError:
            raise SemgradError(f"--port must be a whole number, not {port!r}") from None


def _parallel_size(args: argparse.Namespace, names: tuple[str, str], own: int) -> int:
    """A parallel size: semgrad-serve's own option (``own``), or vLLM's after ``--`` (which wins, as vLLM reads it
    last)."""
    size = own
    for name, value in _named_options(vllm_options(args)):
        if name in names:
            try:
                size = int(value)
            except ValueError:
                raise SemgradError(f"{name} needs a whole number, got {value!r}") from None
    if size < 1:
        raise SemgradError(f"{names[0]} must be at least 1")
    return size


def tensor_parallel_size(args: argparse.Namespace) -> int:
    """``--tensor-parallel-size`` (see ``_parallel_size``)."""
    return _parallel_size(args, ("--tensor-parallel-size", "-tp"), args.tensor_parallel_size)


def data_parallel_size(args: argparse.Namespace) -> int:
    """``--data-parallel-size``: vLLM engines in the server, each with its workers and scoring service."""
    return _parallel_size(args, ("--data-parallel-size", "-dp"), args.data_parallel_size)


def cpu_thread_binding(workers: int, cores: list[int]) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``workers`` CPU workers (tensor-parallel size × data-parallel size): the
    cores split into that many consecutive groups, "0-3|4-7" (vLLM's CPU workers refuse to start without one
    binding each; with several engines, engine ``e`` takes the groups ``e*tp .. e*tp+tp-1``)."""
    if len(cores) < workers:
        raise SemgradError(
            f"{workers} CPU workers (tensor-parallel × data-parallel size) on CPU needs a core per worker; "
            f"this machine gives {len(cores)}"
        )
    per = len(cores) // workers
    groups = [cores[r * per : (r + 1) * per] for r in range(workers)]
    return "|".join(",".join(map(str, g)) for g in groups)


# vLLM's own default share of the GPU, from which serve takes the scoring reserve.
VLLM_GPU_SHARE = 0.9


def gpu_memory_option(model_dir: Path, dtype: str, total_bytes: int) -> list[str]:
    """``--gpu-memory-utilization`` that leaves a scoring batch's memory (``scoring_reserve_bytes`` at the
    scorer's batch-token budget) outside vLLM's share, which vLLM otherwise fills with KV cache."""
    import torch
    from transformers import AutoConfig

    from ..scoring.items import DEFAULT_BATCH_TOKENS
    from ..serving.worker.scoring_memory import scoring_reserve_bytes

    config = AutoConfig.from_pretrained(model_dir)
    # "auto": the checkpoint's dtype, which the config holds as a name or a torch.dtype
    name = dtype if dtype != "auto" else str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    reserve = scoring_reserve_bytes(config, getattr(torch, name), DEFAULT_BATCH_TOKENS)
    share = VLLM_GPU_SHARE - reserve / total_bytes
    if share < 0.1:
        raise SemgradError(
            f"scoring needs ~{reserve / 2**30:.1f} GiB beside vLLM, more than this GPU's "
            f"{total_bytes / 2**30:.0f} GiB allows: use a smaller model or --dtype bfloat16"
        )
    print(
        f"semgrad-serve: keeping {reserve / 2**30:.1f} GiB of the GPU for scoring "
        f"(--gpu-memory-utilization {share:.3f}; pass your own after -- to override)",
        file=sys.stderr,
    )
    return ["--gpu-memory-utilization", f"{share:.3f}"]


def vllm_server_command(model_dir: Path, host: str, port: int, dtype: str) -> list[str]:
    """vLLM's OpenAI server for ``model_dir`` on ``host:port``, served under the directory's name; the options of
    ``semgrad-serve serve`` (or of a benchmark's plain vLLM) follow."""
    return [
        sys.executable,
        "-W",
        "ignore::DeprecationWarning",
        "-m",
        VLLM_SERVER,
        "--model",
        str(model_dir),
        "--served-model-name",
        model_dir.name,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
    ]


def server_command(args: argparse.Namespace, model_dir: Path, on_cpu: bool, gpu_bytes: int = 0) -> list[str]:
    """The vLLM server's command line (``gpu_bytes``: the GPU's memory, when serving on one)."""
    dtype = args.dtype or ("float32" if on_cpu else "auto")
    extra = vllm_options(args)
    return [
        *vllm_server_command(model_dir, args.host, args.port, dtype),
        "--worker-extension-cls",
        WORKER_EXTENSION,
        "--kv-transfer-config",
        CAPTURE_KV_TRANSFER_CONFIG,
        "--tensor-parallel-size",
        str(args.tensor_parallel_size),
        "--data-parallel-size",
        str(args.data_parallel_size),
        *(CPU_DEFAULTS if on_cpu else gpu_memory_option(model_dir, dtype, gpu_bytes)),
        *extra,
    ]


def server_env(settings: ScoringSettings, cpu_workers: int = 0) -> dict[str, str]:
    """This process's environment plus the plugin allowlist, vLLM's V1 model runner (unless the user chose one),
    the scoring settings and a fresh capture secret (``capture_keys.py``; one the user set is kept: front ends
    started apart must share it). With ``cpu_workers`` (vLLM's CPU workers: tensor-parallel × data-parallel size
    on CPU, 0 on a GPU), the cores vLLM reserves beside its
    workers and, with more than one worker, each worker's core binding, unless the user set them."""
    env = dict(os.environ)
    plugins = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*plugins, PLUGIN_NAME]))
    env.setdefault(V2_RUNNER_ENV, "0")  # the runner scoring was tested on; V2 is vLLM's GPU default (docs/gpu.md)
    env[SECRET_ENV] = env.get(SECRET_ENV) or new_secret()
    if cpu_workers and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env:
        # vLLM reserves one more core per worker when a KV connector is configured (for NIXL's transfers); the
        # capture connector moves nothing, and on a 2-core machine that reserve leaves none, so vLLM's threads
        # would take every core and the scoring thread would fight them. Reserve what vLLM does without one.
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(cpu_workers)
    if cpu_workers > 1 and not env.get("VLLM_CPU_OMP_THREADS_BIND"):
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(cpu_workers, sorted(os.sched_getaffinity(0)))
    return {**env, **settings.to_env()}


def run(args: argparse.Namespace) -> int:
    from ..model.loading import resolve_model

    profile = str(Path(args.profile).resolve()) if args.profile else None
    settings = ScoringSettings(
        profile=profile,
        max_batch=args.max_batch,
        recent=args.recent,
        max_claims=args.max_claims,
        claims_per_pass=args.claims_per_pass,
        claim_memory_mib=args.claim_memory,
    )
    vllm_options(args)  # refuse what scoring cannot work with before anything loads
    check_port(args)
    if not any(ep.name == PLUGIN_NAME for ep in entry_points(group="vllm.endpoint_plugins")):
        raise SemgradError(
            "vLLM finds the SemGrad plugin through this package's entry points: install it (pip install -e .)"
        )
    tensor_parallel = tensor_parallel_size(args)
    workers = tensor_parallel * data_parallel_size(args)
    model_dir = resolve_model(args.model).resolve()
    _check_model(model_dir, profile, tensor_parallel)
    import torch

    on_cpu = not torch.cuda.is_available()
    command = server_command(args, model_dir, on_cpu, 0 if on_cpu else torch.cuda.mem_get_info()[1])
    url = server_url(args.host, args.port)
    print(
        f"semgrad-serve: starting vLLM on {url}/v1 with SemGrad scoring; the page: {url}{PAGE_PATH}",
        file=sys.stderr,
        flush=True,
    )
    os.execve(sys.executable, command, server_env(settings, workers if on_cpu else 0))

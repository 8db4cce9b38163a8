"""Run a vLLM server (normally ``semgrad-serve serve``) as a child process for the length of a ``with`` block."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from semgrad_serve.errors import SemgradError


@dataclass(frozen=True)
class RunningServer:
    url: str  # e.g. http://127.0.0.1:8000; the OpenAI API is under /v1
    pid: int  # the API server; vLLM's engine processes are its children
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and the engine processes it started (they share its process group)."""
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def checkout_env(**settings: str) -> dict[str, str]:
    """This process's environment with this checkout first on ``PYTHONPATH`` (the server runs this copy of the
    package) and ``settings`` added."""
    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **settings}


def serve_command(port: int, *serve_args: str) -> list[str]:
    """The command line of ``semgrad-serve serve`` on ``port`` with more of its options."""
    return [sys.executable, "-m", "semgrad_serve.cli", "serve", "--port", str(port), *serve_args]


def plain_vllm_command(port: int, model_dir: Path, dtype: str, kv_bytes: int) -> list[str]:
    """vLLM's own server for ``model_dir`` on ``port``, without SemGrad, with the settings ``semgrad-serve serve``
    gives vLLM on CPU and the same served name (benchmarks compare the two)."""
    from semgrad_serve.commands.serve import CPU_DEFAULTS, vllm_server_command

    return [
        *vllm_server_command(model_dir, "127.0.0.1", port, dtype),
        *CPU_DEFAULTS,
        "--kv-cache-memory-bytes",
        str(kv_bytes),
    ]


@contextmanager
def running_server(
    command: Sequence[str], port: int, log: Path, env: Mapping[str, str] | None = None, timeout_s: float = 600
) -> Iterator[RunningServer]:
    """Start a server listening on 127.0.0.1:``port`` (output to ``log``), wait until it is healthy,
    and stop it, with its engine processes, when the block ends."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=dict(env or os.environ), start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(log).read_text(errors="replace")[-4000:]
                state = (
                    f"exited with {proc.returncode}"
                    if proc.returncode is not None
                    else f"did not start in {timeout_s:.0f} s"
                )
                raise SemgradError(f"the server {state}; the end of {log}:\n{tail}")
            time.sleep(2)
        yield RunningServer(url, proc.pid, Path(log))
    finally:
        _stop(proc)


@contextmanager
def semgrad_server(
    log: Path, *serve_args: str, env: Mapping[str, str] | None = None, timeout_s: float = 600
) -> Iterator[RunningServer]:
    """``semgrad-serve serve`` with ``serve_args`` on a free port, run as ``running_server`` runs it."""
    port = free_port()
    with running_server(serve_command(port, *serve_args), port, log, env, timeout_s) as server:
        yield server

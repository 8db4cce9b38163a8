"""The worker's memory around a forged-capture-key load, for this checkout and for the code before the fix.

The load of issue 27: twelve unscored chat requests (``"semgrad": false``,
``max_tokens`` 1, prompts of 3000 words), each carrying its own
``kv_transfer_params.semgrad_capture``. Before the fix the capture connector
kept each one's prompt keys/values in the worker until they expired (300 s); now
the API server refuses them (400), and the connector would trust no key it did not
mint. For each checkout, one ``semgrad-serve serve`` (default model, float32, CPU
settings) at a time: the worker's resident memory and vLLM's KV-cache use
before and after the load, the requests' status codes, whether a scored
request after it still reuses its prompt's keys/values, and what a string in
``vllm_xargs.kv_transfer_params`` does to the engine.

    python benchmarks/forged_keys.py --before e65acf8   # report in benchmarks/results/forged_keys_cpu.md
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from semgrad_serve.testing.launch_server import free_port, running_server, serve_command

ROOT = Path(__file__).resolve().parents[1]


REQUESTS = 12
PROMPT = " ".join(
    ("the", "river", "carries", "stones", "down", "to", "sea")[i % 7] for i in range(3000)
)  # 3000 words, 3000 tokens
KV_PARAM = "semgrad_capture"


def worker_rss_mib(pid: int) -> float:
    [worker] = [p for p in psutil.Process(pid).children(recursive=True) if "Worker" in p.name()]
    return worker.memory_info().rss / 2**20


def chat(url: str, model: str, content: str, max_tokens: int, timeout_s: float = 300, **extra) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout_s)


def kv_usage(url: str, model: str) -> float:
    """vLLM's KV-cache use reported after one small unscored request (the gauge updates on engine steps)."""
    chat(url, model, "Say OK.", 2, semgrad=False)
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return float(re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", text, re.M)[1])


def measure(checkout: Path, label: str, logs: Path) -> str:
    """One server of ``checkout``: the markdown row of the load's figures."""
    from semgrad_serve.model.loading import resolve_model

    model_dir = resolve_model(None).resolve()
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    os.chdir(checkout)  # ``python -m`` puts the working directory first on the server's path
    port = free_port()
    command = serve_command(
        port, "--model", str(model_dir), "--dtype", "float32", "--", "--kv-cache-memory-bytes", str(1 << 30)
    )
    with running_server(command, port, logs / f"{label}.log", env) as server:
        model = model_dir.name
        chat(server.url, model, "What is the capital of France?", 8)  # warm-up, scored
        idle, rss_before = kv_usage(server.url, model), worker_rss_mib(server.pid)
        statuses, errors = [], set()
        for i in range(REQUESTS):
            forged = {"semgrad": False, "kv_transfer_params": {KV_PARAM: f"foreign-{i}"}}
            response = chat(server.url, model, f"{i} {PROMPT}", 1, **forged)
            statuses.append(response.status_code)
            if response.status_code != 200:
                errors.add(response.json()["error"]["message"])
        time.sleep(2)
        busy, rss_after = kv_usage(server.url, model), worker_rss_mib(server.pid)
        scored = chat(server.url, model, "What is the capital of Italy?", 8).json()["choices"][0]["semgrad"]
        xargs = engine_survives(server.url, model)
    codes = ", ".join(f"{c} x{statuses.count(c)}" for c in sorted(set(statuses))) + "".join(
        f" ({e})" for e in sorted(errors)
    )
    return (
        f"| {label} | {codes} | {rss_before:.0f} | {rss_after:.0f} | {rss_after - rss_before:+.0f} | "
        f"{idle:.4f} → {busy:.4f} | {scored.get('reused')} | {xargs} |"
    )


def engine_survives(url: str, model: str) -> str:
    """What one request with a string for ``vllm_xargs.kv_transfer_params`` gets, and the server's health after it
    (last: it may end the engine)."""
    try:
        # unscored: a scored request's route would put the server's kv_transfer_params in the string's place
        code = str(
            chat(url, model, "Hi!", 1, timeout_s=60, semgrad=False, vllm_xargs={"kv_transfer_params": "x"}).status_code
        )
    except httpx.HTTPError as exc:
        code = type(exc).__name__
    time.sleep(2)
    try:
        health = httpx.get(f"{url}/health", timeout=30).status_code
    except httpx.HTTPError as exc:
        health = type(exc).__name__
    return f"{code}; /health then {health}"


def export(commit: str, into: Path) -> Path:
    """The package as of ``commit`` (with this checkout's built extension), to serve the code before the fix."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for built in (ROOT / "semgrad_serve").glob("_C*.so"):
        shutil.copy(built, into / "semgrad_serve" / built.name)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="COMMIT", help="also measure the code of this commit (before the fix)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "forged_keys_cpu.md")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="semgrad-forged-"))
    rows = []
    if args.before:
        rows.append(
            measure(
                export(args.before, Path(tempfile.mkdtemp(prefix="semgrad-before-"))), f"before ({args.before})", logs
            )
        )
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    rows.append(measure(ROOT, f"this checkout ({head})", logs))
    report = "\n".join(
        [
            f"# Worker memory around {REQUESTS} forged-capture-key requests (CPU, default model, float32)",
            "",
            f"`python benchmarks/forged_keys.py{' --before ' + args.before if args.before else ''}`: {REQUESTS} "
            "unscored "
            "chat requests (`max_tokens` 1, 3000-word prompts), each with its own "
            "`kv_transfer_params.semgrad_capture`; "
            "the vLLM worker's resident memory before and after them, vLLM's KV-cache use (after a small probe "
            "request) "
            "and what a scored request after them reused; last, what one unscored request with `vllm_xargs: "
            '{"kv_transfer_params": "x"}` got, and the server\'s health after it.',
            "",
            "| code | status codes | worker RSS before (MiB) | after (MiB) | change (MiB) | KV-cache use | scored "
            "after: "
            "reused | string vllm_xargs.kv_transfer_params |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(report)
    args.out.write_text(report)


if __name__ == "__main__":
    main()

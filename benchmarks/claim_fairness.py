"""A short scored request's latency while a long claims request is scored, and the scoring worker's memory.

Against one ``semgrad-serve serve`` of the code at ``--repo`` (this checkout by default; give an older checkout,
e.g. the main branch before claim budgets, for the "before" row), default model, float32:
1. idle: a short scored chat request ("Name a planet.", 8 tokens), median of a few;
2. a long request with ``"semgrad": {"claims": true}`` ("List 100 short facts about animals, one short
   sentence each", ``--long-tokens`` tokens, ``ignore_eos``), streamed: once all but its last token have arrived
   (the last comes with the scores), short scored requests one after another until the long one is answered: their
   latencies, and the worker's resident memory sampled every 0.1 s (peak above its level before);
3. memory return: ``--burst`` concurrent short scored requests, then the worker's resident memory after a few
   idle seconds, against its level before the burst.
Appends a section to ``--out`` (a markdown file in benchmarks/results/).

    flock /tmp/semgrad-vllm.lock python benchmarks/claim_fairness.py --repo /work/main --label before
    flock /tmp/semgrad-vllm.lock python benchmarks/claim_fairness.py --label after
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from semgrad_serve.testing.launch_server import free_port, running_server, serve_command

ROOT = Path(__file__).resolve().parents[1]


MODEL = "smollm2-135m-instruct"
LONG = [{"role": "user", "content": "List 100 short facts about animals, one short sentence each."}]
SHORT = [{"role": "user", "content": "Name a planet."}]
MIB = 1 << 20


def worker(server_pid: int) -> psutil.Process:
    """The engine process that holds the model and the scoring thread: the API server's largest descendant."""
    children = psutil.Process(server_pid).children(recursive=True)
    return max(children, key=lambda p: p.memory_info().rss)


class RssSampler:
    """The peak resident memory of a process, sampled every 0.1 s while running."""

    def __init__(self, process: psutil.Process) -> None:
        self.process, self.peak, self._stop = process, process.memory_info().rss, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


async def chat(
    http: httpx.AsyncClient, messages: list, max_tokens: int, semgrad: object, **extra: object
) -> tuple[float, dict]:
    start = time.perf_counter()
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "semgrad": semgrad,
        **extra,
    }
    response = await http.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return time.perf_counter() - start, response.json()


async def long_stream(http: httpx.AsyncClient, max_tokens: int, generated: asyncio.Event) -> tuple[float, dict]:
    """The long claims request, streamed; ``generated`` is set once all but its last token have arrived (its last
    chunk, with the last token, waits for the scores). Returns its time and its final chunk."""
    start, tokens, last = time.perf_counter(), 0, {}
    body = {
        "model": MODEL,
        "messages": LONG,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
        "semgrad": {"claims": True},
    }
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            last = json.loads(line[len("data: ") :])
            for choice in last.get("choices") or []:
                tokens += len(choice.get("token_ids") or [])
            if tokens >= max_tokens - 1:
                generated.set()
    generated.set()
    return time.perf_counter() - start, last


async def measure(url: str, process: psutil.Process, long_tokens: int, burst: int) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as http:
        for _ in range(2):  # warm-up
            await chat(http, SHORT, 8, True)
        idle = statistics.median([(await chat(http, SHORT, 8, True))[0] for _ in range(5)])
        before = process.memory_info().rss
        sampler = RssSampler(process)
        generated = asyncio.Event()
        long = asyncio.create_task(long_stream(http, long_tokens, generated))
        await generated.wait()
        generation = time.perf_counter()
        await asyncio.sleep(0.3)  # the last token's step: now it is being scored
        during = []
        while not long.done():
            during.append((await chat(http, SHORT, 8, True))[0])
        long_s, final = await long
        generation = long_s - (time.perf_counter() - generation)
        peak = sampler.stop()
        claims = final["choices"][0]["semgrad"].get("claims", [])
        await asyncio.sleep(3)
        settled = process.memory_info().rss
        await asyncio.gather(*(chat(http, SHORT, 8, True) for _ in range(burst)))
        await asyncio.sleep(5)
        after_burst = process.memory_info().rss
    return {
        "idle_s": idle,
        "during_s": during,
        "long_s": long_s,
        "generation_s": generation,
        "claims": len(claims),
        "claims_scored": sum("semgrad" in c for c in claims),
        "rss_before": before,
        "rss_peak": peak,
        "rss_settled": settled,
        "rss_after_burst": after_burst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repo", type=Path, default=ROOT, help="checkout whose semgrad_serve serves (default: this one)"
    )
    parser.add_argument("--label", default="after")
    parser.add_argument("--long-tokens", type=int, default=400)
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "claim_fairness_cpu.md")
    args = parser.parse_args()
    from semgrad_serve.model.loading import resolve_model

    model_dir = resolve_model(None).resolve()
    env = {**os.environ, "PYTHONPATH": str(args.repo.resolve())}
    os.chdir(args.repo)  # ``python -m`` puts the working directory first on the server's path
    port = free_port()
    command = serve_command(
        port, "--model", str(model_dir), "--dtype", "float32", "--", "--kv-cache-memory-bytes", str(1 << 30)
    )
    log = Path(tempfile.mkdtemp(prefix="semgrad-fairness-")) / "server.log"
    with running_server(command, port, log, env) as server:
        r = asyncio.run(measure(server.url, worker(server.pid), args.long_tokens, args.burst))
    during = r["during_s"]
    lines = [
        f"\n## {args.label}: {args.repo.resolve()} (commit "
        f"{os.popen(f'git -C {args.repo} rev-parse --short HEAD').read().strip()})\n",
        f"`python benchmarks/claim_fairness.py --repo {args.repo} --label {args.label} --long-tokens "
        f"{args.long_tokens}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
        "| measure | value |",
        "|---|---|",
        f"| short scored request, idle (median of 5) | {r['idle_s']:.2f} s |",
        f"| short requests while the long one is scored | {len(during)}: median {statistics.median(during):.2f} s, "
        f"max {max(during):.2f} s ({max(during) / r['idle_s']:.1f}x idle) |"
        if during
        else "| short requests while scored | none |",
        f"| long claims request ({args.long_tokens} tokens), total | {r['long_s']:.1f} s (generated in "
        f"{r['generation_s']:.1f} s, then scored) |",
        f"| its claims: listed / scored | {r['claims']} / {r['claims_scored']} |",
        f"| worker RSS before / peak while scored | {r['rss_before'] / MIB:.0f} / {r['rss_peak'] / MIB:.0f} MiB "
        f"(+{(r['rss_peak'] - r['rss_before']) / MIB:.0f}) |",
        f"| worker RSS 3 s after | {r['rss_settled'] / MIB:.0f} MiB |",
        f"| worker RSS 5 s after {args.burst} concurrent short scored requests | {r['rss_after_burst'] / MIB:.0f} MiB "
        f"({(r['rss_after_burst'] - r['rss_settled']) / MIB:+.0f}) |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.out.exists():
        args.out.write_text("# A short scored request while a long claims request is scored (CPU, default model)\n")
    with open(args.out, "a") as out:
        out.write(text)


if __name__ == "__main__":
    main()

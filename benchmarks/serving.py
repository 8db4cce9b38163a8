"""Serving benchmark: one ``semgrad-serve serve`` process, the same request load with scoring off and on.

Measures output tokens/s, p50/p99 request latency and the server's memory (RSS of
its process tree) for each load, alternating off/on rounds so that drift in the
machine's load hits both alike; then, unless ``--no-baseline``, the idle memory
of a plain vLLM server, to show what keeping the dense weights costs. Prints
the ratios and writes a Markdown report.

    python benchmarks/serving.py                       # CPU defaults, report in benchmarks/results/
    python benchmarks/serving.py --requests 96 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from semgrad_serve.vllm_ext.config import ScoringSettings  # noqa: E402
from semgrad_serve.vllm_ext.launch import RunningServer, free_port, running_server, serve_command  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "truthfulqa" / "test.jsonl"
# name -> (prompt template, max_tokens): the paper's short-answer QA, and open answers of a paragraph.
LOADS = {
    "qa": ("Please directly answer the following question with one or few words:\n{query}", 150),
    "chat": ("{query} Explain your answer in a short paragraph.", 128),
}


NOTES = [
    "## Reading the numbers",
    "",
    "- Scoring an answer costs a forward pass over its answer and the part of its prompt it does not share with",
    "  the other requests (the shared head, template, system prompt and instruction, runs once and is reused),",
    "  plus a backward through the band from t* on, on the same core that generates; generating it costs about",
    "  one forward pass over its tokens (prefill, then one step per answer token). Where generation is",
    "  compute-bound, as on this core, long answers cost the most: their forward and band backward grow with them.",
    "  On a GPU, decoding is memory-bound and the scoring pass is not.",
    "- Not done yet: taking the prompt's keys/values from vLLM's cache instead of recomputing the prompt, which",
    "  would leave roughly the answer's tokens to score.",
    "- Under load the batcher lets generation run about twice as long as the previous scoring batch took before",
    "  scoring again, so batches grow and latency (p50) roughly doubles; a lone request is scored at once.",
]


@dataclass
class Phase:
    """Requests of one load and mode, pooled over rounds."""

    wall_s: float = 0.0
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    scored: int = 0
    peak_rss: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def tree_rss(pid: int) -> int:
    """Resident memory of a process and its descendants, bytes."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakRss:
    """Samples the tree's RSS in a thread while the block runs."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid, self.every_s, self.peak = pid, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def run_load(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int, scoring: bool, phase: Phase) -> None:
    """Send every prompt, at most ``concurrency`` at a time; add the outcome to ``phase``."""
    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0) as client:

        async def one(prompt: str) -> None:
            async with gate:
                start = time.perf_counter()
                response = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
                    extra_body={"semgrad": scoring},
                )  # fmt: skip
                phase.latencies.append(time.perf_counter() - start)
                phase.tokens += response.usage.completion_tokens
                semgrad = (response.choices[0].model_extra or {}).get("semgrad")
                phase.scored += isinstance(semgrad, dict) and "error" not in semgrad

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        phase.wall_s += time.perf_counter() - start


def scoring_metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(semgrad_\w+) (\S+)$", text, re.M)}


def benchmark(server: RunningServer, model: str, args: argparse.Namespace) -> dict[str, dict[str, Phase]]:
    queries = [json.loads(line)["query"] for line in DATA.read_text().splitlines()[: args.requests]]
    results: dict[str, dict[str, Phase]] = {}
    for load in args.loads:
        template, max_tokens = LOADS[load]
        prompts = [template.format(query=q) for q in queries]
        for scoring in (False, True):  # warm-up: the first requests of each kind pay one-off costs
            asyncio.run(run_load(server.url, model, prompts[: args.concurrency], max_tokens, args.concurrency, scoring, Phase()))
        phases = results[load] = {"off": Phase(), "on": Phase()}
        for round_ in range(args.rounds):
            for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                with PeakRss(server.pid) as rss:
                    asyncio.run(run_load(server.url, model, prompts, max_tokens, args.concurrency, mode == "on", phases[mode]))
                phases[mode].peak_rss = max(phases[mode].peak_rss, rss.peak)
                print(f"{load} {mode} round {round_ + 1}: {phases[mode].tokens_per_s:.1f} tok/s so far", file=sys.stderr)
    return results


def plain_vllm_idle_rss(model_dir: Path, dtype: str, kv_bytes: int, log: Path) -> int:
    """Idle memory of vLLM serving the same model with the same settings, without SemGrad."""
    port = free_port()
    command = [
        sys.executable, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--port", str(port), "--host", "127.0.0.1", "--dtype", dtype,
        "--enforce-eager", "--kv-cache-memory-bytes", str(kv_bytes),
    ]  # fmt: skip
    with running_server(command, port, log) as server:
        time.sleep(5)
        return tree_rss(server.pid)


def report(results: dict[str, dict[str, Phase]], memory: dict[str, int | None], info: dict[str, str], extra: list[str]) -> str:
    mib = 1 << 20
    lines = [
        "# Serving benchmark: SemGrad scoring off vs on (CPU)",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        "",
        "| load | scoring | output tok/s | p50 latency (s) | p99 latency (s) | peak RSS (MiB) | answers scored |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = []
    for load, phases in results.items():
        for mode, p in phases.items():
            lines.append(
                f"| {load} | {mode} | {p.tokens_per_s:.1f} | {p.percentile(0.5):.2f} | {p.percentile(0.99):.2f} "
                f"| {p.peak_rss / mib:.0f} | {p.scored}/{len(p.latencies)} |"
            )
        off, on = phases["off"], phases["on"]
        ratio = on.tokens_per_s / off.tokens_per_s
        summary.append(
            f"- **{load}**: throughput on/off = **{ratio:.2f}x** (target ≥ 0.6x: {'met' if ratio >= 0.6 else 'NOT met'}); "
            f"p50 latency on/off = {on.percentile(0.5) / off.percentile(0.5):.2f}x, "
            f"p99 = {on.percentile(0.99) / off.percentile(0.99):.2f}x; "
            f"extra peak memory while scoring = {(on.peak_rss - off.peak_rss) / mib:+.0f} MiB"
        )
    lines += ["", "## Ratios", "", *summary, "", "## Memory", ""]
    if memory["plain"] is not None:
        lines.append(
            f"- idle RSS: plain vLLM {memory['plain'] / mib:.0f} MiB, with SemGrad {memory['ours'] / mib:.0f} MiB "
            f"(+{(memory['ours'] - memory['plain']) / mib:.0f} MiB: on CPU the dense weights vLLM would free are kept for autograd)"
        )
    else:
        lines.append(f"- idle RSS with SemGrad: {memory['ours'] / mib:.0f} MiB (plain vLLM baseline not measured)")
    lines += ["- RSS sums the API server, engine core and worker processes (shared pages counted in each).", "", *extra, "", *NOTES, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", metavar="DIR", help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=32, help="requests per load, mode and round (default: 32)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    parser.add_argument("--rounds", type=int, default=2, help="off/on rounds per load (default: 2)")
    parser.add_argument("--loads", nargs="+", choices=list(LOADS), default=list(LOADS))
    parser.add_argument("--max-batch", type=int, default=ScoringSettings.max_batch, help="the server's --max-batch (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=ScoringSettings.max_wait_ms, help="the server's --max-wait-ms (default: %(default)s)")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="vLLM KV cache size (default: 2)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain vLLM memory baseline")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving_cpu.md")
    args = parser.parse_args()

    import vllm

    from semgrad_serve.default_model import default_model_dir

    model_dir = Path(args.model).resolve() if args.model else default_model_dir()
    kv_bytes = int(args.kv_cache_gib * (1 << 30))
    logs = Path(tempfile.mkdtemp(prefix="semgrad-bench-"))
    load_before = os.getloadavg()[0]
    port = free_port()
    serve_args = ["--model", str(model_dir), "--dtype", args.dtype, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    serve_args += ["--", "--kv-cache-memory-bytes", str(kv_bytes)]
    with running_server(serve_command(port, *serve_args), port, logs / "semgrad.log") as server:
        before = scoring_metrics(server.url)
        idle = tree_rss(server.pid)
        results = benchmark(server, model_dir.name, args)
        after = scoring_metrics(server.url)
    plain = None if args.no_baseline else plain_vllm_idle_rss(model_dir, args.dtype, kv_bytes, logs / "plain.log")

    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    batches = delta["semgrad_scoring_batch_size_count"]
    extra = [
        "## Scoring",
        "",
        f"- {delta['semgrad_answers_scored_total']:.0f} answers scored in {batches:.0f} batches "
        f"(mean batch {delta['semgrad_scoring_batch_size_sum'] / max(batches, 1):.1f}); mean scoring latency "
        f"{delta['semgrad_scoring_latency_seconds_sum'] / max(delta['semgrad_scoring_latency_seconds_count'], 1):.2f} s "
        "(answer finished → scores, batching wait included); warm-up requests included.",
    ]
    info = {
        "machine": f"{cpu_name()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / (1 << 30):.0f} GiB",
        "software": f"torch {torch.__version__}, vllm {vllm.__version__}",
        "model": f"{model_dir.name}, {args.dtype}, enforce_eager, KV cache {args.kv_cache_gib:g} GiB",
        "load": f"{args.requests} TruthfulQA questions per load, mode and round; {args.concurrency} in flight; "
        f"greedy; {args.rounds} alternating off/on rounds; scoring batch ≤ {args.max_batch}, wait ≤ {args.max_wait_ms:g} ms",
        "loads": "; ".join(f"{name}: `{template!r}`, max_tokens {n}" for name, (template, n) in LOADS.items() if name in args.loads),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine load": f"1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(the benchmark's own server included; vLLM binds its worker, where generation and scoring run, to one core "
        "and keeps the other for its front end)",
    }
    text = report(results, {"plain": plain, "ours": idle}, info, extra)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

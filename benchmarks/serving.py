"""Serving benchmark: one ``semgrad-serve serve`` process, the same request load with scoring off and on.

Loads: ``qa`` (the paper's short answers), ``chat`` (paragraph answers) and
``rag`` (each request its own ~1.5k-token context and a question, answers of at
most 32 tokens). Requests stream, so that per request the time to first token,
the time per output token (between the first and the last token chunk before
the final one, which with scoring on waits for the scores) and the end-to-end
latency are measured; plus output tokens/s, the busy share of each core and the
server's memory (RSS of its process tree), alternating off/on rounds so that
drift in the machine's load hits both alike. Then the head-of-line test: the
latency of short unscored requests sent one at a time, idle and while long-prompt
requests (one, then four, in flight) run with scoring off and on. Unless ``--no-baseline``, a plain vLLM server
with the same settings gives the idle memory (what keeping the dense weights costs) and each load's output
tokens/s without semgrad-serve. Prints the
ratios and writes a Markdown report.

    python benchmarks/serving.py                       # CPU defaults, report in benchmarks/results/
    python benchmarks/serving.py --requests 96 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
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

from semgrad_serve.serving.settings import ScoringSettings
from semgrad_serve.testing.launch_server import (
    RunningServer,
    free_port,
    plain_vllm_command,
    running_server,
    serve_command,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
RAG_FACTS = 70  # retrieved SciQ question/answer notes per rag prompt: about 1.5k tokens with the question
# name -> (prompt template, max_tokens): the paper's short-answer QA, open answers of a paragraph, and
# retrieval-augmented questions (each its own long context, short answers).
LOADS = {
    "qa": ("Please directly answer the following question with one or few words:\n{query}", 150),
    "chat": ("{query} Explain your answer in a short paragraph.", 128),
    "rag": ("Notes:\n{context}\n\nUsing the notes, answer with one or few words:\n{query}", 32),
}


NOTES = [
    "## Reading the numbers",
    "",
    "- With scoring on, while a scored request is generated the residual stream entering the band and the logits of",
    "  its answer are kept (one gather per engine step); when it finishes, its prompt keys/values (up to t*, band",
    "  layers) are copied out of vLLM's KV cache between engine steps and its blocks freed; its answer is scored from",
    "  t* on, through the band only, in a thread of the worker process pinned to the core vLLM leaves to its API",
    "  server, so generation is not paused. 'all reused' counts the answers scored that way (the others recomputed",
    "  a part). Scoring an answer still costs the band's forward and backward and the head's gradient over its",
    "  tokens, so the on/off ratio is bound by the second core's share: under a full load scoring falls behind and",
    "  each request waits for the scores of those before it (E2E), while streams keep their pace (TPOT).",
    "- The 2-core machine also runs the load client; the per-core busy shares show how much of each core was used.",
    "- The loads are closed loops (a client sends its next request when the last one, scores included, is done):",
    "  with scoring on, a request waiting for its scores holds its slot, so fewer prefills run at once. With one rag",
    "  request in flight (head-of-line) that leaves the engine idle while it is scored, and short requests sent",
    "  then find it free: compare p99 as well as p50.",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


@dataclass
class Phase:
    """Requests of one load and mode, pooled over rounds."""

    wall_s: float = 0.0
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)  # end to end, scores included
    ttfts: list[float] = field(default_factory=list)
    tpots: list[float] = field(default_factory=list)  # per request: seconds per output token while streaming
    scored: int = 0
    reused_all: int = 0  # answers scored from what vLLM computed: prompt keys/values, band inputs and logits
    peak_rss: int = 0
    busy: list[list[float]] = field(default_factory=list)  # per round: busy share of each core

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def percentile(self, q: float) -> float:
        return percentile(self.latencies, q)

    def core_busy(self) -> list[float]:
        return [sum(r[i] for r in self.busy) / len(self.busy) for i in range(len(self.busy[0]))]


def cpu_times() -> list[tuple[int, int]]:
    """(busy, total) jiffies of each core from /proc/stat."""
    out = []
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + values[4]
            out.append((sum(values) - idle, sum(values)))
    return out


class CoreBusy:
    """Busy share of each core while the block runs."""

    def __enter__(self) -> "CoreBusy":
        self._start = cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        end = cpu_times()
        self.shares = [(b1 - b0) / max(t1 - t0, 1) for (b0, t0), (b1, t1) in zip(self._start, end)]


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


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, scoring: bool) -> dict:
    """Stream one chat completion; its timings, output tokens and whether it was scored."""
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"semgrad": scoring},
    )
    token_times, tokens, scored, reused_all = [], 0, False, False
    async for chunk in stream:
        now = time.perf_counter()
        for choice in chunk.choices:
            if choice.finish_reason is None and choice.delta.content:
                token_times.append(now)
            semgrad = (choice.model_extra or {}).get("semgrad")
            if isinstance(semgrad, dict) and "error" not in semgrad:
                scored, reused_all = True, semgrad.get("reused") == ["prompt_kv", "band_inputs", "logits"]
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    ttft = (token_times[0] if token_times else end) - start
    tpot = (token_times[-1] - token_times[0]) / (len(token_times) - 1) if len(token_times) > 1 else None
    return {
        "latency": end - start,
        "ttft": ttft,
        "tpot": tpot,
        "tokens": tokens,
        "scored": scored,
        "reused_all": reused_all,
    }


async def run_load(
    url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int, scoring: bool, phase: Phase
) -> None:
    """Send every prompt, at most ``concurrency`` at a time; add the outcome to ``phase``."""
    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0) as client:

        async def one(prompt: str) -> None:
            async with gate:
                r = await one_request(client, model, prompt, max_tokens, scoring)
            phase.latencies.append(r["latency"])
            phase.ttfts.append(r["ttft"])
            if r["tpot"] is not None:
                phase.tpots.append(r["tpot"])
            phase.tokens += r["tokens"]
            phase.scored += r["scored"]
            phase.reused_all += r["reused_all"]

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        phase.wall_s += time.perf_counter() - start


async def head_of_line(
    url: str, model: str, background: list[str], probes: int, scoring: bool | None, in_flight: int = 4
) -> list[float]:
    """Latencies of short unscored requests sent one after another, alone (``scoring`` None) or while the
    ``background`` long-prompt requests (rag, ``in_flight`` at a time) run with scoring on or off."""
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0) as client:
        load = None
        if scoring is not None:
            load = asyncio.create_task(run_load(url, model, background, LOADS["rag"][1], in_flight, scoring, Phase()))
            await asyncio.sleep(3)  # the background is under way
        latencies = []
        for i in range(probes):
            r = await one_request(client, model, f"Say the number {i}.", 8, False)
            latencies.append(r["latency"])
            await asyncio.sleep(0.2)
        if load is not None:
            await load
        return latencies


# Long-prompt requests in flight during the head-of-line phases: one (a single long prompt, as in the issue's
# report of one client stalling the others) and four.
HOL_IN_FLIGHT = (1, 4)


def hol_phase(in_flight: int, scoring: bool) -> str:
    return f"rag x{in_flight}, scoring {'on' if scoring else 'off'}"


def scoring_metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(semgrad_\w+) (\S+)$", text, re.M)}


def load_prompts(load: str, start: int, n: int) -> list[str]:
    """Prompts ``start`` to ``start + n`` of a load: TruthfulQA questions; for rag, SciQ questions each after its own
    notes (other SciQ questions with their answers, drawn at random per prompt, so that no two prompts share a
    prefix that vLLM's prefix cache would serve)."""
    template = LOADS[load][0]
    if load != "rag":
        queries = [json.loads(line)["query"] for line in (DATA / "truthfulqa" / "test.jsonl").read_text().splitlines()]
        if start + n > len(queries):
            raise SystemExit(
                f"the {load} load has {len(queries)} questions; this run needs {start + n}: send fewer requests"
            )
        return [template.format(query=q) for q in queries[start : start + n]]
    rows = [json.loads(line) for line in (DATA / "sciq" / "test.jsonl").read_text().splitlines()]
    if start + n > len(rows):
        raise SystemExit(f"the rag load has {len(rows)} questions; this run needs {start + n}: send fewer requests")
    prompts = []
    for i in range(start, start + n):
        notes = random.Random(i).sample(rows[:i] + rows[i + 1 :], RAG_FACTS)
        context = "\n".join(f"- {r['query']} {r['truthful answer'][0]}." for r in notes)
        prompts.append(template.format(context=context, query=rows[i]["query"]))
    return prompts


class Prompts:
    """Hands out a load's prompts, each once per server: a prompt sent again would find its prefix in vLLM's cache
    and skip the prefill that the first sending paid, so phases that met the same prompts would do different work."""

    def __init__(self, load: str) -> None:
        self.load, self.used = load, 0

    def take(self, n: int) -> list[str]:
        prompts = load_prompts(self.load, self.used, n)
        self.used += n
        return prompts


def benchmark(
    server: RunningServer, model: str, args: argparse.Namespace, sources: dict[str, Prompts]
) -> dict[str, dict[str, Phase]]:
    results: dict[str, dict[str, Phase]] = {}
    for load in args.loads:
        max_tokens, source = LOADS[load][1], sources[load]
        for scoring in (False, True):  # warm-up: the first requests of each kind pay one-off costs
            asyncio.run(
                run_load(
                    server.url, model, source.take(args.concurrency), max_tokens, args.concurrency, scoring, Phase()
                )
            )
        phases = results[load] = {"off": Phase(), "on": Phase()}
        for round_ in range(args.rounds):
            for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                prompts = source.take(args.requests)
                with PeakRss(server.pid) as rss, CoreBusy() as busy:
                    asyncio.run(
                        run_load(server.url, model, prompts, max_tokens, args.concurrency, mode == "on", phases[mode])
                    )
                phases[mode].peak_rss = max(phases[mode].peak_rss, rss.peak)
                phases[mode].busy.append(busy.shares)
                print(
                    f"{load} {mode} round {round_ + 1}: {phases[mode].tokens_per_s:.1f} tok/s so far", file=sys.stderr
                )
    return results


def plain_vllm(
    model_dir: Path, dtype: str, kv_bytes: int, log: Path, args: argparse.Namespace
) -> tuple[int, dict[str, float]]:
    """vLLM serving the same model with the same settings, without SemGrad: its idle memory (what keeping the dense
    weights costs) and, per load, its output tokens/s over one round (what a user would get without semgrad-serve)."""
    port = free_port()
    with running_server(plain_vllm_command(port, model_dir, dtype, kv_bytes), port, log) as server:
        time.sleep(5)
        idle = tree_rss(server.pid)
        throughput = {}
        for load in args.loads:  # the first prompts of each load, as semgrad-serve's warm-up and first round met them
            source, max_tokens = Prompts(load), LOADS[load][1]
            asyncio.run(
                run_load(
                    server.url,
                    model_dir.name,
                    source.take(args.concurrency),
                    max_tokens,
                    args.concurrency,
                    False,
                    Phase(),
                )
            )
            phase = Phase()
            asyncio.run(
                run_load(
                    server.url, model_dir.name, source.take(args.requests), max_tokens, args.concurrency, False, phase
                )
            )
            throughput[load] = phase.tokens_per_s
            print(f"plain vLLM {load}: {phase.tokens_per_s:.1f} tok/s", file=sys.stderr)
        return idle, throughput


TARGETS = {"qa": 0.75, "chat": 0.5, "rag": 0.8}  # output tok/s on/off targets on this CPU


def report(
    results: dict[str, dict[str, Phase]],
    plain: dict[str, float],
    hol: dict[str, list[float]],
    memory: dict[str, int | None],
    info: dict[str, str],
    extra: list[str],
) -> str:
    mib = 1 << 20
    lines = [
        "# Serving benchmark: SemGrad scoring off vs on (CPU)",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        "",
        "| load | scoring | output tok/s | E2E p50 / p99 (s) | TTFT p50 / p99 (s) | time per output token p50 / p99 "
        "(ms) | busy share per core | peak RSS (MiB) | answers scored (all reused) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for load, phases in results.items():
        for mode, p in phases.items():
            busy = " / ".join(f"{b:.0%}" for b in p.core_busy())
            lines.append(
                f"| {load} | {mode} | {p.tokens_per_s:.1f} | {p.percentile(0.5):.2f} / {p.percentile(0.99):.2f} "
                f"| {percentile(p.ttfts, 0.5):.2f} / {percentile(p.ttfts, 0.99):.2f} "
                f"| {percentile(p.tpots, 0.5) * 1000:.0f} / {percentile(p.tpots, 0.99) * 1000:.0f} | {busy} "
                f"| {p.peak_rss / mib:.0f} | {p.scored}/{len(p.latencies)} ({p.reused_all}) |"
            )
        off, on = phases["off"], phases["on"]
        ratio = on.tokens_per_s / off.tokens_per_s
        target = TARGETS[load]
        summary.append(
            f"- **{load}**: output tok/s on/off = **{ratio:.2f}x** (target ≥ {target}x: "
            f"{'met' if ratio >= target else 'NOT met'}); E2E p50 on/off = "
            f"{on.percentile(0.5) / off.percentile(0.5):.2f}x, p99 = "
            f"{on.percentile(0.99) / off.percentile(0.99):.2f}x; time per output token p99 on/off = "
            f"{percentile(on.tpots, 0.99) / percentile(off.tpots, 0.99):.2f}x; extra peak memory while scoring = "
            f"{(on.peak_rss - off.peak_rss) / mib:+.0f} MiB"
            + (
                f"; plain vLLM (no SemGrad) {plain[load]:.1f} tok/s: on/plain = {on.tokens_per_s / plain[load]:.2f}x, "
                f"off/plain = {off.tokens_per_s / plain[load]:.2f}x"
                if load in plain
                else ""
            )
        )
    lines += ["", "## Ratios", "", *summary]
    if hol:
        idle = hol["idle"]
        lines += [
            "",
            "## Head-of-line: short unscored requests (8 tokens) sent one at a time",
            "",
            "| while | p50 (s) | p99 (s) | p50 / idle |",
            "|---|---|---|---|",
            *(
                f"| {name} | {percentile(v, 0.5):.2f} | {percentile(v, 0.99):.2f} | "
                f"{percentile(v, 0.5) / percentile(idle, 0.5):.2f}x |"
                for name, v in hol.items()
            ),
            "",
        ]
        for in_flight in HOL_IN_FLIGHT:
            on, off = hol[hol_phase(in_flight, True)], hol[hol_phase(in_flight, False)]
            lines.append(
                f"- {in_flight} rag request(s) in flight with scoring on slow an unrelated unscored request by "
                f"**{percentile(on, 0.5) / percentile(off, 0.5):.2f}x** against the same requests with scoring off "
                f"(p50; p99 {percentile(on, 0.99) / percentile(off, 0.99):.2f}x), and "
                f"**{percentile(on, 0.5) / percentile(idle, 0.5):.2f}x** against an idle server (target ≤ 2x; with "
                f"scoring off {percentile(off, 0.5) / percentile(idle, 0.5):.2f}x)."
            )
    lines += ["", "## Memory", ""]
    if memory["plain"] is not None:
        lines.append(
            f"- idle RSS: plain vLLM {memory['plain'] / mib:.0f} MiB, with SemGrad {memory['ours'] / mib:.0f} MiB "
            f"(+{(memory['ours'] - memory['plain']) / mib:.0f} MiB: on CPU the dense weights vLLM would free are kept "
            "for autograd)"
        )
    else:
        lines.append(f"- idle RSS with SemGrad: {memory['ours'] / mib:.0f} MiB (plain vLLM baseline not measured)")
    lines += [
        "- RSS sums the API server, engine core and worker processes (shared pages counted in each).",
        "",
        *extra,
        "",
        *NOTES,
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", metavar="DIR", help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=32, help="requests per load, mode and round (default: 32)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    parser.add_argument("--rounds", type=int, default=2, help="off/on rounds per load (default: 2)")
    parser.add_argument("--loads", nargs="+", choices=list(LOADS), default=list(LOADS))
    parser.add_argument(
        "--max-batch",
        type=int,
        default=ScoringSettings.max_batch,
        help="the server's --max-batch (default: %(default)s)",
    )
    parser.add_argument(
        "--hol-probes", type=int, default=12, help="short requests per head-of-line phase (0: skip it; default: 12)"
    )
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="vLLM KV cache size (default: 2)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain vLLM baseline (memory, tokens/s)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving_cpu.md")
    args = parser.parse_args()

    import vllm

    from semgrad_serve.model.loading import resolve_model

    model_dir = resolve_model(args.model).resolve()
    kv_bytes = int(args.kv_cache_gib * (1 << 30))
    logs = Path(tempfile.mkdtemp(prefix="semgrad-bench-"))
    load_before = os.getloadavg()[0]
    port = free_port()
    serve_args = ["--model", str(model_dir), "--dtype", args.dtype, "--max-batch", str(args.max_batch)]
    serve_args += ["--", "--kv-cache-memory-bytes", str(kv_bytes)]
    with running_server(serve_command(port, *serve_args), port, logs / "semgrad.log") as server:
        before = scoring_metrics(server.url)
        idle = tree_rss(server.pid)
        sources = {load: Prompts(load) for load in LOADS}
        results = benchmark(server, model_dir.name, args, sources)
        hol: dict[str, list[float]] = {}
        if args.hol_probes:
            hol["idle"] = asyncio.run(head_of_line(server.url, model_dir.name, [], args.hol_probes, None))
            for in_flight in HOL_IN_FLIGHT:
                for scoring in (False, True):  # each phase long prompts of its own, whose prefill it pays
                    name = hol_phase(in_flight, scoring)
                    background = sources["rag"].take(in_flight * args.hol_probes)
                    hol[name] = asyncio.run(
                        head_of_line(server.url, model_dir.name, background, args.hol_probes, scoring, in_flight)
                    )
                    print(f"head-of-line {name}: p50 {percentile(hol[name], 0.5):.2f} s", file=sys.stderr)
        after = scoring_metrics(server.url)
    plain, plain_throughput = (
        (None, {}) if args.no_baseline else plain_vllm(model_dir, args.dtype, kv_bytes, logs / "plain.log", args)
    )

    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    batches = delta["semgrad_scoring_batch_size_count"]
    extra = [
        "## Scoring",
        "",
        f"- {delta['semgrad_answers_scored_total']:.0f} answers scored in {batches:.0f} batches "
        f"(mean batch {delta['semgrad_scoring_batch_size_sum'] / max(batches, 1):.1f}); mean scoring latency "
        f"{delta['semgrad_scoring_latency_seconds_sum'] / max(delta['semgrad_scoring_latency_seconds_count'], 1):.2f} "
        "s (answer finished → scores, queueing included); warm-up and head-of-line requests included.",
    ]
    info = {
        "machine": f"{cpu_name()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / (1 << 30):.0f} GiB",
        "software": f"torch {torch.__version__}, vllm {vllm.__version__}",
        "model": f"{model_dir.name}, {args.dtype}, enforce_eager, KV cache {args.kv_cache_gib:g} GiB",
        "load": f"{args.requests} requests per load, mode and round (TruthfulQA questions; rag: SciQ questions, each "
        f"after {RAG_FACTS} notes of other SciQ questions and answers, ~1.5k prompt tokens); {args.concurrency} in "
        f"flight; greedy; streaming; {args.rounds} alternating off/on rounds; scoring batch ≤ {args.max_batch}",
        "loads": "; ".join(
            f"{name}: `{template!r}`, max_tokens {n}" for name, (template, n) in LOADS.items() if name in args.loads
        ),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine load": f"1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(the benchmark's own server included; vLLM binds generation's threads to one core and reserves the other "
        "for its front end and engine loop, where the scoring thread runs at nice 10)",
    }
    text = report(results, plain_throughput, hol, {"plain": plain, "ours": idle}, info, extra)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

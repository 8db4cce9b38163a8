"""Data-parallel serving benchmark: ``semgrad-serve serve`` with one engine, then with ``--data-parallel-size 2``,
the same scored loads against each, side by side.

Per server: the qa load (streamed, scoring on; output tokens/s, end-to-end and per-token latency, busy share of
each core), then the head-of-line test of ``serving.py`` (short unscored requests sent one at a time, idle and
while one or four long-prompt rag requests run with scoring on), and the answers each engine scored (from
``/metrics``). The servers run one after the other with the same settings and fresh prompts; their memory is
the RSS of the process tree when idle. Prints the ratios and writes a Markdown report.

    python benchmarks/data_parallel.py            # CPU defaults, report in benchmarks/results/
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch
from serving import (
    HOL_IN_FLIGHT,
    LOADS,
    ROOT,
    CoreBusy,
    Phase,
    Prompts,
    cpu_name,
    head_of_line,
    percentile,
    run_load,
    tree_rss,
)

from semgrad_serve.testing.launch_server import free_port, running_server, serve_command


def engine_answers(url: str) -> dict[str, float]:
    """Answers scored per engine (``semgrad_engine_answers_total``, outcome "scored")."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = re.finditer(r'^semgrad_engine_answers_total\{engine="(\d+)",outcome="scored"\} (\S+)$', text, re.M)
    return {m[1]: float(m[2]) for m in found}


def measure(size: int, model_dir: Path, args: argparse.Namespace, log: Path) -> dict:
    """One server with ``size`` engines: its qa phase, head-of-line latencies, idle memory and per-engine answers."""
    port = free_port()
    serve_args = [
        "--model",
        str(model_dir),
        "--dtype",
        args.dtype,
        "--max-batch",
        str(args.max_batch),
        "--data-parallel-size",
        str(size),
        "--",
        "--kv-cache-memory-bytes",
        str(int(args.kv_cache_gib * (1 << 30))),
        "--max-model-len",
        "4096",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    qa, rag = Prompts("qa"), Prompts("rag")
    max_tokens = LOADS["qa"][1]
    load_before = os.getloadavg()[0]
    with running_server(serve_command(port, *serve_args), port, log, env) as server:
        time.sleep(5)
        idle = tree_rss(server.pid)
        asyncio.run(
            run_load(server.url, model_dir.name, qa.take(args.concurrency), max_tokens, args.concurrency, True, Phase())
        )
        phase = Phase()
        for _ in range(args.rounds):
            with CoreBusy() as busy:
                asyncio.run(
                    run_load(
                        server.url, model_dir.name, qa.take(args.requests), max_tokens, args.concurrency, True, phase
                    )
                )
            phase.busy.append(busy.shares)
        print(f"dp={size} qa: {phase.tokens_per_s:.1f} tok/s", file=sys.stderr)
        hol = {"idle": asyncio.run(head_of_line(server.url, model_dir.name, [], args.hol_probes, None))}
        for in_flight in HOL_IN_FLIGHT:
            name = f"rag x{in_flight}, scoring on"
            background = rag.take(in_flight * args.hol_probes)
            hol[name] = asyncio.run(
                head_of_line(server.url, model_dir.name, background, args.hol_probes, True, in_flight)
            )
            print(f"dp={size} head-of-line {name}: p50 {percentile(hol[name], 0.5):.2f} s", file=sys.stderr)
        load = f"{load_before:.1f} → {os.getloadavg()[0]:.1f}"
        return {"qa": phase, "hol": hol, "idle_rss": idle, "engines": engine_answers(server.url), "load": load}


def report(results: dict[int, dict], info: dict[str, str]) -> str:
    one, two = results[1], results[2]
    lines = ["# Data-parallel serving: one engine vs two (CPU, scoring on)", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [
        "",
        "## qa load, scoring on",
        "",
        "| engines | output tok/s | E2E p50 / p99 (s) | TTFT p50 / p99 (s) | time per output token p50 / p99 "
        "(ms) | busy share per core | answers scored (all reused) | idle RSS (MiB) | 1-min load average, start "
        "→ end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, r in results.items():
        p: Phase = r["qa"]
        busy = " / ".join(f"{b:.0%}" for b in p.core_busy())
        lines.append(
            f"| {size} | {p.tokens_per_s:.1f} | {p.percentile(0.5):.2f} / {p.percentile(0.99):.2f} "
            f"| {percentile(p.ttfts, 0.5):.2f} / {percentile(p.ttfts, 0.99):.2f} "
            f"| {1000 * percentile(p.tpots, 0.5):.0f} / {1000 * percentile(p.tpots, 0.99):.0f} | {busy} "
            f"| {p.scored}/{len(p.latencies)} ({p.reused_all}) | {r['idle_rss'] / (1 << 20):.0f} | {r['load']} |"
        )
    lines += [
        "",
        "## Head-of-line: short unscored requests (8 tokens) sent one at a time",
        "",
        "| while | 1 engine p50 / p99 (s) | 2 engines p50 / p99 (s) | p50 2 / 1 |",
        "|---|---|---|---|",
    ]
    for name in one["hol"]:
        a, b = one["hol"][name], two["hol"][name]
        lines.append(
            f"| {name} | {percentile(a, 0.5):.2f} / {percentile(a, 0.99):.2f} | {percentile(b, 0.5):.2f} / "
            f"{percentile(b, 0.99):.2f} | {percentile(b, 0.5) / percentile(a, 0.5):.2f}x |"
        )
    qa1, qa2 = one["qa"], two["qa"]
    lines += [
        "",
        "## Ratios (2 engines / 1)",
        "",
        f"- qa output tok/s: **{qa2.tokens_per_s / qa1.tokens_per_s:.2f}x**; E2E p50 "
        f"{qa2.percentile(0.5) / qa1.percentile(0.5):.2f}x, p99 {qa2.percentile(0.99) / qa1.percentile(0.99):.2f}x; "
        f"time per output token p50 {percentile(qa2.tpots, 0.5) / percentile(qa1.tpots, 0.5):.2f}x",
        f"- idle memory: {two['idle_rss'] / one['idle_rss']:.2f}x "
        f"(+{(two['idle_rss'] - one['idle_rss']) / (1 << 20):.0f} MiB: a second engine core and worker, each with the "
        "weights)",
        "- answers scored per engine over the whole run (warm-up and head-of-line included): "
        + "; ".join(
            f"{size} engine(s): " + ", ".join(f"engine {e}: {n:.0f}" for e, n in sorted(r["engines"].items()))
            for size, r in results.items()
        ),
        "",
        "## Reading the numbers",
        "",
        "- On this 2-core machine one engine binds generation to one core and leaves the other to the API server,",
        "  the engine loop and the scoring thread; two engines bind one core each, so each engine's scoring thread",
        "  runs on the other engine's generation core and the API server shares both. Data parallelism adds",
        "  generation cores, which this machine does not have: the ratios show what splitting the same two cores",
        "  costs or gains, not what a second GPU would add.",
        "- Scored requests go round-robin over the engines (semgrad-serve picks the engine so that the engine that",
        "  generated an answer scores it over its own capture), so half the head-of-line probes share an engine",
        "  with the long prompts, the other half find an engine without them.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", metavar="DIR", help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=32, help="qa requests per round (default: 32)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    parser.add_argument("--rounds", type=int, default=2, help="qa rounds per server (default: 2)")
    parser.add_argument("--max-batch", type=int, default=16, help="the servers' --max-batch (default: %(default)s)")
    parser.add_argument("--hol-probes", type=int, default=6, help="short requests per head-of-line phase (default: 6)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5, help="vLLM KV cache size per engine (default: 0.5)")
    parser.add_argument(
        "--sizes", type=int, nargs=2, default=[1, 2], help="data-parallel sizes, in the order run (default: 1 2)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_parallel_cpu.md")
    args = parser.parse_args()

    import vllm

    from semgrad_serve.model.loading import resolve_model

    model_dir = resolve_model(args.model).resolve()
    logs = Path(tempfile.mkdtemp(prefix="semgrad-dp-bench-"))
    load_before = os.getloadavg()[0]
    measured = {size: measure(size, model_dir, args, logs / f"dp{size}.log") for size in args.sizes}
    results = {size: measured[size] for size in sorted(measured)}
    info = {
        "machine": f"{cpu_name()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / (1 << 30):.0f} GiB",
        "software": f"torch {torch.__version__}, vllm {vllm.__version__}",
        "model": f"{model_dir.name}, {args.dtype}, enforce_eager, KV cache {args.kv_cache_gib:g} GiB per engine",
        "load": f"qa: {args.rounds} rounds of {args.requests} TruthfulQA questions (`{LOADS['qa'][0]!r}`, max_tokens "
        f"{LOADS['qa'][1]}), {args.concurrency} in flight, greedy, streaming, scoring on, scoring batch ≤ "
        f"{args.max_batch}; head-of-line: {args.hol_probes} probes per phase",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "order": f"data-parallel size {args.sizes[0]}, then {args.sizes[1]}, one server at a time",
        "machine load": f"1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(other users of the machine included)",
    }
    text = report(results, info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""The qa load with scoring off and on under two CPU core layouts, side by side in one run.

``semgrad-serve serve`` sets ``VLLM_CPU_NUM_OF_RESERVED_CPU`` to one core per
worker: with a KV connector configured vLLM otherwise reserves one more, which
on a 2-core machine leaves none, so it binds generation's OpenMP threads to
every core and the scoring thread competes with one of them. This runs the
same load against a server with the reserve (what ``serve`` does) and one with
``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` (the layout before), and reports output
tokens/s, the on/off ratios and the busy share of each core. Uses ``serving.py``'s load, one server at a time.

    python benchmarks/core_layout.py            # report in benchmarks/results/core_layout_cpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
from serving import LOADS, ROOT, CoreBusy, Phase, Prompts, run_load  # beside this script

from semgrad_serve.testing.launch_server import free_port, running_server, serve_command

LAYOUTS = {"reserved core (serve's default)": None, "no reserved core (before)": "0"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per mode and round (default: 32)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="off/on rounds per layout, alternating (default: 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "core_layout_cpu.md")
    args = parser.parse_args()

    from semgrad_serve.model.loading import resolve_model

    model_dir = resolve_model(None).resolve()
    max_tokens = LOADS["qa"][1]
    logs = Path(tempfile.mkdtemp(prefix="semgrad-layout-"))
    rows = []
    for name, reserve in LAYOUTS.items():
        env = dict(os.environ)
        if reserve is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = reserve
        port = free_port()
        command = serve_command(port, "--model", str(model_dir), "--", "--kv-cache-memory-bytes", str(2 << 30))
        with running_server(command, port, logs / f"server{len(rows)}.log", env) as server:
            prompts = Prompts("qa")
            for scoring in (False, True):  # warm-up
                asyncio.run(
                    run_load(
                        server.url,
                        model_dir.name,
                        prompts.take(args.concurrency),
                        max_tokens,
                        args.concurrency,
                        scoring,
                        Phase(),
                    )
                )
            phases, busy = {"off": Phase(), "on": Phase()}, {"off": [], "on": []}
            for round_ in range(args.rounds):
                for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                    batch = prompts.take(args.requests)
                    with CoreBusy() as cores:
                        asyncio.run(
                            run_load(
                                server.url,
                                model_dir.name,
                                batch,
                                max_tokens,
                                args.concurrency,
                                mode == "on",
                                phases[mode],
                            )
                        )
                    busy[mode].append(cores.shares)
            binding = [
                line.split("core ids=")[1]
                for line in (logs / f"server{len(rows)}.log").read_text().splitlines()
                if "core ids=" in line
            ]
        rows.append((name, binding[0] if binding else "?", phases, busy))
        print(
            f"{name}: off {phases['off'].tokens_per_s:.1f}, on {phases['on'].tokens_per_s:.1f} tok/s", file=sys.stderr
        )

    lines = [
        "# Core layout: the qa load with scoring off and on, with and without vLLM's reserved core (CPU)",
        "",
        f"- machine: {psutil.cpu_count()} cores; default model, float32; {time.strftime('%Y-%m-%d %H:%M')}",
        f"- load: serving.py's qa load, {args.requests} requests per mode and round, {args.concurrency} in flight, "
        f"{args.rounds} alternating off/on rounds after a warm-up, every round prompts of its own; one server per "
        "layout",
        "",
        "| layout | generation bound to (vLLM's log) | output tok/s off | on | on/off | busy share per core off / on |",
        "|---|---|---|---|---|---|",
    ]
    for name, binding, phases, busy in rows:
        off, on = phases["off"].tokens_per_s, phases["on"].tokens_per_s
        shares = {
            m: " ".join(f"{sum(r[i] for r in busy[m]) / len(busy[m]):.0%}" for i in range(len(busy[m][0])))
            for m in busy
        }
        lines.append(
            f"| {name} | {binding} | {off:.1f} | {on:.1f} | **{on / off:.2f}x** | {shares['off']} / {shares['on']} |"
        )
    lines += [
        "",
        "- With no reserved core vLLM runs generation on two OpenMP threads, one per core: scoring off is faster, and "
        "the",
        "  scoring thread, pinned beside the API server, shares a core with one of generation's threads.",
        "",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

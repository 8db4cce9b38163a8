"""MoE memory: does serving a mixture-of-experts model with SemGrad keep a second copy of the experts?

For random Qwen3-MoE checkpoints that differ only in their number of experts, plain vLLM and
``semgrad-serve serve`` (same CPU settings, float32) each serve the model; the resident memory of the engine
process (the largest in the server's process tree: vLLM's worker runs in it) and of the whole tree is taken
after start-up and again after scored answers (scoring's transient buffers included). A second copy of the
experts would make semgrad-serve's excess over plain vLLM grow by the experts' bytes from the small model to the
large one; without one the excess stays what keeping the dense non-expert weights and the scorer cost.

    python benchmarks/moe_memory.py                    # report in benchmarks/results/moe_memory_cpu.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil

from semgrad_serve.testing.family_checkpoints import save_family_checkpoint
from semgrad_serve.testing.launch_server import free_port, plain_vllm_command, running_server, serve_command

ROOT = Path(__file__).resolve().parents[1]


MIB = 1 << 20
KV_BYTES = 256 << 20
QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "How many legs does a spider have?",
    "What gas do plants take in?",
]


@dataclass
class Memory:
    engine: int  # bytes: the largest process of the server's tree (vLLM's engine core, with its worker)
    tree: int  # bytes: the whole tree


def memory(pid: int) -> Memory:
    rss = []
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            rss.append(proc.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
    return Memory(max(rss), sum(rss))


def serve(command: list[str], port: int, log: Path, model: str, answers: int) -> tuple[Memory, Memory, int]:
    """(memory after start-up, memory after ``answers`` answers, answers scored)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with running_server(command, port, log, env) as server:
        time.sleep(5)
        idle = memory(server.pid)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300, max_retries=0)
        scored = 0
        for i in range(answers):
            messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            response = client.chat.completions.create(
                model=model, messages=messages, max_tokens=24, temperature=1.0, seed=i
            )
            semgrad = (response.choices[0].model_extra or {}).get("semgrad")
            scored += semgrad is not None and "error" not in semgrad
        time.sleep(2)
        return idle, memory(server.pid), scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--moe-intermediate", type=int, default=1024)
    parser.add_argument("--answers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "moe_memory_cpu.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for experts in args.experts:
            name = f"qwen3-moe-{experts}e"
            layers = 4
            model_dir = save_family_checkpoint(
                "qwen3_moe",
                Path(tmp) / name,
                hidden_size=args.hidden,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=64,
                num_experts=experts,
                moe_intermediate_size=args.moe_intermediate,
                mlp_only_layers=[],
            )
            expert_bytes = layers * experts * 3 * args.hidden * args.moe_intermediate * 4
            port = free_port()
            plain = serve(
                plain_vllm_command(port, model_dir, "float32", KV_BYTES),
                port,
                Path(tmp) / f"{name}-plain.log",
                name,
                args.answers,
            )
            port = free_port()
            command = serve_command(port, "--model", str(model_dir), "--", "--kv-cache-memory-bytes", str(KV_BYTES))
            ours = serve(command, port, Path(tmp) / f"{name}-semgrad.log", name, args.answers)
            rows.append((experts, expert_bytes, plain, ours))
            print(
                f"{name}: experts {expert_bytes / MIB:.0f} MiB; engine RSS plain {plain[1].engine / MIB:.0f} MiB, "
                f"semgrad {ours[1].engine / MIB:.0f} MiB ({ours[2]}/{args.answers} scored)",
                file=sys.stderr,
            )
    lines = [
        "# MoE memory: semgrad-serve over plain vLLM (CPU, float32)",
        "",
        f"`python benchmarks/moe_memory.py` — random Qwen3-MoE, 4 layers all sparse, hidden {args.hidden}, expert "
        f"intermediate {args.moe_intermediate}, top 2; memory after start-up and after {args.answers} answers "
        "(semgrad-serve: each scored). RSS in MiB.",
        "",
        "| experts | experts' bytes | server | engine RSS idle | engine RSS after answers | tree RSS after answers | "
        "scored |",
        "|---|---|---|---|---|---|---|",
    ]
    for experts, expert_bytes, plain, ours in rows:
        for label, (idle, after, scored) in (("plain vLLM", plain), ("semgrad-serve", ours)):
            lines.append(
                f"| {experts} | {expert_bytes / MIB:.0f} | {label} | {idle.engine / MIB:.0f} | "
                f"{after.engine / MIB:.0f} | {after.tree / MIB:.0f} | {scored if label == 'semgrad-serve' else '-'} |"
            )
    lines += ["", "| experts | semgrad-serve − plain vLLM, engine idle | after answers |", "|---|---|---|"]
    excess = []
    for experts, _, plain, ours in rows:
        excess.append((ours[0].engine - plain[0].engine, ours[1].engine - plain[1].engine))
        lines.append(f"| {experts} | {excess[-1][0] / MIB:+.0f} | {excess[-1][1] / MIB:+.0f} |")
    if len(rows) > 1:
        grew = (rows[-1][1] - rows[0][1]) / MIB
        lines += [
            "",
            f"From {rows[0][0]} to {rows[-1][0]} experts the experts grow by {grew:.0f} MiB; semgrad-serve's excess "
            f"over plain vLLM changes by {(excess[-1][0] - excess[0][0]) / MIB:+.0f} MiB idle and "
            f"{(excess[-1][1] - excess[0][1]) / MIB:+.0f} MiB after answers (a second copy of the experts would add "
            f"{grew:.0f} MiB).",
        ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

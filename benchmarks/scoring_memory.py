"""Scoring cost on the default model: the paper's naive full-autograd procedure vs semgrad-serve, side by side.

For prompts of about 256, 1k and 2k tokens with 24-token answers:
- extra peak memory above the loaded model (resident-set high-water mark, reset after loading and
  a short warm-up, in a fresh process whose allocator returns freed blocks), per item and for a batch;
- seconds per item, and items per second at batch 8 (the naive procedure handles one item at a time).
Prints the table and the ratios and writes it to benchmarks/results/scoring_memory_cpu.md.

    python benchmarks/scoring_memory.py [--lengths 256 1024 2048] [--batch 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from semgrad_serve.scoring.items import DEFAULT_BATCH_TOKENS

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT / "data" / "sciq" / "test.jsonl"
ANSWER_TOKENS = 24


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _items(scorer, length: int, count: int) -> list[tuple[list[int], list[int]]]:
    """``count`` prompts of about ``length`` tokens (SciQ questions as context) with 24-token answers."""
    questions = [json.loads(line)["query"] for line in DATA.read_text().splitlines()]
    items, cursor = [], 0
    for _ in range(count):
        parts: list[str] = []
        while True:
            parts.append(questions[cursor % len(questions)])
            cursor += 1
            prompt = scorer.prompt_ids([{"role": "user", "content": "Answer the last question.\n" + "\n".join(parts)}])
            if len(prompt) >= length:
                break
        answer = scorer.answer_ids(" ".join(questions[cursor : cursor + 5]))[:ANSWER_TOKENS]
        items.append((prompt, answer))
    return items


def _run(method: str, scorer, items) -> None:
    if method == "ours":
        results = scorer.score(items, batch_size=len(items))
        assert not any(isinstance(r, Exception) for r in results), results
        return
    from semgrad_serve.testing.naive import naive_scores

    for prompt, answer in items:
        naive_scores(scorer.model, prompt, answer, len(prompt) - 4, scorer.band, paper_style=True)


def worker(mode: str, method: str, length: int, batch: int, repeats: int) -> dict:
    """Runs in a fresh process: one measurement, printed as JSON."""
    from semgrad_serve.scoring.scorer import Scorer

    scorer = Scorer.from_pretrained()
    scorer.model.requires_grad_(True)  # the paper's model: every parameter trainable
    if mode == "memory":
        items = _items(scorer, length, batch if method == "ours" else 1)
        _run(method, scorer, _items(scorer, 48, 1))  # one-time library set-up is not scoring memory
        _reset_peak()
        base = _status_kb("VmRSS")
        _run(method, scorer, items)
        return {"extra_peak_mb": (_status_kb("VmHWM") - base) / 1024, "items": len(items)}
    items = _items(scorer, length, batch)
    _run("ours", scorer, items[:2])  # warm-up of both code paths
    _run("naive", scorer, items[:1])
    timings = {"naive": [], "ours_1": [], "ours_batch": []}
    for _ in range(repeats):  # interleaved, so that machine noise hits all three alike
        start = time.perf_counter()
        _run("naive", scorer, items[:1])
        timings["naive"].append(time.perf_counter() - start)
        start = time.perf_counter()
        _run("ours", scorer, items[:1])
        timings["ours_1"].append(time.perf_counter() - start)
        start = time.perf_counter()
        _run("ours", scorer, items)
        timings["ours_batch"].append((time.perf_counter() - start) / len(items))
    return {k: min(v) for k, v in timings.items()} | {"prompt_tokens": len(items[0][0])}


def measure(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if args[0] == "memory":  # freed blocks go back to the system, so the peak shows every allocation
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *args], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scoring_memory_cpu.md"))
    parser.add_argument(
        "--worker", nargs=5, metavar=("MODE", "METHOD", "LENGTH", "BATCH", "REPEATS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        mode, method, length, batch, repeats = args.worker
        print(json.dumps(worker(mode, method, int(length), int(batch), int(repeats))))
        return

    rows = []
    for length in args.lengths:
        b = str(args.batch)
        naive_mem = measure("memory", "naive", str(length), "1", "1")["extra_peak_mb"]
        ours_mem = measure("memory", "ours", str(length), "1", "1")["extra_peak_mb"]
        ours_batch_mem = measure("memory", "ours", str(length), b, "1")["extra_peak_mb"]
        t = measure("time", "both", str(length), b, str(args.repeats))
        row = {
            "prompt tokens": t["prompt_tokens"],
            "naive extra peak MB": naive_mem,
            "ours extra peak MB": ours_mem,
            "memory ratio": naive_mem / max(ours_mem, 1e-9),
            f"ours extra peak MB (batch {b})": ours_batch_mem,
            "naive s/item": t["naive"],
            "ours s/item (batch 1)": t["ours_1"],
            "naive items/s": 1 / t["naive"],
            f"ours items/s (batch {b})": 1 / t["ours_batch"],
            "throughput ratio": t["naive"] / t["ours_batch"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    cpu = subprocess.run(
        ["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True, text=True
    ).stdout.strip()
    text = "\n".join(
        [
            "# Scoring cost: naive full autograd (paper's procedure) vs semgrad-serve",
            "",
            f"Default model (SmolLM2-135M-Instruct, float32), {ANSWER_TOKENS}-token answers, CPU: {cpu}, "
            f"{os.cpu_count()} cores.",
            "Memory: extra resident-set peak above the loaded model and a short warm-up, in a fresh process.",
            f"Naive = the paper's procedure, one item at a time; ours at batch {args.batch} = `Scorer.score(items, "
            f"batch_size={args.batch})`:",
            f"one forward and one backward per batch of at most {args.batch} items and {DEFAULT_BATCH_TOKENS} tokens "
            "(so 2 items per batch at 2k tokens).",
            "",
            *lines,
            "",
            f"Generated by `python benchmarks/scoring_memory.py` on {time.strftime('%Y-%m-%d')}.",
        ]
    )
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

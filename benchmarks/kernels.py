"""Benchmark of the scoring kernels: each implementation against the materializing torch reference.

For each operation and shape, times every implementation available on the device and measures
its peak extra memory, both also as ratios to the torch reference measured in the same run, and
checks that it agrees with the reference. Shapes: T answer tokens of one sequence (for the band
reduction: T items, 16 band layers), vocabulary V, hidden size d.

    python benchmarks/kernels.py [--device cpu|cuda] [--t 8 32 128] [--v 49152 ...] [--d 576 4096]

Prints the table and writes it to benchmarks/results/kernels_<device>.md (or ``--out``). Each
implementation runs once untimed first (Triton compiles and autotunes there), then time is the best
of up to 3 runs on CPU, 20 on CUDA (fewer once a second is spent). Peak memory on CPU is the
process's resident high-water mark (Linux), reset before the timed runs; on CUDA, the allocator's
peak. The reference is skipped where its estimated peak would not leave 4 GiB free, so the
benchmark never pushes a shared machine out of memory. On CUDA the table also gives each run
against the device's peaks measured in the same run: memory bandwidth (a device-to-device copy)
for token_stats and band_l1, TF32 tensor throughput (an 8192³ product) for head_grad_l1, and the
head-gradient ℓ1's error against float64. head_grad_l1 runs as scoring calls it: ParaGrad's and
ExGrad's row scales at once.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import platform
import re
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import torch

from semgrad_serve.kernels import Kernels, kernel_choices, select_kernels, unavailable_reason
from semgrad_serve.kernels.head_grad_l1 import head_grad_l1_reference
from semgrad_serve.kernels.token_stats import token_stats_reference

RESULTS = Path(__file__).resolve().parent / "results"
T_VALUES, V_VALUES, D_VALUES = (8, 32, 128), (49152, 128256, 151936), (576, 4096)
N_BAND = 16
HEADROOM = 4 * 2**30  # memory left free for everything else on the machine
GIB = 2**30


def _read_kb(path: str, key: str) -> int:
    with open(path) as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _read_kb("/proc/meminfo", "MemAvailable")


class PeakMemory:
    """Peak memory above the level at ``start()``: resident high-water mark on CPU, allocator peak on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._libc.malloc_trim(0)  # return freed heap pages, so that reuse shows as new residency
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current resident size
            self._base = _read_kb("/proc/self/status", "VmRSS")

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self._base
        return _read_kb("/proc/self/status", "VmHWM") - self._base


def measure(fn: Callable[[], object], memory: PeakMemory, budget_s: float = 1.0) -> tuple[float, int, object]:
    """After an untimed warm-up run, best wall time of up to 3 runs (20 on CUDA; no more once ``budget_s`` is
    spent), peak extra memory of the first timed one, result."""
    cuda = memory.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    memory.start()
    while len(times) < (20 if cuda else 3) and sum(times) < budget_s:
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            peak = memory.stop()
    return min(times), peak, result


def max_rel_diff(ours: object, ref: object) -> float:
    """Largest |ours − ref| of each output relative to that output's largest |ref|."""
    pairs = zip(ours, ref) if isinstance(ref, tuple) else [(ours, ref)]
    worst = 0.0
    for a, b in pairs:
        a, b = a.double(), b.double()
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item())
    return worst


class Case(NamedTuple):
    op: str
    shape: str
    ref_bytes: int  # the torch reference's estimated peak
    make: Callable[[Kernels], Callable[[], object]]
    work: tuple[str, float]  # ("bytes", least memory traffic) or ("flops", multiply-adds × 2)
    exact: Callable[[], torch.Tensor] | None = None  # the float64 answer, where it is compared


def float64_head_grad_l1(*args: torch.Tensor) -> torch.Tensor:
    """The head-gradient reference in float64: the exact answer the kernels' errors are measured against."""
    return head_grad_l1_reference(*(x.double() if x.is_floating_point() else x for x in args))


def cases(
    device: torch.device, dtype: torch.dtype, ts: Sequence[int], vs: Sequence[int], ds: Sequence[int]
) -> Iterator[Case]:
    """Every benchmarked (operation, shape)."""
    g = torch.Generator(device=device).manual_seed(0)
    size = torch.finfo(dtype).bits // 8
    for t, v in itertools.product(ts, vs):
        logits = torch.randn(t, v, generator=g, device=device).mul_(3).to(dtype)
        targets = torch.randint(0, v, (t,), generator=g, device=device)
        # logits read twice, the float32 gradient written once
        yield Case(
            "token_stats",
            f"T={t} V={v}",
            20 * t * v,
            lambda k, a=(logits, targets): lambda: k.token_stats(*a),
            ("bytes", t * v * (2 * size + 4)),
        )
        _, entropy, nll_grad = token_stats_reference(logits, targets)
        del logits
        for d in ds:
            hidden = torch.randn(t, d, generator=g, device=device).to(dtype)
            scales = torch.stack((entropy / t, torch.full_like(entropy, 1 / t)))  # ParaGrad's and ExGrad's
            args = (nll_grad, hidden, scales, torch.tensor([0, t], device=device))
            exact = None
            if device.type == "cuda" and 16 * v * d < free_memory(device) - HEADROOM:
                exact = partial(float64_head_grad_l1, *args)
            # the reference holds the V×d gradient, its abs, and the float64 copy the sum makes
            yield Case(
                "head_grad_l1",
                f"T={t} V={v} d={d}",
                16 * v * d,
                lambda k, a=args: lambda: k.head_grad_l1(*a),
                ("flops", 2 * 2 * t * v * d),
                exact,
            )
        del nll_grad
    for t, d in itertools.product(ts, ds):
        grads = torch.randn(N_BAND, t, d, generator=g, device=device).to(dtype)
        yield Case(
            "band_l1",
            f"B={t} n_band={N_BAND} d={d}",
            16 * grads.numel(),
            lambda k, a=grads: lambda: k.band_l1(a),
            ("bytes", grads.numel() * size),
        )


def device_peaks(device: torch.device) -> dict[str, float]:
    """Measured here and now on CUDA: copy bandwidth (bytes/s, read + write) and TF32 product throughput."""
    if device.type != "cuda":
        return {}
    x = torch.empty(2**28, device=device)  # 1 GiB
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    memory = PeakMemory(device)
    copy_s, _, _ = measure(lambda: y.copy_(x), memory)
    mm_s, _, _ = measure(lambda: a @ a, memory)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"bytes": 2 * x.numel() * 4 / copy_s, "flops": 2 * 8192**3 / mm_s}


def skip_reason(name: str, device: torch.device) -> str | None:
    """Why implementation ``name`` is not benchmarked on ``device``, or None."""
    if name == "triton" and device.type == "cpu":
        return (
            "on CPU it runs only under its interpreter, which says nothing about speed; GPU figures for Triton "
            "and native CUDA come from --device cuda on a GPU machine, not measured here"
        )
    return unavailable_reason(name, device.type)


def run(
    device: torch.device, dtype: torch.dtype, shapes: tuple[Sequence[int], ...], peaks: dict[str, float]
) -> list[str]:
    """Benchmark every case; returns the markdown table rows (also printed as they come)."""
    impls = [select_kernels(n, device) for n in kernel_choices()[1:] if skip_reason(n, device) is None]
    memory = PeakMemory(device)
    columns = [
        "operation",
        "shape",
        "implementation",
        "time (ms)",
        "speed-up vs torch",
        "peak extra memory (MiB)",
        "memory vs torch",
        "max rel. diff",
    ]
    if peaks:
        columns += ["of device peak", "rel. err vs float64"]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    print(rows[0], flush=True)
    for case in cases(device, dtype, *shapes):
        ref = None  # (seconds, peak, output) of the torch reference, when it ran
        exact = case.exact() if case.exact and peaks else None
        for k in impls:  # torch first
            if k.name == "torch" and case.ref_bytes > free_memory(device) - HEADROOM:
                free = free_memory(device) / GIB
                cells = [
                    f"skipped: needs ~{case.ref_bytes / GIB:.1f} GiB, {free:.1f} GiB free",
                    *["–"] * (len(columns) - 4),
                ]
            else:
                seconds, peak, out = measure(case.make(k), memory)
                if k.name == "torch":
                    ref = (seconds, peak, out)
                speed, mem, diff = "–", "–", "–"
                if ref:
                    speed, mem = f"{ref[0] / seconds:.2f}x", f"{peak / max(ref[1], 1):.3f}"
                    diff = f"{max_rel_diff(out, ref[2]):.1e}"
                cells = [f"{seconds * 1e3:.3g}", speed, f"{peak / 2**20:.1f}", mem, diff]
                if peaks:
                    kind, amount = case.work
                    unit = "GB/s" if kind == "bytes" else "TFLOP/s"
                    rate = amount / seconds / (1e9 if kind == "bytes" else 1e12)
                    cells.append(f"{rate:.3g} {unit} = {amount / seconds / peaks[kind]:.0%}")
                    cells.append(f"{max_rel_diff(out, exact):.1e}" if exact is not None else "–")
                del out
            rows.append(f"| {case.op} | {case.shape} | {k.name} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
        del ref, exact
    return rows


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """The machine (on CPU with its current load, which other processes may cause), torch and input dtype."""
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        load = Path("/proc/loadavg").read_text().split()[0]
        name = cpu.group(1) if cpu else platform.processor()
        machine = f"{name}, {torch.get_num_threads()} threads, 1-min load average {load} at start"
    return f"{machine}; torch {torch.__version__}; inputs {str(dtype).removeprefix('torch.')}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--t", type=int, nargs="+", default=T_VALUES, help="answer lengths (band: batch sizes)")
    parser.add_argument("--v", type=int, nargs="+", default=V_VALUES, help="vocabulary sizes")
    parser.add_argument("--d", type=int, nargs="+", default=D_VALUES, help="hidden sizes")
    parser.add_argument("--out", type=Path, help="markdown file (default: benchmarks/results/kernels_<device>.md)")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    machine = describe(device, dtype)  # before the run, whose own load would count
    peaks = device_peaks(device)
    rows = run(device, dtype, (args.t, args.v, args.d), peaks)
    notes = [f"Not measured: {n} ({why})." for n in kernel_choices()[1:] if (why := skip_reason(n, device))]
    text = "\n".join(
        [
            f"# Scoring kernels on {device.type}",
            "",
            f"Machine: {machine}.",
            "Ratios are against the torch reference (eager, materializing) measured in the same run. Time is the "
            "best of the timed runs after a warm-up; memory is the peak above the inputs.",
            *(
                [
                    f"Device peaks measured in this run: copy {peaks['bytes'] / 1e9:.0f} GB/s (read + write), "
                    f"TF32 product {peaks['flops'] / 1e12:.0f} TFLOP/s (8192³). head_grad_l1's work counts "
                    "2 × 2·T·V·d flops (ParaGrad and ExGrad); token_stats' the logits read twice and the float32 "
                    "gradient written once; band_l1's its input read once."
                ]
                if peaks
                else []
            ),
            *notes,
            "",
            *rows,
            "",
        ]
    )
    out = args.out or RESULTS / f"kernels_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()

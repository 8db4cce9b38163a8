"""Model profiles: where t* is, which layers form the band, the flag threshold and the confidence model.

A profile is a small JSON document. t* is defined by a token of the chat
template (its last occurrence in the prompt, plus an offset), never by a fixed
position, so a template change cannot silently move it. Built-in profiles live
in ``semgrad_serve/profiles/``; a user's file overrides them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from ..errors import ItemError, SemgradError
from .confidence import ConfidenceModel
from .items import DEFAULT_SCORE, FLAG_SCORES, ScoreResult

PROFILE_FILE_IN_MODEL_DIR = "semgrad_profile.json"


def deeper_half(n_layers: int) -> range:
    """The SPEC's default band: hidden-state indices L − ⌊L/2⌋ .. L − 1."""
    return range(n_layers - n_layers // 2, n_layers)


@dataclass(frozen=True)
class TStarRule:
    """t* = index of the last occurrence of ``token`` in the prompt, plus ``offset``."""

    token: str
    offset: int = 0

    def locate(self, prompt_ids: Sequence[int], token_id: int) -> int:
        """The t* position in ``prompt_ids`` (``token_id`` is ``token`` in the model's vocabulary)."""
        for pos in range(len(prompt_ids) - 1, -1, -1):
            if prompt_ids[pos] == token_id:
                t_star = pos + self.offset
                if not 0 <= t_star < len(prompt_ids):
                    raise ItemError(f"t* ({self.token!r} {self.offset:+d}) falls outside the prompt")
                return t_star
        raise ItemError(f"the prompt does not contain the t* token {self.token!r}")


@dataclass(frozen=True)
class ModelProfile:
    name: str
    t_star: TStarRule
    band: tuple[int, int] | None = None  # first and last hidden-state index; None = the deeper half
    score: str = DEFAULT_SCORE  # the score compared with the threshold
    threshold: float | None = None
    match: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    paragrad_tied: bool = False  # also score the authors' tied-head ParaGrad offline (tied models; never in serving)
    dtype: str = "float32"  # the scoring dtype the threshold was fitted in (scores shift with it)
    confidence: ConfidenceModel | None = (
        None  # calibrated P(correct); where present it sets the flag, not ``threshold``
    )

    def band_range(self, n_layers: int) -> range:
        """Hidden-state indices of the band: the SPEC's deeper half unless the profile fixes it."""
        if self.band is None:
            if n_layers < 2:
                raise SemgradError("SemGrad needs a model with at least 2 layers (the band is the deeper half)")
            return deeper_half(n_layers)
        first, last = self.band
        if not 0 <= first <= last < n_layers:
            raise SemgradError(f"profile {self.name!r}: band {self.band} is outside 0..{n_layers - 1}")
        return range(first, last + 1)

    def assess(self, scores: dict[str, float], length: int, result: ScoreResult | None = None) -> dict[str, Any]:
        """The configured ``score`` and ``threshold``, the ``confidence`` (P(correct); None without a confidence model),
        its ``min_confidence`` and ``flagged``: ``confidence < min_confidence`` with a confidence model, else
        ``score > threshold`` (None without a threshold). ``length``: answer tokens, the stop token not counted;
        ``result``: the whole scored answer, which a probe reads (None for a claim: a probe's claim calibrator)."""
        value = scores[self.score]
        if self.confidence is None:
            flagged = None if self.threshold is None else bool(value > self.threshold)
            return {
                "score": value,
                "threshold": self.threshold,
                "confidence": None,
                "min_confidence": None,
                "flagged": flagged,
            }
        p = self.confidence.confidence_of(scores, length, result)
        return {
            "score": value,
            "threshold": self.threshold,
            "confidence": p,
            "min_confidence": self.confidence.operating_point.min_confidence,
            "flagged": self.confidence.flagged(p),
        }

    def dtype_mismatch(self, dtype: str) -> str | None:
        """A warning when scores in ``dtype`` would meet a threshold or confidence model fitted in another dtype, else
        None."""
        if (self.threshold is None and self.confidence is None) or dtype == self.dtype:
            return None
        return (
            f"profile {self.name!r}: its threshold and confidence were fitted on {self.dtype} scores and these are "
            f"{dtype}; flags may shift: refit it with `semgrad-serve eval --dtype {dtype}` or score in {self.dtype}"
        )

    def to_json(self) -> str:
        doc = asdict(self)
        doc["t_star"] = asdict(self.t_star)
        doc["confidence"] = None if self.confidence is None else self.confidence.to_dict()
        return json.dumps(doc, indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, doc: dict[str, Any], source: str = "profile") -> "ModelProfile":
        try:
            rule = doc["t_star"]
            band = doc.get("band")
            profile = cls(
                name=str(doc.get("name", source)),
                t_star=TStarRule(token=str(rule["token"]), offset=int(rule.get("offset", 0))),
                band=None if band is None else (int(band[0]), int(band[1])),
                score=str(doc.get("score", DEFAULT_SCORE)),
                threshold=None if doc.get("threshold") is None else float(doc["threshold"]),
                match=dict(doc.get("match") or {}),
                calibration=doc.get("calibration"),
                paragrad_tied=bool(doc.get("paragrad_tied", False)),
                dtype=str(doc.get("dtype", "float32")),
                confidence=None
                if doc.get("confidence") is None
                else ConfidenceModel.from_dict(doc["confidence"], source),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SemgradError(f"{source}: not a valid profile ({exc.__class__.__name__}: {exc})") from None
        if profile.score not in FLAG_SCORES:
            raise SemgradError(f"{source}: score must be one of {', '.join(FLAG_SCORES)}, not {profile.score!r}")
        if profile.confidence is not None and profile.confidence.score != profile.score:
            raise SemgradError(
                f"{source}: its confidence model was fitted on {profile.confidence.score!r}, "
                f"not the profile's score {profile.score!r}; refit it with `semgrad-serve eval`"
            )
        return profile

    @classmethod
    def load(cls, path: str | Path) -> "ModelProfile":
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as exc:
            raise SemgradError(f"cannot read profile {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise SemgradError(f"profile {path} is not JSON: {exc}") from None
        return cls.from_dict(doc, source=str(path))


def builtin_profiles() -> list[ModelProfile]:
    """The packaged profiles, most specific (model signature) first."""
    folder = resources.files(__package__) / "profiles"
    found = [
        ModelProfile.from_dict(json.loads(f.read_text()), source=f.name)
        for f in sorted(folder.iterdir(), key=lambda f: f.name)
        if f.name.endswith(".json")
    ]
    return sorted(found, key=lambda p: "chat_template_contains" in p.match)


def _matches(profile: ModelProfile, config: Any, chat_template: str) -> bool:
    for key, want in profile.match.items():
        if key == "chat_template_contains":
            if want not in chat_template:
                return False
        elif getattr(config, key, None) != want:
            return False
    return bool(profile.match)


def resolve_profile(
    config: Any, chat_template: str | None, model_dir: str | Path | None, path: str | Path | None
) -> ModelProfile:
    """The profile to use: an explicit file, else the model directory's own, else a built-in match."""
    if path is not None:
        return ModelProfile.load(path)
    if model_dir is not None and (Path(model_dir) / PROFILE_FILE_IN_MODEL_DIR).is_file():
        return ModelProfile.load(Path(model_dir) / PROFILE_FILE_IN_MODEL_DIR)
    for profile in builtin_profiles():
        if _matches(profile, config, chat_template or ""):
            return profile
    raise SemgradError(
        "no built-in profile fits this model's chat template; run `semgrad-serve calibrate` "
        "and pass the profile with --profile"
    )

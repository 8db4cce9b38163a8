"""The user-facing scorer: token ids or text in, scores out, one backward per batch.

Wraps a ``DecoderWeights`` view (of a Hugging Face model or of vLLM's modules),
the tokenizer and the model profile; validates each item (a bad item becomes an
``ItemError`` in its place, the rest of the batch is still scored); groups items
of similar length into batches.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm import tqdm

from ..errors import ItemError, SemgradError
from ..kernels import Kernels, select_kernels
from ..model.loading import Messages, chat_prompt_ids, load_hf_model
from ..model.stop_token import eos_ids as collect_eos_ids, hf_eos_ids
from ..model.weights import DecoderWeights, from_hf_model
from . import semgrad_object, tied_head
from .batch import score_batch
from .claim_budget import DEFAULT_SEED_BUDGET
from .claims import Claim, answer_claims
from .given import NOTHING_GIVEN, Given, GivenKind, batch_kind
from .items import (
    DEFAULT_BATCH_TOKENS,
    NOTHING_TO_SCORE,
    T_STAR_RULES,
    ClaimScores,
    ClaimsResult,
    PreparedItem,
    ScoreResult,
)
from .profiles import ModelProfile, resolve_profile
from .shared_prefix import PrefixCache


class Scorer:
    """Scores answers with SemGrad, ParaGrad, HybridGrad and ExGrad (and, opted in, the tied-head ParaGrad).

    An answer is scored as given: it counts its stop token when it ends on one of the model's EOS ids
    (the SPEC's convention: generation that ended on EOS includes it, one cut at the token limit has none)."""

    t_star_features: bool = False  # results carry ``TStarFeatures`` where True (set from the profile's probe)
    seed_budget: int = DEFAULT_SEED_BUDGET  # bytes one backward's claim seeds may take (``claim_budget.py``)

    def __init__(
        self,
        weights: DecoderWeights,
        tokenizer: Any,
        profile: ModelProfile,
        kernels: Kernels | None = None,
        exgrad: bool = True,
        eos_ids: Iterable[int] | None = None,
        paragrad_tied: bool = False,
        seed_budget: int = DEFAULT_SEED_BUDGET,
    ) -> None:
        """``exgrad=False`` leaves ExGrad (a baseline, one more pass over the head gradient) out of the results;
        ``eos_ids``: the model's EOS ids (default: the tokenizer's); ``paragrad_tied`` adds ``paragrad_tied`` (a
        backward through every layer and position) and is refused for untied models; ``seed_budget``: bytes one
        backward's claim seeds may take (``claim_budget.py``)."""
        self.weights = weights
        self.tokenizer = tokenizer
        self.profile = profile
        self.kernels = kernels or select_kernels(device=weights.device)
        self.band = profile.band_range(weights.n_layers)
        mismatch = profile.dtype_mismatch(str(weights.dtype).removeprefix("torch."))
        if mismatch:
            warnings.warn(mismatch, RuntimeWarning, stacklevel=2)
        token_id = tokenizer.convert_tokens_to_ids(profile.t_star.token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise SemgradError(f"profile {profile.name!r}: t* token {profile.t_star.token!r} is not in the vocabulary")
        self.t_star_id: int = token_id
        self.eos_ids: list[int] = list(eos_ids) if eos_ids is not None else collect_eos_ids(tokenizer.eos_token_id)
        if paragrad_tied:
            tied_head.check_tied(weights)
        self.paragrad_tied = paragrad_tied
        self.model: Any = None  # the Hugging Face module the weights came from, when there is one
        self.prefix_cache = PrefixCache()
        self.exgrad = exgrad
        self.seed_budget = seed_budget
        # results carry ``TStarFeatures`` where True: the profile's confidence probe reads them
        self.t_star_features = profile.confidence is not None and profile.confidence.needs_t_star

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path | None = None,
        dtype: str = "float32",
        profile: ModelProfile | str | Path | None = None,
        kernels: str | None = None,
        device: str = "cpu",
        paragrad_tied: bool | None = None,
    ) -> "Scorer":
        """A scorer over a local model directory or a packaged model's name (default: the embedded
        SmolLM2-135M-Instruct) with ``profile`` (a profile or its file; default: the model's own or a built-in one);
        ``paragrad_tied`` defaults to the profile's setting. A profile file and the model directory are checked before
        the model loads."""
        explicit = profile if profile is None or isinstance(profile, ModelProfile) else ModelProfile.load(profile)
        model, tokenizer, path = load_hf_model(model_dir, dtype, device)
        weights = from_hf_model(model)
        chosen = explicit or resolve_profile(model.config, tokenizer.chat_template, path, None)
        tied = chosen.paragrad_tied if paragrad_tied is None else paragrad_tied
        scorer = cls(
            weights,
            tokenizer,
            chosen,
            select_kernels(kernels, weights.device),
            eos_ids=hf_eos_ids(tokenizer, model),
            paragrad_tied=tied,
        )
        scorer.model = model
        return scorer

    def report(self, result: ScoreResult | ClaimsResult) -> dict[str, Any]:
        """A result as JSON-ready dict (``semgrad_object.full``), with the profile's configured score, threshold,
        confidence and flag (``ModelProfile.assess``), and its claims' reports where it has claims; a claims-only
        result, ``{"claims": [...]}``."""
        if isinstance(result, ClaimsResult):
            stop = result.stop_token
            return {
                "claims": [self.claim_report(c, stop and c.token_end == result.answer_tokens) for c in result.claims]
            }
        assessed = self.profile.assess(result.scores(), result.answer_tokens - result.stop_token, result)
        claims = None
        if result.claims is not None:
            claims = [
                self.claim_report(c, c.token_end == result.answer_tokens and result.stop_token) for c in result.claims
            ]
        return semgrad_object.full(result, assessed, claims)

    def claim_report(self, claim: ClaimScores, stop_token: bool) -> dict[str, Any]:
        """One claim's entry of ``"claims"``: its text, tokens, raw scores, and the profile's confidence and flag from
        them, as for a whole answer (``stop_token``: the claim ends on the answer's scored stop token, not counted in
        its length)."""
        assessed = self.profile.assess(claim.scores(), claim.token_end - claim.token_start - stop_token)
        return semgrad_object.claim_report(claim, assessed)

    # -- text to token ids -------------------------------------------------------------------------

    def prompt_ids(self, messages: Messages) -> list[int]:
        """``chat_prompt_ids`` of user-given messages; malformed ones are an ``ItemError``."""
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ItemError("messages must be a non-empty list of {role, content} objects")
        try:
            return chat_prompt_ids(self.tokenizer, messages)
        except Exception as exc:  # the template's own error, e.g. roles out of order
            raise ItemError(f"the chat template rejected the messages: {exc}") from None

    def answer_ids(self, answer: str, stop_token: bool = True) -> list[int]:
        """A given answer text as a complete answer: its tokens, then (``stop_token``) the end-of-turn token."""
        ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        if not stop_token:
            return ids
        if not self.eos_ids:
            raise SemgradError("the model has no end-of-turn token; score the answer without it (stop_token=False)")
        return ids + [self.eos_ids[0]]

    def without_stop_token(self, answer_ids: Sequence[int]) -> list[int]:
        """``answer_ids`` less the stop token it ends on, if any (the old convention)."""
        answer = list(answer_ids)
        return answer[:-1] if answer and answer[-1] in self.eos_ids else answer

    # -- scoring -----------------------------------------------------------------------------------

    def claims(self, answer_ids: Sequence[int]) -> tuple[Claim, ...]:
        """The claims of an answer (the sentence rule of ``claims.py`` on its text); its stop token joins the last."""
        return tuple(answer_claims(self.tokenizer, answer_ids, self.eos_ids))

    def locate_t_star(self, prompt_ids: Sequence[int]) -> tuple[int, str]:
        """t* and the rule that found it (``T_STAR_RULES``): the profile's template token, or, in a prompt without
        it (a raw completions prompt), the last prompt token, the paper's ablation."""
        if self.t_star_id in prompt_ids:
            return self.profile.t_star.locate(prompt_ids, self.t_star_id), T_STAR_RULES[0]
        return len(prompt_ids) - 1, T_STAR_RULES[1]

    def t_star_or_none(self, prompt_ids: Sequence[int]) -> int | None:
        """The prompt's t* (``locate_t_star``), or None where there is none (an empty prompt, a rule outside it)."""
        try:
            return self.locate_t_star(prompt_ids)[0] if prompt_ids else None
        except ItemError:
            return None

    def prepare(
        self,
        prompt_ids: Sequence[int],
        answer_ids: Sequence[int],
        claims: bool | range = False,
        whole_answer: bool = True,
    ) -> PreparedItem:
        """Validate one item and locate t*; the answer is scored as given, its stop token included (the stop token
        alone is an answer of one token, as in the SPEC; the server does not score answers that show nothing);
        ``claims``: the item carries the answer's claims (a range: those of them); ``whole_answer=False``: only they
        are scored (an answer so far: ``ClaimsResult``)."""
        answer = list(answer_ids)
        if not answer:
            raise ItemError(NOTHING_TO_SCORE)
        if not prompt_ids:
            raise ItemError("the prompt is empty")
        total = len(prompt_ids) + len(answer)
        if total > self.weights.max_positions:
            raise ItemError(
                f"prompt + answer is {total} tokens, over the model's context of {self.weights.max_positions}"
            )
        vocab = self.weights.vocab_size
        if min(min(prompt_ids), min(answer)) < 0 or max(max(prompt_ids), max(answer)) >= vocab:
            raise ItemError(f"token id outside the vocabulary (size {vocab})")
        t_star, rule = self.locate_t_star(prompt_ids)
        token = self.tokenizer.convert_ids_to_tokens(int(prompt_ids[t_star]))
        return PreparedItem(
            tuple(int(i) for i in prompt_ids),
            tuple(int(i) for i in answer),
            t_star,
            token,
            rule,
            self._claims(answer, claims),
            whole_answer,
        )

    def _claims(self, answer: list[int], wanted: bool | range) -> tuple[Claim, ...]:
        """The claims an item carries: none, all of its answer's, or (a range) those of them."""
        if isinstance(wanted, range):
            return self.claims(answer)[wanted.start : wanted.stop]
        return self.claims(answer) if wanted else ()

    def score_prepared(
        self, items: Sequence[PreparedItem], given: Sequence[Given] | None = None
    ) -> list[ScoreResult | ClaimsResult | ItemError]:
        """One batch; if it fails, each item is retried alone so that one bad item cannot sink the others.
        ``given``: see ``score_batch``."""
        try:
            recompute = batch_kind(given) is GivenKind.NOTHING
            shared = self.prefix_cache.for_batch(self.weights, items) if recompute else None
            results = score_batch(
                self.weights,
                items,
                self.band,
                self.kernels,
                shared,
                self.exgrad,
                given,
                seed_budget=self.seed_budget,
                t_star_features=self.t_star_features,
            )
            return [self._complete(item, r) for item, r in zip(items, results)]
        except (ValueError, RuntimeError) as exc:
            if len(items) == 1:
                return [ItemError(f"scoring failed: {exc}")]
            alone = [None] * len(items) if given is None else [[g] for g in given]
            return [r for item, g in zip(items, alone) for r in self.score_prepared([item], g)]

    def _complete(self, item: PreparedItem, result: ScoreResult | ClaimsResult) -> ScoreResult | ClaimsResult:
        """Add whether the stop token was counted and, opted in, the tied-head ParaGrad."""
        if isinstance(result, ClaimsResult):
            return replace(result, stop_token=item.answer_ids[-1] in self.eos_ids)
        tied = (
            tied_head.paragrad_tied(self.weights, item, result.paragrad, self.kernels) if self.paragrad_tied else None
        )
        return replace(result, stop_token=item.answer_ids[-1] in self.eos_ids, paragrad_tied=tied)

    def score(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        batch_size: int = 8,
        progress: bool = False,
        max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
        given: Sequence[Given] | None = None,
        claims: bool | Sequence[bool | range] = False,
        whole_answer: bool | Sequence[bool] = True,
    ) -> list[ScoreResult | ClaimsResult | ItemError]:
        """Score (prompt ids, answer ids) pairs; results keep input order. ``claims`` (for every pair, or per pair):
        the result also scores each claim of the answer (``Scorer.claims``; per pair, a range scores those of its
        claims only), in the same pass (its seeds in groups within ``seed_budget``). ``whole_answer`` False (for
        every pair, or per pair): only the claims are scored, a ``ClaimsResult`` (answers still being generated).

        Items of similar length share a batch of at most ``batch_size`` items and, padding included,
        ``max_batch_tokens`` tokens (a longer item goes alone): larger batches of long prompts only
        cost memory (their activations outgrow the caches, so they are no faster per item).
        ``given``: per pair, what vLLM computed for it (``Given``; default: nothing, recompute): with its prompt's
        keys/values before t* it runs only from t* on, so only its tokens from t* on count; with the band's inputs
        too, only the band runs; with its logits, the head's product is not formed again. Answers are batched with
        others of the same ``Given.kind``; a given state of the wrong shape is an ``ItemError``."""
        if batch_size < 1 or max_batch_tokens < 1:
            raise SemgradError("batch size and batch tokens must be at least 1")
        given = list(given) if given is not None else [NOTHING_GIVEN] * len(pairs)
        wanted = [claims] * len(pairs) if isinstance(claims, bool) else list(claims)
        whole = [whole_answer] * len(pairs) if isinstance(whole_answer, bool) else list(whole_answer)
        if not len(given) == len(wanted) == len(whole) == len(pairs):
            raise SemgradError("given, claims and whole_answer need one entry per pair")
        results: list[ScoreResult | ClaimsResult | ItemError | None] = [None] * len(pairs)
        groups: dict[GivenKind, list[tuple[int, int, PreparedItem]]] = {kind: [] for kind in GivenKind}
        for i, (prompt, answer) in enumerate(pairs):
            try:
                item = self.prepare(prompt, answer, wanted[i], whole[i])
                self._check_given(item, given[i])
            except ItemError as exc:
                results[i] = exc
                continue
            if not (item.whole_answer or item.claims):  # nothing to score
                results[i] = self._complete(item, ClaimsResult([], len(item.answer_ids)))
                continue
            kind = given[i].kind
            groups[kind].append((item.length if kind is GivenKind.NOTHING else item.length - item.t_star, i, item))
        with tqdm(total=sum(map(len, groups.values())), desc="scoring", unit="answer", disable=not progress) as bar:
            for prepared in groups.values():
                prepared.sort(key=lambda p: p[0])
                while prepared:
                    # sorted by length, so the last item of a batch sets its padded length
                    size = 1
                    while size < min(batch_size, len(prepared)) and (size + 1) * prepared[size][0] <= max_batch_tokens:
                        size += 1
                    chunk, prepared = prepared[:size], prepared[size:]
                    chunk_given = [given[i] for _, i, _ in chunk]
                    scored = self.score_prepared([p for _, _, p in chunk], chunk_given)
                    for (_, i, _), result in zip(chunk, scored):
                        results[i] = result
                    bar.update(len(chunk))
        return results  # type: ignore[return-value]

    def _check_given(self, item: PreparedItem, given: Given) -> None:
        """Given states of the wrong shape for ``item`` are an ``ItemError``."""
        kv, x, z = given.prefix_kv, given.band_inputs, given.logits
        answer, vocab = len(item.answer_ids), self.weights.vocab_size
        if z is not None and self.weights.tp is not None:
            raise ItemError(
                "given logits are not taken under tensor parallelism (each rank forms its own vocabulary rows)"
            )
        if z is not None and (z.dim() != 2 or z.shape[0] < answer or z.shape[1] != vocab):
            raise ItemError(f"logits of shape {tuple(z.shape)}, expected at least ({answer}, {vocab})")
        if kv is None:
            return
        first = 0 if x is None else self.band.start
        expected = self.prefix_kv_shape(item.t_star, first)
        if tuple(kv.shape) != expected:
            raise ItemError(f"prefix keys/values of shape {tuple(kv.shape)}, expected {expected}")
        rows = item.length - item.t_star
        if x is not None and (x.dim() != 2 or x.shape[0] < rows or x.shape[1] != self.weights.hidden_size):
            raise ItemError(
                f"band inputs of shape {tuple(x.shape)}, expected at least ({rows}, {self.weights.hidden_size})"
            )

    def prefix_kv_shape(self, t_star: int, first_layer: int = 0) -> tuple[int, ...]:
        """The shape ``score`` expects of an item's prefix keys/values (layers from ``first_layer`` on)."""
        w = self.weights
        return (w.n_layers - first_layer, 2, w.n_kv_heads, t_star, w.head_dim)

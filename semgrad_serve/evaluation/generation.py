"""Answers for the evaluation: greedy answers and K samples, through vLLM or Hugging Face.

Both generators take prompts as token ids (the scorer's ``prompt_ids``, so the
prompt vLLM answers is exactly the prompt that is scored) and return the answer
token ids as generated (an answer that ended on the model's EOS token includes
it, as the SPEC counts it; one cut at the token limit has none), the decoded
text and the log-probability of every generated token.

vLLM is the default (``--generator vllm``): its offline ``LLM`` class, started
once per run. The Hugging Face fallback (``--generator hf``) uses the scorer's
own model and ``generate``; it is slower on long runs but needs no engine start,
which suits tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from ..errors import SemgradError
from ..model.logprobs import log_softmax
from ..model.stop_token import hf_eos_ids
from .config import GENERATORS
from .prompts import MAX_NEW_TOKENS

# Longest prompt + answer the evaluation's engine accepts on CPU (the questions are a few hundred tokens at most).
EVAL_MAX_MODEL_LEN = 4096


@dataclass
class Generation:
    """One generated answer: token ids (with the EOS token that ended it), text, per-token log-probabilities."""

    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)

    @property
    def mean_logprob(self) -> float:
        """Length-normalised log-probability (0 for an empty answer)."""
        return math.fsum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"token_ids": self.token_ids, "text": self.text, "logprobs": self.logprobs}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "Generation":
        return cls([int(i) for i in doc["token_ids"]], str(doc["text"]), [float(x) for x in doc.get("logprobs", [])])


class Generator:
    """Greedy answers and samples for lists of prompt token ids."""

    name = "base"

    def greedy(self, prompts: Sequence[Sequence[int]], max_tokens: int = MAX_NEW_TOKENS) -> list[Generation]:
        raise NotImplementedError

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        k: int,
        temperature: float = 1.0,
        max_tokens: int = MAX_NEW_TOKENS,
        seed: int = 0,
    ) -> list[list[Generation]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine (vLLM's worker processes and memory)."""


class VLLMGenerator(Generator):
    """vLLM's offline ``LLM`` on the model directory (float32 where scores are compared)."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, tokenizer: Any, dtype: str = "float32", seed: int = 0) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise SemgradError(
                f"--generator vllm needs vLLM ({exc}); install semgrad-serve[cpu] or use --generator hf"
            ) from None
        kwargs: dict[str, Any] = dict(model=str(model_dir), dtype=dtype, seed=seed, enforce_eager=True)
        if not torch.cuda.is_available():
            # a fixed 1 GiB of keys/values for these short prompts: a share of RAM (vLLM's default sizing)
            # leaves nothing for them beside a 1.5B model's float32 weights
            kwargs.update(kv_cache_memory_bytes=1 << 30, max_model_len=EVAL_MAX_MODEL_LEN)
        self.llm = LLM(**kwargs)
        self.tokenizer = tokenizer

    def _run(self, prompts: Sequence[Sequence[int]], params: Any) -> list[list[Generation]]:
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=[int(i) for i in p]) for p in prompts]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=True)
        result = []
        for out in outputs:
            gens = []
            for c in out.outputs:
                # vLLM's token ids end on the EOS token when generation stopped on it (checked: vLLM 0.32)
                ids = list(c.token_ids)
                lps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs or [])]
                gens.append(Generation(ids, self.tokenizer.decode(ids, skip_special_tokens=True).strip(), lps))
            result.append(gens)
        return result

    def greedy(self, prompts: Sequence[Sequence[int]], max_tokens: int = MAX_NEW_TOKENS) -> list[Generation]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0)
        return [g[0] for g in self._run(prompts, params)]

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        k: int,
        temperature: float = 1.0,
        max_tokens: int = MAX_NEW_TOKENS,
        seed: int = 0,
    ) -> list[list[Generation]]:
        from vllm import SamplingParams

        # no per-request seed: the CPU build rejects it ("CPU Generator does not use offset"); the engine seed applies
        params = SamplingParams(n=k, temperature=temperature, max_tokens=max_tokens, logprobs=0)
        return self._run(prompts, params)

    def close(self) -> None:
        import gc

        llm, self.llm = self.llm, None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        del llm
        gc.collect()


class HFGenerator(Generator):
    """Hugging Face ``generate`` on the scorer's model, left-padded batches."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_ids = set(hf_eos_ids(tokenizer, model))  # where generate stops
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _generate(
        self, prompts: Sequence[Sequence[int]], n: int, do_sample: bool, temperature: float, max_tokens: int, desc: str
    ) -> list[list[Generation]]:
        dev = self.model.device
        result: list[list[Generation]] = []
        for start in tqdm(range(0, len(prompts), self.batch_size), desc=desc, unit="batch"):
            chunk = [list(p) for p in prompts[start : start + self.batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk], device=dev)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=dev)
            kwargs: dict[str, Any] = dict(
                max_new_tokens=max_tokens,
                do_sample=do_sample,
                num_return_sequences=n,
                pad_token_id=self.pad_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
            if do_sample:
                kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
            else:
                kwargs.update(temperature=None, top_k=None, top_p=None)
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=mask, **kwargs)
            new = out.sequences[:, width:]
            scores = torch.stack(out.scores, dim=1)  # [B*n, steps, V], already temperature-scaled
            logp = log_softmax(scores).gather(-1, new[..., None]).squeeze(-1)
            for b in range(len(chunk)):
                gens = []
                for j in range(n):
                    row = b * n + j
                    tokens = new[row].tolist()
                    if self.stop_ids & set(tokens):  # cut after the first stop token
                        cut = min(tokens.index(s) for s in self.stop_ids if s in tokens)
                        tokens = tokens[: cut + 1]
                    lps = logp[row, : len(tokens)].tolist()
                    gens.append(
                        Generation(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), lps)
                    )
                result.append(gens)
        return result

    def greedy(self, prompts: Sequence[Sequence[int]], max_tokens: int = MAX_NEW_TOKENS) -> list[Generation]:
        return [g[0] for g in self._generate(prompts, 1, False, 1.0, max_tokens, "greedy answers")]

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        k: int,
        temperature: float = 1.0,
        max_tokens: int = MAX_NEW_TOKENS,
        seed: int = 0,
    ) -> list[list[Generation]]:
        torch.manual_seed(seed)
        return self._generate(prompts, k, True, temperature, max_tokens, f"{k} samples each")


def make_generator(
    kind: str, model_dir: str | Path, model: Any, tokenizer: Any, dtype: str = "float32", seed: int = 0
) -> Generator:
    if kind == "vllm":
        return VLLMGenerator(model_dir, tokenizer, dtype=dtype, seed=seed)
    if kind == "hf":
        return HFGenerator(model, tokenizer)
    raise SemgradError(f"unknown generator {kind!r}; choose one of {', '.join(GENERATORS)}")

"""The established uncertainty baselines the SemGrad scores are compared with (higher = more uncertain).

Single pass, on the greedy answer:
- mean token NLL (log-perplexity) and max token NLL, from one no-grad forward over prompt + answer;
- mean token entropy (same forward);
- ExGrad: from the scorer's ``ScoreResult`` (its pass also gives SemGrad, ParaGrad, HybridGrad);
- P(True) (Kadavath et al. 2022): the model is asked whether its answer is true; score = 1 − P(True) with
  P(True) = p("True") / (p("True") + p("False")) for the first token of the reply.
Sampling, on K answers sampled at temperature T:
- lexical similarity (Fomicheva et al. 2020): score = 1 − mean pairwise ROUGE-L F1 of the samples;
- semantic entropy (Kuhn et al. 2023): samples clustered by meaning — a sample joins the first cluster whose
  first member has cosine similarity ≥ τ with it (all-MiniLM-L6-v2 embeddings, in place of the paper's NLI
  model) — then the entropy of the cluster probabilities, each the sum of its samples' length-normalised
  sequence probabilities exp(mean token log-prob), renormalised over the clusters found.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..model.forward import right_padded, valid_mask
from ..model.logprobs import log_softmax, token_logprobs
from .config import DEFAULT_CLUSTER_THRESHOLD
from .judges import Embedder
from .text import rouge_l

P_TRUE_PROMPT = (
    "Question: {question}\nProposed answer: {answer}\n"
    "Is the proposed answer true or false? Reply with one word: True or False."
)


def _right_padded(seqs: Sequence[Sequence[int]], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and Hugging Face's attention mask (1 on tokens, 0 on padding) of right-padded ``seqs``."""
    ids = right_padded(seqs, device)
    return ids, valid_mask([len(s) for s in seqs], ids.shape[1], device).long()


def answer_token_stats(
    model: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8, progress: bool = True
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(log-probabilities, entropies) of each answer's tokens, from one no-grad forward per batch
    (float32 or wider softmax statistics); the head runs only on the positions that predict answer tokens
    (a 150k-row head over every prompt position would cost more than the rest of the forward)."""
    dev = next(model.parameters()).device
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for start in tqdm(
        range(0, len(order), batch_size), desc="forward (NLL, entropy)", unit="batch", disable=not progress
    ):
        idx = order[start : start + batch_size]
        seqs = [list(pairs[i][0]) + list(pairs[i][1]) for i in idx]
        ids, mask = _right_padded(seqs, dev)
        with torch.no_grad():
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        for b, i in enumerate(idx):
            n_prompt, n_answer = len(pairs[i][0]), len(pairs[i][1])
            with torch.no_grad():
                z = model.lm_head(hidden[b, n_prompt - 1 : n_prompt - 1 + n_answer])
            token_logp, entropy = token_logprobs(z, torch.tensor(list(pairs[i][1]), device=dev))
            out[i] = (token_logp.double().cpu().numpy(), entropy.double().cpu().numpy())
    return out  # type: ignore[return-value]


def mean_nll(logprobs: Sequence[float]) -> float:
    return -float(np.mean(logprobs))


def max_nll(logprobs: Sequence[float]) -> float:
    return -float(np.min(logprobs))


def p_true_prompts(scorer: Any, questions: Sequence[str], answers: Sequence[str]) -> list[list[int]]:
    return [
        scorer.prompt_ids([{"role": "user", "content": P_TRUE_PROMPT.format(question=q, answer=a)}])
        for q, a in zip(questions, answers)
    ]


def true_false_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """First-token ids of the replies "True"/"true"/" True" and "False"/..., without duplicates."""

    def first(words: Sequence[str]) -> list[int]:
        ids = []
        for w in words:
            tok = tokenizer(w, add_special_tokens=False).input_ids
            if tok and tok[0] not in ids:
                ids.append(tok[0])
        return ids

    t, f = first(["True", "true", " True"]), first(["False", "false", " False"])
    return [i for i in t if i not in f], [i for i in f if i not in t]


def p_true_scores(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], batch_size: int = 16, progress: bool = True
) -> list[float]:
    """1 − P(True) for each prompt built by ``p_true_prompts``: one no-grad forward, last position only."""
    true_ids, false_ids = true_false_ids(tokenizer)
    dev = next(model.parameters()).device
    out = [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in tqdm(range(0, len(order), batch_size), desc="P(True)", unit="batch", disable=not progress):
        idx = order[start : start + batch_size]
        ids, mask = _right_padded([prompts[i] for i in idx], dev)
        with torch.no_grad():
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            last = hidden[torch.arange(len(idx)), mask.sum(1) - 1]
            logp = log_softmax(model.lm_head(last))
        p_t = logp[:, true_ids].exp().sum(-1)
        p_f = logp[:, false_ids].exp().sum(-1)
        for b, i in enumerate(idx):
            out[i] = float(1.0 - p_t[b] / (p_t[b] + p_f[b]))
    return out


def lexical_similarity_score(samples: Sequence[str]) -> float:
    """1 − mean pairwise ROUGE-L F1 of the samples (NaN for fewer than two)."""
    pairs = list(combinations(samples, 2))
    if not pairs:
        return float("nan")
    return 1.0 - float(np.mean([rouge_l(a, b) for a, b in pairs]))


def cluster(similarity: np.ndarray, threshold: float = DEFAULT_CLUSTER_THRESHOLD) -> list[int]:
    """Cluster ids: each item joins the first cluster whose first member has similarity ≥ threshold with it."""
    heads: list[int] = []
    labels = []
    for i in range(similarity.shape[0]):
        for c, h in enumerate(heads):
            if similarity[i, h] >= threshold:
                labels.append(c)
                break
        else:
            heads.append(i)
            labels.append(len(heads) - 1)
    return labels


def semantic_entropy(labels: Sequence[int], mean_logprobs: Sequence[float]) -> float:
    """Entropy of the cluster distribution; a cluster's weight is Σ exp(mean token log-prob) of its samples."""
    weights = np.exp(np.asarray(mean_logprobs, dtype=np.float64))
    mass = np.zeros(max(labels) + 1)
    np.add.at(mass, np.asarray(labels), weights)
    p = mass / mass.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def sampling_scores(
    samples: Sequence[Sequence[Any]],
    embedder: Embedder,
    threshold: float = DEFAULT_CLUSTER_THRESHOLD,
    progress: bool = True,
) -> tuple[list[float], list[float], list[int], float, float]:
    """(lexical-similarity scores, semantic entropies, cluster counts, seconds for lexical, seconds for SE) of
    per-question lists of ``Generation`` samples."""
    import time

    start = time.perf_counter()
    lexical = [
        lexical_similarity_score([g.text for g in group])
        for group in tqdm(samples, desc="lexical similarity", disable=not progress)
    ]
    t_lex = time.perf_counter() - start
    start = time.perf_counter()
    embedder.encode([g.text for group in samples for g in group])
    entropies, counts = [], []
    for group in tqdm(samples, desc="semantic entropy", disable=not progress):
        texts = [g.text for g in group]
        vectors = embedder.encode(texts)
        labels = cluster(vectors @ vectors.T, threshold)
        entropies.append(semantic_entropy(labels, [g.mean_logprob for g in group]))
        counts.append(max(labels) + 1)
    t_se = time.perf_counter() - start
    return lexical, entropies, counts, t_lex, t_se

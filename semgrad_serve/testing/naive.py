"""The naive SemGrad computation, as the paper's code does it: the reference our shortcuts must match.

One item at a time: a full Hugging Face forward with autograd over every layer
and position, then ``torch.autograd.grad`` w.r.t. the band hidden states and a
separate copy of the head weight (so a tied embedding's lookup path does not count).
``naive_paragrad_tied`` instead differentiates a tied model's shared matrix, as the authors' code does.
Used by the exactness tests and as the baseline of the benchmarks.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from semgrad_serve.model.logprobs import token_logprobs
from semgrad_serve.scoring.items import hybrid


def _forward(
    model: torch.nn.Module,
    ids: torch.Tensor,
    n_prompt: int,
    answer: torch.Tensor,
    all_logits: bool = False,
    tied: bool = False,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states, head copy, answer log-probs, detached token entropies) of one full forward with autograd;
    ``all_logits`` computes the logits of every position first, as a language-model forward does; ``tied``: the
    head copy is also the embedding matrix that the input is looked up in (a tied model's shared matrix)."""
    embedding = model.model.embed_tokens
    head = model.lm_head.weight.detach().clone().requires_grad_(True)
    if tied:
        embeds = F.embedding(ids, head, embedding.padding_idx)
    else:  # a leaf embedding that requires grad puts every layer and position in the graph, frozen weights or not
        embeds = embedding(ids).detach().requires_grad_(True)
    out = model.model(inputs_embeds=embeds, output_hidden_states=True)
    answer_rows = slice(n_prompt - 1, n_prompt + len(answer) - 1)
    logits = (
        (out.last_hidden_state[0] @ head.T)[answer_rows]
        if all_logits
        else out.last_hidden_state[0, answer_rows] @ head.T
    )
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:  # as the model's *ForCausalLM caps them (Gemma-2)
        logits = torch.tanh(logits / cap) * cap
    logp, entropy = token_logprobs(logits, answer)
    return out.hidden_states, head, logp, entropy.detach()


def naive_scores(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    t_star: int,
    band: range,
    paper_style: bool = False,
    tokens: range | None = None,
) -> dict[str, float]:
    """SemGrad, ParaGrad, HybridGrad, ExGrad and mean entropy of one answer by full autograd; ``tokens``: of
    the loss restricted to those answer tokens (a claim), the whole forward unchanged.

    ``paper_style`` repeats the paper's procedure step for step (logits at every position, gradients
    w.r.t. every hidden state, ExGrad from a second forward and backward): the same numbers, at the
    paper's cost."""
    device = model.lm_head.weight.device
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)], device=device)
    answer = torch.tensor(list(answer_ids), device=device)
    n = len(prompt_ids)
    hidden_states, head, logp, entropy = _forward(model, ids, n, answer, paper_style)
    kept = slice(None) if tokens is None else slice(tokens.start, tokens.stop)
    logp, entropy = logp[kept], entropy[kept]
    loss = -(entropy * logp).mean()
    wanted = list(hidden_states) if paper_style else [hidden_states[i] for i in band]
    *state_grads, head_grad = torch.autograd.grad(loss, wanted + [head], retain_graph=not paper_style)
    band_grads = [state_grads[i] for i in band] if paper_style else state_grads
    ex_head, ex_logp = head, logp
    if paper_style:
        _, ex_head, ex_logp, _ = _forward(model, ids, n, answer, True)
        ex_logp = ex_logp[kept]
    (ex_head_grad,) = torch.autograd.grad(-ex_logp.mean(), ex_head)
    d = head.shape[1]
    semgrad = float(sum(g[0, t_star].double().abs().sum() for g in band_grads) / (len(band) * d))
    paragrad = float(head_grad.double().abs().mean())
    mean_entropy = float(entropy.double().mean())
    return {
        "semgrad": semgrad,
        "paragrad": paragrad,
        "hybridgrad": hybrid(paragrad, semgrad, mean_entropy),
        "exgrad": float(ex_head_grad.double().abs().mean()),
        "mean_entropy": mean_entropy,
    }


def naive_t_star_features(
    model: torch.nn.Module, prompt_ids: Sequence[int], answer_ids: Sequence[int], t_star: int, band: range
) -> dict[str, list[float]]:
    """Per band layer mean |∂loss/∂h| at t*, and at the band's last layer ∂loss/∂h and h at t*, by full
    autograd."""
    device = model.lm_head.weight.device
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)], device=device)
    answer = torch.tensor(list(answer_ids), device=device)
    hidden_states, _, logp, entropy = _forward(model, ids, len(prompt_ids), answer)
    loss = -(entropy * logp).mean()
    grads = torch.autograd.grad(loss, [hidden_states[i] for i in band])
    return {
        "semgrad_layers": [float(g[0, t_star].double().abs().mean()) for g in grads],
        "gradient": grads[-1][0, t_star].double().tolist(),
        "hidden": hidden_states[band.stop - 1][0, t_star].double().tolist(),
    }


def naive_paragrad_tied(model: torch.nn.Module, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> float:
    """mean |∂loss/∂E| of a tied model's shared matrix E, head and embedding lookup both differentiated (authors'
    code)."""
    device = model.lm_head.weight.device
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)], device=device)
    _, shared, logp, entropy = _forward(
        model, ids, len(prompt_ids), torch.tensor(list(answer_ids), device=device), tied=True
    )
    (grad,) = torch.autograd.grad(-(entropy * logp).mean(), shared)
    return float(grad.double().abs().mean())

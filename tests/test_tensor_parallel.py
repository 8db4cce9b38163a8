"""Tensor-parallel scoring: two gloo ranks, each scoring on its own Megatron shards, against the unsharded scorer.

Each rank holds what vLLM's tensor-parallel layers give it: its query heads and key/value heads (replicated where
there are fewer key/value heads than ranks), its rows of the gate/up projections and columns of the output and
down projections, and its vocabulary rows of the embedding and head (101 rows: 51 and 50). Every scoring path
(recompute, shared prefix, prompt keys/values given, band inputs given, claims) must give every rank the unsharded
scores, in float64, within 1e-9. The same ranks check how the scoring services keep in step (``rank_sync``).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semgrad_serve.kernels import select_kernels
from semgrad_serve.model.tensor_parallel import TensorParallel
from semgrad_serve.model.weights import DecoderWeights, from_hf_model
from semgrad_serve.scoring.batch import score_batch
from semgrad_serve.scoring.given import Given, GivenKind
from semgrad_serve.scoring.items import ClaimsResult, PreparedItem
from semgrad_serve.scoring.shared_prefix import PrefixCache
from semgrad_serve.serving.worker import rank_sync

from test_claims import claimed_items
from test_exactness import deeper_half, generation_states, prefix_keys_values
from tiny_models import random_items, tiny_model

WORLD = 2
# (family, config changes): GQA with one key/value head per rank, a replicated key/value head (one head for two
# ranks), tied and untied heads, qkv bias with sliding windows, qk-norm; Gemma's soft-caps (the final one over
# vocabulary-parallel logits) and per-layer-type rotaries; experts split along their intermediate size with a
# shared expert, as vLLM's fused experts are under tensor parallelism
CASES = [
    ("llama-tied", {}),
    ("llama-tied", {"num_key_value_heads": 1}),
    ("llama3-untied", {}),
    ("qwen2-window-untied", {}),
    ("qwen3-tied", {}),
    ("gemma2-softcap", {}),
    ("gemma3-untied", {}),
    ("qwen2-moe-shared", {}),
]


def kv_heads_of(rank: int, n_kv: int) -> range:
    """The key/value heads vLLM gives ``rank`` (one replicated head where there are fewer heads than ranks)."""
    if n_kv >= WORLD:
        per = n_kv // WORLD
        return range(rank * per, (rank + 1) * per)
    head = rank // (WORLD // n_kv)
    return range(head, head + 1)


def shard(w: DecoderWeights, rank: int, group) -> DecoderWeights:
    """Rank ``rank``'s Megatron shards of unsharded weights (separate q/k/v and gate/up matrices)."""
    hd, per_q = w.head_dim, w.n_heads // WORLD
    q_rows = slice(rank * per_q * hd, (rank + 1) * per_q * hd)
    kv = kv_heads_of(rank, w.n_kv_heads)
    kv_rows = slice(kv.start * hd, kv.stop * hd)
    layers = []
    for layer in w.layers:
        q, k, v = layer.qkv
        bias = layer.qkv_bias
        gate_up, down = split_mlp(layer.gate_up, layer.down, rank)
        moe = layer.moe
        if moe is not None:
            inter = moe.down.shape[2] // WORLD
            rows = slice(rank * inter, (rank + 1) * inter)
            half = moe.down.shape[2]
            experts_gate_up = torch.cat((moe.gate_up[:, rows], moe.gate_up[:, half + rows.start : half + rows.stop]), 1)
            shared_gate_up, shared_down = split_mlp(moe.shared_gate_up, moe.shared_down, rank)
            moe = dataclasses.replace(
                moe,
                gate_up=experts_gate_up,
                down=moe.down[:, :, rows],
                shared_gate_up=shared_gate_up,
                shared_down=shared_down,
            )
        layers.append(
            dataclasses.replace(
                layer,
                qkv=(q[q_rows], k[kv_rows], v[kv_rows]),
                qkv_bias=tuple(None if b is None else b[r] for b, r in zip(bias, (q_rows, kv_rows, kv_rows))),
                o_proj=layer.o_proj[:, q_rows],
                gate_up=gate_up,
                down=down,
                moe=moe,
            )
        )
    per_v = math.ceil(w.vocab_size / WORLD)
    v_rows = slice(rank * per_v, min(w.vocab_size, (rank + 1) * per_v))
    embed = w.embed[v_rows]
    head = embed if w.tied else w.head[v_rows]
    return dataclasses.replace(
        w,
        embed=embed,
        head=head,
        layers=tuple(layers),
        n_heads=per_q,
        n_kv_heads=len(kv),
        tp=TensorParallel(group, rank, WORLD, v_rows.start, w.vocab_size),
    )


def split_mlp(
    gate_up: tuple[torch.Tensor, ...], down: torch.Tensor | None, rank: int
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """Rank ``rank``'s rows of a gated MLP's separate gate and up matrices and columns of its down matrix."""
    if down is None:
        return gate_up, down
    inter = down.shape[1] // WORLD
    rows = slice(rank * inter, (rank + 1) * inter)
    return (gate_up[0][rows], gate_up[1][rows]), down[:, rows]


def local_kv(kv: torch.Tensor, rank: int, n_kv: int) -> torch.Tensor:
    """This rank's heads of keys/values [layers, 2, kv_heads, n, head_dim], as its own KV cache holds them."""
    heads = kv_heads_of(rank, n_kv)
    return kv[:, :, heads.start : heads.stop]


def assert_same(ours, reference, rel: float = 1e-9) -> None:
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        assert type(a) is type(b)
        for key, value in b.scores().items():
            assert a.scores()[key] == pytest.approx(value, rel=rel, abs=0), key
        if not isinstance(b, ClaimsResult):  # an answer so far has its claims' scores alone
            assert a.token_entropies == pytest.approx(b.token_entropies, rel=rel, abs=1e-12)
            assert a.token_logprobs == pytest.approx(b.token_logprobs, rel=rel, abs=1e-12)
        assert len(a.claims or ()) == len(b.claims or ())
        for ca, cb in zip(a.claims or (), b.claims or ()):
            for key in ("semgrad", "paragrad", "hybridgrad", "exgrad", "mean_entropy"):
                assert getattr(ca, key) == pytest.approx(getattr(cb, key), rel=rel, abs=0), key
        assert (a.claims is None) == (b.claims is None)


def check_case(rank: int, group, family: str, changes: dict) -> None:
    model = tiny_model(family, **changes)
    full = from_hf_model(model)
    w = shard(full, rank, group)
    band, kernels = deeper_half(full.n_layers), select_kernels("torch")

    def both(items, **given_full_and_local):
        full_given = {k: v[0] for k, v in given_full_and_local.items()}
        local_given = {k: v[1] for k, v in given_full_and_local.items()}
        reference = score_batch(full, items, band, kernels, **full_given)
        assert_same(score_batch(w, items, band, kernels, **local_given), reference)

    # recompute, with claims on some items; answers so far scored for their claims alone, with others and alone
    claimed = claimed_items(seed=31, n=5)
    both(claimed)
    so_far = [dataclasses.replace(it, whole_answer=False) if it.claims else it for it in claimed]
    both(so_far)
    both([it for it in so_far if not it.whole_answer])
    # a prompt prefix shared by every item, its keys/values computed once (on the shards)
    head = [(7 * i + 3) % 64 for i in range(9)]
    shared = [PreparedItem(tuple(head + p), tuple(a), len(head) + t) for p, a, t in random_items(3, seed=11)]
    both(
        shared,
        shared=(PrefixCache(min_tokens=4).for_batch(full, shared), PrefixCache(min_tokens=4).for_batch(w, shared)),
    )
    # the prompt's keys/values given (each rank reads its own heads from its KV cache)
    triples = random_items(4, seed=21)
    items = [PreparedItem(tuple(p), tuple(a), t) for p, a, t in triples]
    kvs = [prefix_keys_values(full, p, t) for p, _, t in triples]
    both(items, given=([Given(kv) for kv in kvs], [Given(local_kv(kv, rank, full.n_kv_heads)) for kv in kvs]))
    # and the band's inputs (the same on every rank)
    xs = [generation_states(model, p, a, t, band)[0] for p, a, t in triples]
    band_kvs = [kv[band.start :] for kv in kvs]
    full_given = [Given(kv, x) for kv, x in zip(band_kvs, xs)]
    both(items, given=(full_given, [Given(local_kv(kv, rank, full.n_kv_heads), x) for kv, x in zip(band_kvs, xs)]))


def check_rank_sync(rank: int, group) -> None:
    """Rank 0's batch reaches every rank; each answer keeps what it was given only where every rank had the same
    kind (else all recompute), and never the logits."""
    sent = rank_sync.Plan(
        [rank_sync.PlannedPiece(7, "key", [([1, 2], [3])], [range(0, 2)], so_far=True)],
        ["gone"],
        [GivenKind.BAND_INPUTS],
    )
    assert rank_sync.share_plan(group, sent if rank == 0 else None) == sent
    kv, x, z = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    mine = (
        [Given(kv, x, z), Given(kv), Given(), Given(kv)]
        if rank == 0
        else [Given(kv, x), Given(kv, x), Given(), Given(kv)]
    )
    agreed = rank_sync.agree(group, mine)
    kinds = [GivenKind.BAND_INPUTS, GivenKind.NOTHING, GivenKind.NOTHING, GivenKind.PROMPT_KV]
    assert [g.kind for g in agreed] == kinds
    assert agreed[0].band_inputs is x and all(g.logits is None for g in agreed)


def run_rank(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        group = dist.new_group(backend="gloo")
        check_rank_sync(rank, group)
        for family, changes in CASES:
            check_case(rank, group, family, changes)
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_unsharded_in_float64(tmp_path) -> None:
    mp.spawn(run_rank, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)

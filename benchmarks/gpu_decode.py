"""What scoring costs a GPU's decode: a vLLM-like decode loop with and without scoring beside it, in one process.

vLLM's decode is memory-bound: each step reads every weight and the KV cache for
one token per sequence. This runs that work without vLLM (none on the GPU
machine): a Llama-3-8B-shaped decoder with random weights, in bfloat16, batch 64,
static KV caches, each step captured once as a CUDA graph and replayed, greedy
tokens read back every step (as vLLM's sampler output is). Each of the 64 slots
answers a request of ``--prompt`` tokens (prefilled once by the package's
forward) with ``--answer`` tokens and starts the next; finishes are staggered.

Side by side, for the same number of steps:

- off: the decode loop alone;
- on: as each answer finishes, its prompt's keys/values before t* are copied out
  of the cache (as the capture connector does) and a scoring thread in the same
  process scores finished answers in batches of up to ``--max-batch`` on a CUDA
  stream of its own (``score_batch``, the pass the scoring service runs, over
  the same weights, from t* on).

It prints decode tokens/s on and off and their ratio, answers finished and
scored, and the scoring pass's achieved TFLOP/s (its matmul FLOPs counted by
torch's FlopCounterMode on one batch, over the pass's time alone and while
decoding) against the device's peak, measured here as the best bfloat16 matmul.
``--tiny`` runs a small model on the CPU (eager, float32, no streams) so that
the harness is exercised by the tests.

    python benchmarks/gpu_decode.py [--out benchmarks/results/gpu_decode_cuda.md]
    python benchmarks/gpu_decode.py --tiny [--out benchmarks/results/gpu_decode_cpu_tiny.md]
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from semgrad_serve.kernels import select_kernels
from semgrad_serve.model.forward import prefix_keys_values
from semgrad_serve.model.weights import DecoderWeights, LayerWeights, build_decoder_weights
from semgrad_serve.scoring.batch import score_batch
from semgrad_serve.scoring.given import Given
from semgrad_serve.scoring.items import PreparedItem

ROOT = Path(__file__).resolve().parents[1]


LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=8192,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    rope_theta=10000.0,
    max_position_embeddings=512,
    initializer_range=0.25,
)  # peaky attention
T_STAR_FROM_END = 4  # t* is the 4th prompt token from the end, as for SmolLM2's and Llama-3's templates


def hf_model(dims: dict, dtype: torch.dtype, device: str, seed: int = 0) -> Any:
    """A transformers Llama with random weights (initialized in ``dtype`` on ``device``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**dims, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def fused_weights(model: Any) -> DecoderWeights:
    """``DecoderWeights`` with fused qkv and gate/up matrices, as vLLM holds them (copies: the model can go)."""
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        layers.append(
            LayerWeights(
                input_norm=layer.input_layernorm.weight,
                qkv=(qkv,),
                qkv_bias=(None,),
                q_norm=None,
                k_norm=None,
                o_proj=attn.o_proj.weight,
                post_norm=layer.post_attention_layernorm.weight,
                gate_up=(gate_up,),
                down=mlp.down_proj.weight,
                window=None,
            )
        )
    base, config = model.model, model.config
    head = model.lm_head.weight
    return build_decoder_weights(config, base.embed_tokens.weight, layers, base.norm.weight, head, config.rms_norm_eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, Llama's rotate-half convention; ``x`` [B, heads, hd], ``cos``/``sin`` [B, 1, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Decoder:
    """One decode step for every slot over static caches [B, kv_heads, max_len, hd] per layer; ``tokens`` and
    ``positions`` [B] are the step's inputs and are advanced in place (greedy), so the step can be a CUDA graph."""

    def __init__(self, w: DecoderWeights, batch: int, max_len: int) -> None:
        self.w, self.batch, self.max_len = w, batch, max_len
        dev, dtype = w.device, w.dtype
        shape = (batch, w.n_kv_heads, max_len, w.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=dev) for _ in w.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=dev) for _ in w.layers]
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.rows = torch.arange(batch, device=dev)
        self.span = torch.arange(max_len, device=dev)
        self.graph: Any = None

    def prefill(self, slot: int, prompt: Sequence[int]) -> None:
        """Keys/values of the prompt's positions but its last (by the package's forward); the step feeds the last."""
        for i, (k, v) in enumerate(prefix_keys_values(self.w, prompt[:-1])):
            self.k[i][slot, :, : len(prompt) - 1] = k[0]
            self.v[i][slot, :, : len(prompt) - 1] = v[0]

    def step(self) -> None:
        w, b = self.w, self.batch
        nh, nkv, hd = w.n_heads, w.n_kv_heads, w.head_dim
        (rope,) = w.rotaries  # a Llama: one rotary over whole heads
        freqs = self.positions[:, None].float() * rope.inv_freq[None]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]
        cos, sin = (angles.cos() * rope.scale).to(w.dtype), (angles.sin() * rope.scale).to(w.dtype)
        visible = (self.span[None] <= self.positions[:, None])[:, None, None]  # [B, 1, 1, max_len]
        x = w.embed[self.tokens]
        for i, layer in enumerate(w.layers):
            q, k, v = (rms_norm(x, layer.input_norm, w.norm_eps) @ layer.qkv[0].T).split(
                [nh * hd, nkv * hd, nkv * hd], -1
            )
            q, k = rotate(q.view(b, nh, hd), cos, sin), rotate(k.view(b, nkv, hd), cos, sin)
            self.k[i][self.rows, :, self.positions] = k
            self.v[i][self.rows, :, self.positions] = v.view(b, nkv, hd)
            out = F.scaled_dot_product_attention(
                q[:, :, None], self.k[i], self.v[i], attn_mask=visible, enable_gqa=True
            )
            x = x + out.reshape(b, nh * hd) @ layer.o_proj.T
            gate, up = (rms_norm(x, layer.post_norm, w.norm_eps) @ layer.gate_up[0].T).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer.down.T
        logits = rms_norm(x, w.final_norm, w.norm_eps) @ w.head.T
        self.tokens.copy_(logits.argmax(-1))
        self.positions.add_(1)

    def capture(self) -> None:
        """Record ``step`` as a CUDA graph (after warm-up steps on a side stream, whose effects are undone)."""
        tokens, positions = self.tokens.clone(), self.positions.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()


@dataclass
class Finished:
    item: PreparedItem
    prefix_kv: torch.Tensor  # [n_layers, 2, kv_heads, t*, hd], copied out of the cache
    ready: Any = None  # a CUDA event after the copy (None on the CPU)
    complete: bool = True  # False: a first request that started mid-answer (staggered), with placeholder tokens


@dataclass
class Scoring:
    """The scoring thread: scores finished answers from ``inbox`` in batches, on its own stream."""

    w: DecoderWeights
    band: range
    kernels: Any
    max_batch: int
    inbox: "queue.Queue[Finished | None]" = field(default_factory=queue.Queue)
    scored: int = 0
    passes: int = 0
    busy_s: float = 0.0
    done: list = field(default_factory=list)  # (finished answer, its scores)

    def run(self) -> None:
        stream = torch.cuda.Stream() if self.w.device.type == "cuda" else None
        stop = False
        while not stop:
            batch = [self.inbox.get()]
            while len(batch) < self.max_batch and not self.inbox.empty():
                batch.append(self.inbox.get())
            stop = batch[-1] is None
            batch = [f for f in batch if f is not None]
            if batch:
                t0 = time.perf_counter()
                self.done += zip(batch, score(self.w, self.band, self.kernels, batch, stream))
                self.busy_s += time.perf_counter() - t0
                self.scored += len(batch)
                self.passes += 1


def score(w: DecoderWeights, band: range, kernels: Any, batch: list[Finished], stream: Any = None) -> list:
    """One scoring pass over finished answers (on ``stream`` where given; returns once its results are read)."""
    if stream is None:
        return score_batch(
            w, [f.item for f in batch], band, kernels, exgrad=False, given=[Given(f.prefix_kv) for f in batch]
        )
    with torch.cuda.stream(stream):
        for f in batch:
            stream.wait_event(f.ready)
            f.prefix_kv.record_stream(stream)
        return score_batch(
            w, [f.item for f in batch], band, kernels, exgrad=False, given=[Given(f.prefix_kv) for f in batch]
        )


def decode(
    decoder: Decoder, prompts: list[list[int]], answer: int, steps: int, scoring: Scoring | None
) -> tuple[float, int]:
    """``steps`` decode steps over every slot; each slot's request ends after ``answer`` tokens (staggered) and the
    slot restarts its prompt. Finished answers go to ``scoring`` (None: nowhere). Returns (seconds, answers)."""
    b, cuda = decoder.batch, decoder.w.device.type == "cuda"
    done = [(slot * answer) // b for slot in range(b)]  # tokens each slot's current request has (staggered)
    answers: list[list[int]] = [[0] * n for n in done]
    complete = [n == 0 for n in done]
    prompt_len = len(prompts[0])
    decoder.tokens.copy_(torch.tensor([p[-1] for p in prompts]))
    decoder.positions.copy_(torch.tensor([prompt_len - 1 + n for n in done]))
    host = torch.empty(b, dtype=torch.long, pin_memory=cuda)
    t_star = prompt_len - T_STAR_FROM_END
    finished = 0
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        decoder.run()
        host.copy_(decoder.tokens, non_blocking=True)
        if cuda:
            torch.cuda.current_stream().synchronize()
        new = host.tolist()
        restart = []
        for slot in range(b):
            answers[slot].append(new[slot])
            done[slot] += 1
            if done[slot] == answer:
                finished += 1
                restart.append(slot)
                if scoring is not None:
                    layers = zip(decoder.k, decoder.v)
                    kv = torch.stack([torch.stack([k[slot, :, :t_star], v[slot, :, :t_star]]) for k, v in layers])
                    ready = torch.cuda.Event() if cuda else None
                    if ready is not None:
                        ready.record()
                    item = PreparedItem(tuple(prompts[slot]), tuple(answers[slot]), t_star)
                    scoring.inbox.put(Finished(item, kv, ready, complete[slot]))
        if restart:  # the slot's next request: the same prompt again, answered from its start
            index = torch.tensor(restart, device=decoder.tokens.device)
            decoder.tokens[index] = torch.tensor([prompts[s][-1] for s in restart], device=index.device)
            decoder.positions[index] = prompt_len - 1
            for slot in restart:
                done[slot], answers[slot], complete[slot] = 0, [], True
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, finished


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeats: int) -> float:
    """The best FLOP/s of an n×n×n matmul in ``dtype`` over ``repeats`` timed runs."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * n**3 / best


def pass_flops(w: DecoderWeights, band: range, kernels: Any, batch: list[Finished]) -> int:
    """Matmul/attention FLOPs of one scoring pass (forward and backward), as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        score(w, band, kernels, batch)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> tuple[str, Scoring, DecoderWeights]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (the tests' smoke run)")
    parser.add_argument("--batch", type=int, help="decode slots (default: 64; tiny: 4)")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default: 256; tiny: 24)")
    parser.add_argument("--answer", type=int, help="answer tokens (default: 128; tiny: 8)")
    parser.add_argument("--steps", type=int, help="decode steps per run (default: 1024; tiny: 32)")
    parser.add_argument("--max-batch", type=int, default=16, help="most answers per scoring pass (default: 16)")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    if not tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny on the CPU")
    dtype = torch.float32 if tiny else torch.bfloat16
    batch, prompt, answer = (
        args.batch or (4 if tiny else 64),
        args.prompt or (24 if tiny else 256),
        args.answer or (8 if tiny else 128),
    )
    steps = args.steps or (32 if tiny else 1024)
    dims = TINY if tiny else LLAMA_8B

    model = hf_model(dims, dtype, device)
    w = fused_weights(model)
    del model
    band = range(w.n_layers - w.n_layers // 2, w.n_layers)
    kernels = select_kernels("auto", device)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, dims["vocab_size"], (batch, prompt), generator=g).tolist()
    decoder = Decoder(w, batch, prompt + answer)
    with torch.no_grad():
        if device == "cuda":
            decoder.capture()  # its warm-up steps write the caches: before the prompts are filled in
        for slot, ids in enumerate(prompts):
            decoder.prefill(slot, ids)
        decode(decoder, prompts, answer, min(steps, 8), None)  # warm-up
        off_s, off_finished = decode(decoder, prompts, answer, steps, None)  # and once more after the on run

    # the scoring pass alone, on finished answers of the same shape (the first pass compiles what it uses)
    scoring = Scoring(w, band, kernels, args.max_batch)
    with torch.no_grad():
        decode(decoder, prompts, answer, answer + answer // batch + 1, scoring)
    sample = []
    while not scoring.inbox.empty() and len(sample) < args.max_batch:
        sample.append(scoring.inbox.get())
    flops = pass_flops(w, band, kernels, sample)
    alone = []
    for _ in range(3):
        t0 = time.perf_counter()
        score(w, band, kernels, sample)
        alone.append(time.perf_counter() - t0)
    alone_s = min(alone)

    scoring = Scoring(w, band, kernels, args.max_batch)
    thread = threading.Thread(target=scoring.run, daemon=True)
    thread.start()
    with torch.no_grad():
        on_s, on_finished = decode(decoder, prompts, answer, steps, scoring)
    backlog, scored, busy_s, passes = scoring.inbox.qsize(), scoring.scored, scoring.busy_s, scoring.passes
    scoring.inbox.put(None)
    thread.join()  # scores the backlog (not counted above: no decode beside it)
    with torch.no_grad():
        off2_s, _ = decode(decoder, prompts, answer, steps, None)
    off_s = (off_s + off2_s) / 2
    peak = matmul_peak(device, dtype, 256 if tiny else 8192, 3 if tiny else 10)

    off_tps, on_tps = batch * steps / off_s, batch * steps / on_s
    per_answer = flops / len(sample)
    while_decoding = per_answer * scored / busy_s if busy_s else 0.0
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (tiny smoke run: not a measurement)"
    lines = [
        f"# Decode with and without scoring beside it ({'tiny, CPU' if tiny else 'Llama-3-8B shape, GPU'})",
        "",
        f"`python benchmarks/gpu_decode.py{' --tiny' if tiny else ''}`. Device: {name}; torch {torch.__version__}; "
        f"{str(dtype).removeprefix('torch.')}; {w.n_layers} layers, d={w.embed.shape[1]}, vocabulary {w.vocab_size}; "
        f"batch {batch}, prompt {prompt} + answer {answer} tokens, {steps} steps per run; "
        f"{'CUDA graph per step; scoring on its own stream' if device == 'cuda' else 'eager'}; "
        f"scoring passes of up to {args.max_batch} answers from t* on over the prompt keys/values copied out of "
        "the cache "
        f"(band {band.start}-{band.stop - 1}), kernels {kernels.name}.",
        "",
        "| | decode tokens/s | answers finished | answers scored | scoring backlog at the end |",
        "|---|---|---|---|---|",
        f"| scoring off (mean of a run before and one after) | {off_tps:.0f} | {off_finished} | - | - |",
        f"| scoring on | {on_tps:.0f} | {on_finished} | {scored} in {passes} passes | {backlog} |",
        "",
        f"Decode on/off: **{on_tps / off_tps:.2f}x**.",
        "",
        "| scoring pass | FLOPs per answer | TFLOP/s | share of the measured matmul peak |",
        "|---|---|---|---|",
        f"| alone ({len(sample)} answers, {alone_s * 1e3:.1f} ms) | {per_answer / 1e9:.2f} G | "
        f"{flops / alone_s / 1e12:.3f} | {flops / alone_s / peak:.1%} |",
        f"| while decoding ({scored} answers, {busy_s:.2f} s busy) | {per_answer / 1e9:.2f} G | "
        f"{while_decoding / 1e12:.3f} | {while_decoding / peak:.1%} |",
        "",
        f"Measured matmul peak ({str(dtype).removeprefix('torch.')}, best of n={256 if tiny else 8192} square "
        f"matmuls): {peak / 1e12:.3f} TFLOP/s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text, scoring, w


if __name__ == "__main__":
    main()

"""Decode throughput: solo's jitted KV-cache sampler vs Hugging Face `generate` (PyTorch CPU).

The same model on both sides, float32, random weights, greedy decoding of 224 new tokens after a
32-token prompt (no stop token can fire). `--model`:
  gpt6x384      (default) GPT-2-shaped: 6 layers, d_model 384, 6 heads, d_ff 1536, GELU,
                LayerNorm, learned positions, tied embeddings, vocabulary 65;
  smollm2-135m  SmolLM2-135M's Llama architecture (30 layers, width 576, 9 heads / 3 KV heads,
                SwiGLU 1536, RoPE, RMSNorm, tied embeddings, vocabulary 49,152): HF's model
                built at random and converted with solo's own HF conversion (model/hf.py).
Measurements of the systems are interleaved round by round (the machine is shared): ours, then
HF at each `--torch-threads` setting (default: torch's own thread count, then 1 thread). Per
system we report the median and the best (max) tok/s, the process CPU time per decode step (all
threads; robust to other load) and the per-round ratio ours / HF; the load average is printed
with every batch.

  python benchmarks/decode_throughput.py [--model smollm2-135m] [--rounds 3] [--batches 1,8]
      [--torch-threads 0,1]

Every run also prints this machine's float32 ceilings per batch size, to read the ratios against:
  roofline   batch * memory read bandwidth / bytes a step must read: every matmul weight once
             (42.6 MB for gpt6x384, more than a 32 MiB L3) plus the filled part of the KV cache
             (averaged over the 224 steps); no float32 sampler can beat it, whatever its kernels;
  gemm-chain batch / time of the step's weight GEMMs alone (qkv, o, mlp in, mlp out per layer,
             the real weights, nothing else) under XLA:CPU: what solo's kernels could reach if
             attention, norms, head, sampling and the loop were free.

Needs the `bench` extra (torch==2.13.0 CPU, transformers) for the HF side.

On a GPU/TPU (any jax backend) ours runs there, in `--dtype` (auto: bfloat16 off CPU), and the
HF side is skipped (PyTorch CPU is no yardstick for it); the ceilings are then the device's
(its memory bandwidth, its GEMMs):

  python benchmarks/decode_throughput.py --batches 1,8,64 --rounds 2      # e.g. on one H200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from solo.agent.sampler import Greedy, Sampler
from solo.experiments.base import get_config
from solo.model import ModelConfig, Transformer

PROMPT, NEW = 32, 224
MODELS = ("gpt6x384", "smollm2-135m")


def make_hf(name: str):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if name == "gpt6x384":
        cfg = tf.GPT2Config(vocab_size=65, n_positions=PROMPT + NEW, n_embd=384, n_layer=6,
                            n_head=6, n_inner=1536, activation_function="gelu_new",
                            bos_token_id=None, eos_token_id=None, pad_token_id=0)
        return tf.GPT2LMHeadModel(cfg).eval()
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0)
    return tf.LlamaForCausalLM(cfg).eval()


def make_ours(name: str, hf=None, dtype: str = "float32") -> Sampler:
    """gpt6x384: solo's own random init (no torch needed); smollm2-135m: HF's weights.
    `dtype`: the compute (and KV cache) dtype; params stay float32."""
    if name == "gpt6x384":
        cfg = ModelConfig.from_config(
            get_config().model, vocab_size=65, d_model=384, num_layers=6, num_heads=6,
            d_ff=1536, max_len=PROMPT + NEW, positions="learned", norm="layernorm", mlp="gelu",
            tie_embeddings=True, dtype=dtype)
        model = Transformer(cfg)
        params = model.init(jax.random.key(0), {"tokens": jnp.zeros((1, 8), jnp.int32)})
    else:
        from solo.model.hf import model_overrides, params_from_hf

        hf = hf or make_hf(name)
        state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
        cfg = ModelConfig.from_config(get_config().model, **{
            **model_overrides(hf.config.to_dict()), "dtype": dtype})
        model, params = Transformer(cfg), {"params": params_from_hf(state, cfg, "llama")}
    return Sampler(model, params, None, cache_len=PROMPT + NEW, stop_ids=())


def run_ours(sampler: Sampler, prompts: np.ndarray, chunk: int = 0) -> dict:
    """Prefill (timed to the first token on the host = TTFT) then the decode loop: one jitted
    call (chunk 0, the non-streaming path) or calls of `chunk` tokens (streaming)."""
    t0 = time.perf_counter()
    it = sampler.iterate(prompts.tolist(), max_new_tokens=NEW, method=Greedy(), chunk=chunk)
    first, _, _ = next(it)
    ttft = time.perf_counter() - t0
    n = first.shape[1]
    c0 = time.process_time()
    for new, _, _ in it:
        n += new.shape[1]
    cpu = time.process_time() - c0
    total = time.perf_counter() - t0
    assert n == NEW, n
    return dict(tok_s=prompts.shape[0] * NEW / total, ttft_ms=1e3 * ttft, total_s=total,
                cpu_ms_step=1e3 * cpu / (NEW - 1))


def read_bandwidth(mbytes: int = 256, reps: int = 5) -> float:
    """Memory read bandwidth in bytes/s: a jitted sum over a buffer far larger than the caches."""
    x = jnp.ones((mbytes << 18,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = min(_timed(lambda: total(x).block_until_ready()) for _ in range(reps))
    return x.nbytes / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ceilings(sampler: Sampler, batch: int, bandwidth: float, reps: int = 50) -> dict:
    """tok/s ceilings at this batch size (see the module docstring): roofline and gemm-chain."""
    params, cfg = sampler.variables["params"], sampler.cfg
    layers = [params["decoder"][f"layers_{i}"] for i in range(cfg.num_layers)]
    d = cfg.d_model
    cat = lambda a, names: jnp.concatenate([a[n].reshape(d, -1) for n in names if n in a], 1)
    ws = [w for p in layers for w in (cat(p["attn"], "qkv"), p["attn"]["o"].reshape(-1, d),
                                      cat(p["mlp"], ("wi", "wi_0", "wi_1")), p["mlp"]["wo"])]
    nbytes = sum(w.nbytes for w in ws) + params["embedder"]["token"].nbytes  # + the tied head
    itemsize = jnp.dtype(cfg.dtype).itemsize
    slot_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize * batch  # k, v
    cache_bytes = slot_bytes * (PROMPT + (NEW - 1) / 2)  # mean filled slots over the steps

    @jax.jit
    def chain(x, ws):
        for qkv, o, wi, wo in zip(*[iter(ws)] * 4, strict=True):
            x = x + (x @ qkv)[:, :d] @ o  # data dependence keeps the order of a real step
            x = x + (x @ wi)[:, :wo.shape[0]] @ wo
        return x

    x = jnp.ones((batch, d), jnp.float32)
    chain(x, ws).block_until_ready()
    best = min(_timed(lambda: chain(x, ws).block_until_ready()) for _ in range(reps))
    return dict(weights_mb=round(nbytes / 1e6, 1), cache_mb=round(cache_bytes / 1e6, 1),
                roofline_tok_s=batch * bandwidth / (nbytes + cache_bytes),
                gemm_chain_ms=1e3 * best, gemm_chain_tok_s=batch / best)


def run_hf(model, prompts: np.ndarray) -> dict:
    import torch

    x = torch.tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, min_new_tokens=1,
                       do_sample=False, use_cache=True)
        ttft = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, use_cache=True)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert out.shape[1] == PROMPT + NEW, out.shape
    return dict(tok_s=prompts.shape[0] * NEW / total, ttft_ms=1e3 * ttft, total_s=total,
                cpu_ms_step=1e3 * cpu / NEW)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, default=MODELS[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--skip-hf", action="store_true",
                    help="ours only (always so off CPU)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="compute dtype (auto: float32 on CPU, bfloat16 on GPU/TPU)")
    ap.add_argument("--torch-threads", default="0,1",
                    help="HF runs, one per entry, interleaved with ours; 0 = torch's default")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--streaming", default="",
                    help="also time streaming at batch 1 in chunks of these sizes, e.g. 1,8")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    hf, hf_names = None, []
    backend = jax.default_backend()
    dtype = args.dtype if args.dtype != "auto" else ("float32" if backend == "cpu" else "bfloat16")
    print(f"device: {len(jax.devices())}x {jax.devices()[0].device_kind} ({backend}), "
          f"dtype {dtype}", flush=True)
    if not args.skip_hf and backend == "cpu":
        import torch

        default_threads = torch.get_num_threads()
        threads = {f"hf{n or default_threads}t": n or default_threads
                   for n in map(int, args.torch_threads.split(","))}
        hf_names = list(threads)
        hf = make_hf(args.model)
    if hf is None and args.model != "gpt6x384":
        hf = make_hf(args.model)  # its weights
    ours = make_ours(args.model, hf, dtype)
    vocab = ours.cfg.vocab_size

    def hf_round(name, p):
        torch.set_num_threads(threads[name])
        return run_hf(hf, p)

    prompts = {b: rng.integers(10, vocab, (b, PROMPT)).astype(np.int32) for b in batches}
    bandwidth = read_bandwidth()
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    for b in batches:  # warm-up: compile every bucket / let torch allocate
        run_ours(ours, prompts[b])
        for name in hf_names:
            hf_round(name, prompts[b])
    results = {}
    for b in batches:
        ceiling = ceilings(ours, b, bandwidth)  # before torch runs: its spinning threads linger
        rows = []
        for _ in range(args.rounds):
            r = dict(ours=run_ours(ours, prompts[b]))
            for name in hf_names:
                r[name] = hf_round(name, prompts[b])
            rows.append(r)
        res = {"load": round(os.getloadavg()[0], 1), **ceiling}
        for k in ["ours"] + hf_names:
            tok = [r[k]["tok_s"] for r in rows]
            res.update({f"{k}_tok_s": statistics.median(tok), f"{k}_best": max(tok),
                        f"{k}_ttft_ms": statistics.median(r[k]["ttft_ms"] for r in rows),
                        f"{k}_cpu_ms_step": min(r[k]["cpu_ms_step"] for r in rows)})
        for name in hf_names:
            ratios = [r["ours"]["tok_s"] / r[name]["tok_s"] for r in rows]
            res[f"ratio_{name}"] = statistics.median(ratios)
            res[f"4x_{name}_over_roofline"] = 4 * res[f"{name}_tok_s"] / res["roofline_tok_s"]
            res[f"ratios_{name}"] = [round(x, 2) for x in ratios]
        results[f"batch{b}"] = res
        if args.json:  # after every batch: a run cut off by a time limit keeps what it measured
            _write(args.json, results)
        print(f"batch {b}: " + ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) and v < 10 else
            f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()),
            flush=True)
    if args.streaming:
        p1 = prompts.get(1, rng.integers(10, vocab, (1, PROMPT)).astype(np.int32))
        for c in [0] + [int(c) for c in args.streaming.split(",")]:
            run_ours(ours, p1, chunk=c)  # warm
            r = statistics.median(run_ours(ours, p1, chunk=c)["tok_s"] for _ in range(args.rounds))
            results[f"stream_chunk{c}"] = r
            print(f"batch 1 {'non-streaming' if c == 0 else f'streaming chunk={c}'}: "
                  f"{r:.1f} tok/s", flush=True)
    if args.json:
        _write(args.json, results)
    return results


def _write(path: str, results: dict) -> None:
    from solo.files import write_atomic

    write_atomic(path, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Train-step throughput (tokens/s, ms/step, MFU) of the project's model and train step, on
every local device through the mesh (data-parallel by default; --mesh for fsdp/tensor).

Times the full compiled update (forward, backward, global-norm clip, AdamW) on one synthetic
batch (no input pipeline) after warm-up, placed and sharded as training places it
(`Stepper`'s jit step: params and optimizer state by the logical rules, the batch over
data/fsdp). MFU = flops_per_token x tokens/s / (peak x devices), the peak from
`train/peaks.py` for the compute dtype (vendor data sheets; on CPU cores x clock x FLOPs a cycle,
declared in the output). With --compare-torch (CPU) it interleaves a minimal PyTorch
nanoGPT-equivalent step (LayerNorm, GELU MLP 4x, SDPA causal attention, tied embeddings,
biases, AdamW fused=False, clip 1.0) in the same process, so a shared/noisy machine affects both
alike; report the *ratio*. Each side's figure is the min over rounds; process CPU time is
printed too (robust to other processes stealing cores, but counts spin-waiting threads).

  python benchmarks/train_throughput.py --size nanogpt-char --compare-torch
  python benchmarks/train_throughput.py --size gpt2-124m            # GPU/TPU: bfloat16
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from solo.compile_options import compiler_options
from solo.config import RunConfig
from solo.experiments import base
from solo.model import ModelConfig, Transformer, flops_per_token
from solo.model.attention import describe
from solo.train import parallel
from solo.train.optim import make_optimizer
from solo.train.peaks import cpu_peak, peak_flops
from solo.train.step import init_state_fns, make_train_step

# name -> (model overrides, seq_len, batch per device)
SIZES = {
    "tiny": (dict(d_model=64, num_layers=2, num_heads=4, d_ff=256), 64, 8),
    "small": (dict(d_model=192, num_layers=4, num_heads=6, d_ff=768), 128, 16),
    "nanogpt-char": (dict(d_model=384, num_layers=6, num_heads=6, d_ff=1536), 256, 16),
    # experiments/gpt2_124m.py's model; 32 rows of 1,024 per device (bfloat16 fits an H100/H200)
    "gpt2-124m": (dict(d_model=768, num_layers=12, num_heads=12, d_ff=3072, vocab_size=50257,
                       vocab_multiple=128, norm_eps=1e-5, attn_bias=True, mlp_bias=True,
                       scan_layers=True), 1024, 32),
}
GPT2_STYLE = dict(positions="learned", norm="layernorm", mlp="gelu", dropout=0.0,
                  tie_embeddings=True, vocab_size=65)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _time(fn, n: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(n):
        c, t = _cpu(), time.perf_counter()
        fn()
        out.append((time.perf_counter() - t, _cpu() - c))
    return out


def measure_gemm(n: int = 2048, reps: int = 5) -> float:
    """float32 GEMM FLOP/s of this machine now (XLA, all cores): a reference beside the
    declared peak (a loaded machine under-reads it, so it is never the MFU denominator)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(w for w, _ in _time(lambda: f(a).block_until_ready(), reps))
    return 2 * n**3 / best


def make_config(size: str, dtype: str, extra: dict, mesh: dict, batch_per_device: int = 0):
    overrides, seq_len, batch = SIZES[size]
    config = base.get_config()
    config.model.update(**{**GPT2_STYLE, **overrides, "max_len": seq_len, "dtype": dtype,
                           **extra})
    config.train.mesh.update(mesh)
    tensor = int(mesh.get("tensor", 1))  # the vocabulary padded to split over it
    config.model.vocab_multiple = math.lcm(config.model.vocab_multiple, tensor)
    dp = parallel.data_parallel_size(parallel.make_mesh(config.train.mesh))
    config.data.update(seq_len=seq_len, batch_size=(batch_per_device or batch) * dp)
    config.optim.update(b2=0.99, weight_decay=0.1, clip_norm=1.0)
    return config


def make_jax_step(size: str, dtype: str, extra: dict, xla_defaults: bool = False,
                  mesh: dict | None = None, batch_per_device: int = 0):
    """(run one step, flops/token, tokens/step, params, config) on all local devices."""
    config = RunConfig.from_config(make_config(size, dtype, extra, mesh or {},
                                               batch_per_device))
    cfg = config.model
    mesh_ = parallel.make_mesh(config.train.mesh)
    model = Transformer(cfg)
    tx, schedule = make_optimizer(config.optim, 1000)
    init_boxed, init_state = init_state_fns(model, config, tx)
    key = jax.random.key(0)
    boxed = jax.eval_shape(init_boxed, key)
    psh = parallel.param_shardings(boxed, mesh_)
    ssh = parallel.state_shardings(tx, nn.meta.unbox(boxed), psh, mesh_)
    bsh = parallel.batch_sharding(mesh_)
    step = jax.jit(make_train_step(model, config, tx, schedule, mesh=mesh_),
                   in_shardings=(ssh, bsh), out_shardings=(ssh, parallel.replicated(mesh_)),
                   donate_argnums=0, compiler_options=compiler_options("train", xla_defaults))
    b, seq_len = config.data.batch_size, config.data.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (b, seq_len + 1))
    data = jax.device_put(dict(tokens=np.asarray(tokens[:, :-1], np.int32),
                               targets=np.asarray(tokens[:, 1:], np.int32),
                               weights=np.ones((b, seq_len), np.float32)), bsh)
    state = [jax.jit(init_state, out_shardings=ssh)(key)]

    def run():
        state[0], metrics = step(state[0], data)
        return float(metrics["loss"][0])

    fpt = flops_per_token(cfg, seq_len)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state[0].params))
    return run, fpt, b * seq_len, n_params, config


def make_torch_step(size: str):
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    overrides, seq_len, batch = SIZES[size]
    d, h, n_layers, v = overrides["d_model"], overrides["num_heads"], overrides["num_layers"], 65

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = tnn.LayerNorm(d), tnn.LayerNorm(d)
            self.qkv, self.proj = tnn.Linear(d, 3 * d), tnn.Linear(d, d)
            self.fc, self.fc2 = tnn.Linear(d, overrides["d_ff"]), tnn.Linear(overrides["d_ff"], d)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, val = self.qkv(self.ln1(x)).split(d, dim=2)
            q, k, val = (t.view(b, n, h, d // h).transpose(1, 2) for t in (q, k, val))
            y = F.scaled_dot_product_attention(q, k, val, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).contiguous().view(b, n, d))
            return x + self.fc2(F.gelu(self.fc(self.ln2(x))))

    class GPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = tnn.Embedding(v, d), tnn.Embedding(seq_len, d)
            self.blocks = tnn.ModuleList([Block() for _ in range(n_layers)])
            self.lnf = tnn.LayerNorm(d)
            self.head = tnn.Linear(d, v, bias=False)
            self.head.weight = self.wte.weight

        def forward(self, idx, tgt):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for blk in self.blocks:
                x = blk(x)
            logits = self.head(self.lnf(x))
            return F.cross_entropy(logits.view(-1, v), tgt.view(-1))

    torch.manual_seed(0)
    m = GPT()
    decay = [p for p in m.parameters() if p.dim() >= 2]
    rest = [p for p in m.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99), fused=False)
    idx, tgt = torch.randint(0, v, (batch, seq_len)), torch.randint(0, v, (batch, seq_len))

    def run():
        loss = m(idx, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="nanogpt-char")
    p.add_argument("--steps", type=int, default=6, help="timed steps per side (split in rounds)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaving rounds")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (auto: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--mesh", default="", metavar="data=N,fsdp=N,tensor=N",
                   help="mesh axes over the local devices (default: all on data)")
    p.add_argument("--batch-per-device", type=int, default=0,
                   help="rows per data-parallel device (default: the size's)")
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--xla-defaults", action="store_true",
                   help="XLA:CPU library fusions as jaxlib ships them, not the project's choice "
                        "(solo/compile_options.py)")
    p.add_argument("--scan-layers", type=int, choices=(0, 1), default=None,
                   help="override model.scan_layers (default: the size's)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="extra ModelConfig override, e.g. --set norm=rmsnorm --set mlp=swiglu "
                        "--set remat=dots_no_batch --set attention=xla (the torch reference "
                        "stays GPT-2 style)")
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args(argv)

    extra = {} if args.scan_layers is None else {"scan_layers": bool(args.scan_layers)}
    for item in args.set:
        key, value = item.split("=", 1)
        default = base.get_config().model[key]
        extra[key] = (value.lower() in ("1", "true") if isinstance(default, bool)
                      else type(default)(value))
    mesh = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(",") if kv)}
    runs = {}
    run, fpt, tokens, n_params, config = make_jax_step(args.size, args.dtype, extra,
                                                       args.xla_defaults, mesh,
                                                       args.batch_per_device)
    cfg, ndev = config.model, len(jax.devices())
    runs["jax"] = run
    if args.compare_torch:
        try:
            import torch
        except ImportError:
            print("torch not installed: skipping --compare-torch")
        else:
            del torch  # its default intra-op threads = cores, like XLA
            runs["torch"] = make_torch_step(args.size)
    dev = jax.devices()[0]
    peak, how = peak_flops(cfg.dtype, dev)
    print(f"size={args.size} params={n_params / 1e6:.2f}M tokens/step={tokens} "
          f"flops/token={fpt / 1e6:.1f}M dtype={cfg.dtype} remat={cfg.remat} "
          f"devices={ndev}x {dev.device_kind} "
          f"mesh={dict(parallel.make_mesh(config.train.mesh).shape)}")
    attention = describe(cfg.attention, config.data.seq_len, cfg.head_dim, cfg.dtype)
    print(attention)
    print(f"peak {peak / 1e12:.3f} TFLOP/s per device ({how})")
    gemm = measure_gemm() if dev.platform == "cpu" else float("nan")
    if dev.platform == "cpu":
        print(f"measured float32 2048^3 GEMM now: {gemm / 1e9:.0f} GFLOP/s for the host "
              f"(declared peak {cpu_peak(1)[0] / 1e9:.0f})")
    for fn in runs.values():
        for _ in range(args.warmup):
            fn()
    res = {k: [] for k in runs}
    per = max(1, args.steps // args.rounds)
    for _ in range(args.rounds):
        for k, fn in runs.items():
            res[k] += _time(fn, per)
    best = {k: (min(w for w, _ in v), min(c for _, c in v), float(np.median([w for w, _ in v])))
            for k, v in res.items()}
    overrides, seq_len, _ = SIZES[args.size]
    fpts = {"jax": fpt,  # the torch model is always GPT-2 style
            "torch": flops_per_token(ModelConfig.from_config(
                base.get_config().model, **{**GPT2_STYLE, **overrides}, max_len=seq_len),
                seq_len)}
    out = {}
    for k, (w, c, med) in best.items():
        mfu = tokens * fpts[k] / w / (peak * (ndev if k == "jax" else 1))
        out[k] = dict(ms_step=w * 1e3, ms_step_median=med * 1e3, tokens_s=tokens / w, mfu=mfu)
        extra_s = (f"  ({tokens * fpts[k] / w / gemm:.0%} of the measured GEMM rate)"
                   if dev.platform == "cpu" else "")
        print(f"{k:6s} step {w * 1e3:8.1f} ms (median {med * 1e3:.1f}, cpu {c * 1e3:.0f} ms)  "
              f"{tokens / w:8.0f} tokens/s  MFU {mfu:6.1%}{extra_s}")
    if "torch" in best:
        (jw, jc, _), (tw, tc, _) = best["jax"], best["torch"]
        print(f"jax/torch throughput ratio: {tw / jw:.3f} (wall min), {tc / jc:.3f} (cpu time)")
    if args.json:
        import json

        from solo.files import write_atomic

        figures = dict(size=args.size, device=dev.device_kind, devices=ndev, dtype=cfg.dtype,
                       peak=peak, peak_source=how, attention=attention, remat=cfg.remat,
                       tokens_per_step=tokens, flops_per_token=fpt, jax_version=jax.__version__,
                       **out)
        write_atomic(args.json, json.dumps(figures, indent=2))
    return out


if __name__ == "__main__":
    main()

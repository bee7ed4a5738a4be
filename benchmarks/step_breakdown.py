"""Where the train step's time goes, measured in place by ablation.

A profiler trace of XLA:CPU shows each thunk's own duration, but the big GEMMs run as
asynchronous Eigen tasks that overlap other work, so per-op times do not add up to the step.
This script asks the question that matters instead: how much faster is the *whole* compiled
step (forward, backward, clip, AdamW) when one component is replaced by a near-free stand-in of
the same shapes? Variants are compiled once and timed in interleaved rounds, so machine noise
hits them alike.

  python benchmarks/step_breakdown.py [--size nanogpt-char] [--rounds 4]

Stand-ins (each keeps every shape, so the rest of the graph is unchanged):
  attention        the whole core (scores, mask, softmax, weighted sum, layout changes) -> q*k+v
  attn-layout      the core -> the same heads-major transposes around q*k+v
  attn-softmax     softmax -> a scale (the two batched matmuls per block stay)
  gelu             GELU -> identity
  norm             LayerNorm/RMSNorm -> identity
cost = full step - ablated step. Stand-ins change XLA's fusion choices a little, so costs are
estimates (+- the round-to-round noise printed), not an exact partition of the step.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import jax
import jax.numpy as jnp
from train_throughput import SIZES, make_jax_step  # this directory (run as a script)

import solo.model.layers as layers


def _attention_free(q_BLHK, k_BSGK, v_BSGK, mask_BLS, *, causal=False):
    r = q_BLHK.shape[2] // k_BSGK.shape[2]
    return q_BLHK * jnp.repeat(k_BSGK, r, axis=2) + jnp.repeat(v_BSGK, r, axis=2)


def _attention_layout_only(q_BLHK, k_BSGK, v_BSGK, mask_BLS, *, causal=False):
    heads = lambda x: x.transpose(0, 2, 1, 3)
    out = _attention_free(heads(q_BLHK), heads(k_BSGK), heads(v_BSGK), mask_BLS)
    return heads(out)


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


ABLATIONS = {
    "attention": lambda: _patched(layers, "attention_core", _attention_free),
    "attn-layout": lambda: _patched(layers, "attention_core", _attention_layout_only),
    "attn-softmax": lambda: _patched(jax.nn, "softmax", lambda x, axis=-1: x * 1e-3),
    "gelu": lambda: _patched(layers, "gelu", lambda x: x),
    "norm": lambda: _patched(layers.Norm, "__call__", lambda self, x: x.astype(self.cfg.dtype)),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="nanogpt-char")
    p.add_argument("--rounds", type=int, default=4, help="interleaving rounds, 2 steps each")
    p.add_argument("--only", default=",".join(ABLATIONS), help="comma-separated ablations")
    args = p.parse_args(argv)
    names = ["full"] + [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(ABLATIONS) - {"full"})
    if unknown:
        p.error(f"unknown ablation(s) {unknown}; choose from {sorted(ABLATIONS)}")
    runs = {}
    for name in names:  # trace + compile while the stand-in is in place, then restore it
        with ABLATIONS[name]() if name != "full" else contextlib.nullcontext():
            runs[name], _, tokens, _ = make_jax_step(args.size, "float32", {})
            runs[name]()
        runs[name]()
    times = {n: [] for n in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            for _ in range(2):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    full = min(times["full"])
    spread = statistics.pstdev(times["full"]) * 1e3
    print(f"size={args.size} tokens/step={tokens}  full step {full * 1e3:.0f} ms "
          f"(min of {len(times['full'])}; sd {spread:.0f} ms)")
    for name in names[1:]:
        t = min(times[name])
        print(f"  {name:13s} ablated {t * 1e3:7.0f} ms   cost {(full - t) * 1e3:6.0f} ms "
              f"({(full - t) / full:6.1%} of the step)")


if __name__ == "__main__":
    main()

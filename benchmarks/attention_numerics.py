"""Attention numerics per path on this backend: each path's forward and gradients against a
high-precision reference on packed segments, causal and bidirectional, grouped-query, printed
as figures (the tests in tests/test_attention.py assert them; this prints how close each is).

Shapes: `small` (2 x 128, 4 heads over 2 kv heads, width 16: the tests') and `gpt2` (2 x 1024,
12 heads, width 64: GPT-2 124M's attention), each with packed documents and padding. Paths:
einsum and xla everywhere, cudnn on a GPU, splash on a TPU (its interpret mode off TPU is what
CPU CI tests). Inputs are drawn in the path's dtype: bfloat16 for every path (run as training
runs it), and float32 for einsum/xla at matmul precision 'highest' (a GPU's default float32
matmul is TF32, ~1e-3: a precision choice, not an attention error). The forward reference is
float64 numpy on those same (rounded) inputs, the gradient reference the xla path in float32 at
'highest'. Errors are over real (non-padding) query rows: max |out - ref| and the relative norm
||out - ref|| / ||ref||, bounded by 1e-4 for float32 and 2e-2 for bfloat16 inputs.
NaN never passes. Exit status 1 when any row fails.

  python benchmarks/attention_numerics.py [--shapes small,gpt2] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from solo.files import write_atomic
from solo.model import attention as attn

# name -> (batch, length, heads, kv heads, head width)
SHAPES = {"small": (2, 128, 4, 2, 16), "gpt2": (2, 1024, 12, 12, 64)}
BOUND = {"float32": 1e-4, "bfloat16": 2e-2}  # relative-norm bounds by input dtype


def segments(b: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Packed rows: row 0 two documents then padding, the others three documents."""
    seg = np.ones((b, n), np.int32)
    for i in range(b):
        cut = np.sort(rng.choice(np.arange(8, n - 8), 2, replace=False))
        seg[i, cut[0]:], seg[i, cut[1]:] = 2, (0 if i == 0 else 3)
    return seg


def mask(seg: np.ndarray, causal: bool) -> np.ndarray:
    m = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    if causal:
        n = seg.shape[1]
        m = m & (np.arange(n)[:, None] >= np.arange(n)[None])
    return m


def errors(out, ref, real) -> dict:
    out, ref = np.asarray(out, np.float64)[real], np.asarray(ref, np.float64)[real]
    if not np.all(np.isfinite(out)):
        return dict(max_abs=float("nan"), rel=float("nan"))
    return dict(max_abs=float(np.abs(out - ref).max()),
                rel=float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)))


def paths(backend: str) -> list[str]:
    """The backend's fused kernel first (the figure that matters there), then the references."""
    return {"gpu": ["cudnn"], "tpu": ["splash"]}.get(backend, []) + ["xla", "einsum"]


def _loss(impl: str, case: dict, prec: str | None = None):
    """jit(value_and_grad) of sum(out * cotangent) over real query rows on path `impl`."""
    real_q = jnp.asarray(case["real"])[:, :, None, None]
    ct = case["ct"].astype(jnp.float32)
    mj, sj = jnp.asarray(case["mask"]), jnp.asarray(case["seg"])

    def f(q, k, v):
        with jax.default_matmul_precision(prec) if prec else contextlib.nullcontext():
            out = attn.attend(impl, q, k, v, mj, sj, causal=case["causal"])
        return jnp.sum(jnp.where(real_q, out.astype(jnp.float32) * ct, 0.0)), out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))


@functools.cache
def _case(shape: str, dtype: str, causal: bool, seed: int = 0) -> dict:
    """Inputs and references of one case, shared by every path checked on it."""
    b, n, h, g, kw = SHAPES[shape]
    rng = np.random.default_rng(seed)
    seg = segments(b, n, rng)
    case = dict(seg=seg, mask=mask(seg, causal), causal=causal, real=seg != 0)
    case["q"], case["k"], case["v"], case["ct"] = (
        jnp.asarray(rng.standard_normal(s), dtype)
        for s in ((b, n, h, kw), (b, n, g, kw), (b, n, g, kw), (b, n, h, kw)))
    up = [case[x].astype(jnp.float32) for x in "qkv"]
    _, case["ref_grads"] = _loss("xla", case, "highest")(*up)
    case["ref"] = attn.reference(*up, case["mask"])
    return case


def check(shape: str, path: str, dtype: str, causal: bool, seed: int = 0) -> dict:
    case = _case(shape, dtype, causal, seed)
    real = case["real"]  # padding queries carry no loss weight: any finite value will do
    # float32 rows at 'highest': a GPU's default float32 matmul is TF32 (~1e-3), a precision
    # choice, not an attention error; bfloat16 rows run as training runs them
    fn = _loss(path, case, "highest" if dtype == "float32" else None)
    (_, out), grads = fn(case["q"], case["k"], case["v"])
    row = dict(shape=shape, path=path, dtype=dtype, causal=causal,
               fwd=errors(out, case["ref"], real))
    for name, a, r in zip("qkv", grads, case["ref_grads"], strict=True):
        row[f"d{name}"] = errors(a, r, real if name == "q" else np.ones_like(real))
    rels = [row["fwd"]["rel"]] + [row[f"d{x}"]["rel"] for x in "qkv"]
    row["ok"] = bool(all(np.isfinite(rels)) and max(rels) < BOUND[dtype])
    return row


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="small,gpt2")
    ap.add_argument("--paths", default="", help="default: those of this backend")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    backend = jax.default_backend()
    chosen = args.paths.split(",") if args.paths else paths(backend)
    print(f"backend {backend}: {jax.devices()[0].device_kind}, jax {jax.__version__}",
          flush=True)
    rows = []
    for shape in args.shapes.split(","):
        for path in chosen:
            for dtype in ("bfloat16",) if path == "cudnn" else ("float32", "bfloat16"):
                for causal in (True, False):
                    try:
                        row = check(shape, path, dtype, causal)
                    except Exception as e:  # noqa: BLE001 - a failing path is a figure too
                        row = dict(shape=shape, path=path, dtype=dtype, causal=causal, ok=False,
                                   error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    rows.append(row)
                    err = row.get("error") or "  ".join(
                        f"{x} rel {row[x]['rel']:.1e} max {row[x]['max_abs']:.1e}"
                        for x in ("fwd", "dq", "dk", "dv"))
                    if args.json:  # after every row: a run cut off by a time limit keeps its
                        write_atomic(args.json, json.dumps(rows, indent=1))  # rows so far
                    print(f"{shape:5s} {path:6s} {dtype:8s} {'causal' if causal else 'bidir ':6s}"
                          f" {'ok  ' if row['ok'] else 'FAIL'} {err}", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(r["ok"] for r in main()) else 1)

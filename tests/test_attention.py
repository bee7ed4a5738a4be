"""Attention by backend (model/attention.py): solo's einsum path, the XLA reference
(`jax.nn.dot_product_attention`) and Pallas splash attention (interpret mode on CPU) agree with
a float64 numpy reference on packed segments, causal and bidirectional, grouped-query; packed
segments never leak through a whole model on any path; splash in `jax.shard_map` on 8 fake
devices; the path choice and its fallbacks.
(cuDNN needs a GPU: benchmarks/gpu_check.sh runs these tests there, cuDNN in splash's place.)
"""

from __future__ import annotations

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solo.experiments import base
from solo.model import ModelConfig, Transformer, init_params
from solo.model import attention as attn

B, N, H, G, K = 2, 128, 4, 2, 16  # GQA: 2 query heads per kv head; splash tiles by 128
# the fused kernel under test: where a GPU runs this file (benchmarks/gpu_check.sh) cuDNN's, else
# splash (its interpret mode off TPU: what a GPU adds nothing to)
FUSED = "cudnn" if jax.default_backend() == "gpu" else "splash"
PATHS = ["einsum", "xla", FUSED]


def _segments() -> np.ndarray:
    seg = np.ones((B, N), np.int32)
    seg[0, 50:], seg[0, 100:] = 2, 0  # two documents then padding
    seg[1, 30:], seg[1, 77:] = 3, 4  # three documents
    return seg


def _mask(seg, causal):
    m = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    if causal:
        m = m & (np.arange(N)[:, None] >= np.arange(N)[None])
    return m


def _qkv(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    shapes = [(B, N, H, K), (B, N, G, K), (B, N, G, K)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_paths_match_float64_reference(path, causal):
    seg = _segments()
    mask = _mask(seg, causal)
    q, k, v = _qkv(jnp.bfloat16 if path == "cudnn" else jnp.float32)
    ref = attn.reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                         mask)
    out = np.asarray(attn.attend(path, q, k, v, jnp.asarray(mask), jnp.asarray(seg),
                                 causal=causal), np.float64)
    real = seg != 0  # padding queries' outputs carry no loss weight; any finite value will do
    assert np.all(np.isfinite(out))
    tol = 3e-2 if path == "cudnn" else 2e-5
    np.testing.assert_allclose(out[real], ref[real], atol=tol, rtol=tol)


def test_fused_gradients_match_xla():
    """The fused kernel's backward (splash; cuDNN's in bfloat16 on a GPU) against the XLA
    reference's in float32 on the same inputs."""
    seg = jnp.asarray(_segments())
    mask = jnp.asarray(_mask(_segments(), True))
    q, k, v = _qkv(jnp.bfloat16 if FUSED == "cudnn" else jnp.float32)
    real = jnp.asarray(_segments() != 0)[:, :, None, None]

    def loss(path):
        return lambda q, k, v: jnp.sum(jnp.where(
            real, attn.attend(path, q, k, v, mask, seg, causal=True).astype(jnp.float32),
            0.0) ** 2)

    gs = jax.grad(loss(FUSED), argnums=(0, 1, 2))(q, k, v)
    gx = jax.grad(loss("xla"), argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
    for a, b in zip(gs, gx, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        if FUSED == "cudnn":  # bfloat16 inputs and kernel: within 3% of the gradient's scale
            np.testing.assert_allclose(a, b, atol=3e-2 * np.abs(b).max(), rtol=3e-2)
        else:
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def _model(path: str) -> Transformer:
    c = base.get_config().model
    c.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_len=N,
                  vocab_size=40, attention=path))
    return Transformer(ModelConfig.from_config(c))


def test_packed_segments_never_leak_on_any_path():
    """Row 0 packs documents 1 and 2: changing document 2's tokens leaves document 1's logits
    unchanged (bit for bit up to 1e-6) on every path, and the paths agree with each other."""
    rng = np.random.default_rng(1)
    seg = np.ones((1, N), np.int32)
    seg[0, 60:] = 2
    pos = np.concatenate([np.arange(60), np.arange(N - 60)])[None].astype(np.int32)
    tokens = rng.integers(0, 40, (1, N)).astype(np.int32)
    other = tokens.copy()
    other[0, 60:] = rng.integers(0, 40, N - 60)
    other_first = tokens.copy()
    other_first[0, :60] = rng.integers(0, 40, 60)
    params = init_params(_model("einsum"), jax.random.key(0), ("lm",), N)
    logits = {}
    for path in PATHS:
        model = _model(path)
        fn = jax.jit(lambda t, model=model: model.apply(
            {"params": params}, dict(tokens=t, segment_ids=seg, positions=pos))["logits"])
        a, b, c = (np.asarray(fn(t)) for t in (tokens, other, other_first))
        np.testing.assert_allclose(a[0, :60], b[0, :60], atol=1e-6, err_msg=path)
        np.testing.assert_allclose(a[0, 60:], c[0, 60:], atol=1e-6, err_msg=path)
        assert np.abs(a[0, 60:] - b[0, 60:]).max() > 1e-3  # the change did reach document 2
        logits[path] = a
    for path in PATHS[1:]:  # dtype auto: bfloat16 on a GPU
        tol = 1e-4 if _model(path).cfg.dtype == "float32" else 5e-2
        np.testing.assert_allclose(logits[path], logits["einsum"], atol=tol, rtol=tol,
                                   err_msg=path)


def test_choice_by_backend_and_fallbacks():
    kw = dict(seq_len=1024, head_dim=64, dtype=jnp.bfloat16)
    assert attn.resolve("auto", backend="cpu", **kw)[0] == "einsum"
    assert attn.resolve("auto", backend="gpu", **kw)[0] == "cudnn"
    assert attn.resolve("auto", backend="tpu", **kw)[0] == "splash"
    impl, why = attn.resolve("auto", backend="gpu", **{**kw, "dtype": jnp.float32})
    assert impl == "xla" and "bfloat16" in why
    impl, why = attn.resolve("auto", backend="tpu", **{**kw, "seq_len": 100})
    assert impl == "xla" and "multiple of 128" in why
    impl, why = attn.resolve("cudnn", backend="cpu", **kw)
    assert impl == "xla" and "GPU" in why
    assert attn.resolve("auto", backend="gpu", segments=False, **kw)[0] == "xla"
    assert attn.resolve("xla", backend="gpu", **kw)[0] == "xla"
    # an explicit splash: interpret mode off TPU where it can run, else xla (not a crash)
    impl, why = attn.resolve("splash", backend="cpu", **kw)
    assert impl == "splash" and "interpret mode" in why
    impl, why = attn.resolve("splash", backend="cpu", **{**kw, "seq_len": 100})
    assert impl == "xla" and "multiple of 128" in why
    assert "einsum" in attn.describe("auto", 128, 16, "float32") or \
        jax.default_backend() != "cpu"


def test_splash_lengths_that_512_does_not_divide():
    """Splash tiles in blocks that divide the length: 640 (5 x 128) runs, packed and causal,
    and equals the float64 reference (a 512 block would not divide it)."""
    n = 640
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in [(1, n, 2, K), (1, n, 1, K), (1, n, 1, K)])
    seg = np.ones((1, n), np.int32)
    seg[0, 300:], seg[0, 600:] = 2, 0
    mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
            & (np.arange(n)[:, None] >= np.arange(n)[None]))
    out = np.asarray(attn.attend("splash", q, k, v, jnp.asarray(mask), jnp.asarray(seg),
                                 causal=True), np.float64)
    ref = attn.reference(q, k, v, mask)
    np.testing.assert_allclose(out[seg != 0], ref[seg != 0], rtol=0, atol=2e-5)


def test_gpu_check_script_stages_fit_eight_minutes(tmp_path):
    """benchmarks/gpu_check.sh --dry-run lists its stages (numerics figures and tests, both
    benchmarks) and their time limits add up to at most 8 minutes (what a GPU session gets for
    it); every Python runs with -P (the repository root would shadow the `solo` package)."""
    import re
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    out = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "OUT": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    limits = [int(x) for x in re.findall(r"\(limit (\d+)s", out.stdout)]
    assert sum(limits) <= 480, limits
    for stage in ("tests/test_attention.py", "train_throughput.py --size gpt2-124m",
                  "--set attention=xla", "decode_throughput.py", "attention_numerics.py"):
        assert stage in out.stdout, stage
    commands = [ln for ln in out.stdout.splitlines() if ln.startswith("+ ") and "python" in ln]
    assert len(commands) == 5 and all(" -P " in ln for ln in commands), commands
    # the device tool returns at most 8 files from $OUT: these 4 figures + log + summary.json
    assert len(set(re.findall(re.escape(str(tmp_path)) + r"/(\S+)", out.stdout))) == 4


def test_attention_numerics_figures_pass_a_right_path_and_fail_a_leaky_one(monkeypatch):
    """benchmarks/attention_numerics.py (the per-path error figures gpu_check.sh prints): xla in
    float32 meets float32's bound; a path whose mask lets packed documents see each other fails."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_numerics.py"
    spec = importlib.util.spec_from_file_location("attention_numerics", path)
    numerics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(numerics)
    row = numerics.check("small", "xla", "float32", causal=True)
    assert row["ok"] and row["fwd"]["rel"] < 1e-5 and row["dq"]["rel"] < 1e-5, row
    attend = attn.attend

    def leaky(impl, q, k, v, mask, seg, causal):
        if impl == "einsum":  # causal only: documents and padding leak
            mask = jnp.broadcast_to(jnp.tril(jnp.ones(mask.shape[1:], bool)), mask.shape)
        return attend(impl, q, k, v, mask, seg, causal=causal)

    monkeypatch.setattr(attn, "attend", leaky)
    row = numerics.check("small", "einsum", "float32", causal=True)
    assert not row["ok"] and row["fwd"]["rel"] > 1e-2, row


def test_gpu_summary_reads_the_figures_and_reports_what_is_missing(tmp_path, monkeypatch, capsys):
    """benchmarks/gpu_summary.py (gpu_check.sh's last word): MFU and tokens/s from the train
    JSON, each path's worst numerics error, pytest's tally from the log, a timed-out stage as
    such, and the missing decode figure named rather than skipped."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_summary.py"
    spec = importlib.util.spec_from_file_location("gpu_summary", path)
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    (tmp_path / "train_cudnn.json").write_text(json.dumps(dict(
        size="gpt2-124m", device="NVIDIA H200", devices=1, dtype="bfloat16", peak=989e12,
        attention="attention: cudnn", jax=dict(ms_step=60.0, tokens_s=546133.3, mfu=0.4718))))
    err = lambda rel: dict(rel=rel, max_abs=10 * rel)
    (tmp_path / "numerics.json").write_text(json.dumps([
        dict(path="cudnn", dtype="bfloat16", ok=True, fwd=err(3e-3), dq=err(5e-3), dk=err(1e-3),
             dv=err(2e-3)),
        dict(path="cudnn", dtype="bfloat16", ok=False, error="NotImplementedError: cuDNN")]))
    (tmp_path / "log").write_text("=== tests (limit 90s, at 3s)\n....F\n"
                                  "1 failed, 4 passed, 3 deselected in 9.1s\n=== tests: exit 1\n")
    monkeypatch.setenv("RESULTS", "train:0:80 tests:1:12 decode:124:70")
    out = summary.main(str(tmp_path))
    assert out["train_cudnn"]["tokens_s"] == 546133 and out["train_cudnn"]["mfu"] == 0.4718
    assert out["numerics"]["cudnn/bfloat16"] == dict(rows=2, failed=1, worst_rel=5e-3,
                                                     worst_max_abs=5e-2,
                                                     errors=["NotImplementedError: cuDNN"])
    assert out["tests"] == "1 failed, 4 passed, 3 deselected in 9.1s"
    assert out["stages"]["decode"]["status"] == "timed out" and out["decode"] == {}
    printed = capsys.readouterr().out
    assert "MFU 47.2% of 989.0 TFLOP/s" in printed and "decode: no figure" in printed
    assert json.loads((tmp_path / "summary.json").read_text()) == out


MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from solo.model import attention as attn, sharding
    assert jax.device_count() == 8, jax.devices()
    B, N, H, G, K = 4, 128, 4, 2, 16
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in [(B, N, H, K), (B, N, G, K), (B, N, G, K)])
    seg = np.ones((B, N), np.int32)
    seg[0, 50:], seg[0, 100:] = 2, 0  # documents then padding, a different packing per row
    seg[1, 30:], seg[1, 77:] = 3, 4
    seg[2, 64:] = 5
    seg[3, 10:], seg[3, 120:] = 6, 0
    real = seg != 0
    out = {}
    for shape in [(2, 2, 2), (4, 1, 2)]:  # data x fsdp x tensor
        mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp", "tensor"))
        put = lambda x, *s: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), *s)))
        args = put(q, None, "tensor"), put(k, None, "tensor"), put(v, None, "tensor"), put(seg)
        for causal in (True, False):
            mask = (seg[:, :, None] == seg[:, None, :]) & real[:, :, None]
            if causal:
                mask = mask & (np.arange(N)[:, None] >= np.arange(N)[None])

            def fn(path, causal=causal, mask=mask):
                def f(q, k, v, s):
                    with sharding.activation_sharding(mesh):
                        return attn.attend(path, q, k, v, jnp.asarray(mask), s, causal=causal)
                return f

            def loss(path):  # padding queries carry no loss weight
                return lambda *a: jnp.sum(jnp.where(real[:, :, None, None], fn(path)(*a),
                                                    0.0) ** 2)

            name = f"{'x'.join(map(str, shape))}_{'causal' if causal else 'bidir'}"
            specs = [str(e.params["in_specs"]) for e in jax.make_jaxpr(fn("splash"))(
                *args).jaxpr.eqns if e.primitive.name == "shard_map"]
            ref = attn.reference(q, k, v, mask)
            got = np.asarray(jax.jit(fn("splash"))(*args), np.float64)
            xla = np.asarray(jax.jit(fn("xla"))(*args), np.float64)
            grads = [jax.jit(jax.grad(loss(p), argnums=(0, 1, 2)))(*args)
                     for p in ("splash", "xla")]
            out[name] = dict(
                specs=specs,
                ref_err=float(np.abs(got - ref)[real].max()),
                xla_err=float(np.abs(got - xla)[real].max()),
                grad_err=max(float(np.abs(np.asarray(a) - np.asarray(b)).max() /
                                   np.abs(np.asarray(b)).max())
                             for a, b in zip(*grads)),
                finite=bool(np.isfinite(got).all()))
    print("RESULT", json.dumps(out))
""")


def test_splash_under_an_eight_device_mesh_matches_xla():
    """The splash path run numerically (interpret mode) in `jax.shard_map` on 8 fake CPU devices,
    data x fsdp x tensor = 2x2x2 and 4x1x2: rows sharded over data and fsdp (each shard packs its
    own documents), query and kv heads over tensor (GQA: each shard's 2 query heads with their
    one kv head), causal and bidirectional. Outputs equal the float64 reference and the xla path
    on the same mesh; gradients equal xla's. The shard_map's specs are checked too, so the test
    cannot pass by silently running replicated."""
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert len(res) == 4
    sharded = "P(('data', 'fsdp'), 'tensor', None, None)"
    for name, r in res.items():
        assert len(r["specs"]) == 1 and r["specs"][0].count(sharded) == 3, (name, r["specs"])
        assert "P(('data', 'fsdp'), None)" in r["specs"][0], (name, r["specs"])  # segment ids
        assert r["finite"], name
        assert r["ref_err"] < 2e-5 and r["xla_err"] < 2e-5, (name, r)
        assert r["grad_err"] < 1e-4, (name, r)

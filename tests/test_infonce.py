"""InfoNCE: the loss against an explicit loop over rows, group positives, padding rows, and the
negatives gathered across devices under pmap (a subprocess with 4 fake CPU devices)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_objectives import (
    F32_EPS,
    E,
    ce_atol,
    cfg,
    infonce_atol,
    logit_atol,
    np_infonce,
    row_atol,
)

from solo.objectives import compute_loss, get_objective, summarize


@pytest.mark.parametrize("learn", [False, True])
@pytest.mark.parametrize("log_scale", [math.log(7.0), math.log(400.0)])
def test_infonce_matches_loop(learn, log_scale):
    rng = np.random.default_rng(2)
    n = 6
    a = rng.normal(size=(n, E)).astype(np.float32)
    b = (a + 1.5 * rng.normal(size=(n, E))).astype(np.float32)
    outputs = {"embedding": a, "embedding_b": b, "logit_scale": np.float32(log_scale)}
    batch = {"tokens": np.zeros((n, 4), np.int32), "tokens_b": np.zeros((n, 4), np.int32)}
    opts = dict(weight=1.0, temperature=0.2, learn_temperature=learn)
    loss, metrics = compute_loss(outputs, batch, cfg(infonce=opts))
    scale = min(math.exp(log_scale), 100.0) if learn else 1 / 0.2
    ref_loss, ref_acc, gap = np_infonce(a, b, scale)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=0,
                               atol=infonce_atol(scale, E, n, ref_loss))
    np.testing.assert_allclose(metrics["infonce/loss"][1], n)
    # every argmax wins by more than two logits' error, so the hits are exact (a multiple of
    # 1/(2n), divided once by n on both sides)
    assert gap > 2 * logit_atol(scale, E), gap
    assert summarize(metrics)["infonce/accuracy"] == ref_acc


def test_infonce_same_group_rows_are_not_negatives():
    """Rows 0, 1, 2 are pairs of one fact (group 5), rows 3, 4 of another (group 9), row 5 has
    none: each row's candidates exclude the other rows of its group (explicit loop reference);
    without groups the loss is higher, because near-duplicates count as negatives."""
    rng = np.random.default_rng(4)
    n = 6
    base = rng.normal(size=(n, E)).astype(np.float32)
    base[1:3] = base[0] + 0.1 * rng.normal(size=(2, E))  # near-duplicates within the group
    a = base
    b = (base + 0.3 * rng.normal(size=(n, E))).astype(np.float32)
    groups = np.array([5, 5, 5, 9, 9, -1], np.int32)
    outputs = {"embedding": a, "embedding_b": b, "logit_scale": np.float32(0.0)}
    batch = {"tokens": np.zeros((n, 4), np.int32), "tokens_b": np.zeros((n, 4), np.int32),
             "pair_groups": groups}
    c = cfg(infonce=dict(weight=1.0, temperature=0.1))
    loss, metrics = compute_loss(outputs, batch, c)
    ref_loss, ref_acc, gap = np_infonce(a, b, 10.0, groups)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=0,
                               atol=infonce_atol(10.0, E, n, ref_loss))
    assert gap > 2 * logit_atol(10.0, E), gap  # exact hits (see test_infonce_matches_loop)
    assert summarize(metrics)["infonce/accuracy"] == ref_acc
    plain = {k: v for k, v in batch.items() if k != "pair_groups"}
    loss_plain, _ = compute_loss(outputs, plain, c)
    ref_plain = np_infonce(a, b, 10.0)[0]
    np.testing.assert_allclose(float(loss_plain), ref_plain, rtol=0,
                               atol=infonce_atol(10.0, E, n, ref_plain))
    assert float(loss_plain) > float(loss) + 0.1


_PMAP_SNIPPET = textwrap.dedent("""
    import json, math
    import jax, jax.numpy as jnp, numpy as np
    from solo.objectives import compute_loss, denominators
    import ml_collections
    D, b, E = 4, 3, 8
    assert jax.local_device_count() >= D
    rng = np.random.default_rng(0)
    a = rng.normal(size=(D * b, E)).astype(np.float32)
    bb = (a + rng.normal(size=(D * b, E))).astype(np.float32)
    batch = {"tokens": np.zeros((D * b, 2), np.int32), "tokens_b": np.zeros((D * b, 2), np.int32)}
    # float64: the smallest 1/|row| and the smallest gap between a row's two largest cosines
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    cos = unit(a.astype(np.float64)) @ unit(bb.astype(np.float64)).T
    top2 = np.sort(np.concatenate([cos, cos.T]), axis=-1)[:, -2:]
    data = dict(inv_norm=float(1 / np.linalg.norm(np.concatenate([a, bb]), axis=-1).min()),
                cos_gap=float((top2[:, 1] - top2[:, 0]).min()))
    res = {}
    for learn in (False, True):
        c = ml_collections.ConfigDict(
            {"infonce": {"weight": 1.0, "temperature": 0.1, "learn_temperature": learn}})
        ls = np.float32(math.log(30.0))
        def f(a, bb, batch, dens, axis_name=None):
            out = {"embedding": a, "embedding_b": bb, "logit_scale": ls}
            return compute_loss(out, batch, c, dens, axis_name=axis_name)
        (gl, gm), (ga, gb) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(a, bb, batch, None)
        def local(a, bb, batch):
            dens = jax.lax.psum(denominators(batch, c), "i")
            vg = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
            (lo, m), g = vg(a, bb, batch, dens, "i")
            return jax.lax.psum(lo, "i"), jax.lax.psum(m, "i"), g
        sh = lambda x: x.reshape(D, b, *x.shape[1:])
        pl, pm, (pa, pb) = jax.pmap(local, axis_name="i", devices=jax.local_devices()[:D])(
            sh(a), sh(bb), jax.tree.map(sh, batch))
        res[str(learn)] = dict(
            loss=[float(gl), float(pl[0])],
            metrics={k: [np.asarray(gm[k]).tolist(), np.asarray(pm[k])[:, 0].tolist()]
                     for k in gm},
            grad_err=float(max(np.abs(pa.reshape(-1, E) - ga).max(),
                               np.abs(pb.reshape(-1, E) - gb).max())),
            grad_scale=float(np.abs(ga).max()), scale=30.0 if learn else 10.0, **data)
    # shard_map over an Explicit mesh, and plain jit over the globally sharded arrays
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((D,), ("i",), (AxisType.Explicit,), devices=jax.devices()[:D])
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("i")))
    args = jax.tree.map(put, (a, bb, batch))
    def sm_local(a, bb, batch):
        lo, m, _ = local(a, bb, batch)
        return lo, m
    with jax.set_mesh(mesh):
        sl, sm = jax.jit(jax.shard_map(sm_local, in_specs=P("i"), out_specs=P()))(*args)
        jl, _ = jax.jit(lambda a, bb, batch: f(a, bb, batch, None))(*args)
    res["sharded"] = dict(loss=[float(gl), float(sl)], jit_loss=float(jl),
                          metrics={k: [np.asarray(gm[k]).tolist(), np.asarray(sm[k]).tolist()]
                                   for k in gm},
                          grad_err=None, scale=30.0, **data)  # loss and metrics only
    print("RESULT" + json.dumps(res))
""")


def test_pmap_infonce_equals_global():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _PMAP_SNIPPET], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    res = json.loads(line[len("RESULT"):])
    n, d = 12, 4  # rows = keys (D * b in _PMAP_SNIPPET), devices
    for r in res.values():
        # global vs per device: the same logits and CEs in other groupings (and a d-term psum),
        # each side within infonce_atol of the exact loss (the float32 one stands in for it)
        s, loss = r["scale"], r["loss"][0]
        loss_tol = 2 * (infonce_atol(s, E, n, loss) + d * F32_EPS * loss)
        np.testing.assert_allclose(*r["loss"], rtol=0, atol=loss_tol)
        if "jit_loss" in r:
            np.testing.assert_allclose(r["jit_loss"], loss, rtol=0, atol=loss_tol)
        # every device holds the psum: (sum, count) of all rows. Counts are exact; every argmax
        # wins by more than two logits' error, so the hits (multiples of 1/2) are exact too
        assert r["cos_gap"] * s > 2 * logit_atol(s, E), r["cos_gap"]
        for k, (glob, dev) in r["metrics"].items():
            if k.endswith("accuracy"):
                assert dev == glob, k
            else:  # a sum over n rows
                np.testing.assert_allclose(dev, glob, rtol=0, atol=n * loss_tol, err_msg=k)
        # d loss / d a^_i = (s / 2n) (sum_j (P_ij - onehot) b^_j + sum_k (P'_ki - onehot) b^_k),
        # a->b and b->a: each P is off by <= row_atol relative, so the brackets by (1 + n) of it
        # (+ n eps of their terms, each <= 2); the normalisation's backward multiplies by
        # <= (1 + sqrt(E)) / |a_i|; twice, for the two sides (the same for b)
        bracket = (1 + n) * row_atol(s, E, n) + 4 * n * F32_EPS
        grad_tol = 2 * (1 + math.sqrt(E)) * r["inv_norm"] * s / (2 * n) * bracket
        if r["grad_err"] is not None:  # the shard_map entry checks loss and metrics only
            assert r["grad_err"] <= grad_tol, (r["grad_err"], grad_tol)


def test_padding_rows_change_neither_nsp_nor_infonce():
    """Eval batches are padded with zero-weight rows: they must not move loss or accuracy."""

    rng = np.random.default_rng(7)
    emb_a = rng.normal(size=(5, 8)).astype(np.float32)
    emb_b = (emb_a + 0.3 * rng.normal(size=(5, 8))).astype(np.float32)
    emb_a /= np.linalg.norm(emb_a, axis=-1, keepdims=True)
    emb_b /= np.linalg.norm(emb_b, axis=-1, keepdims=True)
    nsp_logits = rng.normal(size=(5, 2)).astype(np.float32)
    labels = np.array([0, 1, 1, 0, 1], np.int32)
    real = {"embedding": emb_a[:3], "embedding_b": emb_b[:3], "nsp_logits": nsp_logits[:3]}
    padded = {"embedding": emb_a, "embedding_b": emb_b, "nsp_logits": nsp_logits}
    w = np.array([1, 1, 1, 0, 0], np.float32)
    for name, key, extra in (("nsp", "nsp_weights", {"nsp_labels": labels}),
                             ("infonce", "pair_weights", {"tokens": np.zeros((5, 4), np.int32)})):
        obj = get_objective(name)
        small = {k: v[:3] for k, v in extra.items()}
        opts = dict(temperature=0.1, learn_temperature=False, axis_name=None)
        m_real = obj.loss(real, small, opts)
        m_pad = obj.loss(padded, {**extra, key: w}, opts)
        # The same 3 rows' terms (padding adds exact zeros) in other groupings: twice one side's
        # bound (nsp: ce_atol; infonce: 3 rows of infonce_atol, scale 1/0.1, 5 keys). The hits
        # are exact: nsp argmaxes the same logits, and InfoNCE's argmaxes win by more than two
        # logits' error.
        if name == "nsp":
            total = float(m_real["loss"][0])  # stands in for the exact sum
            tol = 2 * ce_atol(nsp_logits[:3], np.ones(3), total)
        else:
            ref_loss, _, gap = np_infonce(emb_a[:3], emb_b[:3], 10.0)
            assert gap > 2 * logit_atol(10.0, 8), gap
            tol = 2 * 3 * infonce_atol(10.0, 8, 5, ref_loss)
        np.testing.assert_allclose(np.asarray(m_pad["loss"]), np.asarray(m_real["loss"]),
                                   rtol=0, atol=tol, err_msg=f"{name}/loss")
        np.testing.assert_array_equal(np.asarray(m_pad["accuracy"]),
                                      np.asarray(m_real["accuracy"]), err_msg=f"{name}/accuracy")
        assert float(obj.count({**extra, key: w})) == 3.0

"""Objectives vs hand-written numpy references (explicit loops), plus aggregation invariances."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from solo.data.masking import mask_tokens
from solo.objectives import (
    OBJECTIVES,
    active_objectives,
    compute_loss,
    denominators,
    forward,
    get_objective,
    summarize,
)

B, L, V, E = 3, 5, 11, 8


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_token_ce(logits, targets, weights):
    """(loss sum, accuracy sum, count, sum of w * lse^2) by explicit loops."""
    total = acc = count = z = 0.0
    for b in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            row = np.asarray(logits[b, i], np.float64)
            w = float(weights[b, i])
            total += -w * np_log_softmax(row)[targets[b, i]]
            acc += w * float(np.argmax(row) == targets[b, i])
            count += w
            lse = row.max() + math.log(np.exp(row - row.max()).sum())
            z += w * lse**2
    return total, acc, count, z


def np_infonce(a, b, scale, groups=None):
    """Mean over rows of 0.5 * (CE a->b + CE b->a), and mean top-1 retrieval accuracy; with
    groups, row i's candidates are itself and every row of another group (or group -1)."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    n = a.shape[0]
    groups = [-1] * n if groups is None else list(groups)
    losses, hits = [], []
    for i in range(n):
        cand = [j for j in range(n) if j == i or groups[i] < 0 or groups[j] != groups[i]]
        row_ab = np.array([scale * np.dot(a[i], b[j]) for j in cand])
        row_ba = np.array([scale * np.dot(b[i], a[j]) for j in cand])
        t = cand.index(i)
        losses.append(0.5 * (-np_log_softmax(row_ab)[t] - np_log_softmax(row_ba)[t]))
        hits.append(0.5 * (float(np.argmax(row_ab) == t) + float(np.argmax(row_ba) == t)))
    return float(np.mean(losses)), float(np.mean(hits))


def cfg(**entries):
    c = ml_collections.ConfigDict()
    for name, opts in entries.items():
        c[name] = ml_collections.ConfigDict(opts)
    return c


def lm_data(seed=0, b=B, n=L):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, n, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, size=(b, n)).astype(np.int32)
    # make some predictions right so accuracy is non-trivial
    targets[:, ::2] = logits[:, ::2].argmax(-1)
    weights = (rng.random((b, n)) < 0.7).astype(np.float32) * rng.uniform(0.5, 1.5, (b, n))
    weights = weights.astype(np.float32)
    batch = dict(tokens=targets, targets=targets, weights=weights, src_tokens=targets)
    return {"logits": logits}, batch


def bert_data(seed=1):
    rng = np.random.default_rng(seed)
    mlm_logits = rng.normal(size=(B, L, V)).astype(np.float32) * 3
    mlm_targets = rng.integers(0, V, size=(B, L)).astype(np.int32)
    mlm_weights = (rng.random((B, L)) < 0.5).astype(np.float32)
    mlm_weights[0, 0] = 1.0
    nsp_logits = rng.normal(size=(B, 2)).astype(np.float32)
    nsp_labels = rng.integers(0, 2, size=(B,)).astype(np.int32)
    outputs = {"mlm_logits": mlm_logits, "nsp_logits": nsp_logits}
    batch = dict(tokens=mlm_targets, mlm_targets=mlm_targets, mlm_weights=mlm_weights,
                 nsp_labels=nsp_labels)
    return outputs, batch


@pytest.mark.parametrize("name", ["causal_lm", "seq2seq"])
def test_token_ce_matches_numpy(name):
    outputs, batch = lm_data()
    loss, metrics = compute_loss(outputs, batch, cfg(**{name: dict(weight=1.0)}))
    total, acc, count, _ = np_token_ce(outputs["logits"], batch["targets"], batch["weights"])
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
    np.testing.assert_allclose(metrics[f"{name}/loss"], (total, count), rtol=1e-5)
    np.testing.assert_allclose(metrics[f"{name}/accuracy"], (acc, count), rtol=1e-5)
    s = summarize(metrics)
    np.testing.assert_allclose(s[f"{name}/perplexity"], math.exp(total / count), rtol=1e-5)
    assert 0.0 < s[f"{name}/accuracy"] <= 1.0


def test_z_loss():
    outputs, batch = lm_data()
    c = cfg(causal_lm=dict(weight=2.0, z_loss=1e-2))
    loss, metrics = compute_loss(outputs, batch, c)
    total, _, count, z = np_token_ce(outputs["logits"], batch["targets"], batch["weights"])
    np.testing.assert_allclose(float(loss), 2.0 * total / count + 1e-2 * z / count, rtol=1e-5)
    np.testing.assert_allclose(metrics["z_loss"], (1e-2 * z, count), rtol=1e-5)
    # the perplexity stays that of the plain CE
    np.testing.assert_allclose(summarize(metrics)["causal_lm/perplexity"], math.exp(total / count),
                               rtol=1e-5)


def test_mlm_and_nsp_match_numpy_and_weighted_sum():
    outputs, batch = bert_data()
    loss, metrics = compute_loss(outputs, batch, cfg(mlm=dict(weight=1.0), nsp=dict(weight=0.5)))
    m_total, m_acc, m_count, _ = np_token_ce(
        outputs["mlm_logits"], batch["mlm_targets"], batch["mlm_weights"])
    n_total = n_acc = 0.0
    for i in range(B):
        n_total += -np_log_softmax(outputs["nsp_logits"][i])[batch["nsp_labels"][i]]
        n_acc += float(np.argmax(outputs["nsp_logits"][i]) == batch["nsp_labels"][i])
    np.testing.assert_allclose(metrics["mlm/loss"], (m_total, m_count), rtol=1e-5)
    np.testing.assert_allclose(metrics["mlm/accuracy"], (m_acc, m_count), rtol=1e-5)
    np.testing.assert_allclose(metrics["nsp/loss"], (n_total, B), rtol=1e-5)
    np.testing.assert_allclose(metrics["nsp/accuracy"], (n_acc, B), rtol=1e-5)
    np.testing.assert_allclose(float(loss), m_total / m_count + 0.5 * n_total / B, rtol=1e-5)
    # weight 0 drops the objective entirely
    loss0, metrics0 = compute_loss(outputs, batch, cfg(mlm=dict(weight=1.0), nsp=dict(weight=0.0)))
    np.testing.assert_allclose(float(loss0), m_total / m_count, rtol=1e-5)
    assert set(metrics0) == {"mlm/loss", "mlm/accuracy"}


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
    ref_loss, ref_acc = np_infonce(a, b, scale)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["infonce/loss"][1], n)
    np.testing.assert_allclose(summarize(metrics)["infonce/accuracy"], ref_acc, rtol=1e-6)


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
    ref_loss, ref_acc = np_infonce(a, b, 10.0, groups)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(summarize(metrics)["infonce/accuracy"], ref_acc, rtol=1e-6)
    plain = {k: v for k, v in batch.items() if k != "pair_groups"}
    loss_plain, _ = compute_loss(outputs, plain, c)
    np.testing.assert_allclose(float(loss_plain), np_infonce(a, b, 10.0)[0], rtol=1e-5)
    assert float(loss_plain) > float(loss) + 0.1


def test_zero_weight_padding_does_not_change_loss():
    outputs, batch = lm_data()
    rng = np.random.default_rng(3)
    pad_logits = rng.normal(size=(B, 4, V)).astype(np.float32) * 10
    padded_out = {"logits": np.concatenate([outputs["logits"], pad_logits], axis=1)}
    padded = {k: np.concatenate([v, np.zeros((B, 4), v.dtype)], axis=1) for k, v in batch.items()}
    c = cfg(causal_lm=dict(weight=1.0))
    loss, metrics = compute_loss(outputs, batch, c)
    loss_p, metrics_p = compute_loss(padded_out, padded, c)
    np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-6)
    for k in metrics:
        np.testing.assert_allclose(metrics_p[k], metrics[k], rtol=1e-6)


def test_half_batches_aggregate_to_full_batch():
    outputs, batch = lm_data(seed=4, b=4)
    bo, bb = bert_data(seed=5)
    outputs, batch = {**outputs, **bo}, {**batch, **bb}
    outputs = {k: v[:3] for k, v in outputs.items()}
    batch = {k: v[:3] for k, v in batch.items()}
    c = cfg(causal_lm=dict(weight=1.0), mlm=dict(weight=1.0), nsp=dict(weight=1.0))
    _, full = compute_loss(outputs, batch, c)
    sl = lambda d, s: {k: v[s] for k, v in d.items()}
    parts = [compute_loss(sl(outputs, s), sl(batch, s), c)[1] for s in (slice(0, 1), slice(1, 3))]
    summed = jax.tree.map(jnp.add, parts[0], parts[1])
    for k in full:
        np.testing.assert_allclose(summed[k], full[k], rtol=1e-5)
    s_full, s_sum = summarize(full), summarize(summed)
    assert s_full.keys() == s_sum.keys()
    for k in s_full:
        np.testing.assert_allclose(s_sum[k], s_full[k], rtol=1e-5)


def test_microbatches_with_full_denominators_sum_to_full_loss_and_grads():
    outputs, batch = lm_data(seed=6, b=4)
    c = cfg(causal_lm=dict(weight=1.5, z_loss=1e-3))
    dens = denominators(batch, c)
    np.testing.assert_allclose(dens["causal_lm"], batch["weights"].sum(), rtol=1e-6)

    def f(logits, b, d):
        return compute_loss({"logits": logits}, b, c, d)[0]

    full_loss, full_grad = jax.value_and_grad(f)(outputs["logits"], batch, None)
    micro_loss, micro_grads = 0.0, []
    for s in (slice(0, 2), slice(2, 4)):
        mb = {k: v[s] for k, v in batch.items()}
        lo, g = jax.value_and_grad(f)(outputs["logits"][s], mb, dens)
        micro_loss += float(lo)
        micro_grads.append(g)
    np.testing.assert_allclose(micro_loss, float(full_loss), rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(micro_grads), full_grad, rtol=1e-5, atol=1e-7)


def test_mask_tokens_statistics():
    rng = np.random.default_rng(0)
    vocab, special = 50, tuple(range(10))
    tokens = rng.integers(0, vocab, size=(400, 500)).astype(np.int32)
    segment_ids = np.ones_like(tokens)
    segment_ids[:, -50:] = 0  # trailing padding region with non-special ids
    inputs, targets, weights = mask_tokens(
        tokens, np.random.default_rng(1), vocab_size=vocab, special_ids=special, mask_id=4,
        segment_ids=segment_ids)
    assert inputs.dtype == np.int32 and targets.dtype == np.int32 and weights.dtype == np.float32
    sel = weights == 1
    eligible = ~np.isin(tokens, special) & (segment_ids != 0)
    assert not sel[~eligible].any()
    np.testing.assert_array_equal(inputs[~sel], tokens[~sel])
    np.testing.assert_array_equal(targets[sel], tokens[sel])
    assert (targets[~sel] == 0).all()
    assert abs(sel.sum() / eligible.sum() - 0.15) < 0.01
    masked = sel & (inputs == 4)
    kept = sel & (inputs == tokens)
    randomized = sel & ~masked & ~kept
    n = sel.sum()
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs(randomized.sum() / n - 0.1) < 0.02
    assert abs(kept.sum() / n - 0.1) < 0.02
    assert not np.isin(inputs[randomized], special).any()
    # determinism given the generator
    again = mask_tokens(tokens, np.random.default_rng(1), vocab_size=vocab, special_ids=special,
                        mask_id=4, segment_ids=segment_ids)
    np.testing.assert_array_equal(again[0], inputs)


def test_forward_runs_each_view_once_with_union_of_heads():
    calls = []

    def apply_fn(variables, batch, *, heads, deterministic, rngs):
        calls.append((sorted(batch), heads, rngs))
        assert "params" in variables
        out = {"hidden": batch["tokens"] * 1.0}
        if "embed" in heads:
            out["embedding"] = batch["tokens"][:, :2] * 1.0
        if "lm" in heads:
            out["logits"] = batch["tokens"] * 2.0
        return out

    batch = {"tokens": jnp.ones((2, 3), jnp.int32), "targets": jnp.ones((2, 3), jnp.int32),
             "weights": jnp.ones((2, 3)), "tokens_b": 3 * jnp.ones((2, 3), jnp.int32),
             "positions_b": jnp.zeros((2, 3), jnp.int32)}
    rngs = {"dropout": jax.random.key(0)}
    out = forward(apply_fn, {"w": 1}, batch, ["causal_lm", "infonce"], deterministic=False,
                  rngs=rngs)
    assert len(calls) == 2
    assert calls[0][1] == ("embed", "lm") and calls[1][1] == ("embed",)
    assert calls[1][0] == ["positions", "tokens"]
    assert set(out) == {"hidden", "embedding", "logits", "hidden_b", "embedding_b"}
    np.testing.assert_array_equal(out["embedding_b"], 3.0)
    # the two views get different dropout streams
    k0, k1 = (jax.random.key_data(c[2]["dropout"]) for c in calls)
    assert not np.array_equal(k0, k1)
    with pytest.raises(KeyError, match="tokens_b"):
        forward(apply_fn, {"w": 1}, {"tokens": batch["tokens"]}, ["infonce"], deterministic=True)


def test_unknown_objective_and_config_errors():
    with pytest.raises(ValueError, match=r"'infonse'.*'infonce'.*causal_lm"):
        get_objective("infonse")
    with pytest.raises(ValueError, match="clm"):
        compute_loss({}, {}, cfg(clm=dict(weight=1.0)))
    c = cfg(causal_lm=dict(weight=1.0), nsp=dict(weight=0.0))
    assert list(active_objectives(c)) == ["causal_lm"]
    c.z_loss = 0.0
    assert list(active_objectives(c)) == ["causal_lm"]
    c.z_loss = 1e-4
    with pytest.raises(ValueError, match="causal_lm.z_loss"):
        active_objectives(c)
    assert set(OBJECTIVES) == {"causal_lm", "mlm", "nsp", "infonce", "seq2seq"}


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
            grad_scale=float(np.abs(ga).max()))
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
                          grad_err=0.0, grad_scale=1.0)
    print("RESULT" + json.dumps(res))
""")


def test_pmap_infonce_equals_global():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _PMAP_SNIPPET], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    res = json.loads(line[len("RESULT"):])
    for r in res.values():
        np.testing.assert_allclose(*r["loss"], rtol=1e-5)
        np.testing.assert_allclose(r.get("jit_loss", r["loss"][0]), r["loss"][0], rtol=1e-5)
        for glob, dev in r["metrics"].values():
            # every device holds the psum: (sum, count) of all rows
            np.testing.assert_allclose(dev, glob, rtol=1e-5)
        assert r["grad_err"] <= 1e-5 * max(1.0, r["grad_scale"])


def test_padding_rows_change_neither_nsp_nor_infonce():
    """Eval batches are padded with zero-weight rows: they must not move loss or accuracy."""
    from solo.objectives import get_objective

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
        m_real = obj.loss(real, small, {"temperature": 0.1})
        m_pad = obj.loss(padded, {**extra, key: w}, {"temperature": 0.1})
        for metric in ("loss", "accuracy"):
            np.testing.assert_allclose(np.asarray(m_pad[metric]), np.asarray(m_real[metric]),
                                       rtol=1e-6, err_msg=f"{name}/{metric}")
        assert float(obj.count({**extra, key: w})) == 3.0

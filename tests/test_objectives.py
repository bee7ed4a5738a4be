"""Objectives vs hand-written numpy references (explicit loops), plus aggregation invariances."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from solo.data.masking import mask_tokens
from solo.experiments.base import get_config
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

# Tolerances: float32 rounds each operation by <= eps/2 (eps = 2**-23), a sum of n terms errs by
# <= n eps of the sum of its absolute terms (Higham, Accuracy and Stability of Numerical
# Algorithms, 4.2), and XLA's exp/log/rsqrt are within a few ulp (<= 2 eps). The references are
# float64 loops over the same float32 inputs. A real bug (a wrong normalisation or mask, a missing
# negative) moves a loss by >= 1/(tokens or rows) of it, far above these bounds.
F32_EPS = float(np.finfo(np.float32).eps)
ALPHA = 1e-6  # false-failure probability of each statistical check below


def token_atol(logits, weights):
    """Bound on |float32 - exact| of one token's CE = logsumexp(x) - x_target (or of its
    logsumexp): x - max rounds by <= S eps (S = max |x| over weighted tokens), a relative error
    of its exp; exp and log add <= 2 eps each, the V-term sum of exps V eps, adding the max back
    and subtracting x_target <= (S + log V) eps: <= (V + 3 S + 3 log V + 4) eps."""
    x, w = np.asarray(logits, np.float64), np.asarray(weights)
    s, v = np.abs(x[w > 0]).max(), x.shape[-1]
    return (v + 3 * s + 3 * np.log(v) + 4) * F32_EPS


def ce_atol(logits, weights, total):
    """Bound on |float32 sum_t w_t CE_t - exact| (`total`: the exact sum): each token's bound
    (token_atol), and the weighted sum of n terms >= 0 adds (n + 1) eps of the total."""
    w = np.asarray(weights, np.float64)
    return w.sum() * token_atol(logits, w) + (w.size + 1) * F32_EPS * total


def logit_atol(scale, e):
    """Bound on |float32 - exact| of an InfoNCE logit from float32 embeddings of dim e:
    normalising (an e-term sum of squares, rsqrt, a product) errs by <= (e + 4) eps, so a cosine
    (an e-term dot of unit vectors) by <= (3 e + 9) eps, and the logit is scale * cosine."""
    return (3 * e + 9) * F32_EPS * scale


def row_atol(scale, e, n):
    """Bound on |float32 - exact| of one row's InfoNCE CE over n keys: it moves by <= 2
    logit_atol through its inputs, plus its own rounding (token_atol with S = scale, V = n)."""
    return 2 * logit_atol(scale, e) + (n + 3 * scale + 3 * np.log(n) + 4) * F32_EPS


def infonce_atol(scale, e, n, loss):
    """Bound on |float32 - exact| of the InfoNCE loss over n rows (and n keys), `loss` its exact
    value: each row's row_atol, and the mean of n terms >= 0 adds (n + 2) eps."""
    return row_atol(scale, e, n) + (n + 2) * F32_EPS * loss


def assert_binomial(k, n, p):
    """k hits in n independent draws of probability p: a two-sided exact binomial test, which
    a correct sampler fails with probability ALPHA."""
    from scipy.stats import binomtest

    assert binomtest(int(k), int(n), p).pvalue > ALPHA, (int(k), int(n), p)


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
    """Mean over rows of 0.5 * (CE a->b + CE b->a), mean top-1 retrieval accuracy, and the
    smallest gap between a row's two largest logits (in float64); with groups, row i's
    candidates are itself and every row of another group (or group -1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    n = a.shape[0]
    groups = [-1] * n if groups is None else list(groups)
    losses, hits, gap = [], [], np.inf
    for i in range(n):
        cand = [j for j in range(n) if j == i or groups[i] < 0 or groups[j] != groups[i]]
        row_ab = np.array([scale * np.dot(a[i], b[j]) for j in cand])
        row_ba = np.array([scale * np.dot(b[i], a[j]) for j in cand])
        t = cand.index(i)
        losses.append(0.5 * (-np_log_softmax(row_ab)[t] - np_log_softmax(row_ba)[t]))
        hits.append(0.5 * (float(np.argmax(row_ab) == t) + float(np.argmax(row_ba) == t)))
        gap = min([gap, *(np.diff(np.sort(r)[-2:])[0] for r in (row_ab, row_ba) if len(r) > 1)])
    return float(np.mean(losses)), float(np.mean(hits)), gap


def cfg(**entries):
    """config.objectives with these entries: each objective's options from experiments/base.py,
    then the given ones."""
    base = get_config().objectives
    c = ml_collections.ConfigDict()
    for name, opts in entries.items():
        c[name] = ml_collections.ConfigDict({**(base[name].to_dict() if name in base else {}),
                                             **opts})
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
    # the CE sum (relative bound, see ce_atol); the weight and accuracy sums: n terms w * {0, 1}
    # (both argmax the same float32 logits); the mean adds the count's error and one division
    sum_tol = ce_atol(outputs["logits"], batch["weights"], total) / total
    count_tol = (batch["weights"].size + 1) * F32_EPS
    mean_tol = sum_tol + count_tol + F32_EPS
    np.testing.assert_allclose(float(loss), total / count, rtol=mean_tol)
    np.testing.assert_allclose(metrics[f"{name}/loss"], (total, count), rtol=sum_tol)
    np.testing.assert_allclose(metrics[f"{name}/accuracy"], (acc, count), rtol=count_tol)
    s = summarize(metrics)
    # exp turns the mean's absolute error (mean_tol * mean) into a relative one
    np.testing.assert_allclose(s[f"{name}/perplexity"], math.exp(total / count),
                               rtol=mean_tol * total / count)
    assert 0.0 < s[f"{name}/accuracy"] <= 1.0


def test_z_loss():
    outputs, batch = lm_data()
    c = cfg(causal_lm=dict(weight=2.0, z_loss=1e-2))
    loss, metrics = compute_loss(outputs, batch, c)
    total, _, count, z = np_token_ce(outputs["logits"], batch["targets"], batch["weights"])
    w, x = batch["weights"], outputs["logits"]
    ce_tol = ce_atol(x, w, total) / total + (w.size + 2) * F32_EPS  # CE sum / count (see above)
    # lse^2: lse errs by at most CE's per-token bound (see ce_atol) and |lse| <= S + log V, so
    # w lse^2 by 2 |lse| times that (+ eps lse^2); the n-term sum of >= 0 terms adds n eps
    lse_max = np.abs(x[w > 0]).max() + math.log(V)
    z_tol = w.sum() * (2 * lse_max * token_atol(x, w) + F32_EPS * lse_max**2) / z \
        + (w.size + 2) * F32_EPS
    np.testing.assert_allclose(float(loss), 2.0 * total / count + 1e-2 * z / count,
                               rtol=max(ce_tol, z_tol))
    np.testing.assert_allclose(metrics["z_loss"], (1e-2 * z, count), rtol=z_tol + F32_EPS)
    # the perplexity stays that of the plain CE (exp: the mean's absolute error, relative)
    np.testing.assert_allclose(summarize(metrics)["causal_lm/perplexity"], math.exp(total / count),
                               rtol=ce_tol * total / count)


def test_mlm_and_nsp_match_numpy_and_weighted_sum():
    outputs, batch = bert_data()
    loss, metrics = compute_loss(outputs, batch, cfg(mlm=dict(weight=1.0), nsp=dict(weight=0.5)))
    m_total, m_acc, m_count, _ = np_token_ce(
        outputs["mlm_logits"], batch["mlm_targets"], batch["mlm_weights"])
    n_total = n_acc = 0.0
    for i in range(B):
        n_total += -np_log_softmax(outputs["nsp_logits"][i])[batch["nsp_labels"][i]]
        n_acc += float(np.argmax(outputs["nsp_logits"][i]) == batch["nsp_labels"][i])
    # CE sums: ce_atol; weight and accuracy sums: n terms w * {0, 1} (the same argmax)
    m_tol = ce_atol(outputs["mlm_logits"], batch["mlm_weights"], m_total) / m_total
    n_tol = ce_atol(outputs["nsp_logits"], np.ones(B), n_total) / n_total
    count_tol = (batch["mlm_weights"].size + 1) * F32_EPS
    np.testing.assert_allclose(metrics["mlm/loss"], (m_total, m_count), rtol=m_tol)
    np.testing.assert_allclose(metrics["mlm/accuracy"], (m_acc, m_count), rtol=count_tol)
    np.testing.assert_allclose(metrics["nsp/loss"], (n_total, B), rtol=n_tol)
    np.testing.assert_allclose(metrics["nsp/accuracy"], (n_acc, B), rtol=count_tol)
    # the means add the counts' error, and the division and the sum one rounding each
    np.testing.assert_allclose(float(loss), m_total / m_count + 0.5 * n_total / B,
                               rtol=max(m_tol, n_tol) + count_tol + 2 * F32_EPS)
    # weight 0 drops the objective entirely
    loss0, metrics0 = compute_loss(outputs, batch, cfg(mlm=dict(weight=1.0), nsp=dict(weight=0.0)))
    np.testing.assert_allclose(float(loss0), m_total / m_count, rtol=m_tol + count_tol + F32_EPS)
    assert set(metrics0) == {"mlm/loss", "mlm/accuracy"}


def test_zero_weight_padding_does_not_change_loss():
    outputs, batch = lm_data()
    rng = np.random.default_rng(3)
    pad_logits = rng.normal(size=(B, 4, V)).astype(np.float32) * 10
    padded_out = {"logits": np.concatenate([outputs["logits"], pad_logits], axis=1)}
    padded = {k: np.concatenate([v, np.zeros((B, 4), v.dtype)], axis=1) for k, v in batch.items()}
    c = cfg(causal_lm=dict(weight=1.0))
    loss, metrics = compute_loss(outputs, batch, c)
    loss_p, metrics_p = compute_loss(padded_out, padded, c)
    # the same weighted terms (padding adds exact zeros) summed in different groupings: each side
    # is within ce_atol of the exact CE sum, the weight sums and the division within (n + 2) eps
    total = np_token_ce(outputs["logits"], batch["targets"], batch["weights"])[0]
    tol = 2 * (ce_atol(padded_out["logits"], padded["weights"], total) / total
               + (padded["weights"].size + 2) * F32_EPS)
    np.testing.assert_allclose(float(loss_p), float(loss), rtol=tol)
    for k in metrics:
        np.testing.assert_allclose(metrics_p[k], metrics[k], rtol=tol)


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
    # both sides are float32 evaluations of the same sums, each within ce_atol of the exact CE
    # sum (the float32 one stands in for it), the accuracy and weight sums and a mean's division
    # within (n + 2) eps
    inputs = {"causal_lm": (outputs["logits"], batch["weights"]),
              "mlm": (outputs["mlm_logits"], batch["mlm_weights"]),
              "nsp": (outputs["nsp_logits"], np.ones(3))}
    rel = {}
    for name, (x, w) in inputs.items():
        total = float(full[f"{name}/loss"][0])
        rel[name] = 2 * (ce_atol(x, w, total) / total + (w.size + 2) * F32_EPS)
    for k in full:
        np.testing.assert_allclose(summed[k], full[k], rtol=rel[k.split("/")[0]])
    s_full, s_sum = summarize(full), summarize(summed)
    assert s_full.keys() == s_sum.keys()
    for k in s_full:
        name, metric = k.split("/")
        # perplexity = exp(mean loss): the mean's absolute error becomes its relative one
        scale = max(1.0, s_full[f"{name}/loss"]) if metric == "perplexity" else 1.0
        np.testing.assert_allclose(s_sum[k], s_full[k], rtol=rel[name] * scale)


def test_microbatches_with_full_denominators_sum_to_full_loss_and_grads():
    outputs, batch = lm_data(seed=6, b=4)
    c = cfg(causal_lm=dict(weight=1.5, z_loss=1e-3))
    dens = denominators(batch, c)
    x, w = outputs["logits"], batch["weights"]
    # two float32 sums of the same n weights >= 0, each within n eps of the exact one
    np.testing.assert_allclose(dens["causal_lm"], w.sum(), rtol=2 * w.size * F32_EPS)

    def f(logits, b, d):
        return compute_loss({"logits": logits}, b, c, d)[0]

    full_loss, full_grad = jax.value_and_grad(f)(outputs["logits"], batch, None)
    micro_loss, micro_grads = 0.0, []
    for s in (slice(0, 2), slice(2, 4)):
        mb = {k: v[s] for k, v in batch.items()}
        lo, g = jax.value_and_grad(f)(outputs["logits"][s], mb, dens)
        micro_loss += float(lo)
        micro_grads.append(g)
    # Both sides sum the same per-token terms 1.5 CE + 1e-3 lse^2 over denominators within
    # (n + 2) eps, in different groupings: twice the bound of one side. CE: ce_atol; lse^2 errs
    # by <= 2 |lse| token_atol + eps lse^2, |lse| <= S + log V.
    total, _, count, z = np_token_ce(x, batch["targets"], w)
    lse_max = np.abs(x[w > 0]).max() + math.log(V)
    tok = token_atol(x, w)
    err = 1.5 * ce_atol(x, w, total) + 1e-3 * (w.sum() * 2 * lse_max * tok
                                               + (w.size + 1) * F32_EPS * z)
    loss = (1.5 * total + 1e-3 * z) / count
    np.testing.assert_allclose(micro_loss, float(full_loss), rtol=0,
                               atol=2 * (err / count + (w.size + 2) * F32_EPS * loss))
    # d loss / d logit = (1.5 (p - onehot) + 2e-3 lse p) w / den; p = exp(x - lse) is off by
    # <= token_atol relative on each side, the denominator by (n + 2) eps
    g_atol = 2 * tok * (1.5 + 2e-3 * lse_max) * w.max() / count
    np.testing.assert_allclose(np.concatenate(micro_grads), full_grad,
                               rtol=2 * (w.size + 2) * F32_EPS, atol=g_atol)


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
    assert_binomial(sel.sum(), eligible.sum(), 0.15)
    masked = sel & (inputs == 4)
    kept = sel & (inputs == tokens)
    randomized = sel & ~masked & ~kept
    n = sel.sum()
    assert_binomial(masked.sum(), n, 0.8)
    # a random replacement draws the original token again with probability 1 / (non-special ids)
    same = 1 / (vocab - len(special))
    assert_binomial(randomized.sum(), n, 0.1 * (1 - same))
    assert_binomial(kept.sum(), n, 0.1 + 0.1 * same)
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
    c.z_loss = 1e-4  # a top-level key is no objective
    with pytest.raises(ValueError, match="'z_loss'"):
        active_objectives(c)
    with pytest.raises(ValueError, match=r"objectives.infonce lacks \['learn_temperature'\]"):
        active_objectives({"infonce": {"weight": 1.0, "temperature": 0.1}})
    with pytest.raises(ValueError, match=r"objectives.nsp has unknown option\(s\) \['z_loss'\]"):
        active_objectives({"nsp": {"weight": 1.0, "z_loss": 0.0}})
    assert set(OBJECTIVES) == {"causal_lm", "mlm", "nsp", "infonce", "seq2seq"}

"""Model tests: independent references (numpy), invariances (causality, packing, caching)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import model_config

from solo.experiments.base import get_config
from solo.model import (
    ModelConfig,
    Transformer,
    attention_core,
    flops_per_token,
    unstack_layers,
)
from solo.model.layers import gelu

V = 32


def make_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=64,
                embed_dim=0, scan_layers=True)
    base.update(kw)
    return model_config(**base)


@functools.cache
def _init_fn(cfg, heads):
    return jax.jit(lambda key, batch: Transformer(cfg).init(key, batch, heads))


@functools.cache
def _apply_fn(cfg, heads, deterministic):
    return jax.jit(lambda p, batch, rngs: Transformer(cfg).apply(
        p, batch, heads, deterministic=deterministic, rngs=rngs))


def init(cfg, batch, heads=("lm",), seed=0):
    return _init_fn(cfg, tuple(heads))(jax.random.key(seed), batch)


def run(cfg, params, batch, heads=("lm",), deterministic=True, rngs=None):
    """Jitted (and cached per config) apply: repeated shapes compile once."""
    return _apply_fn(cfg, tuple(heads), deterministic)(params, batch, rngs)


def rand_tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(10, V, size=shape), jnp.int32)


# Tolerances. float32 rounds each operation by <= eps/2, a reduction of n terms errs by <= n eps
# of the sum of its absolute terms (Higham, Accuracy and Stability of Numerical Algorithms, 4.2),
# and XLA's exp and tanh are within a few ulp (<= 4 eps absolute for tanh's values in [-1, 1]).
F32_EPS = float(np.finfo(np.float32).eps)


def chain_length(cfg, keys):
    """Summed length K of the float32 reductions a logit passes through (their errors add up
    along the chain): per layer the norm, q/k/v and output projections, the second norm and the
    MLP input over d_model (5 D), the scores over the head dim, the softmax and values over the
    `keys`, the MLP output over d_ff (a decoder layer of an encoder-decoder adds its
    cross-attention); then the final norm and the unembedding (2 D)."""
    d, attn = cfg.d_model, 3 * cfg.d_model + cfg.head_dim + 2 * keys
    layer = attn + 2 * d + cfg.d_ff
    k = cfg.num_layers * layer + 2 * d
    if cfg.kind == "encoder_decoder":
        k += cfg.num_decoder_layers * (layer + attn)
    return k


def logits_atol(cfg, keys, scale):
    """Bound on how far two float32 forward passes of one model that differ only in shapes,
    layouts or the grouping of the same sums may put a logit apart: each is within K eps
    (chain_length) of the logits' `scale` from the exact value. A leak (a position, segment or
    padding token that must not be seen) moves logits by a sizeable fraction of their scale."""
    return 2 * chain_length(cfg, keys) * F32_EPS * scale


def attention_atol(q, k, v):
    """Bound on |float32 attention_core - exact| (float64 of the same inputs): a score
    (q / sqrt(K)) . k errs by <= (K + 2) eps sqrt(K) max|q| max|k|; the softmax weights carry
    twice that (the score and the max) plus the exp, the T-key sum and the division ((T + 4)
    eps), relative; the T-term sum of weights times v adds T eps of max|v|."""
    kd, t = q.shape[-1], k.shape[1]
    score = (kd + 2) * np.sqrt(kd) * np.abs(q).max() * np.abs(k).max()
    return F32_EPS * np.abs(v).max() * (2 * score + 2 * t + 4)


# ---------------------------------------------------------------- config


def test_config_from_configdict_resolves_and_validates():
    cd = get_config().model  # every key; experiments/base.py is the one home of defaults
    cd.update(d_model=64, num_heads=8, num_layers=2, d_ff=128, embed_dim=0)
    cfg = ModelConfig.from_config(cd, vocab_size=100)
    assert (cfg.vocab_size, cfg.num_kv_heads, cfg.head_dim, cfg.num_decoder_layers,
            cfg.embed_dim) == (100, 8, 8, 2, 64)
    with pytest.raises(ValueError, match="norm.*rmsnorm"):
        ModelConfig.from_config(cd, vocab_size=100, norm="batchnorm")
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.from_config(cd, vocab_size=100, num_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size is 0"):  # 0 = "the tokenizer's", unresolved
        Transformer(ModelConfig.from_config(cd)).init(jax.random.key(0), {"tokens": jnp.ones(
            (1, 2), jnp.int32)})
    with pytest.raises(ValueError, match="unknown config key model.d_modle.*d_model"):
        ModelConfig.from_config(cd, vocab_size=100, d_modle=3)
    partial = {k: v for k, v in cd.items() if k != "d_ff"}
    with pytest.raises(ValueError, match="config lacks model.d_ff.*experiments/base.py"):
        ModelConfig.from_config(partial, vocab_size=100)


def test_flops_per_token_hand_computed():
    cfg = model_config(vocab_size=10, d_model=4, num_layers=2, num_heads=2, d_ff=8, mlp="gelu")
    # per layer: q,k,v,o 4*16=64, mlp 2*32=64 -> 128; 2 layers 256; output 40 -> N = 296
    assert flops_per_token(cfg, seq_len=5) == 6 * 296 + 12 * 2 * 5 * 4


def test_gelu_value_and_custom_gradient_match_float64_reference():
    """The custom-VJP GELU equals the tanh formula, and its gradient equals the derivative
    by central differences in float64 (an independent check of the hand-written backward)."""
    x = np.linspace(-6, 6, 241).astype(np.float32).astype(np.float64)  # what gelu sees
    c = np.sqrt(2 / np.pi)
    f = lambda z: 0.5 * z * (1 + np.tanh(c * (z + 0.044715 * z**3)))
    # gelu's ~8 float32 roundings, each <= eps/2 of a value <= 6 (an error in tanh's argument
    # reaches the output times 0.5 |x| tanh' < 1), and tanh's own <= 4 eps times 0.5 |x| <= 3
    value_atol = (4 * 0.5 * 6 + 8 * 6 / 2) * F32_EPS
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x, jnp.float32))), f(x),
                               atol=value_atol)
    h = 1e-5  # float64 central differences: truncation ~h^2 |f^(3)| / 6, rounding ~1e-16 / h
    want = (f(x + h) - f(x - h)) / (2 * h)
    dy = np.random.default_rng(0).normal(size=x.shape)
    got = jax.grad(lambda z: jnp.sum(gelu(z) * dy))(jnp.asarray(x, jnp.float32))
    # dy (0.5 (1 + t) + 0.5 x (1 - t^2) C (1 + 3 k x^2)): 1 - t^2 loses 2 x tanh's 4 eps + eps
    # absolute, times m(x) = 0.5 |x| C (1 + 3 k x^2); the other ~10 roundings of values <= m + 1
    m = 0.5 * np.abs(x) * c * (1 + 3 * 0.044715 * x**2)
    # (+ the float64 reference's own error, < 1e-9 with |dy| < 4)
    grad_atol = np.abs(dy) * F32_EPS * (9 * m + 10 * (m + 1) / 2) + 1e-9
    np.testing.assert_array_less(np.abs(np.asarray(got) - want * dy), grad_atol)
    # both are float32 evaluations of the same formula, each within value_atol of it
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x, jnp.float32))),
                               np.asarray(jax.nn.gelu(jnp.asarray(x, jnp.float32))),
                               atol=2 * value_atol)


# ---------------------------------------------------------------- attention core


def test_attention_core_matches_numpy_single_head():
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(1, 3, 1, 2)), rng.normal(size=(1, 3, 1, 2)), rng.normal(
        size=(1, 3, 1, 2))
    # the float64 reference works on the float32 values attention_core gets
    q, k, v = (a.astype(np.float32).astype(np.float64) for a in (q, k, v))
    mask = np.tril(np.ones((3, 3), bool))[None]
    out = np.asarray(attention_core(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)),
                                    jnp.asarray(mask)))
    for t in range(3):  # explicit loops: query t over keys 0..t
        s = np.array([q[0, t, 0] @ k[0, j, 0] / np.sqrt(2) for j in range(t + 1)])
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        np.testing.assert_allclose(out[0, t, 0], (p[:, None] * v[0, : t + 1, 0]).sum(0),
                                   rtol=0, atol=attention_atol(q, k, v))


def test_attention_core_gqa_matches_repeated_kv():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 5, 4, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 6, 2, 3)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 6, 2, 3)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 5, 6)) < 0.7).at[:, :, 0].set(True)
    gqa = attention_core(q, k, v, mask)
    mha = attention_core(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask)
    # two float32 evaluations (other layouts), each within attention_atol of the exact value
    np.testing.assert_allclose(gqa, mha, rtol=0, atol=2 * attention_atol(q, k, v))


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_causality(kind):
    cfg = make_cfg(kind=kind)
    tokens = rand_tokens((1, 8))
    params = init(cfg, dict(tokens=tokens))
    a = run(cfg, params, dict(tokens=tokens))["logits"]
    b = run(cfg, params, dict(tokens=tokens.at[:, 5:].set(3)))["logits"]
    if kind == "decoder":
        # bit-identical: the same compiled program, and the changed tokens reach positions < 5
        # only through attention weights that are exactly 0 (an additive -1e30 bias)
        np.testing.assert_array_equal(a[:, :5], b[:, :5])
    else:  # more than rounding could explain
        tol = logits_atol(cfg, 8, float(jnp.abs(a).max()))
        assert np.abs(np.asarray(a[:, :5] - b[:, :5])).max() > tol


@pytest.mark.parametrize("kind,positions", [("decoder", "rope"), ("encoder", "learned"),
                                            ("decoder", "learned")])
def test_packed_segments_do_not_leak(kind, positions):
    cfg = make_cfg(kind=kind, positions=positions)
    t = rand_tokens((1, 8))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0]], jnp.int32)
    pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0]], jnp.int32)
    params = init(cfg, dict(tokens=t))
    packed = run(cfg, params, dict(tokens=t, segment_ids=seg, positions=pos))["logits"]
    alone = run(cfg, params, dict(tokens=t[:, 3:7]))["logits"]
    np.testing.assert_allclose(packed[:, 3:7], alone, rtol=0,
                               atol=logits_atol(cfg, 8, float(jnp.abs(alone).max())))
    # changing segment 1 or the padding token does not change segment 2: bit-identical (the
    # same program; they reach segment 2 only through attention weights that are exactly 0)
    t2 = t.at[:, :3].set(4).at[:, 7].set(5)
    other = run(cfg, params, dict(tokens=t2, segment_ids=seg, positions=pos))["logits"]
    np.testing.assert_array_equal(other[:, 3:7], packed[:, 3:7])


def test_encoder_decoder_cross_mask_ignores_src_padding():
    cfg = make_cfg(kind="encoder_decoder", num_decoder_layers=1)
    src = rand_tokens((1, 6), seed=1)
    src_seg = jnp.asarray([[1, 1, 1, 1, 0, 0]], jnp.int32)
    tgt = rand_tokens((1, 5), seed=2)
    params = init(cfg, dict(tokens=tgt, src_tokens=src))
    a = run(cfg, params, dict(tokens=tgt, src_tokens=src, src_segment_ids=src_seg))["logits"]
    b = run(cfg, params, dict(tokens=tgt, src_tokens=src.at[:, 4:].set(7),
                              src_segment_ids=src_seg))["logits"]
    c = run(cfg, params, dict(tokens=tgt, src_tokens=src[:, :4]))["logits"]
    # bit-identical: the same program, and padded source tokens get cross-attention weights
    # that are exactly 0; without the padding, other shapes (logits_atol)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=0, atol=logits_atol(cfg, 6, float(jnp.abs(a).max())))


# ---------------------------------------------------------------- KV cache


# ---------------------------------------------------------------- layer stacking / remat


def _stack_loop_params(params, n):
    """Loop-layout params {'layers_i': p_i} -> scan layout {'layers': stacked}."""
    def convert(tree):
        if not isinstance(tree, dict):
            return tree
        if "layers_0" in tree:
            rest = {k: convert(v) for k, v in tree.items() if not k.startswith("layers_")}
            layers = [tree[f"layers_{i}"] for i in range(n)]
            rest["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
            return rest
        return {k: convert(v) for k, v in tree.items()}
    return convert(params)


@pytest.mark.parametrize("kind", ["decoder", "encoder_decoder"])
def test_scan_equals_loop(kind):
    loop_cfg = make_cfg(kind=kind, scan_layers=False)
    scan_cfg = make_cfg(kind=kind, scan_layers=True)
    batch = dict(tokens=rand_tokens((2, 6)), src_tokens=rand_tokens((2, 5), seed=1))
    loop_params = nn.unbox(init(loop_cfg, batch))
    scan_params = _stack_loop_params(loop_params, 2)
    expect = jax.tree.map(jnp.shape, nn.unbox(init(scan_cfg, batch)))
    assert jax.tree.map(jnp.shape, scan_params) == expect
    ref = run(loop_cfg, loop_params, batch)["logits"]
    np.testing.assert_allclose(ref, run(scan_cfg, scan_params, batch)["logits"], rtol=0,
                               atol=logits_atol(loop_cfg, 6, float(jnp.abs(ref).max())))
    # unstack_layers (what decoding runs) is the exact inverse of the stacking
    unrolled_cfg, unrolled = unstack_layers(scan_cfg, scan_params)
    assert unrolled_cfg == loop_cfg
    jax.tree.map(np.testing.assert_array_equal, unrolled, loop_params)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_values_and_grads(remat):
    base, rem = make_cfg(dropout=0.1), make_cfg(dropout=0.1, remat=remat)
    batch = dict(tokens=rand_tokens((2, 6)))
    params = init(base, batch)

    def loss(p, cfg):
        out = Transformer(cfg).apply(p, batch, deterministic=False,
                                     rngs={"dropout": jax.random.key(7)})
        return jnp.mean(out["logits"] ** 2)

    vg = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (la, ga), (lb, gb) = (vg(params, c) for c in (base, rem))
    # The same forward, recomputed. The logits l differ by <= d = logits_atol, so mean(l^2)
    # by <= 2 d mean|l|, and its n-term sum adds n eps on each side. The backward runs the
    # forward chain again plus the weight gradients' sums over the 12 tokens: 2 K + 12 eps
    # of the largest gradient, on each side.
    logits = np.abs(np.asarray(Transformer(base).apply(
        params, batch, deterministic=False, rngs={"dropout": jax.random.key(7)})["logits"]))
    d = logits_atol(base, 6, float(logits.max()))
    np.testing.assert_allclose(la, lb, rtol=2 * logits.size * F32_EPS,
                               atol=2 * d * float(logits.mean()))
    g_max = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ga))
    g_atol = 2 * (2 * chain_length(base, 6) + 12) * F32_EPS * g_max
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=g_atol), ga, gb)


def test_dropout_only_when_not_deterministic():
    cfg = make_cfg(dropout=0.5)
    batch = dict(tokens=rand_tokens((1, 6)))
    params = init(cfg, batch)
    a = run(cfg, params, batch)["logits"]
    np.testing.assert_array_equal(a, run(cfg, params, batch)["logits"])
    b = run(cfg, params, batch, deterministic=False, rngs={"dropout": jax.random.key(1)})
    # more than rounding could explain
    assert np.abs(np.asarray(a - b["logits"])).max() > logits_atol(cfg, 6, float(
        jnp.abs(a).max()))


# ---------------------------------------------------------------- variants


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa_cfg, mha_cfg = make_cfg(num_kv_heads=2), make_cfg(num_kv_heads=4)
    batch = dict(tokens=rand_tokens((2, 6)))
    gqa = nn.unbox(init(gqa_cfg, batch))

    def rep(path, x):  # k/v kernels [layers, D, G, K]: kv head g serves query heads 2g, 2g+1
        return jnp.repeat(x, 2, axis=2) if path[-1].key in ("k", "v") else x

    mha = jax.tree_util.tree_map_with_path(rep, gqa)
    assert jax.tree.map(jnp.shape, mha) == jax.tree.map(jnp.shape,
                                                        nn.unbox(init(mha_cfg, batch)))
    ref = run(mha_cfg, mha, batch)["logits"]
    np.testing.assert_allclose(run(gqa_cfg, gqa, batch)["logits"], ref, rtol=0,
                               atol=logits_atol(mha_cfg, 6, float(jnp.abs(ref).max())))
    # num_kv_heads == num_heads is exactly the default MHA
    assert make_cfg(num_kv_heads=4) == make_cfg()


def test_bfloat16_compute_keeps_logits_float32():
    cfg = make_cfg(dtype="bfloat16", tie_embeddings=False)
    batch = dict(tokens=rand_tokens((2, 6)))
    params = init(cfg, batch, heads=("lm", "embed"))
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(params))} == {jnp.dtype(jnp.float32)}
    out = run(cfg, params, batch, heads=("lm", "embed"))
    assert out["logits"].dtype == jnp.float32 and out["hidden"].dtype == jnp.bfloat16
    ref = run(make_cfg(tie_embeddings=False), params, batch)["logits"]
    # bfloat16 rounds by <= u = 2^-9 relative: a logit passes through R such roundings (the
    # embedding, per layer 12 activations - norm, q/k/v, attention weights and output,
    # projection, residual, norm, MLP input, activation, output, residual - and 6 weight casts,
    # the final norm and the unembedding's weights), which add up to R u of the logits' scale
    rounds = 3 + 18 * cfg.num_layers
    np.testing.assert_allclose(out["logits"], ref, rtol=0,
                               atol=rounds * 2.0**-9 * float(jnp.abs(ref).max()))


def test_heads_shapes_dtypes_and_pooling():
    cfg = make_cfg(kind="encoder", type_vocab_size=2, embed_dim=16)
    seg = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    tokens = rand_tokens((2, 6))
    batch = dict(tokens=tokens, segment_ids=seg, token_types=jnp.zeros((2, 6), jnp.int32))
    heads = ("lm", "mlm", "nsp", "embed")
    params = init(cfg, batch, heads)
    out = run(cfg, params, batch, heads)
    shapes = {k: (v.shape, v.dtype) for k, v in out.items()}
    assert shapes == {"hidden": ((2, 6, 32), jnp.float32), "logits": ((2, 6, V), jnp.float32),
                      "mlm_logits": ((2, 6, V), jnp.float32), "nsp_logits": ((2, 2), jnp.float32),
                      "embedding": ((2, 16), jnp.float32), "logit_scale": ((), jnp.float32)}
    # e rsqrt(sum e^2) and the float32 norm: two E-term sums of squares, rsqrt, sqrt, a product
    np.testing.assert_allclose(jnp.linalg.norm(out["embedding"], axis=-1), 1.0,
                               rtol=(cfg.embed_dim + 5) * F32_EPS)
    # a constant initialiser: log(20) rounded to float32 once
    np.testing.assert_allclose(out["logit_scale"], np.log(20.0), rtol=F32_EPS / 2)
    # padded tokens do not change the mean-pooled embedding of row 0: bit-identical (the same
    # program; they enter with pooling and attention weights that are exactly 0)
    other = run(cfg, params, dict(batch, tokens=tokens.at[0, 4:].set(9)), heads)
    np.testing.assert_array_equal(other["embedding"][0], out["embedding"][0])
    # token types matter: more than rounding could explain
    tt = run(cfg, params, dict(batch, token_types=jnp.ones((2, 6), jnp.int32)), heads)
    assert np.abs(np.asarray(tt["hidden"] - out["hidden"])).max() > logits_atol(
        cfg, 6, float(jnp.abs(out["hidden"]).max()))
    with pytest.raises(ValueError, match="bogus"):
        run(cfg, params, batch, ("bogus",))

"""Decoding: the model's cached decode against its full forward pass, for every pair of model
options (left-padded batches, token types, scanned layers unrolled once)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import V, init, logits_atol, make_cfg, rand_tokens, run

from solo.model import Transformer, init_cache, unstack_layers

# Every model option decoding could get wrong. `_pairwise` picks few option sets such that every
# pair of values of two options appears together in at least one of them.
DECODE_OPTIONS = dict(kind=["decoder", "encoder_decoder"], positions=["rope", "learned"],
                      norm=["rmsnorm", "layernorm"], mlp=["swiglu", "gelu", "gelu_exact"],
                      tie_embeddings=[True, False], num_kv_heads=[4, 2, 1],
                      type_vocab_size=[0, 2], scan_layers=[False, True], head_dim=[0, 12],
                      attn_bias=[False, True], mlp_bias=[False, True],
                      norm_position=["pre", "post"], embed_norm=[False, True],
                      embed_scale=[False, True])


def _pairwise(options: dict) -> list[dict]:
    """Greedy pairwise covering array (deterministic): each round starts from the first
    uncovered pair and fills every other option with the value covering most uncovered pairs."""
    keys = list(options)
    todo = {(a, va, b, vb) for i, a in enumerate(keys) for b in keys[i + 1:]
            for va in options[a] for vb in options[b]}
    rows = []
    while todo:
        a, va, b, vb = min(todo, key=lambda p: (keys.index(p[0]), keys.index(p[2]), str(p)))
        row = {a: va, b: vb}
        for k in keys:
            if k not in row:
                row[k] = max(options[k], key=lambda v, k=k: sum(
                    (x, row[x], k, v) in todo or (k, v, x, row[x]) in todo for x in row))
        todo -= {(x, row[x], y, row[y]) for i, x in enumerate(keys) for y in keys[i + 1:]}
        rows.append(row)
    return rows


DECODE_VARIANTS = _pairwise(DECODE_OPTIONS)


def jittered(params, scale=0.1):
    """Params plus noise, so that biases and norm parameters (initialised to 0 and 1) matter."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(42), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys, strict=True)])


def test_the_pairwise_variants_cover_every_pair():
    assert 6 <= len(DECODE_VARIANTS) <= 16
    keys = list(DECODE_OPTIONS)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            seen = {(r[a], r[b]) for r in DECODE_VARIANTS}
            assert seen == {(x, y) for x in DECODE_OPTIONS[a] for y in DECODE_OPTIONS[b]}


@pytest.mark.parametrize("kw", DECODE_VARIANTS, ids=lambda kw: ",".join(
    f"{k}={v}" for k, v in kw.items() if v != DECODE_OPTIONS[k][0]) or "default")
def test_decode_equals_full_recompute_for_every_option_pair(kw):
    """Left-padded batched prefill, then cached steps, against the full forward pass of each row
    alone (token types included): two float32 computations of the same function with other
    reduction orders, so they agree within logits_atol (the summed reduction lengths)."""
    cfg = make_cfg(num_layers=2, **kw)
    rng = np.random.default_rng(0)
    lens, new = [5, 2], 3
    seqs = [rng.integers(10, V, size=n + new) for n in lens]
    types = [rng.integers(0, 2, size=n + new) * (cfg.type_vocab_size > 0) for n in lens]
    src = rand_tokens((2, 6), seed=1)
    src_seg = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], jnp.int32)
    width = max(lens)
    pad = lambda rows, n: jnp.asarray([[0] * (width - n_) + list(r[:n_]) for r, n_ in
                                       zip(rows, lens, strict=True)], jnp.int32)
    full_batch = dict(tokens=jnp.asarray([s for s in seqs[:1]], jnp.int32), src_tokens=src[:1])
    params = jittered(init(cfg, full_batch))
    dec_cfg, dec_params = unstack_layers(cfg, params["params"])  # decode runs unrolled layers
    model, dec_params = Transformer(dec_cfg), {"params": dec_params}
    enc = {}
    if cfg.kind == "encoder_decoder":
        enc = dict(encoded=model.apply(dec_params, dict(src_tokens=src, src_segment_ids=src_seg),
                                       method=Transformer.encode), src_segment_ids=src_seg)
    cache = init_cache(cfg, 2, width + new, offset_B=[width - n for n in lens])
    step = jax.jit(lambda p, tok, typ, c, e: model.apply(p, tok, c, token_types_BT=typ,
                                                         method=Transformer.decode, **e))
    logits, cache = step(dec_params, pad(seqs, None), pad(types, None), cache, enc)
    got = [[logits[b, width - n:]] for b, n in enumerate(lens)]
    for t in range(new):
        tok = jnp.asarray([[s[n + t]] for s, n in zip(seqs, lens, strict=True)], jnp.int32)
        typ = jnp.asarray([[ty[n + t]] for ty, n in zip(types, lens, strict=True)], jnp.int32)
        logits, cache = step(dec_params, tok, typ, cache, enc)
        for b in range(2):
            got[b].append(logits[b])
    assert int(cache.slot) == width + new
    for b in range(2):
        batch = dict(tokens=jnp.asarray(seqs[b][None], jnp.int32),
                     token_types=jnp.asarray(types[b][None], jnp.int32),
                     src_tokens=src[b:b + 1], src_segment_ids=src_seg[b:b + 1])
        ref = run(cfg, params, batch)["logits"][0]
        atol = logits_atol(cfg, width + new, float(jnp.abs(ref).max()))
        np.testing.assert_allclose(jnp.concatenate(got[b]), ref, rtol=0, atol=atol,
                                   err_msg=f"row {b}")


def test_decode_without_token_types_is_the_forward_without_them():
    """A model with token-type embeddings decodes with type 0, as its forward pass without
    token_types does (the removed fast path silently dropped the embedding)."""
    cfg = make_cfg(type_vocab_size=2, scan_layers=False)
    tokens = rand_tokens((1, 6))
    params = init(cfg, dict(tokens=tokens))
    ref = run(cfg, params, dict(tokens=tokens))["logits"]
    logits, _ = Transformer(cfg).apply(params, tokens, init_cache(cfg, 1, 6),
                                       method=Transformer.decode)
    np.testing.assert_allclose(logits, ref, rtol=0,
                               atol=logits_atol(cfg, 6, float(jnp.abs(ref).max())))

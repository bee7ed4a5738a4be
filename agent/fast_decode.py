"""Decoder-only forward pass specialised for sampling on XLA:CPU (the Sampler's fast path).

Same function as `Transformer.decode` for kind='decoder' (tests compare logits), with a cache
layout chosen for XLA:CPU instead of the contract's training-friendly one:
- per-layer k [B*G,S,K] and v [B*G,K,S] arrays in a tuple, not one stacked [layers,B,S,G,K]:
  the model's nn.scan over layers copies the whole stacked cache every step (xs -> ys), and
  XLA:CPU's batched matvecs want (B,G) leading and the other operand's contracted dim minor
  (q.k over K, p.v over S), otherwise the cache is transposed (copied) per layer per step;
- prompts are *left*-padded so every row writes the same slot each step: one in-place
  dynamic_update_slice instead of a per-row scatter; row b's positions start at its first real
  slot (offset_b), and slots before offset_b are masked out;
- per-layer weights are split once on the host (no per-step slicing of stacked params).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from solo.model import layers
from solo.model.config import ModelConfig

F32 = jnp.float32


def supports(cfg: ModelConfig) -> bool:
    return cfg.kind == "decoder"


def prepare_params(params, cfg: ModelConfig) -> dict:
    """Model params ('params' tree, scanned or not) -> {embed, layers: tuple, final_norm, head}."""
    params = nn.meta.unbox(params)
    params = params.get("params", params)
    dec = params["decoder"]
    if "layers" in dec:  # scanned: leading layer axis
        layers = tuple(jax.tree.map(lambda x, i=i: x[i], dec["layers"])
                       for i in range(cfg.num_layers))
    else:
        layers = tuple(dec[f"layers_{i}"] for i in range(cfg.num_layers))
    # one [D, (H+2G)*K] matmul for q, k, v instead of three (fewer ops per decode step)
    d = cfg.d_model
    fuse = lambda a: jnp.concatenate([a["q"].reshape(d, -1), a["k"].reshape(d, -1),
                                      a["v"].reshape(d, -1)], axis=1)
    # matmul weights are stored in the compute dtype once, as every step would cast them to it
    # anyway (bfloat16 models: half the bytes streamed per step, no per-step f32 -> bf16 pass)
    dt = jnp.dtype(cfg.dtype)
    layers = tuple(dict(p, attn=dict(qkv=fuse(p["attn"]).astype(dt), o=p["attn"]["o"].astype(dt)),
                        mlp=jax.tree.map(lambda w: w.astype(dt), p["mlp"])) for p in layers)
    emb = params["embedder"]
    head = emb["token"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
    return dict(token=emb["token"], position=emb.get("position"), layers=layers,
                final_norm=dec["final_norm"], head=head.astype(dt))


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=F32) -> tuple:
    """Per layer (k [B*G,S,K], v [B*G,K,S]): what XLA:CPU's batched matvecs (T=1) want, so
    neither attention matmul transposes (copies) the cache; one merged batch axis N=B*G avoids
    a bitcast between the in-place update and the dot (which made XLA duplicate the update and
    copy the cache)."""
    n, k = batch * cfg.num_kv_heads, cfg.head_dim
    return tuple((jnp.zeros((n, slots, k), dtype), jnp.zeros((n, k, slots), dtype))
                 for _ in range(cfg.num_layers))


def grow(cache: tuple, slots: int) -> tuple:
    """Pads every layer's cache to `slots` slots (the new slots are empty and masked).

    The sampler starts with a cache just large enough for the prompt plus a segment of steps and
    grows it between segments: attention reads (and XLA:CPU's batched matvecs stream) only the
    allocated slots, not the whole budget. A slice of a larger cache is no substitute: the dot
    would copy it every step (measured 14 vs 8 ms/step at batch 8)."""
    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, slots - x.shape[axis])
        return jnp.pad(x, widths)
    return tuple((pad(ck, 1), pad(cv, 2)) for ck, cv in cache)


def _norm(cfg, p, x):
    return layers.norm(x, p["scale"], p.get("bias") if cfg.norm == "layernorm" else None,
                       cfg.dtype)


def forward(fp: dict, cfg: ModelConfig, tokens_BT, positions_BT, cache: tuple, slot,
            offset_B, last_only: bool = False) -> tuple[jax.Array, tuple]:
    """Runs T new tokens written at cache slots [slot, slot+T) for every row; token t of row b
    attends to slots offset_b..slot+t. Returns float32 logits [B,T,V] (T=1 with last_only)
    and the new cache."""
    dt = jnp.dtype(cfg.dtype)
    b, t = tokens_BT.shape
    h, g, k = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = jnp.take(fp["token"], tokens_BT, axis=0)
    if cfg.positions == "learned":
        x = x + jnp.take(fp["position"], positions_BT, axis=0)
    x = x.astype(dt)
    s = cache[0][0].shape[1]
    r = h // g
    slots_S = jnp.arange(s)
    q_slot_T = slot + jnp.arange(t)
    mask_BTS = ((slots_S[None, None, :] <= q_slot_T[None, :, None])
                & (slots_S[None, None, :] >= offset_B[:, None, None]))
    # rows n = (b, g) of the merged batch axis; queries (r, t) of each kv head
    mask_NQS = jnp.broadcast_to(mask_BTS[:, None, None], (b, g, r, t, s)).reshape(b * g, r * t, s)
    new_cache = []
    for p, (ck, cv) in zip(fp["layers"], cache, strict=True):
        a = p["attn"]
        y = _norm(cfg, p["attn_norm"], x)
        qkv = y @ a["qkv"].astype(dt)
        q = qkv[..., : h * k].reshape(b, t, h, k)
        kk = qkv[..., h * k: (h + g) * k].reshape(b, t, g, k)
        vv = qkv[..., (h + g) * k:].reshape(b, t, g, k)
        if cfg.positions == "rope":
            q = layers.apply_rope(q, positions_BT, cfg.rope_theta)
            kk = layers.apply_rope(kk, positions_BT, cfg.rope_theta)
        k_NTK = kk.transpose(0, 2, 1, 3).reshape(b * g, t, k)
        v_NKT = vv.transpose(0, 2, 3, 1).reshape(b * g, k, t)
        ck = lax.dynamic_update_slice(ck, k_NTK.astype(ck.dtype), (0, slot, 0))
        cv = lax.dynamic_update_slice(cv, v_NKT.astype(cv.dtype), (0, 0, slot))
        new_cache.append((ck, cv))
        q_NQK = q.reshape(b, t, g, r, k).transpose(0, 2, 3, 1, 4).reshape(b * g, r * t, k)
        sc = jnp.einsum("NQK,NSK->NQS", q_NQK, ck.astype(dt), preferred_element_type=F32)
        sc = jnp.where(mask_NQS, sc * (k ** -0.5), -1e30)
        pr = jax.nn.softmax(sc, axis=-1).astype(dt)
        o_NQK = jnp.einsum("NQS,NKS->NQK", pr, cv.astype(dt))
        o = o_NQK.reshape(b, g, r, t, k).transpose(0, 3, 1, 2, 4).reshape(b, t, h, k)
        x = x + jnp.einsum("BTHK,HKD->BTD", o, a["o"].astype(dt))
        y = _norm(cfg, p["mlp_norm"], x)
        m = p["mlp"]
        if cfg.mlp == "swiglu":
            hid = nn.silu(y @ m["wi_0"].astype(dt)) * (y @ m["wi_1"].astype(dt))
        else:
            hid = layers.gelu(y @ m["wi"].astype(dt))
        x = x + hid @ m["wo"].astype(dt)
    if last_only:
        x = x[:, -1:]
    x = _norm(cfg, fp["final_norm"], x)
    logits = jnp.einsum("BTD,DV->BTV", x, fp["head"].astype(dt), preferred_element_type=F32)
    return logits, tuple(new_cache)

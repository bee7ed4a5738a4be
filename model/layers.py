"""Building blocks: logically-partitioned params, norms, embeddings, RoPE, MLP, attention.

Shapes: B batch, L length, S key/cache length, D model, H heads, G kv heads, K head width, F MLP.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from model.config import ModelConfig

F32 = jnp.float32
_NEG_INF = -1e30  # finite: fully-masked rows (padding queries) stay NaN-free


def param(mod: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str | None],
          cfg: ModelConfig) -> jax.Array:
    """A param in cfg.param_dtype annotated with logical axis names (see model.sharding)."""
    return mod.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                     jnp.dtype(cfg.param_dtype))


def fan_in_init(in_axis, out_axis):
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)


class Norm(nn.Module):
    """RMSNorm or LayerNorm (cfg.norm), computed in float32, returned in the compute dtype."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = x_BLD.astype(F32)
        if cfg.norm == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        x = x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
        x = x * param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), cfg)
        if cfg.norm == "layernorm":
            x = x + param(self, "bias", nn.initializers.zeros, (x.shape[-1],), ("embed",), cfg)
        return x.astype(cfg.dtype)


class Dense(nn.Module):
    """y = x @ W (+ b) over the last axis, W [in, out] with given logical axes."""

    cfg: ModelConfig
    features: int
    axes: tuple[str | None, str | None] = ("embed", "embed")
    use_bias: bool = True
    out_dtype: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        w = param(self, "kernel", fan_in_init(0, 1), (x.shape[-1], self.features), self.axes, cfg)
        dt = jnp.dtype(self.out_dtype or cfg.dtype)
        y = jnp.einsum("...d,df->...f", x.astype(cfg.dtype), w.astype(cfg.dtype),
                       preferred_element_type=dt)
        if self.use_bias:
            y = y + param(self, "bias", nn.initializers.zeros, (self.features,), self.axes[1:], cfg)
        return y.astype(dt)


class Embedder(nn.Module):
    """Token (+ learned position) (+ token type) embeddings; `attend` is the tied output layer."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        emb_init = nn.initializers.normal(0.02)
        self.token = param(self, "token", emb_init, (cfg.vocab_size, cfg.d_model),
                           ("vocab", "embed"), cfg)
        if cfg.positions == "learned":
            self.position = param(self, "position", emb_init, (cfg.max_len, cfg.d_model),
                                  (None, "embed"), cfg)
        if cfg.type_vocab_size > 0:
            self.token_type = param(self, "token_type", emb_init,
                                    (cfg.type_vocab_size, cfg.d_model), (None, "embed"), cfg)

    def __call__(self, tokens_BL, positions_BL, token_types_BL=None) -> jax.Array:
        cfg = self.cfg
        x_BLD = jnp.take(self.token, tokens_BL, axis=0)
        if cfg.positions == "learned":  # out-of-range positions give NaN (jnp.take fill mode)
            x_BLD = x_BLD + jnp.take(self.position, positions_BL, axis=0)
        if cfg.type_vocab_size > 0:
            if token_types_BL is None:
                token_types_BL = jnp.zeros_like(tokens_BL)
            x_BLD = x_BLD + jnp.take(self.token_type, token_types_BL, axis=0)
        return x_BLD.astype(cfg.dtype)

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        """Tied output projection: float32 logits [B,L,V]."""
        dt = self.cfg.dtype
        return jnp.einsum("BLD,VD->BLV", x_BLD.astype(dt), self.token.astype(dt),
                          preferred_element_type=F32)


def apply_rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    """Rotary embeddings (rotate-half convention), computed in float32."""
    half = x_BLHK.shape[-1] // 2
    freq_k = theta ** (-jnp.arange(half, dtype=F32) / half)
    angle_BLk = positions_BL.astype(F32)[..., None] * freq_k
    sin, cos = jnp.sin(angle_BLk)[:, :, None, :], jnp.cos(angle_BLk)[:, :, None, :]
    x1, x2 = jnp.split(x_BLHK.astype(F32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHK.dtype)


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt, d, f = cfg.dtype, cfg.d_model, cfg.d_ff
        init = fan_in_init(0, 1)
        x = x_BLD.astype(dt)
        wi = lambda name: param(self, name, init, (d, f), ("embed", "mlp"), cfg).astype(dt)
        if cfg.mlp == "swiglu":
            h_BLF = nn.silu(x @ wi("wi_0")) * (x @ wi("wi_1"))
        else:
            h_BLF = nn.gelu(x @ wi("wi"))
        wo = param(self, "wo", init, (f, d), ("mlp", "embed"), cfg).astype(dt)
        return h_BLF @ wo


def attention_core(q_BLHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array,
                   mask_BLS: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(K) masked) v with GQA (query head h uses kv head h // (H/G)).

    mask_BLS is boolean (True = may attend). Scores and softmax are float32; fully-masked rows
    (padding queries) get a uniform average, finite. Returns [B,L,H,K] in q's dtype.
    """
    b, n, h, k = q_BLHK.shape
    g = k_BSGK.shape[2]
    q_BLGRK = q_BLHK.reshape(b, n, g, h // g, k)
    s_BGRLS = jnp.einsum("BLGRK,BSGK->BGRLS", q_BLGRK, k_BSGK.astype(q_BLHK.dtype),
                         preferred_element_type=F32) * (k ** -0.5)
    s_BGRLS = jnp.where(mask_BLS[:, None, None, :, :], s_BGRLS, _NEG_INF)
    p_BGRLS = jax.nn.softmax(s_BGRLS, axis=-1).astype(q_BLHK.dtype)
    out_BLGRK = jnp.einsum("BGRLS,BSGK->BLGRK", p_BGRLS, v_BSGK.astype(q_BLHK.dtype))
    return out_BLGRK.reshape(b, n, h, k)


def _write_rows(cache_BSGK: jax.Array, new_BTGK: jax.Array, end_B: jax.Array) -> jax.Array:
    """Writes new_BTGK[b] into cache slots end[b]..end[b]+T-1 (caller ensures it fits)."""
    write = lambda c, n, e: lax.dynamic_update_slice(c, n.astype(c.dtype), (e, 0, 0))
    return jax.vmap(write)(cache_BSGK, new_BTGK, end_B)


class Attention(nn.Module):
    """Multi-head / grouped-query attention; self-attention (optionally cached) or cross."""

    cfg: ModelConfig
    rope: bool = True

    @nn.compact
    def __call__(self, x_BLD, kv_BSD, mask_BLS, positions_BL=None, cache=None, end_B=None):
        """cache: (k_BSGK, v_BSGK) of this layer or None; returns (out_BLD, new cache or None)."""
        cfg = self.cfg
        dt, d, h, g, k = cfg.dtype, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        proj_in = fan_in_init(0, (1, 2))
        wq = param(self, "q", proj_in, (d, h, k), ("embed", "heads", "kv"), cfg).astype(dt)
        wk = param(self, "k", proj_in, (d, g, k), ("embed", "heads", "kv"), cfg).astype(dt)
        wv = param(self, "v", proj_in, (d, g, k), ("embed", "heads", "kv"), cfg).astype(dt)
        wo = param(self, "o", fan_in_init((0, 1), 2), (h, k, d), ("heads", "kv", "embed"),
                   cfg).astype(dt)
        x_BLD, kv_BSD = x_BLD.astype(dt), kv_BSD.astype(dt)
        q_BLHK = jnp.einsum("BLD,DHK->BLHK", x_BLD, wq)
        k_BSGK = jnp.einsum("BSD,DGK->BSGK", kv_BSD, wk)
        v_BSGK = jnp.einsum("BSD,DGK->BSGK", kv_BSD, wv)
        if self.rope and cfg.positions == "rope":  # self-attention only: kv positions == q's
            q_BLHK = apply_rope(q_BLHK, positions_BL, cfg.rope_theta)
            k_BSGK = apply_rope(k_BSGK, positions_BL, cfg.rope_theta)
        if cache is not None:  # decode: write this step's k/v, attend over all cache slots
            k_BSGK = _write_rows(cache[0], k_BSGK, end_B)
            v_BSGK = _write_rows(cache[1], v_BSGK, end_B)
            cache = (k_BSGK, v_BSGK)
        out_BLHK = attention_core(q_BLHK, k_BSGK, v_BSGK, mask_BLS)
        return jnp.einsum("BLHK,HKD->BLD", out_BLHK, wo), cache


class Block(nn.Module):
    """Pre-norm block: self-attention [+ cross-attention] + MLP, each with residual dropout.

    ctx (broadcast over layers): mask [B,L,S] bool, positions [B,L], end [B] or None (decode),
    encoded [B,Ls,D] or None, cross_mask [B,L,Ls] or None.
    """

    cfg: ModelConfig
    cross: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD, cache, ctx):
        cfg = self.cfg
        drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
        h_BLD = Norm(cfg, name="attn_norm")(x_BLD)
        h_BLD, cache = Attention(cfg, name="attn")(h_BLD, h_BLD, ctx["mask"], ctx["positions"],
                                                   cache, ctx["end"])
        x_BLD = x_BLD + drop(h_BLD)
        if self.cross:
            h_BLD = Norm(cfg, name="cross_norm")(x_BLD)
            h_BLD, _ = Attention(cfg, rope=False, name="cross_attn")(
                h_BLD, ctx["encoded"], ctx["cross_mask"])
            x_BLD = x_BLD + drop(h_BLD)
        h_BLD = Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x_BLD))
        return x_BLD + drop(h_BLD), cache

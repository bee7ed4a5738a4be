"""Building blocks: logically-partitioned params, norms, embeddings, RoPE, MLP, attention.

Shapes: B batch, L length, S key/cache length, D model, H heads, G kv heads, K head width, F MLP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from solo.model import attention as attention_lib
from solo.model.config import ModelConfig
from solo.model.kvcache import LayerCache
from solo.model.sharding import constrain

F32 = jnp.float32
_NEG_INF = -1e30  # finite: fully-masked rows (padding queries) stay NaN-free
RESIDUAL = ("act_batch", "act_len", "act_embed")  # [B,L,D] activations' logical axes


def param(mod: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str | None],
          cfg: ModelConfig) -> jax.Array:
    """A param in cfg.param_dtype annotated with logical axis names (see model.sharding)."""
    return mod.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                     jnp.dtype(cfg.param_dtype))


def matmul(x: jax.Array, w_IO: jax.Array, dtype=None) -> jax.Array:
    """x [..., I] @ w [I, O] as ONE 2-D GEMM (leading axes flattened).

    Why not einsum on [B,L,I]: XLA:CPU then canonicalises the weight gradient into a GEMM with
    *both* operands transposed (dY materialised as [O, B*L]), which its Eigen path runs far below
    peak; on 2-D operands it is X^T dY (contracting dim 0 of both), which runs at full speed
    (README, "Throughput and MFU").
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w_IO, preferred_element_type=dtype)
    return y.reshape(*x.shape[:-1], w_IO.shape[-1])


def fan_in_init(in_axis, out_axis):
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)


def norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, dtype,
         eps: float = 1e-6) -> jax.Array:
    """LayerNorm (with bias) or RMSNorm (bias None) over the last axis, computed in float32,
    returned in `dtype`."""
    x = x.astype(F32)
    if bias is not None:
        x = x - x.mean(-1, keepdims=True)
    x = x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale
    return (x if bias is None else x + bias).astype(dtype)


class Norm(nn.Module):
    """RMSNorm or LayerNorm (cfg.norm) with learned scale (and bias); see `norm`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        cfg = self.cfg
        d = x_BLD.shape[-1]
        scale = param(self, "scale", nn.initializers.ones, (d,), ("embed",), cfg)
        bias = (param(self, "bias", nn.initializers.zeros, (d,), ("embed",), cfg)
                if cfg.norm == "layernorm" else None)
        return norm(x_BLD, scale, bias, cfg.dtype, cfg.norm_eps)


class Dense(nn.Module):
    """y = x @ W (+ b) over the last axis, W [in, out] with given logical axes."""

    cfg: ModelConfig
    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")  # distinct names: shardable
    use_bias: bool = True
    out_dtype: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        w = param(self, "kernel", fan_in_init(0, 1), (x.shape[-1], self.features), self.axes, cfg)
        dt = jnp.dtype(self.out_dtype or cfg.dtype)
        y = matmul(x.astype(cfg.dtype), w.astype(cfg.dtype), dt)
        if self.use_bias:
            y = y + param(self, "bias", nn.initializers.zeros, (self.features,), self.axes[1:], cfg)
        return y.astype(dt)


class Embedder(nn.Module):
    """Token (+ learned position) (+ token type) embeddings; `attend` is the tied output layer."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        emb_init = nn.initializers.normal(0.02)
        self.token = param(self, "token", emb_init, (cfg.padded_vocab, cfg.d_model),
                           ("vocab", "embed"), cfg)
        if cfg.positions == "learned":
            self.position = param(self, "position", emb_init, (cfg.max_len, cfg.d_model),
                                  (None, "embed"), cfg)
        if cfg.type_vocab_size > 0:
            self.token_type = param(self, "token_type", emb_init,
                                    (cfg.type_vocab_size, cfg.d_model), (None, "embed"), cfg)

    def __call__(self, tokens_BL, positions_BL, token_types_BL=None) -> jax.Array:
        cfg = self.cfg
        # the table gathered over fsdp first (as FSDP does for any weight): a lookup into a
        # D-sharded table would come out D-sharded, and resharding that to batch-sharded rows
        # is what XLA calls an involuntary full rematerialization
        table_VD = constrain(self.token, ("act_vocab", "act_embed"))
        x_BLD = jnp.take(table_VD, tokens_BL, axis=0)
        if cfg.positions == "learned":  # out-of-range positions give NaN (jnp.take fill mode)
            x_BLD = x_BLD + jnp.take(self.position, positions_BL, axis=0)
        if cfg.type_vocab_size > 0:
            if token_types_BL is None:
                token_types_BL = jnp.zeros_like(tokens_BL)
            x_BLD = x_BLD + jnp.take(self.token_type, token_types_BL, axis=0)
        if cfg.embed_scale:  # Gemma: the tied table serves both ends at sqrt(D) apart
            x_BLD = x_BLD * jnp.asarray(math.sqrt(cfg.d_model), x_BLD.dtype)
        return constrain(x_BLD.astype(cfg.dtype), RESIDUAL)

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        """Tied output projection: float32 logits [B,L,V] (V padded: see mask_padding)."""
        dt = self.cfg.dtype
        return mask_padding(matmul(x_BLD.astype(dt), self.token.astype(dt).T, F32), self.cfg)


def mask_padding(logits_BLV: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits of the vocabulary's padding ids (>= cfg.vocab_size) set to -1e30: never sampled,
    no share of any softmax; sharded over the vocabulary like the output table."""
    logits_BLV = constrain(logits_BLV, ("act_batch", "act_len", "act_vocab")[-logits_BLV.ndim:])
    if cfg.padded_vocab == cfg.vocab_size:
        return logits_BLV
    real_V = jnp.arange(logits_BLV.shape[-1]) < cfg.vocab_size
    return jnp.where(real_V, logits_BLV, jnp.asarray(_NEG_INF, logits_BLV.dtype))


def apply_rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    """Rotary embeddings (rotate-half convention), computed in float32."""
    half = x_BLHK.shape[-1] // 2
    freq_k = theta ** (-jnp.arange(half, dtype=F32) / half)
    angle_BLk = positions_BL.astype(F32)[..., None] * freq_k
    sin, cos = jnp.sin(angle_BLk)[:, :, None, :], jnp.cos(angle_BLk)[:, :, None, :]
    x1, x2 = jnp.split(x_BLHK.astype(F32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHK.dtype)


_GELU_C = math.sqrt(2 / math.pi)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """tanh-approximate GELU, the same function as `nn.gelu` (GPT-2 / BERT).

    Custom VJP: the backward recomputes tanh from x in one fused pass. XLA:CPU runs autodiff's
    backward of the tanh form as several passes over [B,L,F] (benchmarks/step_breakdown.py
    measures what this saves in place). Reverse
    mode only (jax.jvp / jacfwd through it raise)."""
    return 0.5 * x * (1 + jnp.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, dy):
    x2 = x * x
    t = jnp.tanh(_GELU_C * x * (1 + 0.044715 * x2))
    return (dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * x2)),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def activation(cfg: ModelConfig):
    """The MLP's (and MLM head's) GELU: erf-exact (BERT) or the tanh approximation (`gelu`)."""
    return (lambda x: jax.nn.gelu(x, approximate=False)) if cfg.activation == "gelu_exact" \
        else gelu


class Mlp(nn.Module):
    """SwiGLU (wi_0 gate, wi_1 up, wo down) or GELU (wi, wo), with biases if cfg.mlp_bias."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt, d, f = cfg.dtype, cfg.d_model, cfg.d_ff
        init = fan_in_init(0, 1)
        x = x_BLD.astype(dt)

        def proj(x, name, shape, axes):
            y = matmul(x, param(self, name, init, shape, axes, cfg).astype(dt))
            if cfg.mlp_bias:
                b = param(self, f"{name}_bias", nn.initializers.zeros, shape[1:], axes[1:], cfg)
                y = y + b.astype(dt)
            return y

        hidden = ("act_batch", "act_len", "act_mlp")
        if cfg.mlp == "swiglu":
            h_BLF = nn.silu(constrain(proj(x, "wi_0", (d, f), ("embed", "mlp")), hidden)) * \
                constrain(proj(x, "wi_1", (d, f), ("embed", "mlp")), hidden)
        else:
            h_BLF = activation(cfg)(constrain(proj(x, "wi", (d, f), ("embed", "mlp")), hidden))
        return constrain(proj(h_BLF, "wo", (f, d), ("mlp", "embed")), RESIDUAL)


def attention_core(q_BLHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array,
                   mask_BLS: jax.Array, *, causal: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(K) masked) v with GQA (query head h uses kv head h // (H/G)).

    mask_BLS is boolean (True = may attend). Scores and softmax are float32; fully-masked rows
    (padding queries) get a uniform average of the keys of their block, finite. `causal=True`
    promises mask[l, s] is False for s > l (self-attention, L == S): the first half of the
    queries then skips the second half of the keys (a quarter less attention work, the same
    result on every row that can attend somewhere). Returns [B,L,H,K] in q's dtype.

    CPU layout notes (XLA:CPU, see benchmarks/): heads-major [B,G,R,L,K] operands make both score
    matmuls and their gradients plain batched GEMMs; q is scaled before QK^T (L*K multiplies,
    not L*S); the mask is an additive float bias (its gradient path is free, unlike select).
    """
    b, n, h, k = q_BLHK.shape
    s, g = k_BSGK.shape[1], k_BSGK.shape[2]
    dt = q_BLHK.dtype
    q_BGRLK = (q_BLHK * jnp.asarray(k ** -0.5, dt)).reshape(b, n, g, h // g, k)
    q_BGRLK = q_BGRLK.transpose(0, 2, 3, 1, 4)
    k_BGSK = k_BSGK.astype(dt).transpose(0, 2, 1, 3)
    v_BGSK = v_BSGK.astype(dt).transpose(0, 2, 1, 3)
    bias_B11LS = jnp.where(mask_BLS, 0.0, _NEG_INF).astype(F32)[:, None, None]
    # (query start, query end, number of keys) per block
    blocks = [(0, n, s)]
    if causal and n == s and n >= 128 and n % 2 == 0:
        blocks = [(0, n // 2, n // 2), (n // 2, n, n)]
    outs = []
    for lo, hi, keys in blocks:
        s_BGRLS = jnp.einsum("BGRLK,BGSK->BGRLS", q_BGRLK[:, :, :, lo:hi], k_BGSK[:, :, :keys],
                             preferred_element_type=F32)
        s_BGRLS = s_BGRLS + bias_B11LS[..., lo:hi, :keys]
        p_BGRLS = jax.nn.softmax(s_BGRLS, axis=-1).astype(dt)
        outs.append(jnp.einsum("BGRLS,BGSK->BGRLK", p_BGRLS, v_BGSK[:, :, :keys]))
    out_BGRLK = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out_BGRLK.transpose(0, 3, 1, 2, 4).reshape(b, n, h, k)


class Attention(nn.Module):
    """Multi-head / grouped-query attention; self-attention (optionally cached) or cross."""

    cfg: ModelConfig
    rope: bool = True

    @nn.compact
    def __call__(self, x_BLD, kv_BSD, mask_BLS, positions_BL=None, cache: LayerCache | None = None,
                 slot=None, causal: bool = False, segment_ids_BL=None):
        """Returns (out_BLD, new cache or None). With `cache` (decoding, self-attention only) the
        L new tokens are written at cache slots [slot, slot+L) and attend over the cache under
        mask_BLS [B,L,S]; without it they attend over kv_BSD by `cfg.attention`
        (model/attention.py; segment_ids_BL, self-attention only, feed the fused kernels).

        causal: the mask is known causal (see attention_core); only without a cache.

        Self-attention computes q, k, v as ONE GEMM with the weight laid out kv-head-major,
        [D, G, R+2, K] (each kv head's R query heads, then its k and v): split over 'tensor'
        along G, every shard holds whole groups, so q, k and v come out already sharded by
        heads (no collective-permute, which the [q | k | v] column order needs)."""
        cfg = self.cfg
        dt, d, h, g, k = cfg.dtype, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        r = h // g
        proj_in = fan_in_init(0, (1, 2))
        wq = param(self, "q", proj_in, (d, h, k), ("embed", "heads", "kv"), cfg).astype(dt)
        wk = param(self, "k", proj_in, (d, g, k), ("embed", "heads", "kv"), cfg).astype(dt)
        wv = param(self, "v", proj_in, (d, g, k), ("embed", "heads", "kv"), cfg).astype(dt)
        wo = param(self, "o", fan_in_init((0, 1), 2), (h, k, d), ("heads", "kv", "embed"),
                   cfg).astype(dt)
        zero = nn.initializers.zeros
        bq = bk = bv = bo = None
        if cfg.attn_bias:
            bq = param(self, "q_bias", zero, (h, k), ("heads", "kv"), cfg).astype(dt)
            bk = param(self, "k_bias", zero, (g, k), ("heads", "kv"), cfg).astype(dt)
            bv = param(self, "v_bias", zero, (g, k), ("heads", "kv"), cfg).astype(dt)
            bo = param(self, "o_bias", zero, (d,), ("embed",), cfg).astype(dt)
        heads = ("act_batch", "act_len", "act_heads", "act_kv")
        self_attn = kv_BSD is x_BLD
        x_BLD, kv_BSD = x_BLD.astype(dt), kv_BSD.astype(dt)
        b, n = x_BLD.shape[:2]
        if self_attn:
            w_DGCK = jnp.concatenate([wq.reshape(d, g, r, k), wk[:, :, None], wv[:, :, None]],
                                     axis=2)
            y = matmul(x_BLD, w_DGCK.reshape(d, -1))
            if cfg.attn_bias:
                y = y + jnp.concatenate([bq.reshape(g, r, k), bk[:, None], bv[:, None]],
                                        axis=1).reshape(-1)
            y_BLGCK = constrain(y.reshape(b, n, g, r + 2, k),
                                ("act_batch", "act_len", "act_heads", None, "act_kv"))
            q_BLHK = y_BLGCK[:, :, :, :r].reshape(b, n, h, k)
            k_BSGK, v_BSGK = y_BLGCK[:, :, :, r], y_BLGCK[:, :, :, r + 1]
        else:  # cross-attention: queries and keys/values from different sequences
            proj = lambda z, w, bias, m: (matmul(z, w.reshape(d, -1)) + (
                0.0 if bias is None else bias.reshape(-1))).reshape(z.shape[0], -1, m, k)
            q_BLHK = proj(x_BLD, wq, bq, h)
            k_BSGK, v_BSGK = proj(kv_BSD, wk, bk, g), proj(kv_BSD, wv, bv, g)
        if self.rope and cfg.positions == "rope":  # self-attention only: kv positions == q's
            q_BLHK = apply_rope(q_BLHK, positions_BL, cfg.rope_theta)
            k_BSGK = apply_rope(k_BSGK, positions_BL, cfg.rope_theta)
        q_BLHK, k_BSGK, v_BSGK = (constrain(t, heads) for t in (q_BLHK, k_BSGK, v_BSGK))
        if cache is not None:  # decode: write this step's k/v, attend over all cache slots
            cache = cache.write(k_BSGK, v_BSGK, slot)
            out_BLHK = cache.attend(q_BLHK, mask_BLS)
        else:
            out_BLHK = attention_lib.attend(cfg.attention, q_BLHK, k_BSGK, v_BSGK, mask_BLS,
                                            segment_ids_BL if self_attn else None,
                                            causal=causal)
        out_BLHK = constrain(out_BLHK, heads)
        out_BLD = matmul(out_BLHK.reshape(b, n, h * k), wo.reshape(h * k, d))
        if cfg.attn_bias:
            out_BLD = out_BLD + bo
        return constrain(out_BLD, RESIDUAL), cache


class Block(nn.Module):
    """Self-attention [+ cross-attention] + MLP, each a residual branch with dropout; pre-norm
    (x + f(norm(x)), GPT-2/Llama) or post-norm (norm(x + f(x)), BERT) by cfg.norm_position.

    ctx (broadcast over layers): mask [B,L,S] bool, positions [B,L], slot (decoding: the cache
    slot of the first new token) or None, encoded [B,Ls,D] or None, cross_mask [B,L,Ls] or None.
    cache: this layer's LayerCache when decoding, else None.
    """

    cfg: ModelConfig
    cross: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD, cache, ctx):
        cfg = self.cfg
        drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)

        def residual(x, norm_name, branch):
            if cfg.norm_position == "pre":
                return x + drop(branch(Norm(cfg, name=norm_name)(x)))
            return Norm(cfg, name=norm_name)(x + drop(branch(x)))

        causal = cfg.kind == "decoder" or self.cross  # decoder self-attention (static)
        new_cache = [cache]

        def self_attention(h):
            h, new_cache[0] = Attention(cfg, name="attn")(h, h, ctx["mask"], ctx["positions"],
                                                          cache, ctx["slot"], causal,
                                                          ctx.get("segment_ids"))
            return h

        x_BLD = residual(x_BLD, "attn_norm", self_attention)
        if self.cross:
            x_BLD = residual(x_BLD, "cross_norm", lambda h: Attention(
                cfg, rope=False, name="cross_attn")(h, ctx["encoded"], ctx["cross_mask"])[0])
        x_BLD = residual(x_BLD, "mlp_norm", Mlp(cfg, name="mlp"))
        return constrain(x_BLD, RESIDUAL), new_cache[0]

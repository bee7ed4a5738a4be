"""Transformer: decoder-only, encoder-only (BERT-style) and encoder-decoder from one block family.

Shapes: B batch, L length, S cache/source length, D model width, H heads, G kv heads, K head width,
F MLP width, V vocab, E embed dim.

Masks: decoder = causal AND same nonzero segment; encoder = same nonzero segment (bidirectional);
cross-attention = query segment nonzero AND key src segment nonzero. Layers are stacked with
nn.scan (params and cache get a leading 'layers' axis) or a python loop (params `layers_{i}`);
both compute the same function. Params are cfg.param_dtype, compute is cfg.dtype, logits float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from solo.model.config import ModelConfig
from solo.model.layers import F32, Block, Dense, Embedder, Norm, gelu, param

HEADS = ("lm", "mlm", "nsp", "embed")


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """Empty KV cache: k, v [layers,B,S,G,K] (decoder-stack layers) and end [B] int32 = 0."""
    if cfg.kind == "encoder":
        raise ValueError("init_cache: kind='encoder' has no decoder; use 'decoder' or "
                         "'encoder_decoder'")
    n = cfg.num_decoder_layers if cfg.kind == "encoder_decoder" else cfg.num_layers
    shape = (n, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                end=jnp.zeros((batch_size,), jnp.int32))


def _remat_policy(name: str):
    return {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}[name]


class Stack(nn.Module):
    """num_layers Blocks (scanned or looped, optionally rematerialised) + final norm."""

    cfg: ModelConfig
    num_layers: int
    cross: bool = False

    @nn.compact
    def __call__(self, x_BLD, ctx, cache=None, deterministic: bool = True):
        cfg = self.cfg
        block_cls = Block
        if cfg.remat != "none":
            block_cls = nn.remat(Block, policy=_remat_policy(cfg.remat),
                                 prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            scanned = nn.scan(block_cls, variable_axes={"params": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(0, nn.broadcast), length=self.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x_BLD, cache = scanned(cfg, self.cross, deterministic, name="layers")(
                x_BLD, cache, ctx)
        else:
            new_caches = []
            for i in range(self.num_layers):
                layer_cache = None if cache is None else tuple(c[i] for c in cache)
                x_BLD, layer_cache = block_cls(cfg, self.cross, deterministic,
                                               name=f"layers_{i}")(x_BLD, layer_cache, ctx)
                new_caches.append(layer_cache)
            if cache is not None:
                cache = jax.tree.map(lambda *cs: jnp.stack(cs), *new_caches)
        return Norm(cfg, name="final_norm")(x_BLD), cache


class MlmHead(nn.Module):
    """BERT MLM head: dense + gelu + norm, then (tied) vocab projection with bias."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, table_VD=None):
        cfg = self.cfg
        h = gelu(Dense(cfg, cfg.d_model, name="transform")(x_BLD))
        h = Norm(cfg, name="norm")(h)
        if table_VD is None:
            logits = Dense(cfg, cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                           out_dtype="float32", name="decoder")(h)
        else:
            logits = jnp.einsum("BLD,VD->BLV", h, table_VD.astype(cfg.dtype),
                                preferred_element_type=F32)
        bias = param(self, "bias", nn.initializers.zeros, (cfg.vocab_size,), ("vocab",), cfg)
        return logits + bias.astype(F32)


class NspHead(nn.Module):
    """BERT pooler (tanh dense on the first token) + 2-way classifier."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD):
        pooled_BD = jnp.tanh(Dense(self.cfg, self.cfg.d_model, name="pooler")(x_BLD[:, 0]))
        return Dense(self.cfg, 2, ("embed", None), out_dtype="float32", name="cls")(pooled_BD)


class EmbedHead(nn.Module):
    """Pool (mean over non-pad tokens or first token), project to E, L2-normalise; logit scale."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL):
        cfg = self.cfg
        x = x_BLD.astype(F32)
        if cfg.pooling == "mean":
            keep_BL1 = (segment_ids_BL != 0).astype(F32)[..., None]
            pooled_BD = (x * keep_BL1).sum(1) / jnp.maximum(keep_BL1.sum(1), 1.0)
        else:
            pooled_BD = x[:, 0]
        e_BE = Dense(cfg, cfg.embed_dim, ("embed", None), use_bias=False, out_dtype="float32",
                     name="proj")(pooled_BD)
        e_BE = e_BE * jax.lax.rsqrt(jnp.maximum(jnp.sum(e_BE * e_BE, -1, keepdims=True), 1e-12))
        scale_init = nn.initializers.constant(np.log(1 / 0.05))
        logit_scale = param(self, "logit_scale", scale_init, (), (), cfg)
        return e_BE, logit_scale.astype(F32)


def _self_mask(segment_ids_BL, causal: bool) -> jax.Array:
    seg = segment_ids_BL
    mask_BLL = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    if causal:
        idx = jnp.arange(seg.shape[1])
        mask_BLL = mask_BLL & (idx[None, :, None] >= idx[None, None, :])
    return mask_BLL


def _defaults(batch: Mapping, prefix: str):
    tokens = jnp.asarray(batch[prefix + "tokens"])
    b, n = tokens.shape
    seg = batch.get(prefix + "segment_ids")
    seg = jnp.ones((b, n), jnp.int32) if seg is None else jnp.asarray(seg)
    pos = batch.get(prefix + "positions")
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)) if pos is None else pos
    return tokens, seg, jnp.asarray(pos)


class Transformer(nn.Module):
    """See module docstring and /work/contract.md ("Model")."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embedder = Embedder(cfg)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        if cfg.kind in ("encoder", "encoder_decoder"):
            self.encoder = Stack(cfg, cfg.num_layers)
        if cfg.kind in ("decoder", "encoder_decoder"):
            self.decoder = Stack(cfg, cfg.num_decoder_layers if cfg.kind == "encoder_decoder"
                                 else cfg.num_layers, cross=cfg.kind == "encoder_decoder")
        if not cfg.tie_embeddings:
            self.lm_head = Dense(cfg, cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                                 out_dtype="float32")
        self.mlm_head = MlmHead(cfg)
        self.nsp_head = NspHead(cfg)
        self.embed_head = EmbedHead(cfg)

    def _embed(self, tokens, positions, token_types, deterministic):
        x_BLD = self.embedder(tokens, positions, token_types)
        return self.embed_dropout(x_BLD, deterministic=deterministic)

    def _lm_logits(self, x_BLD):
        if self.cfg.tie_embeddings:
            return self.embedder.attend(x_BLD)
        return self.lm_head(x_BLD)

    def encode(self, batch: Mapping, *, deterministic: bool = True) -> jax.Array:
        """Encoder stack on src_tokens/src_segment_ids/src_positions -> encoded_BSD."""
        if self.cfg.kind != "encoder_decoder":
            raise ValueError(f"encode needs kind='encoder_decoder', got {self.cfg.kind!r}")
        tokens, seg, pos = _defaults(batch, "src_")
        x = self._embed(tokens, pos, None, deterministic)
        ctx = dict(mask=_self_mask(seg, causal=False), positions=pos, end=None, encoded=None,
                   cross_mask=None)
        return self.encoder(x, ctx, None, deterministic)[0]

    def __call__(self, batch: Mapping, heads: Sequence[str] = ("lm",), *,
                 deterministic: bool = True) -> dict:
        cfg = self.cfg
        unknown = [h for h in heads if h not in HEADS]
        if unknown:
            raise ValueError(f"Unknown head(s) {unknown}; valid: {HEADS}")
        tokens, seg, pos = _defaults(batch, "")
        token_types = batch.get("token_types")
        x = self._embed(tokens, pos, token_types, deterministic)
        ctx = dict(mask=_self_mask(seg, causal=cfg.kind != "encoder"), positions=pos, end=None,
                   encoded=None, cross_mask=None)
        if cfg.kind == "encoder_decoder":
            src_seg = _defaults(batch, "src_")[1]
            ctx["encoded"] = self.encode(batch, deterministic=deterministic)
            ctx["cross_mask"] = (seg[:, :, None] != 0) & (src_seg[:, None, :] != 0)
        stack = self.encoder if cfg.kind == "encoder" else self.decoder
        x, _ = stack(x, ctx, None, deterministic)
        out = {"hidden": x}
        if "lm" in heads:
            out["logits"] = self._lm_logits(x)
        if "mlm" in heads:
            out["mlm_logits"] = self.mlm_head(
                x, self.embedder.token if cfg.tie_embeddings else None)
        if "nsp" in heads:
            out["nsp_logits"] = self.nsp_head(x)
        if "embed" in heads:
            out["embedding"], out["logit_scale"] = self.embed_head(x, seg)
        return out

    def decode(self, tokens_BT: jax.Array, cache: dict, *, num_valid_B=None, encoded=None,
               src_segment_ids=None) -> tuple[jax.Array, dict]:
        """Cached decoding: token t of row b goes to slot/position end[b]+t, attends slots <= it.

        Returns float32 logits [B,T,V] and the cache with end += num_valid_B (default T).
        Caller guarantees end + T <= S. encoder_decoder needs `encoded` (from `encode`).
        """
        cfg = self.cfg
        if cfg.kind == "encoder":
            raise ValueError("decode needs kind 'decoder' or 'encoder_decoder'")
        b, t = tokens_BT.shape
        s = cache["k"].shape[2]
        end_B = cache["end"]
        pos_BT = end_B[:, None] + jnp.arange(t, dtype=jnp.int32)
        mask_BTS = jnp.arange(s)[None, None, :] <= pos_BT[:, :, None]
        ctx = dict(mask=mask_BTS, positions=pos_BT, end=end_B, encoded=None, cross_mask=None)
        if cfg.kind == "encoder_decoder":
            if encoded is None:
                raise ValueError("encoder_decoder decode needs encoded=Transformer.encode(...)")
            if src_segment_ids is None:
                src_segment_ids = jnp.ones(encoded.shape[:2], jnp.int32)
            ctx["encoded"] = encoded
            ctx["cross_mask"] = jnp.broadcast_to(
                (src_segment_ids != 0)[:, None, :], (b, t, encoded.shape[1]))
        x = self._embed(tokens_BT, pos_BT, None, True)
        x, (k, v) = self.decoder(x, ctx, (cache["k"], cache["v"]), True)
        n_new = t if num_valid_B is None else num_valid_B
        new_end = (end_B + jnp.asarray(n_new, jnp.int32)).astype(jnp.int32)
        return self._lm_logits(x), dict(k=k, v=v, end=new_end)

"""Transformer: decoder-only, encoder-only (BERT-style) and encoder-decoder from one block family.

Shapes: B batch, L length, S cache/source length, D model width, H heads, G kv heads, K head width,
F MLP width, V vocab, E embed dim, T new tokens when decoding.

Masks: decoder = causal AND same nonzero segment; encoder = same nonzero segment (bidirectional);
cross-attention = query segment nonzero AND key src segment nonzero. Layers are stacked with
nn.scan (params get a leading 'layers' axis) or a python loop (params `layers_{i}`); both compute
the same function. Params are cfg.param_dtype, compute is cfg.dtype, logits float32.

One forward for training and decoding: `__call__` (training, eval, scoring) and `decode` (prefill
and cached steps over a `DecodeCache`, model/kvcache.py) run the same Blocks; only attention's
keys and values come from the cache when decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from solo.model.config import ModelConfig
from solo.model.kvcache import DecodeCache
from solo.model.layers import F32, Block, Dense, Embedder, Norm, activation, mask_padding, param

HEADS = ("lm", "mlm", "nsp", "embed")


def init_cache(cfg: ModelConfig, batch_size: int, slots: int, offset_B=None) -> DecodeCache:
    """Empty decode cache of the decoder stack (compute dtype); offset_B = each row's left
    padding (default 0)."""
    if cfg.kind == "encoder":
        raise ValueError("init_cache: kind='encoder' has no decoder; use 'decoder' or "
                         "'encoder_decoder'")
    n = cfg.num_decoder_layers if cfg.kind == "encoder_decoder" else cfg.num_layers
    return DecodeCache.init(n, cfg.num_kv_heads, cfg.head_dim, batch_size, slots, offset_B,
                            jnp.dtype(cfg.dtype))


def example_batch(cfg: ModelConfig, seq_len: int, src_seq_len: int = 0) -> dict:
    """A 1-row batch with every key the model reads (shape inference and init)."""
    batch = {"tokens": jnp.zeros((1, seq_len), jnp.int32)}
    if cfg.type_vocab_size > 0:
        batch["token_types"] = jnp.zeros((1, seq_len), jnp.int32)
    if cfg.kind == "encoder_decoder":
        batch["src_tokens"] = jnp.zeros((1, src_seq_len or seq_len), jnp.int32)
    return batch


def init_params(model: Transformer, key: jax.Array, heads: Sequence[str], seq_len: int,
                src_seq_len: int = 0):
    """Boxed (logically annotated) params with the given heads; pure, so `jax.eval_shape` of it
    gives the parameter shapes alone."""
    batch = example_batch(model.cfg, seq_len, src_seq_len)
    return model.init({"params": key, "dropout": key}, batch, heads=tuple(heads))["params"]


def _remat_policy(name: str):
    """jax.checkpoint policy of model.remat (None: save nothing, recompute the whole block).
    offload needs pinned host memory (GPU/TPU); elsewhere it falls back to dots_no_batch."""
    cp = jax.checkpoint_policies
    if name == "offload":
        from solo.model.platform import has_host_offload

        if has_host_offload():
            return cp.offload_dot_with_no_batch_dims("device", "pinned_host")
        name = "dots_no_batch"
    return {"full": None, "dots": cp.checkpoint_dots,
            "dots_no_batch": cp.dots_with_no_batch_dims_saveable}[name]


class Stack(nn.Module):
    """num_layers Blocks (scanned or looped, optionally rematerialised) + final norm."""

    cfg: ModelConfig
    num_layers: int
    cross: bool = False

    @nn.compact
    def __call__(self, x_BLD, ctx, cache: tuple | None = None, deterministic: bool = True):
        """cache: a tuple of per-layer LayerCaches when decoding (returned updated), else None."""
        cfg = self.cfg
        if cache is not None:
            x_BLD, cache = self._decode(x_BLD, ctx, cache)
        elif cfg.scan_layers:
            block_cls = self._block_cls()
            scanned = nn.scan(block_cls, variable_axes={"params": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(0, nn.broadcast), length=self.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x_BLD, _ = scanned(cfg, self.cross, deterministic, name="layers")(x_BLD, None, ctx)
        else:
            block_cls = self._block_cls()
            for i in range(self.num_layers):
                x_BLD, _ = block_cls(cfg, self.cross, deterministic, name=f"layers_{i}")(
                    x_BLD, None, ctx)
        if cfg.norm_position == "post":  # each block already ends in a norm (BERT)
            return x_BLD, cache
        return Norm(cfg, name="final_norm")(x_BLD), cache

    def _block_cls(self):
        if self.cfg.remat == "none":
            return Block
        return nn.remat(Block, policy=_remat_policy(self.cfg.remat),
                        prevent_cse=not self.cfg.scan_layers)

    def _decode(self, x_BLD, ctx, cache: tuple):
        """Layer by layer, each with its own cache (updated in place)."""
        if self.cfg.scan_layers:
            raise ValueError("decode runs unrolled layers; convert a scanned model once with "
                             "solo.model.unstack_layers(cfg, params)")
        new = []
        for i, layer_cache in enumerate(cache):
            x_BLD, layer_cache = Block(self.cfg, self.cross, True, name=f"layers_{i}")(
                x_BLD, layer_cache, ctx)
            new.append(layer_cache)
        return x_BLD, tuple(new)


def unstack_layers(cfg: ModelConfig, params) -> tuple[ModelConfig, Any]:
    """The same model with its layers unrolled (what `Transformer.decode` runs; both layouts
    compute the same function): a scanned stack's params [layers, ...] become layers_0,
    layers_1, ... Done once, not per decode step, where slicing the stack would cost a copy."""
    if not cfg.scan_layers:
        return cfg, params

    def convert(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: convert(v) for k, v in tree.items() if k != "layers"}
        if isinstance(tree.get("layers"), dict):  # a scanned Stack
            stacked = tree["layers"]
            n = jax.tree.leaves(stacked)[0].shape[0]
            out.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                        for i in range(n)})
        return out

    return dataclasses.replace(cfg, scan_layers=False), convert(nn.meta.unbox(params))


class MlmHead(nn.Module):
    """BERT MLM head: dense + GELU (the model's) + norm, then (tied) vocab projection + bias."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, table_VD=None):
        cfg = self.cfg
        h = activation(cfg)(Dense(cfg, cfg.d_model, name="transform")(x_BLD))
        h = Norm(cfg, name="norm")(h)
        if table_VD is None:
            logits = Dense(cfg, cfg.padded_vocab, ("embed", "vocab"), use_bias=False,
                           out_dtype="float32", name="decoder")(h)
        else:
            logits = jnp.einsum("BLD,VD->BLV", h, table_VD.astype(cfg.dtype),
                                preferred_element_type=F32)
        bias = param(self, "bias", nn.initializers.zeros, (cfg.padded_vocab,), ("vocab",), cfg)
        return mask_padding(logits + bias.astype(F32), cfg)


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


def _chunks(x_BLD: jax.Array, chunk: int) -> jax.Array:
    """[B,L,D] -> [B, ceil(L/c), c, D] (zero rows pad the last chunk): what the LM losses read
    under model.logits_chunk (objectives.base.chunked_token_ce)."""
    b, n, d = x_BLD.shape
    c = min(chunk, n)
    pad = -n % c
    if pad:
        x_BLD = jnp.pad(x_BLD, ((0, 0), (0, pad), (0, 0)))
    return x_BLD.reshape(b, (n + pad) // c, c, d)


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
    """See the module docstring. Heads: 'lm' (logits [B,L,V], V = cfg.padded_vocab, padding ids
    at -1e30; with model.logits_chunk instead lm_kernel, lm_hidden and lm_bias, which the LM
    losses turn into logits chunk by chunk), 'mlm' (mlm_logits), 'nsp' (nsp_logits),
    'embed' (embedding, logit_scale); 'hidden' (the final-norm output) is always returned."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size is 0 ('the tokenizer's'): build the model "
                             "with ModelConfig.from_config(..., vocab_size=tokenizer.vocab_size)")
        self.embedder = Embedder(cfg)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        if cfg.embed_norm:
            self.embed_norm = Norm(cfg)
        if cfg.kind in ("encoder", "encoder_decoder"):
            self.encoder = Stack(cfg, cfg.num_layers)
        if cfg.kind in ("decoder", "encoder_decoder"):
            self.decoder = Stack(cfg, cfg.num_decoder_layers if cfg.kind == "encoder_decoder"
                                 else cfg.num_layers, cross=cfg.kind == "encoder_decoder")
        if not cfg.tie_embeddings:
            self.lm_head = Dense(cfg, cfg.padded_vocab, ("embed", "vocab"), use_bias=False,
                                 out_dtype="float32")
        self.mlm_head = MlmHead(cfg)
        self.nsp_head = NspHead(cfg)
        self.embed_head = EmbedHead(cfg)

    def _embed(self, tokens, positions, token_types, deterministic):
        x_BLD = self.embedder(tokens, positions, token_types)
        if self.cfg.embed_norm:
            x_BLD = self.embed_norm(x_BLD)
        return self.embed_dropout(x_BLD, deterministic=deterministic)

    def _lm_logits(self, x_BLD):
        if self.cfg.tie_embeddings:
            return self.embedder.attend(x_BLD)
        return mask_padding(self.lm_head(x_BLD), self.cfg)

    def _lm_kernel(self, x_BLD) -> jax.Array:
        """The output projection [D, V] (V padded) in the compute dtype (model.logits_chunk)."""
        if self.cfg.tie_embeddings:
            return self.embedder.token.astype(self.cfg.dtype).T
        self.lm_head(x_BLD[:, :0])  # creates the kernel (a 0-row product)
        kernel = nn.meta.unbox(self.lm_head.variables["params"]["kernel"])
        return kernel.astype(self.cfg.dtype)

    def encode(self, batch: Mapping, *, deterministic: bool = True) -> jax.Array:
        """Encoder stack on src_tokens/src_segment_ids/src_positions -> encoded_BSD."""
        if self.cfg.kind != "encoder_decoder":
            raise ValueError(f"encode needs kind='encoder_decoder', got {self.cfg.kind!r}")
        tokens, seg, pos = _defaults(batch, "src_")
        x = self._embed(tokens, pos, None, deterministic)
        ctx = dict(mask=_self_mask(seg, causal=False), positions=pos, slot=None, encoded=None,
                   cross_mask=None, segment_ids=seg)
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
        ctx = dict(mask=_self_mask(seg, causal=cfg.kind != "encoder"), positions=pos, slot=None,
                   encoded=None, cross_mask=None, segment_ids=seg)
        if cfg.kind == "encoder_decoder":
            src_seg = _defaults(batch, "src_")[1]
            ctx["encoded"] = self.encode(batch, deterministic=deterministic)
            ctx["cross_mask"] = (seg[:, :, None] != 0) & (src_seg[:, None, :] != 0)
        stack = self.encoder if cfg.kind == "encoder" else self.decoder
        x, _ = stack(x, ctx, None, deterministic)
        out = {"hidden": x}
        if "lm" in heads and cfg.logits_chunk:  # the loss makes logits chunk by chunk
            out["lm_kernel"], out["lm_hidden"] = self._lm_kernel(x), _chunks(x, cfg.logits_chunk)
            out["lm_bias"] = jnp.where(jnp.arange(cfg.padded_vocab) < cfg.vocab_size, 0.0,
                                       -1e30).astype(F32)
        elif "lm" in heads:
            out["logits"] = self._lm_logits(x)
        if "mlm" in heads:
            out["mlm_logits"] = self.mlm_head(
                x, self.embedder.token if cfg.tie_embeddings else None)
        if "nsp" in heads:
            out["nsp_logits"] = self.nsp_head(x)
        if "embed" in heads:
            out["embedding"], out["logit_scale"] = self.embed_head(x, seg)
        return out

    def decode(self, tokens_BT: jax.Array, cache: DecodeCache, *, token_types_BT=None,
               encoded=None, src_segment_ids=None, last_only: bool = False
               ) -> tuple[jax.Array, DecodeCache]:
        """Cached decoding, for prefill (T = the left-padded prompt length) and for steps (T=1).

        The T tokens of every row go to cache slots [cache.slot, cache.slot + T); token t of row
        b attends to slots cache.offset[b]..slot+t and has position slot + t - offset[b]. Returns
        float32 logits [B,T,V] (T=1 with last_only: the last token's only) and the cache with
        slot += T. The caller keeps slot + T <= cache.slots (see DecodeCache.grow).
        encoder_decoder needs `encoded` (from `encode`) and src_segment_ids (default all real).
        """
        cfg = self.cfg
        if cfg.kind == "encoder":
            raise ValueError("decode needs kind 'decoder' or 'encoder_decoder'")
        b, t = tokens_BT.shape
        pos_BT = cache.positions(t)
        ctx = dict(mask=cache.mask(t), positions=pos_BT, slot=cache.slot, encoded=None,
                   cross_mask=None)
        if cfg.kind == "encoder_decoder":
            if encoded is None:
                raise ValueError("encoder_decoder decode needs encoded=Transformer.encode(...)")
            if src_segment_ids is None:
                src_segment_ids = jnp.ones(encoded.shape[:2], jnp.int32)
            ctx["encoded"] = encoded
            ctx["cross_mask"] = jnp.broadcast_to(
                (src_segment_ids != 0)[:, None, :], (b, t, encoded.shape[1]))
        x = self._embed(tokens_BT, pos_BT, token_types_BT, True)
        x, layers = self.decoder(x, ctx, cache.layers, True)
        if last_only:
            x = x[:, -1:]
        return self._lm_logits(x), cache.replace(layers=layers, slot=cache.slot + t)

"""Token log-probabilities and text embeddings from the model's own forward pass: what the
server's /v1/completions `logprobs`/`echo`, chat `logprobs` and /v1/embeddings return.

Log-probabilities are `log_softmax` of the float32 logits of `Transformer.__call__` (the training
forward, not the KV-cache decode), so they are the model's own numbers at each position: entry t
of a row is log p(ids[t] | ids[:t]). Rows are right-padded (segment id 0: causal attention never
reads the padding) and bucketed to powers of two, so a new length rarely recompiles.

Embeddings: a model trained with the `embed` head (InfoNCE) has one, L2-normalised; any other
model has none unless `pooling='mean'` is chosen (the server's `--embeddings mean`): the mean of
the final hidden states over the text's tokens, L2-normalised. Text is framed as the contrastive
training views are (data/framing.document: [BOS] text [EOS], or [CLS] text [SEP]).

Shapes: B batch, L length, V vocabulary, K top-k alternatives, D model width, E embedding width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from solo.data import framing
from solo.model import Transformer

POOLINGS = ("head", "mean")
MAX_TOP_K = 20


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


class ScoringError(ValueError):
    """A request the model cannot score (too long, wrong model kind, no embedding head)."""


@dataclasses.dataclass
class TokenScores:
    """One row: logprobs[t] = log p(ids[t] | ids[:t]) (None for t=0: no context); top[t] the K
    most likely ids at t with their log-probabilities (None for t=0)."""

    ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


class Scorer:
    """Log-probabilities (decoder models) and embeddings (any kind) of token rows.

    Args:
      model, params: the run's `Transformer` and its params (scanned or unrolled).
      tokenizer: the run's tokenizer (text framing for embeddings).
      pooling: 'head' (only models with an embed head give embeddings) or 'mean' (models without
        one give mean-pooled final hidden states).
    """

    def __init__(self, model: Transformer, params, tokenizer, *, pooling: str = "head"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; valid: {POOLINGS}")
        params = nn.meta.unbox(params)
        self.params = params["params"] if "params" in params else params
        # a model trained with model.logits_chunk returns lm_hidden/lm_kernel instead of logits:
        # the same params without it give the logits
        if model.cfg.logits_chunk:
            model = Transformer(model.cfg.replace(logits_chunk=0))
        self.model, self.cfg, self.tokenizer = model, model.cfg, tokenizer
        self.max_len = int(self.cfg.max_len)
        self.has_embed_head = "embed_head" in self.params
        self.pooling = pooling
        self._logprobs = jax.jit(self._logprobs_impl, static_argnames=("k",))
        self._embed = jax.jit(self._embed_impl, static_argnames=("head",))

    # --- log-probabilities ---------------------------------------------------------------------

    @property
    def can_score(self) -> bool:
        return self.cfg.kind == "decoder"

    def _logprobs_impl(self, params, tokens_BL, seg_BL, k: int):
        out = self.model.apply({"params": params}, {"tokens": tokens_BL, "segment_ids": seg_BL},
                               heads=("lm",))
        # log p = logit - logsumexp(logits): no second [B,L,V] array besides the logits
        logits_BLV = out["logits"].astype(jnp.float32)[:, :-1]
        lse_BL1 = jax.nn.logsumexp(logits_BLV, axis=-1, keepdims=True)
        lp_BL = (jnp.take_along_axis(logits_BLV, tokens_BL[:, 1:, None], axis=-1) - lse_BL1)[..., 0]
        if not k:
            return lp_BL, None, None
        top_v_BLK, top_i_BLK = jax.lax.top_k(logits_BLV, k)
        return lp_BL, top_v_BLK - lse_BL1, top_i_BLK

    def _padded(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Rows right-padded into a [b, length] bucket (fewer shapes to compile) and their
        segment ids (1 on tokens, 0 on padding)."""
        length = min(_bucket(max(map(len, rows))), self.max_len)
        b = _bucket(len(rows), 1)
        tokens = np.zeros((b, length), np.int32)
        seg = np.zeros((b, length), np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
            seg[i, : len(r)] = 1
        return tokens, seg

    def score(self, rows: Sequence[Sequence[int]], top_k: int = 0) -> list[TokenScores]:
        """Per-token log-probabilities of each row under the model, with the top_k alternatives
        at each position (top_k 0: none)."""
        if not self.can_score:
            raise ScoringError(f"log-probabilities need a decoder-only model; this one is "
                               f"{self.cfg.kind!r}")
        rows = [[int(t) for t in r] for r in rows]
        if not rows:
            return []
        longest = max(map(len, rows))
        if longest > self.max_len:
            raise ScoringError(f"{longest} tokens to score; this model's maximum context length "
                               f"is {self.max_len} tokens")
        if min(map(len, rows)) < 1:
            raise ScoringError("an empty row cannot be scored")
        tokens, seg = self._padded(rows)
        # one compiled function per shape: the top 20 are always computed, top_k of them kept
        k = min(MAX_TOP_K, self.cfg.vocab_size)
        if top_k > k:
            raise ScoringError(f"top_k={top_k}; at most {k}")
        lp, tv, ti = jax.device_get(self._logprobs(self.params, jnp.asarray(tokens),
                                                   jnp.asarray(seg), k=k))
        out = []
        for i, r in enumerate(rows):
            n = len(r)
            lps: list[float | None] = [None] + [float(x) for x in lp[i, : n - 1]]
            top: list = [None]
            if top_k > 0:
                top += [[(int(ti[i, t, j]), float(tv[i, t, j])) for j in range(top_k)]
                        for t in range(n - 1)]
            else:
                top += [[] for _ in range(n - 1)]
            out.append(TokenScores(r, lps, top))
        return out

    # --- embeddings ----------------------------------------------------------------------------

    def embedding_error(self) -> str | None:
        """Why this model gives no embeddings (None: it does)."""
        if self.has_embed_head or self.pooling == "mean":
            return None
        return ("this model has no embedding head (it was not trained with the infonce "
                "objective); serve it with `solo serve --embeddings mean` for mean-pooled hidden "
                "states")

    def text_ids(self, text: str) -> list[int]:
        """A text as an embedding input, framed as the contrastive views are (framing.document:
        [BOS] text [EOS], or [CLS] text [SEP]), truncated to the model's length keeping EOS."""
        return framing.document(self.tokenizer, text, self.max_len)

    def _embed_impl(self, params, tokens_BL, seg_BL, head: bool):
        batch = {"tokens": tokens_BL, "segment_ids": seg_BL}
        if self.cfg.type_vocab_size > 0:
            batch["token_types"] = jnp.zeros_like(tokens_BL)
        if self.cfg.kind == "encoder_decoder":  # the encoder's states of the text
            batch = {"src_tokens": tokens_BL, "src_segment_ids": seg_BL}
            x_BLD = self.model.apply({"params": params}, batch, method=Transformer.encode)
        else:
            out = self.model.apply({"params": params}, batch,
                                   heads=("embed",) if head else ())
            if head:
                return out["embedding"]
            x_BLD = out["hidden"]
        keep_BL1 = (seg_BL != 0).astype(jnp.float32)[..., None]
        e_BD = (x_BLD.astype(jnp.float32) * keep_BL1).sum(1) / jnp.maximum(keep_BL1.sum(1), 1.0)
        return e_BD * jax.lax.rsqrt(jnp.maximum(jnp.sum(e_BD * e_BD, -1, keepdims=True), 1e-12))

    def embed(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """L2-normalised embeddings [n, E] of token rows (see text_ids for text)."""
        why = self.embedding_error()
        if why:
            raise ScoringError(why)
        rows = [[int(t) for t in r] for r in rows]
        if any(len(r) < 1 for r in rows):
            raise ScoringError("an empty input cannot be embedded")
        if any(len(r) > self.max_len for r in rows):
            raise ScoringError(f"an input is longer than this model's maximum context length "
                               f"of {self.max_len} tokens")
        tokens, seg = self._padded(rows)
        e = self._embed(self.params, jnp.asarray(tokens), jnp.asarray(seg),
                        head=self.has_embed_head)
        return np.asarray(jax.device_get(e))[: len(rows)]

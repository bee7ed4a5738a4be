"""ModelConfig: the frozen, validated description of a Transformer, and its FLOP count."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from solo.config import from_section

_CHOICES = {
    "kind": ("decoder", "encoder", "encoder_decoder"),
    "positions": ("rope", "learned"),
    "norm": ("rmsnorm", "layernorm"),
    "norm_position": ("pre", "post"),
    "mlp": ("swiglu", "gelu", "gelu_exact"),
    "pooling": ("mean", "first"),
    "dtype": ("float32", "bfloat16"),
    "param_dtype": ("float32", "bfloat16"),
    "remat": ("none", "full", "dots", "dots_no_batch", "offload"),
    "attention": ("auto", "einsum", "xla", "cudnn", "splash"),
}
_AUTO = ("dtype", "remat")  # "auto": model/platform.py picks by backend


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of `solo.model.Transformer`; the meaning and default of each key is in
    experiments/base.py (`config.model`), the one home of defaults: this record has none.

    Zero-valued "derived" fields are resolved in `__post_init__` so consumers always see concrete
    values: num_decoder_layers 0 -> num_layers, num_kv_heads 0 -> num_heads,
    head_dim 0 -> d_model // num_heads, embed_dim 0 -> d_model. vocab_size 0 means "the
    tokenizer's" (`from_config(..., vocab_size=tokenizer.vocab_size)`); a model needs it > 0.
    """

    kind: str
    vocab_size: int
    d_model: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    max_len: int
    positions: str
    rope_theta: float
    norm: str
    norm_eps: float
    norm_position: str
    embed_norm: bool
    embed_scale: bool
    mlp: str
    attn_bias: bool
    mlp_bias: bool
    dropout: float
    tie_embeddings: bool
    type_vocab_size: int
    embed_dim: int
    pooling: str
    dtype: str
    param_dtype: str
    scan_layers: bool
    remat: str
    attention: str
    vocab_multiple: int
    logits_chunk: int

    def __post_init__(self):
        from solo.model.platform import platform_default

        for name in _AUTO:  # frozen: resolved once, here
            if getattr(self, name) == "auto":
                object.__setattr__(self, name, platform_default(name))
        if int(self.logits_chunk) < 0:
            raise ValueError(f"ModelConfig.logits_chunk must be >= 0, got {self.logits_chunk!r}")
        if int(self.vocab_multiple) < 1:
            raise ValueError(f"ModelConfig.vocab_multiple must be >= 1, got "
                             f"{self.vocab_multiple!r}")
        for name, valid in _CHOICES.items():
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"ModelConfig.{name}={getattr(self, name)!r} is invalid; valid choices: {valid}"
                )
        for name in ("d_model", "num_layers", "num_heads", "d_ff", "max_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("vocab_size", "num_decoder_layers", "num_kv_heads", "head_dim",
                     "type_vocab_size", "embed_dim"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"ModelConfig.norm_eps must be in (0, 1), got {self.norm_eps!r}")
        if self.rope_theta <= 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        setf = lambda k, v: object.__setattr__(self, k, v)  # frozen: resolve derived fields once
        if self.num_decoder_layers == 0:
            setf("num_decoder_layers", self.num_layers)
        if self.num_kv_heads == 0:
            setf("num_kv_heads", self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be divisible by "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim == 0:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"ModelConfig.d_model={self.d_model} not divisible by num_heads="
                    f"{self.num_heads}; set head_dim explicitly"
                )
            setf("head_dim", self.d_model // self.num_heads)
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for rope")
        if self.embed_dim == 0:
            setf("embed_dim", self.d_model)

    @classmethod
    def from_config(cls, section: Mapping[str, Any], **overrides) -> ModelConfig:
        """From `config.model` (a ConfigDict or mapping with every key); `overrides` win (e.g.
        vocab_size=tokenizer.vocab_size). A missing or unknown key is an error naming it."""
        values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        values.update(overrides)
        return from_section(cls, values, "model")

    @property
    def padded_vocab(self) -> int:
        """vocab_size rounded up to vocab_multiple: the embedding/output table rows. Logits of
        the padding ids are masked to -1e30 (never sampled, no share of the softmax)."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def activation(self) -> str:
        """The GELU the MLP (and the MLM head) use: 'gelu_exact' (erf, BERT) or 'gelu' (tanh,
        GPT-2's gelu_new; also the MLM head's of SwiGLU models)."""
        return "gelu_exact" if self.mlp == "gelu_exact" else "gelu"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _block_matmul_params(cfg: ModelConfig, cross: bool) -> int:
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = d * h * k * 2 + d * g * k * 2  # q, o + k, v
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff  # biases are free (see below)
    return attn * (2 if cross else 1) + mlp


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM-style (Chowdhery et al. 2022, App. B).

        flops_per_token = 6 * N + 12 * n_attn_layers * seq_len * (num_heads * head_dim)

    N counts matmul weights only: per block q/k/v/o projections (+ a second set for cross-attention
    in encoder-decoder decoder blocks) and MLP (3*D*F for SwiGLU, 2*D*F for GELU), plus the output
    projection D*V (counted once whether or not tied; embedding lookups, norms and biases are free).
    The second term is the QK^T and AV matmuls (2 matmuls * 2 FLOPs * 3 for fwd+bwd = 12), counted
    over the full L x L square even when causal, as PaLM does. For encoder_decoder we assume source
    and target both have seq_len tokens and count one source plus one target token per "token":
    n_attn_layers = encoder layers + 2 * decoder layers (self + cross).
    """
    n = cfg.d_model * cfg.vocab_size
    if cfg.kind == "encoder_decoder":
        n += cfg.num_layers * _block_matmul_params(cfg, cross=False)
        n += cfg.num_decoder_layers * _block_matmul_params(cfg, cross=True)
        n_attn_layers = cfg.num_layers + 2 * cfg.num_decoder_layers
    else:
        n += cfg.num_layers * _block_matmul_params(cfg, cross=False)
        n_attn_layers = cfg.num_layers
    return float(6 * n + 12 * n_attn_layers * seq_len * cfg.num_heads * cfg.head_dim)

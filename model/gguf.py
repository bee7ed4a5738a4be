"""GGUF files (llama.cpp) -> an HF config and state dict, for model/hf.py to map onto solo.

Llama-family architectures only. Tensors are dequantized to float32 with the `gguf` package's
own kernels (the types it implements: F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0 and the k-quants;
`solo import --dtype bfloat16` then rounds them); a type it lacks is a one-line error.
llama.cpp stores the q and k projections with their rows permuted for its interleaved RoPE;
`_unpermute` restores HF's rotate-half order (the inverse of llama.cpp's convert_hf_to_gguf
`permute`), as `transformers`' GGUF loader does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from solo.model.hf import ConversionError

_NAMES = {  # GGUF tensor name (blk.{i}.) -> HF Llama name (model.layers.{i}.)
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ARCHS = ("llama",)


def reader(path: str):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConversionError("reading GGUF files needs the `gguf` package: pip install "
                              "gguf") from None
    try:
        return GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ConversionError(f"{path} is not a readable GGUF file ({e})") from None


def field(r, key: str, default: Any = None) -> Any:
    f = r.fields.get(key)
    return default if f is None else f.contents()


def hf_config(r) -> dict[str, Any]:
    """The HF config.json of a GGUF model (Llama family)."""
    arch = field(r, "general.architecture")
    if arch not in ARCHS:
        raise ConversionError(f"GGUF architecture {arch!r} is not supported; supported: "
                              f"{', '.join(ARCHS)}")
    def g(key: str, default: Any = None) -> Any:
        value = field(r, f"{arch}.{key}", default)
        if value is None:
            raise ConversionError(f"GGUF file lacks the metadata {arch}.{key}")
        return value

    heads = int(g("attention.head_count"))
    names = {t.name for t in r.tensors}
    vocab = len(field(r, "tokenizer.ggml.tokens", [])) or int(g("vocab_size"))
    d = int(g("embedding_length"))
    # RoPE scaling changes the model's logits: hand it on so model_overrides refuses it (as an HF
    # config.json's rope_scaling), never dropped. llama.cpp writes Llama 3.1's per-frequency
    # factors as a rope_freqs tensor and linear/yarn scaling as metadata
    scaling = str(field(r, f"{arch}.rope.scaling.type", "none"))
    rope = {}
    if "rope_freqs.weight" in names:
        rope = dict(rope_scaling={"rope_type": "llama3", "source": "GGUF rope_freqs tensor"})
    elif scaling != "none":
        rope = dict(rope_scaling={"rope_type": scaling,
                                  "factor": float(field(r, f"{arch}.rope.scaling.factor", 1.0))})
    return dict(model_type="llama", vocab_size=vocab, hidden_size=d, **rope,
                num_hidden_layers=int(g("block_count")), num_attention_heads=heads,
                num_key_value_heads=int(g("attention.head_count_kv", heads)),
                head_dim=int(g("rope.dimension_count", d // heads)),
                intermediate_size=int(g("feed_forward_length")),
                max_position_embeddings=int(g("context_length", 2048)),
                rope_theta=float(g("rope.freq_base", 10000.0)),
                rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
                hidden_act="silu", tie_word_embeddings="output.weight" not in names)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def state_dict(r, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """HF Llama state dict (float32) of a GGUF model."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out = {}
    for t in r.tensors:
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        except NotImplementedError:
            raise ConversionError(
                f"GGUF tensor {t.name} has quantization type "
                f"{GGMLQuantizationType(t.tensor_type).name}, which the gguf package cannot "
                "dequantize; convert the model to a supported type (F16, Q8_0, Q4_K, ...)"
            ) from None
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists the fastest axis first
        name = t.name
        if name == "token_embd.weight":
            out["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            out["model.norm.weight"] = w
        elif name == "output.weight":
            out["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, i, part, kind = name.split(".")
            if part not in _NAMES:
                raise ConversionError(f"GGUF tensor {name} has no Llama counterpart")
            if part == "attn_q":
                w = _unpermute(w, config["num_attention_heads"])
            elif part == "attn_k":
                w = _unpermute(w, config["num_key_value_heads"])
            out[f"model.layers.{i}.{_NAMES[part]}.{kind}"] = w
        elif name != "rope_freqs.weight":
            raise ConversionError(f"GGUF tensor {name} has no Llama counterpart")
    return out

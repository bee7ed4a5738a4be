"""Hugging Face checkpoints <-> solo, as plain functions on numpy arrays: configs, and parameter
trees for GPT-2, BERT and the Llama family (Llama, Mistral, SmolLM2, ...).

`model_overrides(hf_config)` gives the `config.model` keys that express an HF architecture;
`params_from_hf(state, cfg, arch)` maps an HF state dict (name -> array, as safetensors or
`state_dict()` hold it) onto solo's (unrolled) param tree, and `hf_from_params` is its exact
inverse, with `hf_config(cfg, arch)` the config.json that `transformers` loads it with.

Layouts: torch Linear weights are [out, in] and solo's kernels [in, out]; GPT-2's Conv1D is
already [in, out] and fuses q, k, v; solo's q/k/v kernels are [D, heads, head width] and the
output projection [heads, head width, D]; HF Llama's q/k rows are in the rotate-half order solo's
RoPE uses, so they map as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from solo.model.config import ModelConfig

ARCHS = ("gpt2", "bert", "llama")
LLAMA_FAMILY = ("llama", "mistral")  # model_type values with Llama's layout


class ConversionError(ValueError):
    """A checkpoint solo cannot express (or a tree that does not fit); the message says which."""


def arch_of(hf: Mapping[str, Any]) -> str:
    kind = hf.get("model_type", "")
    if kind in LLAMA_FAMILY:
        return "llama"
    if kind in ("gpt2", "bert"):
        return kind
    raise ConversionError(f"unsupported architecture model_type={kind!r}; supported: gpt2, "
                          f"bert, {', '.join(LLAMA_FAMILY)}")


def model_overrides(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The `config.model` keys (over experiments/base.py's) of an HF config.json."""
    arch = arch_of(hf)
    if arch == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ConversionError(f"GPT-2 activation_function={act!r} is not supported")
        d = hf["n_embd"]
        return dict(kind="decoder", vocab_size=hf["vocab_size"], d_model=d,
                    num_layers=hf["n_layer"], num_heads=hf["n_head"], num_kv_heads=0, head_dim=0,
                    d_ff=hf.get("n_inner") or 4 * d, max_len=hf["n_positions"],
                    positions="learned", norm="layernorm",
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_position="pre",
                    embed_norm=False, embed_scale=False,
                    mlp="gelu_exact" if act == "gelu" else "gelu", attn_bias=True,
                    mlp_bias=True, tie_embeddings=True, type_vocab_size=0, scan_layers=False)
    if arch == "bert":
        act = hf.get("hidden_act", "gelu")
        if act not in ("gelu", "gelu_new"):
            raise ConversionError(f"BERT hidden_act={act!r} is not supported")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ConversionError("BERT position_embedding_type must be 'absolute'")
        return dict(kind="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                    num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                    num_kv_heads=0, head_dim=0, d_ff=hf["intermediate_size"],
                    max_len=hf["max_position_embeddings"], positions="learned",
                    norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
                    norm_position="post", embed_norm=True, embed_scale=False,
                    mlp="gelu_exact" if act == "gelu" else "gelu", attn_bias=True, mlp_bias=True,
                    tie_embeddings=True, type_vocab_size=hf.get("type_vocab_size", 2),
                    pooling="first", scan_layers=False)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"Llama hidden_act={hf.get('hidden_act')!r}: only silu (SwiGLU)")
    # transformers >= 5 writes rope_parameters {rope_theta, rope_type}; older, rope_theta and
    # rope_scaling
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or rope
    if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ConversionError(f"rope scaling {scaling!r} is not supported (plain RoPE only)")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    # sliding-window attention (Mistral v0.1: 4096) equals full causal attention on sequences no
    # longer than the window, so the context is capped there rather than the import refused
    max_len = hf.get("max_position_embeddings", 2048)
    if hf.get("sliding_window") and hf.get("use_sliding_window", True):
        max_len = min(max_len, int(hf["sliding_window"]))
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return dict(kind="decoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"], num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
                d_ff=hf["intermediate_size"], max_len=max_len, positions="rope", rope_theta=theta,
                norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), norm_position="pre",
                embed_norm=False, embed_scale=False, mlp="swiglu",
                attn_bias=bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), type_vocab_size=0,
                scan_layers=False)


def hf_config(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    """An HF config.json for a solo model of one of ARCHS (inverse of model_overrides)."""
    check_expressible(cfg, arch)
    if arch == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"],
                    vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.num_layers,
                    n_head=cfg.num_heads, n_inner=cfg.d_ff, n_positions=cfg.max_len,
                    n_ctx=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
                    activation_function="gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    tie_word_embeddings=True)
    if arch == "bert":
        return dict(model_type="bert", architectures=["BertForPreTraining"],
                    vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                    intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_len,
                    type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
                    hidden_act="gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    tie_word_embeddings=True)
    return dict(model_type="llama", architectures=["LlamaForCausalLM"],
                vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_len,
                rope_theta=cfg.rope_theta,
                rope_parameters=dict(rope_theta=cfg.rope_theta, rope_type="default"),
                rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias,
                tie_word_embeddings=cfg.tie_embeddings)


def check_expressible(cfg: ModelConfig, arch: str) -> None:
    """ConversionError naming the first option an HF `arch` model cannot express."""
    want = {  # option -> the value the architecture has
        "gpt2": dict(kind="decoder", positions="learned", norm="layernorm",
                     norm_position="pre", embed_norm=False, embed_scale=False, attn_bias=True,
                     mlp_bias=True, tie_embeddings=True, type_vocab_size=0),
        "bert": dict(kind="encoder", positions="learned", norm="layernorm",
                     norm_position="post", embed_norm=True, embed_scale=False, attn_bias=True,
                     mlp_bias=True, tie_embeddings=True),
        "llama": dict(kind="decoder", positions="rope", norm="rmsnorm", norm_position="pre",
                      embed_norm=False, embed_scale=False, mlp="swiglu", type_vocab_size=0),
    }
    if arch not in want:
        raise ConversionError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHS)}")
    for key, value in want[arch].items():
        if getattr(cfg, key) != value:
            raise ConversionError(f"an HF {arch} model cannot express model.{key}="
                                  f"{getattr(cfg, key)!r} (it has {value!r})")
    if arch in ("gpt2", "bert") and (cfg.mlp == "swiglu" or cfg.num_kv_heads != cfg.num_heads
                                     or cfg.head_dim * cfg.num_heads != cfg.d_model):
        raise ConversionError(f"an HF {arch} model needs mlp gelu/gelu_exact, no grouped-query "
                              "attention and head_dim * num_heads == d_model")


def _t(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32).T)


# path -> vocabulary axis of every table with a row or column per token id
_VOCAB_AXES = {("embedder", "token"): 0, ("lm_head", "kernel"): 1,
               ("mlm_head", "decoder", "kernel"): 1, ("mlm_head", "bias"): 0}


def _resize_vocab(params: Mapping, size: int) -> dict:
    """A copy of params with every vocabulary table cut or zero-padded to `size` ids
    (model.vocab_multiple pads solo's tables; HF's have the real vocabulary)."""
    def resize(x, axis):
        x = np.asarray(x)
        if x.shape[axis] >= size:
            return np.take(x, np.arange(size), axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, size - x.shape[axis])
        return np.pad(x, pad)

    def walk(node, path):
        if isinstance(node, Mapping):
            return {k: walk(v, (*path, k)) for k, v in node.items()}
        axis = _VOCAB_AXES.get(path)
        return node if axis is None else resize(node, axis)

    return walk(params, ())


def params_from_hf(state: Mapping[str, np.ndarray], cfg: ModelConfig, arch: str,
                   heads: tuple[str, ...] = ("lm",)) -> dict:
    """solo's param tree (layers unrolled) from an HF state dict; `heads` as the run uses them.
    Missing or misshaped tensors are a ConversionError naming them. Vocabulary tables are
    zero-padded to cfg.padded_vocab rows."""
    return _resize_vocab(_params_from_hf(state, cfg, arch, heads), cfg.padded_vocab)


def _params_from_hf(state: Mapping[str, np.ndarray], cfg: ModelConfig, arch: str,
                    heads: tuple[str, ...]) -> dict:
    get = _getter(state)
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if arch == "gpt2":
        p = "transformer." if "transformer.wte.weight" in state else ""
        layers = {}
        for i in range(cfg.num_layers):
            b = f"{p}h.{i}."
            w_qkv, b_qkv = get(b + "attn.c_attn.weight", (d, 3 * d)), get(b + "attn.c_attn.bias")
            q, kk, v = np.split(w_qkv, 3, axis=1)
            bq, bk, bv = np.split(b_qkv, 3)
            layers[f"layers_{i}"] = dict(
                attn_norm=dict(scale=get(b + "ln_1.weight"), bias=get(b + "ln_1.bias")),
                attn=dict(q=q.reshape(d, h, k), k=kk.reshape(d, g, k), v=v.reshape(d, g, k),
                          o=get(b + "attn.c_proj.weight", (d, d)).reshape(h, k, d),
                          q_bias=bq.reshape(h, k), k_bias=bk.reshape(g, k), v_bias=bv.reshape(g, k),
                          o_bias=get(b + "attn.c_proj.bias")),
                mlp_norm=dict(scale=get(b + "ln_2.weight"), bias=get(b + "ln_2.bias")),
                mlp=dict(wi=get(b + "mlp.c_fc.weight", (d, cfg.d_ff)),
                         wi_bias=get(b + "mlp.c_fc.bias"),
                         wo=get(b + "mlp.c_proj.weight", (cfg.d_ff, d)),
                         wo_bias=get(b + "mlp.c_proj.bias")))
        layers["final_norm"] = dict(scale=get(p + "ln_f.weight"), bias=get(p + "ln_f.bias"))
        return dict(embedder=dict(token=get(p + "wte.weight", (cfg.vocab_size, d)),
                                  position=get(p + "wpe.weight", (cfg.max_len, d))),
                    decoder=layers)
    if arch == "bert":
        return _bert_params(get, cfg, heads)
    p = "model." if "model.embed_tokens.weight" in state else ""
    layers = {}
    for i in range(cfg.num_layers):
        b = f"{p}layers.{i}."
        attn = dict(q=_t(get(b + "self_attn.q_proj.weight", (h * k, d))).reshape(d, h, k),
                    k=_t(get(b + "self_attn.k_proj.weight", (g * k, d))).reshape(d, g, k),
                    v=_t(get(b + "self_attn.v_proj.weight", (g * k, d))).reshape(d, g, k),
                    o=_t(get(b + "self_attn.o_proj.weight", (d, h * k))).reshape(h, k, d))
        if cfg.attn_bias:
            attn.update(q_bias=get(b + "self_attn.q_proj.bias").reshape(h, k),
                        k_bias=get(b + "self_attn.k_proj.bias").reshape(g, k),
                        v_bias=get(b + "self_attn.v_proj.bias").reshape(g, k),
                        o_bias=get(b + "self_attn.o_proj.bias"))
        mlp = dict(wi_0=_t(get(b + "mlp.gate_proj.weight", (cfg.d_ff, d))),
                   wi_1=_t(get(b + "mlp.up_proj.weight", (cfg.d_ff, d))),
                   wo=_t(get(b + "mlp.down_proj.weight", (d, cfg.d_ff))))
        if cfg.mlp_bias:
            mlp.update(wi_0_bias=get(b + "mlp.gate_proj.bias"),
                       wi_1_bias=get(b + "mlp.up_proj.bias"), wo_bias=get(b + "mlp.down_proj.bias"))
        layers[f"layers_{i}"] = dict(
            attn_norm=dict(scale=get(b + "input_layernorm.weight")), attn=attn,
            mlp_norm=dict(scale=get(b + "post_attention_layernorm.weight")), mlp=mlp)
    layers["final_norm"] = dict(scale=get(p + "norm.weight"))
    out = dict(embedder=dict(token=get(p + "embed_tokens.weight", (cfg.vocab_size, d))),
               decoder=layers)
    if not cfg.tie_embeddings:
        out["lm_head"] = dict(kernel=_t(get("lm_head.weight", (cfg.vocab_size, d))))
    return out


def _bert_params(get, cfg: ModelConfig, heads: tuple[str, ...]) -> dict:
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    ln = lambda n: dict(scale=get(n + ".weight"), bias=get(n + ".bias"))
    lin = lambda n, shape: (_t(get(n + ".weight", shape)), get(n + ".bias"))
    layers = {}
    for i in range(cfg.num_layers):
        b = f"bert.encoder.layer.{i}."
        (q, bq), (kk, bk), (v, bv) = (lin(b + f"attention.self.{n}", (d, d))
                                      for n in ("query", "key", "value"))
        o, bo = lin(b + "attention.output.dense", (d, d))
        wi, bi = lin(b + "intermediate.dense", (cfg.d_ff, d))
        wo, bwo = lin(b + "output.dense", (d, cfg.d_ff))
        layers[f"layers_{i}"] = dict(
            attn=dict(q=q.reshape(d, h, k), k=kk.reshape(d, h, k), v=v.reshape(d, h, k),
                      o=o.reshape(h, k, d), q_bias=bq.reshape(h, k), k_bias=bk.reshape(h, k),
                      v_bias=bv.reshape(h, k), o_bias=bo),
            attn_norm=ln(b + "attention.output.LayerNorm"),
            mlp=dict(wi=wi, wi_bias=bi, wo=wo, wo_bias=bwo),
            mlp_norm=ln(b + "output.LayerNorm"))
    e = "bert.embeddings."
    out = dict(embedder=dict(token=get(e + "word_embeddings.weight", (cfg.vocab_size, d)),
                             position=get(e + "position_embeddings.weight", (cfg.max_len, d)),
                             token_type=get(e + "token_type_embeddings.weight",
                                            (cfg.type_vocab_size, d))),
               embed_norm=ln(e + "LayerNorm"), encoder=layers)
    if "mlm" in heads:
        t, tb = lin("cls.predictions.transform.dense", (d, d))
        out["mlm_head"] = dict(transform=dict(kernel=t, bias=tb),
                               norm=ln("cls.predictions.transform.LayerNorm"),
                               bias=get("cls.predictions.bias"))
    if "nsp" in heads:
        pk, pb = lin("bert.pooler.dense", (d, d))
        ck, cb = lin("cls.seq_relationship", (2, d))
        out["nsp_head"] = dict(pooler=dict(kernel=pk, bias=pb), cls=dict(kernel=ck, bias=cb))
    return out


def _getter(state: Mapping[str, np.ndarray]):
    def get(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in state:
            raise ConversionError(f"checkpoint lacks tensor {name!r}")
        x = np.asarray(state[name], np.float32)
        if shape is not None and tuple(x.shape) != tuple(shape):
            raise ConversionError(f"tensor {name!r} has shape {tuple(x.shape)}, the config says "
                                  f"{tuple(shape)}")
        return x
    return get


def hf_from_params(params: Mapping, cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """The HF state dict of solo params (unrolled layers; inverse of params_from_hf); the
    vocabulary padding (model.vocab_multiple) is cut off."""
    check_expressible(cfg, arch)
    params = _resize_vocab(params, cfg.vocab_size)
    P = lambda x: np.asarray(x, np.float32)
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    emb = params["embedder"]
    out: dict[str, np.ndarray] = {}
    if arch == "gpt2":
        out["transformer.wte.weight"] = P(emb["token"])
        out["transformer.wpe.weight"] = P(emb["position"])
        for i in range(cfg.num_layers):
            lp, b = params["decoder"][f"layers_{i}"], f"transformer.h.{i}."
            a, m = lp["attn"], lp["mlp"]
            out[b + "ln_1.weight"], out[b + "ln_1.bias"] = P(lp["attn_norm"]["scale"]), P(
                lp["attn_norm"]["bias"])
            out[b + "attn.c_attn.weight"] = np.concatenate(
                [P(a["q"]).reshape(d, -1), P(a["k"]).reshape(d, -1), P(a["v"]).reshape(d, -1)], 1)
            out[b + "attn.c_attn.bias"] = np.concatenate(
                [P(a["q_bias"]).reshape(-1), P(a["k_bias"]).reshape(-1),
                 P(a["v_bias"]).reshape(-1)])
            out[b + "attn.c_proj.weight"] = P(a["o"]).reshape(h * k, d)
            out[b + "attn.c_proj.bias"] = P(a["o_bias"])
            out[b + "ln_2.weight"], out[b + "ln_2.bias"] = P(lp["mlp_norm"]["scale"]), P(
                lp["mlp_norm"]["bias"])
            out[b + "mlp.c_fc.weight"], out[b + "mlp.c_fc.bias"] = P(m["wi"]), P(m["wi_bias"])
            out[b + "mlp.c_proj.weight"], out[b + "mlp.c_proj.bias"] = P(m["wo"]), P(m["wo_bias"])
        fn = params["decoder"]["final_norm"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = P(fn["scale"]), P(fn["bias"])
        out["lm_head.weight"] = out["transformer.wte.weight"]
        return out
    if arch == "bert":
        e = "bert.embeddings."
        out[e + "word_embeddings.weight"] = P(emb["token"])
        out[e + "position_embeddings.weight"] = P(emb["position"])
        out[e + "token_type_embeddings.weight"] = P(emb["token_type"])
        out[e + "LayerNorm.weight"] = P(params["embed_norm"]["scale"])
        out[e + "LayerNorm.bias"] = P(params["embed_norm"]["bias"])
        for i in range(cfg.num_layers):
            lp, b = params["encoder"][f"layers_{i}"], f"bert.encoder.layer.{i}."
            a, m = lp["attn"], lp["mlp"]
            for n, w, bias in (("query", "q", "q_bias"), ("key", "k", "k_bias"),
                               ("value", "v", "v_bias")):
                out[b + f"attention.self.{n}.weight"] = _t(P(a[w]).reshape(d, d))
                out[b + f"attention.self.{n}.bias"] = P(a[bias]).reshape(-1)
            out[b + "attention.output.dense.weight"] = _t(P(a["o"]).reshape(d, d))
            out[b + "attention.output.dense.bias"] = P(a["o_bias"])
            for n, norm in (("attention.output.LayerNorm", "attn_norm"),
                            ("output.LayerNorm", "mlp_norm")):
                out[b + n + ".weight"] = P(lp[norm]["scale"])
                out[b + n + ".bias"] = P(lp[norm]["bias"])
            out[b + "intermediate.dense.weight"] = _t(P(m["wi"]))
            out[b + "intermediate.dense.bias"] = P(m["wi_bias"])
            out[b + "output.dense.weight"] = _t(P(m["wo"]))
            out[b + "output.dense.bias"] = P(m["wo_bias"])
        if "mlm_head" in params:
            mh = params["mlm_head"]
            out["cls.predictions.transform.dense.weight"] = _t(P(mh["transform"]["kernel"]))
            out["cls.predictions.transform.dense.bias"] = P(mh["transform"]["bias"])
            out["cls.predictions.transform.LayerNorm.weight"] = P(mh["norm"]["scale"])
            out["cls.predictions.transform.LayerNorm.bias"] = P(mh["norm"]["bias"])
            out["cls.predictions.bias"] = P(mh["bias"])
            out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]  # tied in HF
            out["cls.predictions.decoder.weight"] = out[e + "word_embeddings.weight"]
        if "nsp_head" in params:
            nh = params["nsp_head"]
            out["bert.pooler.dense.weight"] = _t(P(nh["pooler"]["kernel"]))
            out["bert.pooler.dense.bias"] = P(nh["pooler"]["bias"])
            out["cls.seq_relationship.weight"] = _t(P(nh["cls"]["kernel"]))
            out["cls.seq_relationship.bias"] = P(nh["cls"]["bias"])
        return out
    out["model.embed_tokens.weight"] = P(emb["token"])
    for i in range(cfg.num_layers):
        lp, b = params["decoder"][f"layers_{i}"], f"model.layers.{i}."
        a, m = lp["attn"], lp["mlp"]
        out[b + "input_layernorm.weight"] = P(lp["attn_norm"]["scale"])
        out[b + "post_attention_layernorm.weight"] = P(lp["mlp_norm"]["scale"])
        out[b + "self_attn.q_proj.weight"] = _t(P(a["q"]).reshape(d, h * k))
        out[b + "self_attn.k_proj.weight"] = _t(P(a["k"]).reshape(d, g * k))
        out[b + "self_attn.v_proj.weight"] = _t(P(a["v"]).reshape(d, g * k))
        out[b + "self_attn.o_proj.weight"] = _t(P(a["o"]).reshape(h * k, d))
        if cfg.attn_bias:
            for n, w in (("q_proj", "q_bias"), ("k_proj", "k_bias"), ("v_proj", "v_bias")):
                out[b + f"self_attn.{n}.bias"] = P(a[w]).reshape(-1)
            out[b + "self_attn.o_proj.bias"] = P(a["o_bias"])
        out[b + "mlp.gate_proj.weight"] = _t(P(m["wi_0"]))
        out[b + "mlp.up_proj.weight"] = _t(P(m["wi_1"]))
        out[b + "mlp.down_proj.weight"] = _t(P(m["wo"]))
        if cfg.mlp_bias:
            out[b + "mlp.gate_proj.bias"] = P(m["wi_0_bias"])
            out[b + "mlp.up_proj.bias"] = P(m["wi_1_bias"])
            out[b + "mlp.down_proj.bias"] = P(m["wo_bias"])
    out["model.norm.weight"] = P(params["decoder"]["final_norm"]["scale"])
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    else:
        out["lm_head.weight"] = _t(P(params["lm_head"]["kernel"]))
    return out

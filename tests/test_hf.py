"""Hugging Face parity: randomly initialised GPT-2, BERT and Llama models built by `transformers`,
mapped onto solo, give the same logits (float32, CPU); the mapping back is exact.

The bound 1e-4 on |logit difference| (the issue's) is an error argument too: both sides compute
the same function in float32 with other reduction orders, a logit passes through ~K = 1,500
float32 reductions here (tests/test_model.py's chain_length for these widths), each within its
length times eps of the logits' scale (~1): K * eps ~ 2e-4 in the worst case, ~1e-5 typically.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import model_config
from reference import require

from solo.model import Transformer
from solo.model.hf import (
    ConversionError,
    check_expressible,
    hf_config,
    hf_from_params,
    model_overrides,
    params_from_hf,
)

ATOL = 1e-4


def jitter(model, scale=0.05, seed=0):
    """HF initialises norms to 1 and biases to 0: noise on every parameter makes them count."""
    torch = require("torch")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def ours(hf_model, arch, heads=("lm",)):
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    cfg = model_config(**model_overrides(hf_model.config.to_dict()))
    return cfg, params_from_hf(state, cfg, arch, heads), state


def tokens(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def test_gpt2_logits_and_round_trip():
    torch, tf = require("torch"), require("transformers")
    hf = jitter(tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0)))
    cfg, params, state = ours(hf, "gpt2")
    x = tokens(97, (2, 20))
    got = Transformer(cfg).apply({"params": params}, {"tokens": x})["logits"]
    want = hf(torch.tensor(x, dtype=torch.long)).logits.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    back = hf_from_params(params, cfg, "gpt2")
    for k, v in state.items():
        if not k.endswith(".attn.bias") and "masked_bias" not in k:  # buffers, not weights
            np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert hf_config(cfg, "gpt2")["n_embd"] == 64


def test_llama_gqa_untied_logits_and_round_trip():
    torch, tf = require("torch"), require("transformers")
    hf = jitter(tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
        rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)))
    cfg, params, state = ours(hf, "llama")
    assert (cfg.num_kv_heads, cfg.tie_embeddings, cfg.norm_eps) == (2, False, 1e-5)
    x = tokens(101, (2, 24))
    got = Transformer(cfg).apply({"params": params}, {"tokens": x})["logits"]
    want = hf(torch.tensor(x, dtype=torch.long)).logits.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    back = hf_from_params(params, cfg, "llama")
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_bert_mlm_and_nsp_logits_with_token_types_and_padding():
    torch, tf = require("torch"), require("transformers")
    hf = jitter(tf.BertForPreTraining(tf.BertConfig(
        vocab_size=89, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=40, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)))
    cfg, params, state = ours(hf, "bert", heads=("mlm", "nsp"))
    x = tokens(89, (2, 16))
    types = np.zeros_like(x)
    types[:, 7:] = 1
    mask = np.ones_like(x)
    mask[1, 11:] = 0  # row 1 is padded after 11 tokens
    out = Transformer(cfg).apply({"params": params}, dict(tokens=x, token_types=types,
                                                          segment_ids=mask),
                                 heads=("mlm", "nsp"))
    ref = hf(torch.tensor(x, dtype=torch.long), attention_mask=torch.tensor(mask),
             token_type_ids=torch.tensor(types, dtype=torch.long))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out["mlm_logits"])[real],
                               ref.prediction_logits.detach().numpy()[real], rtol=0, atol=ATOL)
    np.testing.assert_allclose(out["nsp_logits"], ref.seq_relationship_logits.detach().numpy(),
                               rtol=0, atol=ATOL)
    back = hf_from_params(params, cfg, "bert")
    for k, v in state.items():
        if k in back:
            np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert {k for k in state if "position_ids" not in k} <= set(back)


def test_what_hf_cannot_express_is_named():
    with pytest.raises(ConversionError, match="model_type='t5'"):
        model_overrides({"model_type": "t5"})
    cfg = model_config(vocab_size=50, norm="rmsnorm")  # solo's default: rope, swiglu
    with pytest.raises(ConversionError, match="gpt2 model cannot express model.positions"):
        check_expressible(cfg, "gpt2")
    with pytest.raises(ConversionError, match="llama model cannot express model.kind"):
        check_expressible(model_config(vocab_size=50, kind="encoder"), "llama")
    with pytest.raises(ConversionError, match="rope scaling"):
        model_overrides({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"},
                         "num_attention_heads": 4, "hidden_size": 8})
    cfg = model_config(**model_overrides({"model_type": "llama", "vocab_size": 10,
                                          "hidden_size": 8, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "intermediate_size": 16}))
    with pytest.raises(ConversionError, match="lacks tensor 'layers.0.self_attn.q_proj"):
        params_from_hf({}, cfg, "llama")


LLAMA = {"model_type": "mistral", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 32768}


def test_sliding_window_caps_the_context_where_it_equals_full_attention():
    assert model_overrides(LLAMA)["max_len"] == 32768
    assert model_overrides({**LLAMA, "sliding_window": 4096})["max_len"] == 4096  # Mistral v0.1
    assert model_overrides({**LLAMA, "sliding_window": 4096,
                            "use_sliding_window": False})["max_len"] == 32768  # Qwen2's switch
    assert model_overrides({**LLAMA, "sliding_window": None})["max_len"] == 32768


def _gguf_model(path, rope_scaling: str | None = None, rope_freqs: bool = False) -> str:
    gguf = require("gguf")
    d, h, ff, vocab = 8, 2, 16, 10
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(h)
    w.add_head_count_kv(h)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
        w.add_rope_scaling_factor(8.0)
    rng = np.random.default_rng(0)
    t = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    w.add_tensor("token_embd.weight", t(vocab, d))
    w.add_tensor("output_norm.weight", t(d))
    if rope_freqs:  # what llama.cpp writes for Llama 3.1's rope_type llama3
        w.add_tensor("rope_freqs.weight", np.full(d // h // 2, 8.0, np.float32))
    for n, shape in dict(attn_norm=(d,), ffn_norm=(d,), attn_q=(d, d), attn_k=(d, d),
                         attn_v=(d, d), attn_output=(d, d), ffn_gate=(ff, d), ffn_up=(ff, d),
                         ffn_down=(d, ff)).items():
        w.add_tensor(f"blk.0.{n}.weight", t(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_gguf_rope_scaling_is_refused_not_dropped(tmp_path):
    from solo.model import gguf as gguf_lib

    plain = gguf_lib.hf_config(gguf_lib.reader(_gguf_model(tmp_path / "plain.gguf")))
    assert model_overrides(plain)["rope_theta"] == 500000.0
    for name, kw in (("linear", dict(rope_scaling="linear")),
                     ("llama3", dict(rope_freqs=True))):
        cfg = gguf_lib.hf_config(gguf_lib.reader(_gguf_model(tmp_path / f"{name}.gguf", **kw)))
        with pytest.raises(ConversionError, match=f"rope scaling .*{name}.* is not supported"):
            model_overrides(cfg)

"""LoRA (train/lora.py): the trainable count is the formula's, the base params are bit-identical
after training, the adapters start as the identity and the merged export has the unmerged
model's logits (transformers loading it: 1e-4, tests/test_hf.py's bound)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import model_config
from reference import require

from solo import cli
from solo.config import ConfigError, RunConfig
from solo.model import Transformer
from solo.model.transformer import init_params
from solo.train import inference, lora, parallel
from solo.train.checkpoint import Checkpointer
from solo.train.config import LoraConfig
from solo.train.inference import load
from solo.train.workdir import read_config

# legend: B batch, L length, V vocabulary


def _lcfg(rank=4, targets=("attn/q$", "attn/v$"), alpha=8.0):
    return LoraConfig(rank=rank, alpha=alpha, targets=targets)


def _params(**kw):
    cfg = model_config(vocab_size=40, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                       head_dim=8, d_ff=64, max_len=16, **kw)
    model = Transformer(cfg)
    params = init_params(model, jax.random.key(0), ("lm",), 16, 0)
    return model, cfg, jax.tree.map(lambda x: getattr(x, "value", x), params,
                                    is_leaf=lambda x: hasattr(x, "value"))


def test_trainable_count_is_the_formula():
    """r * (in + out) per adapted kernel: q is [D, H, Dh] (in D, out H*Dh), v [D, KV, Dh],
    o [H, Dh, D] (in H*Dh, out D), the MLP's wi [D, F] and wo [F, D]."""
    _, c, params = _params()
    r, n = 4, c.num_layers
    qv = n * r * ((c.d_model + c.num_heads * c.head_dim) + (c.d_model + 2 * c.head_dim))
    assert lora.trainable_count(lora.add(params, _lcfg(r), jax.random.key(1))) == qv
    every = _lcfg(r, targets=("attn/(q|k|v|o)$", "mlp/"))
    with_all = lora.add(params, every, jax.random.key(1))
    wi = 2 if c.mlp == "swiglu" else 1  # swiglu's gate and up kernels: wi_0, wi_1
    want = n * r * (4 * c.d_model + (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                    + wi * (c.d_model + c.d_ff) + (c.d_ff + c.d_model))
    assert lora.trainable_count(with_all) == want
    with pytest.raises(ConfigError, match="match no kernel"):
        lora.add(params, _lcfg(targets=("nothing$",)), jax.random.key(1))


def test_adapters_start_as_identity_and_every_kernel_merges_as_w_plus_scaled_ab():
    """The adapted forward is the base model's on W + (alpha/r) A B (linear in W, so the same as
    adding x A B (alpha/r) to each projection): B = 0 changes nothing; each merged kernel is
    checked against that formula by hand."""
    model, _, params = _params()
    lcfg = _lcfg(targets=("attn/(q|k|v|o)$", "mlp/"))
    adapted = lora.add(params, lcfg, jax.random.key(1))
    tokens = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 16)), jnp.int32)}
    apply = lora.apply_fn(model.apply, lcfg)
    base_BLV = model.apply({"params": params}, tokens)["logits"]
    assert np.array_equal(apply({"params": adapted}, tokens)["logits"], base_BLV)  # B = 0
    # random B: the adapted forward differs, and merging first gives the same logits
    moved = {**adapted, lora.KEY: jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapted[lora.KEY])}
    adapted_BLV = apply({"params": moved}, tokens)["logits"]
    assert float(jnp.max(jnp.abs(adapted_BLV - base_BLV))) > 1e-2
    merged = lora.merge(moved, lcfg)
    assert len(moved[lora.KEY]) == 3 * 7  # per layer q, k, v, o, wi_0, wi_1, wo (swiglu)
    for path, ab in moved[lora.KEY].items():
        node_w, node_m = params, merged
        for part in path.split("/"):
            node_w, node_m = node_w[part], node_m[part]
        want = node_w + (lcfg.alpha / lcfg.rank) * (
            np.asarray(ab["a"]) @ np.asarray(ab["b"])).reshape(node_w.shape)
        np.testing.assert_allclose(node_m, want, rtol=0, atol=1e-6, err_msg=path)


def test_scanned_layers_are_refused():
    _, _, params = _params(scan_layers=True)
    with pytest.raises(ConfigError, match="scan_layers=False"):
        lora.add(params, _lcfg(), jax.random.key(1))


def _raw_params(workdir):
    """The latest checkpoint's params as saved (adapters unmerged)."""
    config = RunConfig.from_config(read_config(str(workdir)))
    model = inference.build_model(config, inference.load_tokenizer(str(workdir)).vocab_size)
    target = inference.abstract_params(model, config, parallel.data_mesh())
    c = Checkpointer(str(workdir), read_only=True)
    try:
        return jax.tree.map(np.asarray, c.restore_params(target, c.latest_step()))
    finally:
        c.close()


def test_lora_fine_tune_freezes_the_base_and_exports_merged(tmp_path):
    """Full run: tiny trained, then a LoRA run from it (train.init_from, init_model). The base
    params in the LoRA checkpoint are bit-identical to the source's, the adapters moved, and
    `solo export` (merged) loads in transformers with the unmerged model's logits."""
    torch, tf = require("torch"), require("transformers")
    small = ["--config.data.world.num_people=10"]
    src, wd = tmp_path / "src", tmp_path / "lora"
    assert cli.main(["train", "tiny", "--workdir", str(src), "--config.train.steps=2",
                     *small]) == 0
    assert cli.main(["train", "tiny", "--workdir", str(wd), "--config.train.steps=6",
                     f"--config.train.init_from={src}", "--config.train.init_model=True",
                     "--config.lora.rank=4", "--config.lora.targets=('attn/q$','mlp/wo$')",
                     "--config.model.d_model=16",  # ignored: init_model takes src's
                     "--config.optim.lr=1e-2", *small]) == 0
    assert read_config(str(wd)).model.d_model == 64  # config.json records the adopted model
    base, tuned = _raw_params(src), _raw_params(wd)
    adapters = tuned.pop(lora.KEY)
    assert jax.tree.structure(base) == jax.tree.structure(tuned)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(tuned), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert sorted(adapters) == ["decoder/layers_0/attn/q", "decoder/layers_0/mlp/wo",
                                "decoder/layers_1/attn/q", "decoder/layers_1/mlp/wo"]
    assert all(float(np.abs(ab["b"]).max()) > 0 for ab in adapters.values())  # B moved from 0

    loaded = load(str(wd))  # merged on load
    lcfg = loaded.config.lora
    ids = [2, *loaded.tokenizer.encode("Anya was born in")]
    batch = {"tokens": jnp.asarray([ids], jnp.int32)}
    unmerged_LV = lora.apply_fn(loaded.model.apply, lcfg)(
        {"params": {**tuned, lora.KEY: adapters}}, batch)["logits"][0]
    base_LV = loaded.model.apply({"params": base}, batch)["logits"][0]
    assert float(jnp.max(jnp.abs(unmerged_LV - base_LV))) > 1e-3  # the adapters do something
    loaded_LV = loaded.model.apply({"params": loaded.params}, batch)["logits"][0]
    np.testing.assert_allclose(loaded_LV, unmerged_LV, rtol=0, atol=1e-4)  # merged on load
    assert cli.main(["export", str(wd), "--to", str(tmp_path / "out")]) == 0
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(back(torch.tensor([ids])).logits.detach().numpy()[0],
                               np.asarray(unmerged_LV), rtol=0, atol=1e-4)

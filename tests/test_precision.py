"""Memory and precision (issue 13): chunked cross-entropy equals whole-logits CE in loss and
gradients (tied and untied output, padded vocabulary, uneven chunks, z-loss); every remat policy
computes the same gradients; "auto" settings resolve by platform; and the compiled GPT-2 124M
train step on 8 fake CPU devices with FSDP fits a per-device budget that remat lowers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solo.experiments import base
from solo.model import ModelConfig, Transformer, init_params
from solo.model.platform import PLATFORM_DEFAULTS
from solo.objectives import causal_lm

HERE = Path(__file__).resolve().parent


def _cfg(**kw) -> ModelConfig:
    c = base.get_config().model
    c.update({**dict(d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=32,
                     vocab_size=50, vocab_multiple=16, dtype="float32"), **kw})
    return ModelConfig.from_config(c)


def _batch(b=3, n=20):
    rng = np.random.default_rng(0)
    w = (rng.random((b, n)) > 0.3).astype(np.float32)
    return dict(tokens=jnp.asarray(rng.integers(0, 50, (b, n)), jnp.int32),
                targets=jnp.asarray(rng.integers(0, 50, (b, n)), jnp.int32),
                weights=jnp.asarray(w))


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_cross_entropy_equals_whole(tie):
    whole, chunked = _cfg(tie_embeddings=tie), _cfg(tie_embeddings=tie, logits_chunk=8)
    batch = _batch()  # 20 positions in chunks of 8: the last one padded
    params = nn.meta.unbox(init_params(Transformer(whole), jax.random.key(0), ("lm",), 20))
    opts = {"z_loss": 1e-2}

    def loss(cfg):
        def f(p):
            out = Transformer(cfg).apply({"params": p}, batch, heads=("lm",))
            m = causal_lm.loss(out, batch, opts)
            return m["loss"][0] + m["z_loss"][0], m
        return jax.value_and_grad(f, has_aux=True)(params)

    (lw, mw), gw = loss(whole)
    (lc, mc), gc = loss(chunked)
    assert "logits" not in Transformer(chunked).apply({"params": params}, batch)
    np.testing.assert_allclose(float(lc), float(lw), rtol=1e-5)
    for k in mw:
        np.testing.assert_allclose(np.asarray(mc[k]), np.asarray(mw[k]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gw), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_remat_policies_give_the_same_gradients():
    batch = _batch()
    grads = {}
    # the new policy against none (full and dots: tests/test_model.py; offload is
    # dots_no_batch's with the kept values on the host)
    for remat in ("none", "dots_no_batch"):
        cfg = _cfg(remat=remat, scan_layers=True)
        params = nn.meta.unbox(init_params(Transformer(cfg), jax.random.key(0), ("lm",), 20))

        def f(p, cfg=cfg):
            out = Transformer(cfg).apply({"params": p}, batch, heads=("lm",))
            return causal_lm.loss(out, batch, {"z_loss": 0.0})["loss"][0]
        grads[remat] = jax.jit(jax.grad(f))(params)
    for remat, g in grads.items():
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads["none"]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                       err_msg=remat)


def test_auto_settings_resolve_by_platform_and_are_saved_resolved():
    from solo.config import RunConfig

    cfg = _cfg(dtype="auto")
    want = PLATFORM_DEFAULTS[jax.default_backend()]
    assert (cfg.dtype, cfg.remat) == (want["dtype"], want["remat"])
    saved = json.loads(RunConfig.from_config(base.get_config()).json)["model"]
    assert saved["dtype"] == want["dtype"] and saved["remat"] == want["remat"]
    assert PLATFORM_DEFAULTS["gpu"]["dtype"] == "bfloat16" and PLATFORM_DEFAULTS["cpu"][
        "dtype"] == "float32"


MEMORY = textwrap.dedent("""
    import json, sys
    import jax
    from solo.experiments import gpt2_124m
    from solo.train.compiled import compile_train_step
    assert jax.device_count() == 8
    out = {}
    for name, model in [("none", dict(remat="none")), ("full", dict(remat="full"))]:
        c = gpt2_124m.get_config()
        c.model.update(dict(model, dtype="bfloat16", scan_layers=True, attention="einsum"))
        c.data.update(dict(batch_size=8, seq_len=1024))
        c.train.mesh.update(dict(data=1, fsdp=8, tensor=1))
        m = compile_train_step(c, vocab_size=50257).memory_analysis()
        out[name] = dict(temp=m.temp_size_in_bytes, args=m.argument_size_in_bytes,
                         out=m.output_size_in_bytes, alias=m.alias_size_in_bytes)
    print(json.dumps(out))
""")

# per device, GPT-2 124M (padded vocabulary 50,304), FSDP over 8, batch 8 x 1024, bfloat16
# compute: params + AdamW moments in float32 are 124M * 12 B / 8 = 187 MB per device; without
# remat the step's temporaries (activations of 12 layers for 1 row, whole logits) add ~2 GB.
BUDGET_BYTES = 3 * 2**30


@pytest.fixture(scope="module")
def gpt2_memory():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", MEMORY], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gpt2_step_memory_fits_budget_and_remat_lowers_it(gpt2_memory):
    total = {k: v["temp"] + v["args"] + v["out"] - v["alias"] for k, v in gpt2_memory.items()}
    assert total["none"] < BUDGET_BYTES, total
    assert gpt2_memory["full"]["temp"] < 0.6 * gpt2_memory["none"]["temp"], gpt2_memory
    params_and_moments = 124e6 * 12 / 8
    assert gpt2_memory["none"]["args"] > params_and_moments  # really FSDP-sharded, not less
    assert gpt2_memory["none"]["args"] < 2 * params_and_moments


def test_gpt2_124m_config_validates_and_builds():
    """The experiment validates on this host's mesh and builds GPT-2 124M exactly: GPT-2's
    124,439,808 parameters plus the 47 padding rows of the tied table (50,257 -> 50,304)."""
    from solo.config import RunConfig
    from solo.experiments import gpt2_124m
    from solo.train import inference, parallel
    from solo.train.loop import validate_config

    config = RunConfig.from_config(gpt2_124m.get_config())
    validate_config(config, parallel.make_mesh(config.train.mesh))
    model = inference.build_model(config, 50257)
    assert model.cfg.padded_vocab == 50304 and model.cfg.dtype == "bfloat16"
    shapes = jax.eval_shape(lambda k: nn.meta.unbox(init_params(model, k, ("lm",), 1024)),
                            jax.random.key(0))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 124_439_808 + 47 * 768
    assert config.optim.lr == 6e-4 and (config.optim.b1, config.optim.b2) == (0.9, 0.95)


@pytest.mark.parametrize("chunk", [0, 8])
def test_bfloat16_compute_keeps_float32_masters_logits_and_loss(chunk):
    cfg = _cfg(dtype="bfloat16", logits_chunk=chunk)
    batch = _batch()
    params = nn.meta.unbox(init_params(Transformer(cfg), jax.random.key(0), ("lm",), 20))

    def f(p):
        out = Transformer(cfg).apply({"params": p}, batch, heads=("lm",))
        return causal_lm.loss(out, batch, {"z_loss": 0.0})["loss"][0], out

    (loss, out), grads = jax.value_and_grad(f, has_aux=True)(params)
    assert loss.dtype == jnp.float32 and out["hidden"].dtype == jnp.bfloat16
    assert out["logits" if not chunk else "lm_bias"].dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    whole = causal_lm.loss(Transformer(_cfg()).apply({"params": params}, batch), batch,
                           {"z_loss": 0.0})["loss"][0]
    np.testing.assert_allclose(float(loss), float(whole), rtol=2e-2)  # bf16 rounding only

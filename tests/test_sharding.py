"""Sharding: logical axis names on every param and their mapping onto a mesh; and sharding
without waste (issue 13): the compiled train step on 8 fake CPU devices (a subprocess)
has no collective-permute and no SPMD "involuntary full rematerialization" on data=4,tensor=2
and on 2x2x2; model dims the mesh cannot split are rejected before the workdir exists; the
padded vocabulary is never sampled, never in the loss, and HF import/export round-trips.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from test_model import init, make_cfg, rand_tokens

from solo.model import ModelConfig, Transformer, init_params
from solo.model import hf as hf_lib
from solo.model.sharding import DEFAULT_RULES, check_divisible, param_shardings
from solo.objectives.base import token_ce

HERE = Path(__file__).resolve().parent


def test_logical_axes_and_param_shardings():
    cfg = make_cfg()
    batch = dict(tokens=rand_tokens((1, 4)))
    abstract = jax.eval_shape(lambda: init(cfg, batch))
    names = {jax.tree_util.keystr(p): x.names for p, x in jax.tree_util.tree_leaves_with_path(
        abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))}
    q = [v for k, v in names.items() if k.endswith("['attn']['q']")]
    assert q == [("layers", "embed", "heads", "kv")]
    assert names["['params']['embedder']['token']"] == ("vocab", "embed")
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    sh = param_shardings(abstract, mesh, DEFAULT_RULES)
    q_sh = sh["params"]["decoder"]["layers"]["attn"]["q"]
    assert isinstance(q_sh, NamedSharding)
    assert q_sh.spec == PartitionSpec(None, "fsdp", "tensor", None)
    data_only = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    assert param_shardings(abstract, data_only)["params"]["embedder"]["token"].spec in (
        PartitionSpec(), PartitionSpec(None, None))


@pytest.mark.parametrize("kind,heads", [("encoder", ("mlm", "nsp", "embed")),
                                        ("decoder", ("lm",)),
                                        ("encoder_decoder", ("lm",))])
def test_every_head_has_shardable_logical_axes(kind, heads):
    """A param whose logical names repeat (e.g. a D x D dense as ('embed', 'embed')) cannot be
    mapped onto a mesh; every head of every model kind must map."""
    cfg = make_cfg(kind=kind, type_vocab_size=2 if kind == "encoder" else 0)
    batch = dict(tokens=rand_tokens((1, 4)))
    if kind == "encoder_decoder":
        batch["src_tokens"] = rand_tokens((1, 4))
    abstract = jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.PRNGKey(0), batch, heads=heads))
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    leaves = jax.tree.leaves(param_shardings(abstract, mesh, DEFAULT_RULES))
    assert leaves and all(isinstance(s, NamedSharding) for s in leaves)

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax
    sys.path.insert(0, sys.argv[1])
    from test_train import tiny_config
    from solo.train.compiled import compile_train_step, collective_counts
    from solo.train.loop import train_and_evaluate
    assert jax.device_count() == 8, jax.devices()
    out = {}
    for name, mesh in [("d4t2", dict(data=4, fsdp=1, tensor=2)),
                       ("2x2x2", dict(data=2, fsdp=2, tensor=2))]:
        c = tiny_config()  # GQA (4 heads, 2 kv heads), a vocabulary padded 251 -> 256
        c.model.update(dict(num_layers=2, num_heads=4, num_kv_heads=2, d_model=64, d_ff=128,
                            vocab_multiple=8))
        c.train.mesh.update(mesh)
        hlo = compile_train_step(c, vocab_size=251).as_text()
        print("=== compiled", name, file=sys.stderr, flush=True)
        out[name] = collective_counts(hlo)
    rejected = {}
    for key, model, mesh in [("heads", dict(num_heads=3, d_model=48), dict(data=4, tensor=2)),
                             ("vocab", dict(vocab_size=251), dict(data=4, tensor=2)),
                             ("tokenizer_vocab", dict(), dict(data=2, fsdp=2, tensor=2))]:
        c = tiny_config()
        c.model.update(model)
        c.train.mesh.update(dict(dict(data=1, fsdp=1, tensor=1), **mesh))
        wd = os.path.join(sys.argv[2], key)
        try:
            train_and_evaluate(c, wd)
            rejected[key] = "trained"
        except Exception as e:  # noqa: BLE001
            rejected[key] = [type(e).__name__, str(e), os.path.exists(wd)]
    out["rejected"] = rejected
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    tmp = tmp_path_factory.mktemp("sharding")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(HERE), str(tmp)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("mesh", ["d4t2", "2x2x2"])
def test_tensor_parallel_step_has_no_permutes(eight_devices, mesh):
    counts, _ = eight_devices
    assert counts[mesh]["collective-permute"] == 0, counts[mesh]
    assert counts[mesh]["all-to-all"] == 0, counts[mesh]
    assert counts[mesh]["all-reduce"] > 0  # tensor parallelism is really there


def test_no_involuntary_rematerialization(eight_devices):
    _, stderr = eight_devices
    assert "=== compiled 2x2x2" in stderr  # the warnings would precede these lines
    assert "Involuntary full rematerialization" not in stderr, stderr[-2000:]


@pytest.mark.parametrize("key,names", [("heads", "num_heads=3"), ("vocab", "vocab_size=251"),
                                       ("tokenizer_vocab", "vocab_multiple")])
def test_indivisible_rejected_before_workdir(eight_devices, key, names):
    kind, message, workdir_exists = eight_devices[0]["rejected"][key]
    assert kind == "TrainConfigError" and names in message and "tensor=2" in message, message
    assert not workdir_exists


def test_check_divisible_names_fsdp():
    cfg = ModelConfig.from_config(_model(d_model=48, num_heads=4))
    check_divisible(cfg, dict(tensor=2, fsdp=4), 64)
    with pytest.raises(ValueError, match="d_model=48 does not divide over train.mesh.fsdp=32"):
        check_divisible(cfg, dict(fsdp=32))


def _model(**kw):
    from solo.experiments import base

    c = base.get_config().model
    c.update({**dict(d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=16), **kw})
    return c


def test_padded_vocab_is_masked_and_out_of_the_loss():
    """A 50-id vocabulary padded to 64: same loss as the unpadded model with the same weights
    (the padding takes no share of the softmax), padding never the argmax, HF round trip."""
    padded = ModelConfig.from_config(_model(vocab_size=50, vocab_multiple=64, positions="learned",
                                            norm="layernorm", mlp="gelu", attn_bias=True,
                                            mlp_bias=True))
    plain = padded.replace(vocab_multiple=1)
    assert padded.padded_vocab == 64 and plain.padded_vocab == 50
    params = jax.tree.map(np.array, nn.meta.unbox(init_params(
        Transformer(padded), jax.random.key(0), ("lm",), 16)))
    # the padding rows of the tied table made large: masking, not small weights, must hide them
    params["embedder"]["token"][50:] = 100.0
    state = hf_lib.hf_from_params(params, padded, "gpt2")
    assert state["transformer.wte.weight"].shape == (50, 32)
    back = hf_lib.params_from_hf(state, padded, "gpt2")
    assert back["embedder"]["token"].shape == (64, 32)
    np.testing.assert_array_equal(back["embedder"]["token"][:50], params["embedder"]["token"][:50])
    np.testing.assert_array_equal(back["embedder"]["token"][50:], 0.0)
    small = hf_lib.params_from_hf(state, plain, "gpt2")
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 50, (2, 16)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 50, (2, 16)), jnp.int32)
    lp = Transformer(padded).apply({"params": params}, {"tokens": tokens})["logits"]
    ls = Transformer(plain).apply({"params": small}, {"tokens": tokens})["logits"]
    assert lp.shape == (2, 16, 64) and ls.shape == (2, 16, 50)
    np.testing.assert_allclose(lp[..., :50], ls, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(lp[..., 50:])) <= -1e29
    assert int(jnp.max(jnp.argmax(lp, -1))) < 50
    w = jnp.ones((2, 16))
    a, b = token_ce(lp, targets, w)["loss"][0], token_ce(ls, targets, w)["loss"][0]
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)

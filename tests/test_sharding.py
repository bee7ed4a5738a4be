"""Sharding: logical axis names on every param and their mapping onto a mesh."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from test_model import init, make_cfg, rand_tokens

from solo.model import Transformer
from solo.model.sharding import DEFAULT_RULES, param_shardings


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

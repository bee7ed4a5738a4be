"""Logical-axis sharding: rules mapping param and activation axis names to mesh axes
('data', 'fsdp', 'tensor'), as MaxText's logical_axis_rules do.

Params carry logical names from their init (`layers.param`); activations get them through
`constrain(x, names)`, a `with_sharding_constraint` while a train/eval step is traced under
`activation_sharding(mesh)` and a no-op otherwise (decoding, pmap, one device). Tensor
parallelism is Megatron's: heads, kv heads, MLP width and vocabulary split over 'tensor',
the residual stream [B,L,D] split over the batch only, so each attention and MLP block needs
one all-reduce forward and one backward and nothing else. `check_divisible` rejects a model
whose sharded dims do not divide by the mesh, at config validation (before anything is written).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Order matters: flax uses each mesh axis at most once per array, first matching rule wins, so in
# q/k/v kernels [embed, heads, kv] 'heads' takes 'tensor' and 'kv' falls back to replicated.
# act_* name activations: batch over every data-parallel axis, the model dims as their params.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", "tensor"),
    ("embed", "fsdp"),
    ("layers", None),
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("solo_activation_sharding", default=None)


def _restrict(rules: Sequence, mesh: Mesh) -> tuple:
    """Drops mesh axes the mesh does not have (e.g. a data-only mesh) so specs stay valid."""
    out = []
    for name, axes in rules:
        if axes is None:
            out.append((name, None))
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = tuple(a for a in axes_t if a in mesh.axis_names)
        out.append((name, kept if len(kept) > 1 else (kept[0] if kept else None)))
    return tuple(out)


def logical_specs(abstract_params) -> object:
    """Tree of PartitionSpecs of logical names (unboxed structure); unannotated leaves -> ()."""
    return nn.get_partition_spec(abstract_params)


def param_shardings(abstract_params, mesh: Mesh, rules: Sequence = DEFAULT_RULES):
    """NamedShardings for a (possibly abstract, `jax.eval_shape(model.init, ...)`) param tree.

    The result matches the *unboxed* tree (`nn.unbox(params)` / `nn.meta.unbox`).
    """
    specs = logical_specs(abstract_params)
    return nn.logical_to_mesh_sharding(specs, mesh, _restrict(rules, mesh))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Sequence = DEFAULT_RULES) -> Iterator[None]:
    """While tracing inside it, `constrain` pins activations to `mesh` by `rules`."""
    token = _ACTIVE.set(None if mesh is None else (mesh, dict(_restrict(rules, mesh))))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_sharding`, or None."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


def mesh_axes_for(mesh: Mesh, name: str | None, dim: int, used: Sequence[str] = ()):
    """The mesh axes logical `name` maps to under the active rules (None, one name or a tuple),
    minus `used` ones and all of them when their product does not divide `dim`."""
    active = _ACTIVE.get()
    rules = active[1] if active is not None else dict(_restrict(DEFAULT_RULES, mesh))
    axes = rules.get(name) if name else None
    axes_t = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    axes_t = tuple(a for a in axes_t if a not in used)
    if axes_t and dim % math.prod(mesh.shape[a] for a in axes_t):
        axes_t = ()
    return axes_t if len(axes_t) > 1 else (axes_t[0] if axes_t else None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """x with a sharding constraint from logical `names` (one per dim) under
    `activation_sharding`; mesh axes that do not divide a dim are left out (a 1-row init batch)."""
    mesh = active_mesh()
    if mesh is None:
        return x
    spec, used = [], []
    for dim, name in zip(x.shape, names, strict=True):
        axes = mesh_axes_for(mesh, name, dim, used)
        used.extend((axes,) if isinstance(axes, str) else (axes or ()))
        spec.append(axes)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def check_divisible(cfg, mesh_shape: dict[str, int], vocab_size: int = 0) -> None:
    """Raises ValueError naming the first model dim the mesh cannot split evenly (and the fix):
    heads, kv heads, MLP width and vocabulary over 'tensor', the model width over 'fsdp'.
    vocab_size: the padded vocabulary when already known (0: cfg's, skipped when 0 too)."""
    t, f = int(mesh_shape.get("tensor", 1)), int(mesh_shape.get("fsdp", 1))
    vocab = vocab_size or cfg.vocab_size
    checks = [("num_heads", cfg.num_heads, t, "tensor"),
              ("num_kv_heads", cfg.num_kv_heads, t, "tensor"),
              ("d_ff", cfg.d_ff, t, "tensor"),
              ("d_model", cfg.d_model, f, "fsdp")]
    for name, value, size, axis in checks:
        if value % size:
            raise ValueError(f"model.{name}={value} does not divide over train.mesh.{axis}="
                             f"{size}; change one of them")
    if t > 1 and vocab == 0 and cfg.vocab_multiple % t:
        raise ValueError(f"the tokenizer's vocabulary may not divide over train.mesh.tensor={t}:"
                         f" set model.vocab_multiple to a multiple of {t} (e.g. 128); the "
                         "padding is never sampled nor in the loss")
    if vocab and padded_vocab(vocab, cfg.vocab_multiple) % t:
        raise ValueError(f"model.vocab_size={vocab} (padded to model.vocab_multiple="
                         f"{cfg.vocab_multiple}) does not divide over train.mesh.tensor={t}: "
                         f"set model.vocab_multiple to a multiple of {t} (e.g. 128)")


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """vocab_size rounded up to a multiple of `multiple` (>= 1)."""
    return -(-vocab_size // multiple) * multiple


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays [B, ...] split over every data-parallel axis the mesh has."""
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


__all__ = ["DEFAULT_RULES", "param_shardings", "logical_specs", "batch_sharding", "replicated",
           "activation_sharding", "constrain", "active_mesh", "mesh_axes_for", "check_divisible",
           "padded_vocab"]

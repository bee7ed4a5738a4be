"""Logical-axis sharding: rules mapping param axis names to mesh axes ('data','fsdp','tensor')."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Order matters: flax uses each mesh axis at most once per array, first matching rule wins, so in
# q/k/v kernels [embed, heads, kv] 'heads' takes 'tensor' and 'kv' falls back to replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", "tensor"),
    ("embed", "fsdp"),
    ("layers", None),
)


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays [B, ...] split over every data-parallel axis the mesh has."""
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


__all__ = ["DEFAULT_RULES", "param_shardings", "logical_specs", "batch_sharding", "replicated"]

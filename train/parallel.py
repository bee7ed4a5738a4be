"""Device mesh, shardings and batch placement shared by the jit and pmap steps.

Mesh axes are ('data', 'fsdp', 'tensor') from `config.train.mesh` (-1 = all remaining devices).
One device is simply a 1x1x1 mesh: the same code path as a pod slice. Params follow the model's
logical axis rules (`model.sharding.DEFAULT_RULES`); the batch is split along its first dim over
('data', 'fsdp'); the step counter and rng are replicated. Optimizer moments reuse the sharding of
the params they mirror (`optax.tree_map_params`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from solo.model import sharding as model_sharding
from solo.train.state import TrainState

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
    """Resolves the single -1 entry; errors name the numbers that do not fit."""
    sizes = [int(getattr(mesh_cfg, a)) for a in MESH_AXES]
    named = lambda: dict(zip(MESH_AXES, sizes, strict=True))
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"train.mesh {named()}: at most one axis may be -1 "
                         "and the others must be positive")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"train.mesh {named()}: {num_devices} devices "
                             f"are not divisible by the fixed axes' product {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"train.mesh {named()} needs {math.prod(sizes)} "
                         f"devices but {num_devices} are available; set one axis to -1")
    return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(device_grid(shape, devices), MESH_AXES)


def device_grid(shape: tuple[int, int, int], devices: list) -> np.ndarray:
    """`devices` as a (data, fsdp, tensor) array laid out on the physical topology.

    jax's mesh_utils give the inner axes (tensor, then fsdp: the most communication) the fastest
    links: TPU torus neighbours, NVLink ids in order on GPU; on CPU this is a plain reshape. With
    several TPU slices (multislice: devices carry `slice_index`) only `data` spans slices, over
    the data-center network, and each slice holds a (data / slices, fsdp, tensor) block."""
    # TPU only: what GPUs report as slices (hosts, NVLink domains) is left to create_device_mesh
    tpu = all(getattr(d, "platform", "") == "tpu" for d in devices)
    slices = len({getattr(d, "slice_index", 0) for d in devices}) if tpu else 1
    if slices > 1:
        if shape[0] % slices:
            raise ValueError(f"train.mesh.data={shape[0]} must be a multiple of the {slices} "
                             "slices (only data parallelism spans slices); set data to a "
                             f"multiple of {slices}")
        return mesh_utils.create_hybrid_device_mesh(
            (shape[0] // slices, *shape[1:]), (slices, 1, 1), devices,
            allow_split_physical_axes=True)
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def data_mesh(devices: list | None = None) -> Mesh:
    """All devices on the data axis (inference and evaluation)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices).reshape(len(devices), 1, 1), MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return model_sharding.batch_sharding(mesh)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh) -> Any:
    """Shardings for the *unboxed* param tree from the boxed abstract init (logical names)."""
    return model_sharding.param_shardings(abstract_boxed_params, mesh,
                                          model_sharding.DEFAULT_RULES)


def state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                    params_sharding: Any, mesh: Mesh) -> TrainState:
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    rep = replicated(mesh)
    # masked transforms (LoRA's frozen base) hold a MaskedNode where a param has no state
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt_sharding = optax.tree_map_params(
        tx, lambda x, s: x if masked(x) else s, abstract_opt, params_sharding,
        transform_non_params=lambda _: rep, is_leaf=masked,
    )
    return TrainState(step=rep, params=params_sharding, opt_state=opt_sharding, rng=rep)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Per-process numpy batch -> global jax arrays split over ('data','fsdp')."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def split_for_pmap(batch: dict, devices: int | list) -> dict:
    """This process's [B, ...] -> [local devices, B / local devices, ...] for jax.pmap.
    `devices`: pmap's device list (global under multi-host: only this process's count) or a
    count of local devices."""
    n = devices if isinstance(devices, int) else local_count(devices)
    return {k: np.asarray(v).reshape(n, -1, *np.shape(v)[1:]) for k, v in batch.items()}


def local_count(devices: list) -> int:
    """How many of `devices` belong to this process."""
    return sum(d.process_index == jax.process_index() for d in devices)


def abstract_with_sharding(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

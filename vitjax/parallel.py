"""Device mesh, logical-axis sharding rules, and the shardings of params, optimizer state and batches.

The mesh has three named axes:
  data   pure data parallelism (params replicated);
  fsdp   data parallelism with params sharded (ZeRO-3 style) along the axis their `embed` dim maps to;
  model  tensor parallelism (`mlp`, `heads` dims of params and activations).
The batch is sharded over `("data", "fsdp")`. The models name their axes (`embed`, `mlp`, `heads`,
`kv`, `classes`, `layers`; activations `batch`, `length`, ...); `config.sharding_rules` maps those
names onto mesh axes. The same code runs on one CPU device (a 1x1x1 mesh) and on a pod.
"""
import os
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vitjax.pytree import path_to_str

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Environment variables set by the launchers that `jax.distributed.initialize()` auto-detects.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed(force: Optional[bool] = None) -> bool:
    """Returns whether `jax.distributed.initialize()` was called (forced, or a multi-host launch detected)."""
    if force is None:
        force = (any(os.environ.get(name) for name in _CLUSTER_ENV)
                 or int(os.environ.get("SLURM_NTASKS", "1")) > 1
                 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
                 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
    if force:
        jax.distributed.initialize()  # arguments come from the cluster environment
        logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                     jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return bool(force)


def mesh_shape(mesh_config, num_devices: int) -> Tuple[int, int, int]:
    """Returns the (data, fsdp, model) sizes, resolving one -1; raises ValueError if they do not tile the devices."""
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    unknown = [name for name in mesh_config.keys() if name not in MESH_AXES]
    if unknown:
        raise ValueError(f"Unknown mesh axes {unknown}; valid axes: {list(MESH_AXES)}")
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"Mesh sizes must be positive with at most one -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([size for size in sizes if size != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} devices, but "
                         f"{num_devices} are available; use -1 for one axis to fill them")
    return tuple(sizes)


def create_mesh(mesh_config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """Returns a ("data", "fsdp", "model") mesh over `devices` (default: all), laid out for the interconnect."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    try:
        from jax.experimental import mesh_utils
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Fake CPU devices or a subset of a slice: any order is as good as another.
        device_array = np.asarray(devices).reshape(shape)
    # Auto axes: shardings are decided by jit's in/out shardings and constraints, not by types.
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(device_array, MESH_AXES, axis_types=axis_types)


def use_mesh(mesh: Mesh):
    """Returns a context manager that makes `mesh` the one flax's activation constraints refer to."""
    return jax.set_mesh(mesh)


def logical_rules(rules) -> Tuple[Tuple[str, Any], ...]:
    """Returns the sharding rules as a tuple of (logical name, mesh axes) with tuples, not lists."""
    result = []
    for name, axes in rules:
        result.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(result)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Returns the sharding of a batch: leading dim over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Returns the fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    """Returns the number of batch shards (data x fsdp): global batch sizes must be multiples of it."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def logical_param_specs(boxed_tree) -> Any:
    """Returns the tree of logical PartitionSpecs of a (possibly abstract) tree of boxed variables."""
    return nn.get_partition_spec(boxed_tree)


def _fit_spec(spec: PartitionSpec, shape: Tuple[int, ...], mesh: Mesh, path: str) -> PartitionSpec:
    """Returns `spec` with the mesh axes dropped from dims they do not divide (those dims replicate)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for dim, axes in zip(shape, entries):
        if axes is None:
            fitted.append(None)
            continue
        axes_tuple = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[axis] for axis in axes_tuple]))
        if dim % size:
            logging.warning("Param %s: dim %d is not divisible by mesh axes %s (%d); replicating it",
                            path, dim, axes_tuple, size)
            fitted.append(None)
        else:
            fitted.append(axes)
    return PartitionSpec(*fitted)


def param_shardings(abstract_params, logical_specs, mesh: Mesh, rules) -> Any:
    """Returns a NamedSharding per param from its logical spec and the rules; unnamed params replicate."""
    mesh_specs = nn.logical_to_mesh(logical_specs, logical_rules(rules))
    is_spec = lambda x: isinstance(x, PartitionSpec) or x is None  # noqa: E731

    flat_specs = {path_to_str(path): spec for path, spec in
                  jax.tree_util.tree_flatten_with_path(mesh_specs, is_leaf=is_spec)[0]}

    def sharding(path, leaf):
        name = path_to_str(path)
        spec = flat_specs.get(name)
        spec = PartitionSpec() if spec is None else spec
        return NamedSharding(mesh, _fit_spec(spec, tuple(leaf.shape), mesh, name))

    return jax.tree_util.tree_map_with_path(sharding, abstract_params)


def logical_shardings(abstract_variables, mesh: Mesh, rules) -> Any:
    """Returns a NamedSharding per leaf of a (possibly abstract) variables tree, from the leaves' logical axes.

    Every collection is laid out the same way: leaves boxed with logical axis names (params of any
    module, a frozen teacher's included) by the rules, unboxed leaves (batch statistics, counters)
    replicated.
    """
    specs = logical_param_specs(abstract_variables)
    return param_shardings(nn.meta.unbox(abstract_variables), specs, mesh, rules)


def optimizer_shardings(tx: optax.GradientTransformation, abstract_opt_state, params_shardings, mesh: Mesh) -> Any:
    """Returns the shardings of an optimizer state: each param-shaped slot (adam's mu / nu, momentum) as its
    param, every other leaf (step counts) replicated. Uses optax's own map from state leaves to params."""
    is_leaf = lambda x: isinstance(x, (NamedSharding, optax.MaskedNode))  # noqa: E731
    return optax.tree_map_params(
        tx, lambda leaf, sharding: leaf if isinstance(leaf, optax.MaskedNode) else sharding,
        abstract_opt_state, params_shardings, transform_non_params=lambda _: replicated(mesh), is_leaf=is_leaf)


def global_batch(local_batch, mesh: Mesh) -> Any:
    """Returns global jax arrays sharded over the batch axes from this host's numpy slices."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)

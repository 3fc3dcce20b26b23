"""Device mesh, the logical-axis rules table, and sharding helpers.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`); this module
owns the ONE table that maps them to the mesh axes `data`, `fsdp` and `tensor` (docs/CONTRACTS.md
section 6). The trainer asks it for `NamedSharding`s of the train state and of the batch.

A logical axis whose mesh size does not divide the array dimension is replicated instead of
failing, so tiny test configs run on any mesh; real configs are sized to divide.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The one logical-axis rules table. Batch is split over data AND fsdp (fsdp is data parallelism
# whose parameters are also sharded); "embed" is the fsdp-sharded parameter dimension; the wide
# dimensions (vocab, mlp, heads) are tensor-parallel. Everything not named is replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("mel", None),
    ("conv", None),
    ("norm", None),
    ("enc_features", None),
    ("activation_length", None),
    ("activation_embed", None),
)


@gin.configurable
def create_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh over all devices.

    Args:
      data: size of the data axis; -1 = the devices left over by the other axes.
      fsdp: size of the fsdp axis; -1 allowed (at most one axis may be -1).
      tensor: size of the tensor axis; -1 allowed.
      devices: devices to use; default `jax.devices()` (all processes).

    Returns:
      A `Mesh` with axis names `("data", "fsdp", "tensor")`.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data/fsdp/tensor = {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data/fsdp/tensor = {sizes} needs {math.prod(sizes)} devices, have {len(devices)}"
        )
    # mesh_utils orders devices so that the fastest-interconnect axis (tensor) is innermost.
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # CPU and odd topologies: plain row-major device order is fine.
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def logical_to_mesh_spec(
    logical: PartitionSpec | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """Maps one array's logical spec to a mesh spec, replicating non-dividing dimensions.

    Args:
      logical: logical axis names, one per dimension (or None = replicated).
      shape: the array's shape.
      mesh: the device mesh.
      rules: logical-axis rules.

    Returns:
      A `PartitionSpec` over mesh axes, valid for `shape` on `mesh`.
    """
    if logical is None or len(logical) == 0:
        return PartitionSpec()
    if len(logical) != len(shape):
        raise ValueError(f"logical spec {logical} does not match shape {tuple(shape)}")
    # Not `nn.logical_to_mesh_axes`: it rejects a name used twice (a 2-D conv kernel is
    # ("conv", "conv")), which is harmless when the name maps to no mesh axis.
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, logical, strict=True):
        names: tuple[str, ...] = ()
        for rule_name, axes in rules:
            if rule_name != name:
                continue
            cand = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            # Drop size-1 axes (they shard nothing); a mesh axis shards one dimension at most.
            cand = tuple(a for a in cand if mesh.shape[a] > 1)
            if used.intersection(cand):
                continue
            names = cand
            break
        if names and dim % math.prod(mesh.shape[a] for a in names):
            names = ()  # does not divide: replicate this dimension
        used.update(names)
        out.append(None if not names else (names[0] if len(names) == 1 else names))
    return PartitionSpec(*out)


def logical_specs(boxed_tree: PyTree) -> PyTree:
    """Logical `PartitionSpec`s of a variables tree carrying flax partitioning metadata.

    Args:
      boxed_tree: variables (or their `jax.eval_shape`) with `nn.Partitioned` leaves.

    Returns:
      The unboxed tree's structure with one logical `PartitionSpec` per leaf (`P()` where a
      leaf has no metadata).
    """
    return nn.get_partition_spec(boxed_tree)


def tree_shardings(
    abstract_tree: PyTree,
    specs: PyTree,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> PyTree:
    """`NamedSharding` per leaf from unboxed abstract arrays and their logical specs."""
    return jax.tree.map(
        lambda x, s: NamedSharding(mesh, logical_to_mesh_spec(s, x.shape, mesh, rules)),
        abstract_tree,
        specs,
        is_leaf=lambda s: isinstance(s, PartitionSpec),
    )


def _dict_suffix(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The trailing run of dict keys of a key path: the parameter's own path inside the tree."""
    keys: list[str] = []
    for entry in reversed(path):
        if not isinstance(entry, jax.tree_util.DictKey):
            break
        keys.append(str(entry.key))
    return tuple(reversed(keys))


def follow_param_specs(abstract_tree: PyTree, params: PyTree, param_specs: PyTree) -> PyTree:
    """Logical specs for a tree whose leaves mirror parameters (optimizer moments).

    A leaf inherits the spec of the parameter with the same dict path and shape (Adam's mu/nu);
    anything else (step counts, Adafactor's factored rows/columns) is replicated, which is cheap.

    Args:
      abstract_tree: e.g. the optimizer state's `jax.eval_shape`.
      params: the unboxed parameters (or their shapes).
      param_specs: logical specs of `params`.

    Returns:
      One logical `PartitionSpec` per leaf of `abstract_tree`.
    """
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], PartitionSpec]] = {}
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.leaves(param_specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
    for (path, leaf), spec in zip(flat_p, flat_s, strict=True):
        by_path[_dict_suffix(path)] = (tuple(leaf.shape), spec)

    def spec_of(path: tuple[Any, ...], leaf: Any) -> PartitionSpec:
        suffix = _dict_suffix(path)
        shape = tuple(getattr(leaf, "shape", ()))
        # Longest suffix first: optimizer states wrap the params tree in their own containers.
        for start in range(len(suffix)):
            hit = by_path.get(suffix[start:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_of, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch array: leading (batch) dimension split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def host_local_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into global arrays sharded over data x fsdp.

    Args:
      batch: this process's per-host batch (leading dim = global batch / process_count).
      mesh: the device mesh.

    Returns:
      Global `jax.Array`s of leading dim = global batch.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), sharding) for k, v in batch.items()}
    return multihost_utils.host_local_array_to_global_array(batch, mesh, PartitionSpec(BATCH_AXES))


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Iterator[None]:
    """Applies the rules and the mesh, so that `nn.with_logical_constraint` in activations
    takes effect.

    Flax applies an activation constraint only where JAX has a mesh set (`jax.set_mesh`; the
    legacy `with mesh:` alone is not seen, and every constraint would silently be dropped). An
    `AbstractMesh` (shardings computed without devices, e.g. the golden-shardings files) is set
    as the abstract mesh.
    """
    if isinstance(mesh, jax.sharding.AbstractMesh):
        with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(rules):
            yield
        return
    with mesh, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def log_shardings(shardings: PyTree, abstract: PyTree, title: str) -> None:
    """Logs each leaf's shape and mesh spec (a cheap stand-in for maxtext's golden files)."""
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    specs = jax.tree.leaves(shardings)
    logging.info("%s:", title)
    for (path, leaf), sharding in zip(flat, specs, strict=True):
        logging.info("  %-60s %-18s %s", jax.tree_util.keystr(path), leaf.shape, sharding.spec)

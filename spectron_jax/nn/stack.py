"""Stacks of identical blocks: scanned (one compiled body for all layers) or unrolled; remat.

Scanned (`scan_layers=True`, the default): the blocks run under `nn.scan`, so XLA compiles one
block body whatever the depth, and every parameter lives under one scope `layers` with a leading
layer axis whose logical name is "layers" (`layers/attn/q_proj/kernel` float[L, D, H, Dh]); the
KV cache gets the same leading axis. Unrolled: a Python loop over `layers_0` .. `layers_{L-1}`,
each with its own scope. `stack_layers` / `unstack_layers` convert one layout into the other
(the HF converters work on the unrolled names and stack at the end).

Remat policies (what the backward pass keeps from the forward pass of each block):
  none                 everything (no recomputation);
  full                 nothing: the block is recomputed from its input;
  minimal              matmul outputs without batch dimensions (weights-only products);
  save_dots            every matmul output; the elementwise work between them is recomputed
                       (inside a scan this beats "none", which stacks every intermediate);
  save_attention_proj  the attention's q/k/v/out projections (named with `checkpoint_name`);
  offload              those projections, moved to pinned host memory (TPU/GPU backends).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec

LAYER_AXIS = "layers"
REMAT_POLICIES = ("none", "full", "minimal", "save_dots", "save_attention_proj", "offload")
# Names that `checkpoint_name` gives the attention projections (save_attention_proj, offload).
ATTENTION_PROJ_NAMES = ("query_proj", "key_proj", "value_proj", "attention_out")
# The names of older checkpoints' configs, kept readable.
_REMAT_ALIASES = {"dots": "minimal", True: "full", False: "none"}


def canonical_remat(remat: Any) -> str:
    """A remat setting as one of REMAT_POLICIES (older spellings: "dots", True, False)."""
    remat = _REMAT_ALIASES.get(remat, remat) if isinstance(remat, (str, bool)) else remat
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} not in {REMAT_POLICIES}")
    return remat


def tag(x: jax.Array, name: str) -> jax.Array:
    """Names an intermediate for the save_attention_proj / offload policies (a no-op otherwise)."""
    return checkpoint_name(x, name)


def remat_policy(remat: str) -> Any:
    """The `jax.checkpoint` policy of a REMAT_POLICIES name (None: save nothing)."""
    policies = jax.checkpoint_policies
    if remat == "full":
        return None
    if remat == "minimal":
        return policies.dots_with_no_batch_dims_saveable
    if remat == "save_dots":
        return policies.dots_saveable
    if remat == "save_attention_proj":
        return policies.save_only_these_names(*ATTENTION_PROJ_NAMES)
    if remat == "offload":
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=list(ATTENTION_PROJ_NAMES),
            offload_src="device",
            offload_dst="pinned_host",
        )
    raise ValueError(f"no checkpoint policy for remat {remat!r}")


def rematted(block: type[nn.Module], remat: str, static_argnums: Sequence[int], scanned: bool):
    """`block` under `nn.remat` with the named policy; `block` itself for "none".

    Args:
      block: the module class.
      remat: a REMAT_POLICIES name.
      static_argnums: positions of Python-valued call arguments (0 is the module itself).
      scanned: the block runs inside `nn.scan`, whose loop already stops XLA from merging the
        recomputation into the forward pass, so common-subexpression prevention is off.
    """
    remat = canonical_remat(remat)
    if remat == "none":
        return block
    return nn.remat(
        block,
        policy=remat_policy(remat),
        prevent_cse=not scanned,
        static_argnums=tuple(static_argnums),
    )


def scanned(block: type[nn.Module], num_layers: int, in_axes: tuple[Any, ...]):
    """`block` run `num_layers` times under `nn.scan`; its call must return (carry, None).

    Args:
      block: the (possibly rematted) block class; `block(...)(carry, *args) -> (carry, None)`.
      num_layers: L.
      in_axes: one entry per argument after the carry: 0 for a per-layer input with a leading
        L axis, `nn.broadcast` for one shared by every layer.
    """
    return nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: LAYER_AXIS},
    )


# ---------------------------------------------------------------------------------------------
# The two parameter layouts.
# ---------------------------------------------------------------------------------------------


def unrolled_name(i: int) -> str:
    return f"{LAYER_AXIS}_{i}"


def stack_layers(tree: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Unrolled -> scanned layout: `layers_0..layers_{L-1}` become `layers` with a leading L axis.

    Args:
      tree: a nested dict holding `layers_{i}` subtrees (numpy or jax arrays, unboxed).
      num_layers: L; every `layers_{i}` for i < L must be there with the same structure.

    Returns:
      A new dict: the other keys unchanged, `layers` with leaves float[L, ...].
    """
    names = [unrolled_name(i) for i in range(num_layers)]
    missing = [n for n in names if n not in tree]
    if missing:
        raise KeyError(f"no {missing[0]} to stack (have {sorted(tree)[:12]})")
    extra = sorted(k for k in tree if k.startswith(LAYER_AXIS + "_") and k not in names)
    if extra:
        raise ValueError(f"{extra[:3]} beyond num_layers={num_layers}")
    out = {k: v for k, v in tree.items() if k not in names}
    out[LAYER_AXIS] = jax.tree.map(_stack, *(tree[n] for n in names))
    return out


def _stack(*xs):
    # Device arrays stay on device (a checkpoint's sharded leaves); host arrays stay numpy.
    return jnp.stack(xs) if isinstance(xs[0], jax.Array) else np.stack(xs)


def unstack_layers(tree: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Scanned -> unrolled layout, the inverse of `stack_layers`."""
    if LAYER_AXIS not in tree:
        raise KeyError(f"no {LAYER_AXIS!r} to unstack (have {sorted(tree)[:12]})")
    stacked = tree[LAYER_AXIS]
    for leaf in jax.tree.leaves(stacked):
        if leaf.shape[:1] != (num_layers,):
            raise ValueError(f"a layer leaf has shape {leaf.shape}, expected [{num_layers}, ...]")
    out = {k: v for k, v in tree.items() if k != LAYER_AXIS}
    for i in range(num_layers):
        out[unrolled_name(i)] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def saved_layout(config: Mapping[str, Any]) -> dict[str, Any]:
    """A saved decoder / encoder config dict; one from before `scan_layers` existed is unrolled."""
    return {"scan_layers": False, **config}


def layout_of(tree: Mapping[str, Any]) -> str | None:
    """ "scanned" (a `layers` key), "unrolled" (`layers_0`) or None (no layers at this level)."""
    if LAYER_AXIS in tree:
        return "scanned"
    if unrolled_name(0) in tree:
        return "unrolled"
    return None


def _num_unrolled(tree: Mapping[str, Any]) -> int:
    prefix = LAYER_AXIS + "_"
    return sum(1 for k in tree if k.startswith(prefix) and k[len(prefix) :].isdigit())


def layout_mismatches(expected: Any, stored: Any, path: str = "") -> list[str]:
    """Where one tree stacks `layers` and the other holds `layers_{i}`: "path: scanned vs unrolled".

    Args:
      expected: the tree a model builds (nested mappings; leaves of any kind).
      stored: a checkpoint's tree metadata (nested mappings).
    """
    if not isinstance(expected, Mapping) or not isinstance(stored, Mapping):
        return []
    mine, theirs = layout_of(expected), layout_of(stored)
    if mine and theirs and mine != theirs:
        return [f"{path or '/'}: {mine} here, {theirs} in the checkpoint"]
    out = []
    for key in expected:
        if key in stored:
            out += layout_mismatches(expected[key], stored[key], f"{path}/{key}")
    return out


def _drop_layer_axis(leaf: Any) -> Any:
    shape, sharding = leaf.shape[1:], getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)


def _add_layer_axis(leaf: Any, num_layers: int) -> Any:
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((num_layers, *leaf.shape), leaf.dtype, sharding=sharding)


def abstract_in_layout_of(target: Any, stored: Any) -> Any:
    """`target` (ShapeDtypeStructs) re-laid-out, level by level, the way `stored` holds layers.

    What to ask a checkpoint for when it was written with the other `scan_layers`; the restored
    tree goes back with `in_layout_of(restored, target)`.
    """
    if not isinstance(target, Mapping) or not isinstance(stored, Mapping):
        return target
    mine, theirs = layout_of(target), layout_of(stored)
    if mine == "scanned" and theirs == "unrolled":
        num = jax.tree.leaves(target[LAYER_AXIS])[0].shape[0]
        one = jax.tree.map(_drop_layer_axis, target[LAYER_AXIS])
        target = {k: v for k, v in target.items() if k != LAYER_AXIS}
        target.update({unrolled_name(i): one for i in range(num)})
    elif mine == "unrolled" and theirs == "scanned":
        num = _num_unrolled(target)
        one = jax.tree.map(lambda x: _add_layer_axis(x, num), target[unrolled_name(0)])
        target = {k: v for k, v in target.items() if not k.startswith(LAYER_AXIS + "_")}
        target[LAYER_AXIS] = one
    return {k: abstract_in_layout_of(v, stored.get(k)) for k, v in target.items()}


def in_layout_of(tree: Any, target: Any) -> Any:
    """`tree` stacked or unstacked, level by level, into the layout of `target` (see above)."""
    if not isinstance(tree, Mapping) or not isinstance(target, Mapping):
        return tree
    mine, theirs = layout_of(tree), layout_of(target)
    if mine == "unrolled" and theirs == "scanned":
        tree = stack_layers(tree, _num_unrolled(tree))
    elif mine == "scanned" and theirs == "unrolled":
        tree = unstack_layers(tree, _num_unrolled(target))
    return {k: in_layout_of(v, target.get(k)) for k, v in tree.items()}

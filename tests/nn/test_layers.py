"""nn.layers.DenseGeneral: the same function, tree and initial scale as flax's DenseGeneral, and
it initialises and applies under axis rules with a global mesh (how T5X's partitioner traces a
model), where flax's DenseGeneral with a logically partitioned kernel fails."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectron_jax.nn.layers import DenseGeneral

RULES = (("embed", None), ("heads", "model"), ("head_dim", None))


def _pair(features, axis, names):
    ours = DenseGeneral(features=features, kernel_axes=names, axis=axis, use_bias=True)
    theirs = nn.DenseGeneral(features=features, axis=axis, use_bias=True)
    return ours, theirs


@pytest.mark.parametrize(
    "features, axis, names, shape",
    [
        ((4, 8), -1, ("embed", "heads", "head_dim"), (2, 3, 16)),  # q/k/v projection
        (16, (-2, -1), ("heads", "head_dim", "embed"), (2, 3, 4, 8)),  # output projection
    ],
)
def test_matches_flax_dense_general(features, axis, names, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    ours, theirs = _pair(features, axis, names)
    params = nn.unbox(ours.init(jax.random.key(1), x))
    ref_shapes = jax.tree.map(jnp.shape, theirs.init(jax.random.key(1), x))
    assert jax.tree.map(jnp.shape, params) == ref_shapes
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6, atol=1e-6)
    # Fan-in over every contracted dim (truncated normal, variance 1 / fan_in).
    big = DenseGeneral(features=(32, 32), kernel_axes=("embed", "heads", "head_dim"))
    kernel = nn.unbox(big.init(jax.random.key(2), jnp.zeros((1, 128))))["params"]["kernel"]
    assert kernel.shape == (128, 32, 32)
    assert float(jnp.std(kernel)) == pytest.approx(128**-0.5, rel=0.03)


def test_initialises_and_applies_under_axis_rules_and_a_global_mesh():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    x = jnp.ones((2, 3, 16))
    ours = DenseGeneral(features=(4, 8), kernel_axes=("embed", "heads", "head_dim"))
    flax_boxed = nn.DenseGeneral(
        features=(4, 8),
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "heads", "head_dim")
        ),
    )
    # T5X's pjit partitioner makes the mesh the abstract one that flax constrains against.
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        variables = jax.jit(ours.init)(jax.random.key(0), x)
        assert variables["params"]["kernel"].names == ("embed", "heads", "head_dim")
        out = jax.jit(ours.apply)(nn.unbox(variables), x)
        assert out.shape == (2, 3, 4, 8)
        # flax's own DenseGeneral inits the kernel at rank 2 and constrains it with 3 names.
        with pytest.raises(ValueError, match="rank"):
            jax.jit(flax_boxed.init)(jax.random.key(0), x)


def test_kernel_axes_must_name_every_dim():
    layer = DenseGeneral(features=(4, 8), kernel_axes=("embed", "heads"), name="q")
    with pytest.raises(ValueError, match="q: kernel_axes .* need 3 names"):
        layer.init(jax.random.key(0), jnp.ones((1, 16)))

"""Small building blocks: RMSNorm variants, a named multi-axis projection, gated MLP, embedding.

Every parameter carries logical axis names (docs/CONTRACTS.md section 6) where it is created;
`spectron_jax/partitioning.py` maps them to mesh axes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

NORM_VARIANTS = ("gemma", "llama")
ACTIVATIONS = {
    # HF "gelu_pytorch_tanh" is the tanh approximation.
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for integers (frame groups, subsampled lengths, padded buckets)."""
    return -(-a // b)


def default_kernel_init() -> nn.initializers.Initializer:
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class DenseGeneral(nn.Module):
    """`nn.DenseGeneral` whose kernel is created at full rank with one logical name per dim.

    flax's DenseGeneral calls `kernel_init` with the kernel flattened to 2-D and reshapes the
    result; a logically partitioned init is then unboxed (sharding-constrained) at rank 2 with
    rank-3 names, which fails wherever axis rules and a global mesh are active (T5X's
    partitioner traces every `param` init, even in `apply`). Same parameter tree, shapes and
    initial distribution (fan-in over all contracted dims) as `nn.DenseGeneral`.

    Attributes:
      features: output dims, e.g. `(heads, head_dim)` or `d_model`.
      kernel_axes: logical names of the kernel, contracted input dims first, then `features`.
      axis: input dims contracted (default the last).
      use_bias: add a bias named `kernel_axes[len(axis):]`.
      kernel_init: an initializer for the full-rank kernel; default truncated-normal fan-in
        scaling over the contracted dims.
    """

    features: int | tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """float[..., *in] -> float[..., *features] (the `axis` dims of x contracted)."""
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = tuple(a % x.ndim for a in axis)
        n_in = len(axis)
        if len(self.kernel_axes) != n_in + len(features):
            raise ValueError(
                f"{self.name}: kernel_axes {self.kernel_axes} need {n_in + len(features)} names"
            )
        init = self.kernel_init or nn.initializers.variance_scaling(
            1.0,
            "fan_in",
            "truncated_normal",
            in_axis=tuple(range(n_in)),
            out_axis=tuple(range(n_in, n_in + len(features))),
        )
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.kernel_axes),
            tuple(x.shape[a] for a in axis) + features,
            self.param_dtype,
        )
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            ((axis, tuple(range(n_in))), ((), ())),
        )
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[n_in:]),
                features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, statistics in float32.

    `variant="gemma"` scales by `1 + w` with `w` initialised to zeros; `variant="llama"` scales by
    `w` with `w` initialised to ones. Both store `w` exactly as the HF checkpoints do, so import
    and export are plain copies.

    Attributes:
      variant: "gemma" or "llama".
      eps: added to the mean square.
      dtype: output dtype (None: the input's).
      param_dtype: dtype of the scale.
    """

    variant: str = "llama"
    eps: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """float[..., D] -> float[..., D]."""
        if self.variant not in NORM_VARIANTS:
            raise ValueError(f"norm variant {self.variant!r} not in {NORM_VARIANTS}")
        init = nn.initializers.zeros if self.variant == "gemma" else nn.initializers.ones
        scale = self.param(
            "scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.variant == "gemma":
            # HF Gemma multiplies in float32 before the cast back.
            return (y * (1.0 + scale.astype(jnp.float32))).astype(dtype)
        # HF Llama casts the normalised value back first, then multiplies in the input dtype.
        return y.astype(dtype) * scale.astype(dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), the Gemma / Llama feed-forward.

    Attributes:
      mlp_dim: hidden width F.
      activation: key of ACTIVATIONS.
      use_bias: biases on the three projections (Llama `mlp_bias`).
      dropout_rate: dropout on the hidden activation.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    mlp_dim: int
    activation: str = "silu"
    use_bias: bool = False
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """float[B, T, D] -> float[B, T, D]."""
        d_model = x.shape[-1]

        def dense(features: int, axes: tuple[str, str], name: str) -> nn.Dense:
            return nn.Dense(
                features,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(default_kernel_init(), axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
                name=name,
            )

        act = ACTIVATIONS[self.activation]
        gate = dense(self.mlp_dim, ("embed", "mlp"), "gate")(x)
        up = dense(self.mlp_dim, ("embed", "mlp"), "up")(x)
        h = act(gate) * up
        h = nn.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_mlp")
        )
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense(d_model, ("mlp", "embed"), "down")(h)


class Embed(nn.Module):
    """Token embedding table float[V, D], also usable as the tied output projection.

    Attributes:
      vocab_size: V.
      features: D.
      dtype: compute dtype of lookups and of `attend`.
      param_dtype: dtype of the table.
    """

    vocab_size: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0 / self.features**0.5), ("vocab", "embed")
            ),
            (self.vocab_size, self.features),
            self.param_dtype,
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """int32[B, T] -> dtype[B, T, D]."""
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """float[B, T, D] -> dtype[B, T, V]: dot product with every embedding row."""
        return jnp.einsum("btd,vd->btv", x.astype(self.dtype), self.embedding.astype(self.dtype))

"""The spectrogram side of the decoder: pre-net (frames in), post-net (frames out), stop logit.

The paper calls both "lightweight" without details; the project default follows Tacotron 2:
the pre-net is a 2-layer ReLU MLP with dropout 0.5 that can stay active at inference (so that
autoregressive generation does not lock into repeated frames), then a linear map to the LM width.
The post-net is a 2-layer MLP from the LM hidden state to `reduction_factor x n_mels` values (one
decoder step predicts a group of frames). The optional stop head is one linear logit per step.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectron_jax.nn.layers import default_kernel_init

Dtype = Any


def logical_dense(
    features: int, in_axis: str, out_axis: str, dtype, param_dtype, name: str
) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(default_kernel_init(), (in_axis, out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
        name=name,
    )


class PreNet(nn.Module):
    """Frame group -> LM input: Dense-ReLU-Dropout x 2, then Dense to the LM width.

    Attributes:
      hidden_dim: width of the two MLP layers.
      output_dim: LM width D.
      dropout_rate: dropout after each ReLU (0.5, Tacotron 2).
      always_dropout: keep dropout on even when `deterministic=True` (inference); it then draws
        from the `dropout` rng stream, which inference must provide.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    hidden_dim: int
    output_dim: int
    dropout_rate: float = 0.5
    always_dropout: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, frames: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """float[B, N, r * n_mels] -> float[B, N, D]."""
        drop_off = deterministic and not self.always_dropout
        x = frames.astype(self.dtype)
        for i in range(2):
            x = logical_dense(
                self.hidden_dim, "mel", "mlp", self.dtype, self.param_dtype, f"dense_{i}"
            )(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout_rate)(x, deterministic=drop_off)
        x = logical_dense(self.output_dim, "mlp", "embed", self.dtype, self.param_dtype, "out")(x)
        return nn.with_logical_constraint(
            x, ("activation_batch", "activation_length", "activation_embed")
        )


class PostNet(nn.Module):
    """LM hidden -> frame group: Dense-ReLU-Dense to `reduction_factor * n_mels`, float32 out.

    Attributes:
      hidden_dim: width of the hidden layer.
      n_mels: mel bins per frame.
      reduction_factor: frames per decoder step r.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    hidden_dim: int
    n_mels: int
    reduction_factor: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        """float[B, N, D] -> float32[B, N, r * n_mels]."""
        x = logical_dense(self.hidden_dim, "embed", "mlp", self.dtype, self.param_dtype, "dense_0")(
            hidden
        )
        x = nn.relu(x)
        out = self.reduction_factor * self.n_mels
        # The regression target is read in float32; the last matmul runs in float32 too.
        x = logical_dense(out, "mlp", "mel", jnp.float32, self.param_dtype, "out")(x)
        return x.astype(jnp.float32)


class StopHead(nn.Module):
    """End-of-speech logit per decoder step: float[B, N, D] -> float32[B, N].

    The logit says "this group is the last one" (`losses.stop_targets`); decoding stops after
    the first group whose sigmoid crosses its threshold.

    Attributes:
      initial_bias: the bias at initialisation. Negative (sigmoid(-4) ~ 0.02, about one end per
        fifty groups) so that an untrained head does not end speech at random: with a zero bias
        half the groups of a fresh model would cross the default 0.5 threshold.
      param_dtype: parameter dtype.
    """

    initial_bias: float = -4.0
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        x = nn.Dense(
            1,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(default_kernel_init(), ("embed", None)),
            bias_init=nn.with_logical_partitioning(
                nn.initializers.constant(self.initial_bias), (None,)
            ),
            name="dense",
        )(hidden.astype(jnp.float32))
        return x[..., 0]


def group_frames(frames: jax.Array, reduction_factor: int) -> jax.Array:
    """float[B, T_f, M] -> float[B, T_f / r, r * M]: r consecutive frames per decoder step."""
    b, t, m = frames.shape
    if t % reduction_factor:
        raise ValueError(f"{t} frames is not a multiple of reduction_factor={reduction_factor}")
    return frames.reshape(b, t // reduction_factor, reduction_factor * m)


def ungroup_frames(groups: jax.Array, n_mels: int) -> jax.Array:
    """float[B, N, r * M] -> float[B, N * r, M], the inverse of `group_frames`."""
    b, n, rm = groups.shape
    return groups.reshape(b, n * (rm // n_mels), n_mels)


def shift_groups(groups: jax.Array) -> jax.Array:
    """Teacher forcing: slot j gets group j - 1, slot 0 gets zeros. float[B, N, X] -> same."""
    return jnp.pad(groups, ((0, 0), (1, 0), (0, 0)))[:, :-1]

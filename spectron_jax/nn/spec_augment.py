"""SpecAugment (Park et al. 2019) on the prompt features, during training only [paper].

Frequency masks hide bands of feature channels, time masks hide runs of valid frames; masked
values are set to the example's mean over its valid frames, so a mask in log-mel input does not
inject an out-of-range value (log silence is -5, speech around 0). Time masks scale with each
example's valid length and never touch padding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SpecAugmentConfig:
    """Masking knobs. Defaults: LibriSpeech "LD"-like policy scaled for 3 s prompts.

    Attributes:
      enabled: apply during training.
      num_freq_masks: frequency bands per example.
      max_freq_width: widest band (channels); drawn uniformly in [0, max].
      num_time_masks: time runs per example.
      max_time_fraction: widest run as a fraction of the example's valid frames.
      max_time_width: absolute cap on a run's width (frames).
    """

    enabled: bool = True
    num_freq_masks: int = 2
    max_freq_width: int = 27
    num_time_masks: int = 2
    max_time_fraction: float = 0.05
    max_time_width: int = 100

    def __post_init__(self):
        if min(self.num_freq_masks, self.num_time_masks, self.max_freq_width) < 0:
            raise ValueError(f"negative mask count or width in {self}")
        if not 0.0 <= self.max_time_fraction <= 1.0:
            raise ValueError(f"max_time_fraction={self.max_time_fraction} must be in [0, 1]")


def _bands(rng: jax.Array, n: int, max_width: jax.Array, extent: jax.Array, size: int) -> jax.Array:
    """bool[B, size]: union of n random bands [start, start + w), w <= max_width, inside extent.

    max_width, extent: [B] (per example).
    """
    b = max_width.shape[0]
    idx = jnp.arange(size)[None, :]
    out = jnp.zeros((b, size), bool)
    for key in jax.random.split(rng, n):
        k_w, k_s = jax.random.split(key)
        width = jnp.floor(jax.random.uniform(k_w, (b,)) * (max_width + 1)).astype(jnp.int32)
        width = jnp.minimum(width, extent)
        start = jnp.floor(jax.random.uniform(k_s, (b,)) * (extent - width + 1)).astype(jnp.int32)
        out |= (idx >= start[:, None]) & (idx < (start + width)[:, None])
    return out


def spec_augment(
    rng: jax.Array, features: jax.Array, mask: jax.Array, config: SpecAugmentConfig
) -> jax.Array:
    """Masks random frequency bands and time runs.

    Args:
      rng: PRNG key.
      features: float[B, T, F].
      mask: int[B, T], 1 on valid frames (a valid prefix per example).
      config: the policy.

    Returns:
      float[B, T, F]; padded frames are returned unchanged.
    """
    if not config.enabled:
        return features
    b, t, f = features.shape
    valid = mask > 0
    lengths = jnp.sum(valid, axis=-1).astype(jnp.int32)
    m = valid[..., None].astype(jnp.float32)
    mean = jnp.sum(features.astype(jnp.float32) * m, axis=(1, 2)) / jnp.maximum(
        jnp.sum(m, axis=(1, 2)) * f, 1.0
    )
    k_f, k_t = jax.random.split(rng)
    freq = _bands(
        k_f,
        config.num_freq_masks,
        jnp.full((b,), min(config.max_freq_width, f), jnp.int32),
        jnp.full((b,), f, jnp.int32),
        f,
    )
    max_t = jnp.minimum(
        jnp.floor(config.max_time_fraction * lengths).astype(jnp.int32), config.max_time_width
    )
    time = _bands(k_t, config.num_time_masks, max_t, lengths, t)
    hide = (freq[:, None, :] | time[:, :, None]) & valid[..., None]  # [B, T, F]
    return jnp.where(hide, mean[:, None, None].astype(features.dtype), features)

"""Frame heads: what turns the LM's hidden state on a frame slot into the next frame group.

One interface, three heads (`FrameHeadConfig.kind`), each with the same parameter logical axes
("embed" -> "mlp" -> "mel") and the same call:

    head(hidden float[B, N, D], group_index int32[N], temperature)
        -> {"frames": float32[B, N, G], ...}

with G = reduction_factor * n_mels. "frames" is what decoding feeds back through the pre-net and
what the vocoder hears; the other outputs are what the head's loss terms need (`losses`).

- `regression` (the paper): the post-net's deterministic prediction (`PostNet`; its parameters
  keep the name `post_net`). Temperature has no effect.
- `gaussian` (MELLE-style latent sampling): a latent layer predicts a mean and a log-variance per
  value, samples `z = mean + temperature * std * eps`, and a residual MLP refines z into the
  frames. Loss: the regression terms on the refined frames and on z, a KL term that pulls
  N(mean, var) towards N(target, 1) and a "spectrogram flux" term that rewards change between
  the mean and the previous target frame.
- `energy_distance` (SLED-style): a generator MLP fed the hidden state and Gaussian noise
  (scaled by temperature); trained only with the energy score, which `num_samples` draws per slot
  estimate. Temperature 0 gives the generator's output at zero noise.

Noise for frame group j is drawn from `fold_in(key, j)` (key: the `sample` rng stream), so a
group's sample does not depend on how many groups one call computes: teacher forcing over N slots,
cached decoding one slot at a time and the uncached re-run all draw the same noise for group j.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The heads' dense layers are the post-net's (the same logical-axis boxing).
from spectron_jax.nn.speech_heads import PostNet, logical_dense

Dtype = Any
FRAME_HEADS = ("regression", "gaussian", "energy_distance")


@dataclasses.dataclass(frozen=True)
class FrameHeadConfig:
    """Which frame head, its sizes and its loss weights.

    Attributes:
      kind: one of `FRAME_HEADS`.
      noise_dim: width of the energy_distance generator's noise input.
      num_samples: samples per slot in training for the energy score (>= 2: the score's
        spread term compares samples with each other).
      latent_weight: gaussian: weight of the L1 + L2 of the sampled latent z against the target.
      kl_weight: gaussian: weight of KL(N(mean, var) || N(target, 1)) (MELLE: 0.1).
      flux_weight: gaussian: weight of the flux term -|mean_t - target_{t-1}| (MELLE: 0.5).
      energy_weight: energy_distance: weight of the energy score.
    """

    kind: str = "regression"
    noise_dim: int = 32
    num_samples: int = 2
    latent_weight: float = 1.0
    kl_weight: float = 0.1
    flux_weight: float = 0.5
    energy_weight: float = 1.0

    def __post_init__(self):
        problems = []
        if self.kind not in FRAME_HEADS:
            problems.append(f"kind={self.kind!r} not in {FRAME_HEADS}")
        if self.noise_dim < 1:
            problems.append(f"noise_dim={self.noise_dim} must be >= 1")
        if self.num_samples < 2:
            problems.append(f"num_samples={self.num_samples} must be >= 2")
        for name in ("latent_weight", "kl_weight", "flux_weight", "energy_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if problems:
            raise ValueError("Invalid FrameHeadConfig: " + "; ".join(problems))

    @property
    def stochastic(self) -> bool:
        return self.kind != "regression"


def slot_noise(key: jax.Array, group_index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal noise float32[B, N, *shape] for groups `group_index` int32[N] (the same
    group index always draws the same noise from `key`, whatever the other groups)."""
    per_group = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), shape))
    return jnp.moveaxis(per_group(group_index), 0, 1)


class GaussianHead(nn.Module):
    """MELLE-style latent sampling then refinement: float[B, N, D] -> frames float32[B, N, G].

    Outputs: `frames` (refined), `latent` (the sample z), `mean`, `log_var` (all [B, N, G]).
    """

    hidden_dim: int
    group_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden, group_index, temperature) -> dict[str, jax.Array]:
        d = logical_dense
        x = nn.relu(
            d(self.hidden_dim, "embed", "mlp", self.dtype, self.param_dtype, "latent_0")(hidden)
        )
        stats = d(2 * self.group_dim, "mlp", "mel", jnp.float32, self.param_dtype, "latent_out")(x)
        mean, log_var = jnp.split(stats.astype(jnp.float32), 2, axis=-1)
        log_var = jnp.clip(log_var, -10.0, 10.0)  # exp() stays finite early in training.
        b = hidden.shape[0]
        eps = slot_noise(self.make_rng("sample"), group_index, (b, self.group_dim))
        latent = mean + temperature * jnp.exp(0.5 * log_var) * eps
        y = nn.relu(
            d(self.hidden_dim, "mel", "mlp", self.dtype, self.param_dtype, "refine_0")(latent)
        )
        frames = latent + d(
            self.group_dim, "mlp", "mel", jnp.float32, self.param_dtype, "refine_out"
        )(y)
        return {"frames": frames, "latent": latent, "mean": mean, "log_var": log_var}


class EnergyHead(nn.Module):
    """SLED-style generator: (hidden, noise) -> frames float32[B, N, G].

    Outputs: `frames` (sample 0) and, with `num_samples` > 1, `samples` float32[S, B, N, G].
    """

    hidden_dim: int
    group_dim: int
    noise_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden, group_index, temperature, num_samples: int = 1):
        d = logical_dense
        context = d(self.hidden_dim, "embed", "mlp", self.dtype, self.param_dtype, "context")(
            hidden
        )
        noise_in = d(self.hidden_dim, None, "mlp", self.dtype, self.param_dtype, "noise")
        # One logical name per dimension (a mesh rule cannot place "mlp" twice): out is None.
        layer = d(self.hidden_dim, "mlp", None, self.dtype, self.param_dtype, "hidden")
        out = d(self.group_dim, "mlp", "mel", jnp.float32, self.param_dtype, "out")
        key, b = self.make_rng("sample"), hidden.shape[0]
        samples = []
        for s in range(num_samples):
            eps = slot_noise(jax.random.fold_in(key, s), group_index, (b, self.noise_dim))
            x = nn.relu(context + noise_in(temperature * eps.astype(self.dtype)))
            x = nn.relu(layer(x))
            samples.append(out(x).astype(jnp.float32))
        result = {"frames": samples[0]}
        if num_samples > 1:
            result["samples"] = jnp.stack(samples)
        return result


def make_frame_head(
    config: FrameHeadConfig, *, hidden_dim, n_mels, reduction_factor, dtype, param_dtype
) -> nn.Module:
    """The head module for `config.kind`: `PostNet` (regression), `GaussianHead` or `EnergyHead`."""
    group_dim = reduction_factor * n_mels
    if config.kind == "regression":
        return PostNet(hidden_dim, n_mels, reduction_factor, dtype, param_dtype)
    if config.kind == "gaussian":
        return GaussianHead(hidden_dim, group_dim, dtype, param_dtype)
    return EnergyHead(hidden_dim, group_dim, config.noise_dim, dtype, param_dtype)


# The parameter names that tell the heads apart in a checkpoint's tree (no config needed).
_SIGNATURES = {"gaussian": "latent_out", "energy_distance": "noise"}


def kind_of_params(params: dict) -> str | None:
    """The frame head a params tree was built with (None: neither head's names are there)."""
    if "post_net" in params:
        return "regression"
    head = params.get("frame_head")
    if not isinstance(head, dict):
        return None
    return next((k for k, name in _SIGNATURES.items() if name in head), None)

"""HiFi-GAN generator (Kong et al., 2020) in Flax, layer for layer the `transformers`
`SpeechT5HifiGan`, so the public vocoder `microsoft/speecht5_hifigan` (whose features are our
default `SpectrogramConfig`) loads into it with `spectron_jax.convert.hf_hifigan`.

Input convention: the log10 magnitude mel of `SpectrogramConfig` (what `log_mel_*` returns and the
model predicts), float32[B, frames, n_mels]. With `normalize_before` the generator itself applies
the checkpoint's `(x - mean) / scale` (SpeechT5 trains the vocoder on normalised features but its
TTS model emits un-normalised ones), so callers never normalise. Output: float32[B, frames * hop]
in [-1, 1] with hop = prod(upsample_rates) samples per frame.

Layout: activations are [B, T, C] (Flax's NWC) where PyTorch uses [B, C, T]; kernels are
[taps, in, out] where PyTorch's Conv1d uses [out, in, taps] and ConvTranspose1d [in, out, taps].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spectron_jax.audio.spectrogram import SpectrogramConfig, check_compatible

# PyTorch's nn.functional.leaky_relu default; HF applies it (not the config's slope) before
# conv_post, a quirk the original HiFi-GAN code shares.
_FINAL_LEAKY_SLOPE = 0.01


@dataclasses.dataclass(frozen=True)
class HifiGanConfig:
    """Architecture of the generator; field names and defaults as `SpeechT5HifiGanConfig`."""

    model_in_dim: int = 80
    sampling_rate: int = 16_000
    upsample_initial_channel: int = 512
    upsample_rates: tuple[int, ...] = (4, 4, 4, 4)
    upsample_kernel_sizes: tuple[int, ...] = (8, 8, 8, 8)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    leaky_relu_slope: float = 0.1
    normalize_before: bool = True

    def __post_init__(self):
        # Accept lists (as read from JSON) but store tuples so the config stays hashable.
        for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(
            self,
            "resblock_dilation_sizes",
            tuple(tuple(int(d) for d in ds) for ds in self.resblock_dilation_sizes),
        )
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError(f"upsample_rates and upsample_kernel_sizes differ in length: {self}")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError(f"resblock kernel and dilation lists differ in length: {self}")

    @property
    def hop_length(self) -> int:
        """Waveform samples per input frame."""
        return math.prod(self.upsample_rates)


class _Conv1d(nn.Module):
    """PyTorch-style Conv1d on [B, T, C]: symmetric padding (k * d - d) // 2 or as given."""

    features: int
    kernel_size: int
    dilation: int = 1
    padding: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = (self.kernel_size * self.dilation - self.dilation) // 2
        pad = pad if self.padding is None else self.padding
        return nn.Conv(
            self.features,
            (self.kernel_size,),
            kernel_dilation=(self.dilation,),
            padding=[(pad, pad)],
            name="conv",
        )(x)


class _ConvTranspose1d(nn.Module):
    """PyTorch ConvTranspose1d(stride, padding) on [B, T, C]: T -> (T - 1) * s - 2p + k.

    Written as a regular convolution of the stride-dilated input with the flipped kernel and
    padding k - 1 - p on each side, which is exactly PyTorch's definition; `kernel[t, i, o]`
    equals PyTorch's `weight[i, o, t]`.
    """

    features: int
    kernel_size: int
    stride: int
    padding: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, in_features = self.kernel_size, x.shape[-1]
        bound = 1.0 / math.sqrt(self.features * k)  # PyTorch's default fan-in uniform.
        kernel = self.param(
            "kernel",
            lambda rng, shape: jax.random.uniform(rng, shape, jnp.float32, -bound, bound),
            (k, in_features, self.features),
        )
        bias = self.param(
            "bias",
            lambda rng, shape: jax.random.uniform(rng, shape, jnp.float32, -bound, bound),
            (self.features,),
        )
        edge = k - 1 - self.padding
        y = jax.lax.conv_general_dilated(
            x,
            kernel[::-1].astype(x.dtype),
            window_strides=(1,),
            padding=[(edge, edge)],
            lhs_dilation=(self.stride,),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + bias.astype(x.dtype)


class HifiGanResBlock(nn.Module):
    """Residual block of one receptive field: per dilation, lrelu, dilated conv, lrelu, conv."""

    channels: int
    kernel_size: int
    dilations: Sequence[int]
    leaky_relu_slope: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, dilation in enumerate(self.dilations):
            h = nn.leaky_relu(x, self.leaky_relu_slope)
            h = _Conv1d(self.channels, self.kernel_size, dilation, name=f"convs1_{i}")(h)
            h = nn.leaky_relu(h, self.leaky_relu_slope)
            h = _Conv1d(self.channels, self.kernel_size, 1, name=f"convs2_{i}")(h)
            x = x + h
        return x


class HifiGanGenerator(nn.Module):
    """float32[B, frames, model_in_dim] log10 mel -> float32[B, frames * hop] waveform."""

    config: HifiGanConfig

    @nn.compact
    def __call__(self, log_mel: jax.Array) -> jax.Array:
        cfg = self.config
        x = log_mel.astype(jnp.float32)
        # Buffers of the checkpoint (zeros/ones when random); parameters so one pytree holds all.
        mean = self.param("mean", nn.initializers.zeros, (cfg.model_in_dim,))
        scale = self.param("scale", nn.initializers.ones, (cfg.model_in_dim,))
        if cfg.normalize_before:
            x = (x - mean) / scale
        x = _Conv1d(cfg.upsample_initial_channel, 7, padding=3, name="conv_pre")(x)
        num_kernels = len(cfg.resblock_kernel_sizes)
        for i, (rate, kernel) in enumerate(
            zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)
        ):
            channels = cfg.upsample_initial_channel // 2 ** (i + 1)
            x = nn.leaky_relu(x, cfg.leaky_relu_slope)
            # [B, T, C] -> [B, T * rate, C / 2]
            x = _ConvTranspose1d(
                channels, kernel, rate, (kernel - rate) // 2, name=f"upsampler_{i}"
            )(x)
            # Multi-receptive-field fusion: the mean of the parallel residual blocks.
            total = 0.0
            for j, (size, dilations) in enumerate(
                zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
            ):
                block = HifiGanResBlock(
                    channels,
                    size,
                    dilations,
                    cfg.leaky_relu_slope,
                    name=f"resblocks_{i * num_kernels + j}",
                )
                total = total + block(x)
            x = total / num_kernels
        x = nn.leaky_relu(x, _FINAL_LEAKY_SLOPE)
        x = _Conv1d(1, 7, padding=3, name="conv_post")(x)  # [B, T', 1]
        return jnp.tanh(x[..., 0])


# eq=False: identity hash and equality (the params dict is neither hashable nor cheap to compare).
@dataclasses.dataclass(frozen=True, eq=False)
class HifiGanVocoder:
    """The vocoder interface (as `GriffinLimVocoder`): float32[B, frames, n_mels] -> [B, samples].

    `spectrogram_config` is the log-mel this generator was trained on; `check` compares it with the
    config of the spectrograms a caller is about to feed.
    """

    config: HifiGanConfig
    params: dict
    spectrogram_config: SpectrogramConfig

    def __post_init__(self):
        if self.spectrogram_config.n_mels != self.config.model_in_dim:
            raise ValueError(
                f"HiFi-GAN takes {self.config.model_in_dim} mel bins ({self.config}) but its "
                f"spectrogram config has {self.spectrogram_config.n_mels} "
                f"({self.spectrogram_config})"
            )
        if self.spectrogram_config.hop_length != self.config.hop_length:
            raise ValueError(
                f"HiFi-GAN makes {self.config.hop_length} samples per frame ({self.config}) but "
                f"its spectrogram config has hop_length={self.spectrogram_config.hop_length} "
                f"({self.spectrogram_config})"
            )

    def check(self, config: SpectrogramConfig) -> None:
        """ValueError naming both configs when `config` is not the vocoder's training features."""
        check_compatible(config, self.spectrogram_config, "HiFi-GAN vocoder")

    def __call__(self, log_mel: jax.Array) -> jax.Array:
        log_mel = jnp.asarray(log_mel, jnp.float32)
        if log_mel.shape[-1] != self.config.model_in_dim:
            raise ValueError(
                f"HiFi-GAN vocoder expects {self.config.model_in_dim} mel bins "
                f"({self.spectrogram_config}), got log-mel of shape {log_mel.shape}"
            )
        squeeze = log_mel.ndim == 2
        out = _apply(self.config, self.params, log_mel[None] if squeeze else log_mel)
        return out[0] if squeeze else out


@functools.lru_cache(maxsize=8)
def _jitted_apply(config: HifiGanConfig):
    return jax.jit(HifiGanGenerator(config).apply)


def _apply(config: HifiGanConfig, params: dict, log_mel: jax.Array) -> jax.Array:
    return _jitted_apply(config)({"params": params}, log_mel)


def init_params(config: HifiGanConfig, rng: jax.Array, num_frames: int = 8) -> dict:
    """Random parameters (PyTorch-like init) of the generator; for tests and benchmarks."""
    dummy = np.zeros((1, num_frames, config.model_in_dim), np.float32)
    return HifiGanGenerator(config).init(rng, dummy)["params"]

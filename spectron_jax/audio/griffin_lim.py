"""Griffin-Lim vocoder in JAX: the dependency-free default (no weights to download).

log-mel (`SpectrogramConfig`) -> linear magnitude -> phase by (fast) Griffin-Lim -> waveform.

The STFT/ISTFT here are the ones of `spectrogram.py` (centred with reflect padding, periodic Hann
window of `win_length` zero-padded to `n_fft`, hop `hop_length`), so the magnitude that the
iterations try to match is measured exactly as the data pipeline measured the target.

The mel -> linear step uses the pseudo-inverse of the mel filter bank, clipped at 0. librosa's
`mel_to_stft` solves a non-negative least-squares problem instead; the pseudo-inverse is a closed
form (one matmul, jit-friendly) and the iterations absorb most of the difference.

Momentum is the "fast Griffin-Lim" of Perraudin, Balazs & Søndergaard (2013): the phase update
extrapolates from the previous projection; 0 gives the classic algorithm of Griffin & Lim (1984).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from spectron_jax.audio.spectrogram import (
    SpectrogramConfig,
    analysis_window,
    check_compatible,
    mel_filter_bank,
)

# Guards divisions by the overlap-added window energy and by phase magnitudes.
_EPS = 1e-8


@functools.lru_cache(maxsize=16)
def mel_pseudo_inverse(config: SpectrogramConfig) -> np.ndarray:
    """float32[n_mels, n_fft // 2 + 1]: mel magnitudes -> linear magnitudes (least squares)."""
    return np.linalg.pinv(mel_filter_bank(config).astype(np.float64)).astype(np.float32)


def log_mel_to_linear(log_mel: jax.Array, config: SpectrogramConfig) -> jax.Array:
    """float32[..., frames, n_mels] log-mel -> float32[..., frames, n_fft // 2 + 1] magnitude.

    Undoes the log (base `config.log_base`) and, for a power mel, the square; then maps mel bins
    to STFT bins with the filter bank's pseudo-inverse. Negative least-squares values are clipped
    to 0 since a magnitude cannot be negative.
    """
    mel = jnp.power(config.log_base, log_mel.astype(jnp.float32))
    linear = jnp.maximum(mel @ mel_pseudo_inverse(config), 0.0)
    if config.power == 2.0:
        linear = jnp.sqrt(linear)
    return linear


# ------------------------------------------------------------------------------------------------
# STFT / ISTFT consistent with spectrogram.py.
# ------------------------------------------------------------------------------------------------


def stft(waveform: jax.Array, config: SpectrogramConfig) -> jax.Array:
    """float32[..., T] -> complex64[..., 1 + T // hop, n_fft // 2 + 1] (centred, like log_mel)."""
    if config.center:
        pad = [(0, 0)] * (waveform.ndim - 1) + [(config.n_fft // 2, config.n_fft // 2)]
        waveform = jnp.pad(waveform, pad, mode="reflect")
    num_frames = 1 + (waveform.shape[-1] - config.n_fft) // config.hop_length
    index = (
        np.arange(num_frames)[:, None] * config.hop_length + np.arange(config.n_fft)[None, :]
    )  # [frames, n_fft]
    frames = waveform[..., index] * analysis_window(config)
    return jnp.fft.rfft(frames, n=config.n_fft, axis=-1)


@functools.lru_cache(maxsize=16)
def _window_envelope(config: SpectrogramConfig, num_frames: int) -> np.ndarray:
    """float32[n_fft + (frames - 1) * hop]: overlap-added squared window (the ISTFT normaliser)."""
    window_sq = analysis_window(config).astype(np.float64) ** 2
    length = config.n_fft + (num_frames - 1) * config.hop_length
    envelope = np.zeros(length)
    for i in range(num_frames):
        envelope[i * config.hop_length : i * config.hop_length + config.n_fft] += window_sq
    return envelope.astype(np.float32)


def istft(spectrum: jax.Array, config: SpectrogramConfig, num_samples: int) -> jax.Array:
    """complex64[..., frames, n_fft // 2 + 1] -> float32[..., num_samples].

    Least-squares inverse of `stft` (windowed overlap-add divided by the summed squared window),
    so `istft(stft(x))` returns `x` where the windows cover it.
    """
    num_frames = spectrum.shape[-2]
    frames = jnp.fft.irfft(spectrum, n=config.n_fft, axis=-1) * analysis_window(config)
    envelope = _window_envelope(config, num_frames)
    batch_shape = frames.shape[:-2]
    if config.n_fft % config.hop_length == 0:
        # Overlap-add as R = n_fft / hop shifted sums of hop-long chunks (no scatter: fast on CPU).
        ratio = config.n_fft // config.hop_length
        chunks = frames.reshape(*batch_shape, num_frames, ratio, config.hop_length)
        no_pad = [(0, 0)] * len(batch_shape)
        signal = 0.0
        for k in range(ratio):
            part = chunks[..., k, :].reshape(*batch_shape, num_frames * config.hop_length)
            pads = (k * config.hop_length, (ratio - 1 - k) * config.hop_length)
            signal = signal + jnp.pad(part, no_pad + [pads])
    else:
        index = (
            np.arange(num_frames)[:, None] * config.hop_length + np.arange(config.n_fft)[None, :]
        ).reshape(-1)
        signal = jnp.zeros((*batch_shape, envelope.shape[0]), frames.dtype)
        signal = signal.at[..., index].add(frames.reshape(*batch_shape, -1))
    signal = signal / np.maximum(envelope, _EPS)
    start = config.n_fft // 2 if config.center else 0
    signal = signal[..., start : start + num_samples]
    missing = num_samples - signal.shape[-1]
    if missing > 0:  # Only when n_fft // 2 < hop: the tail no window reaches is silent.
        signal = jnp.pad(signal, [(0, 0)] * len(batch_shape) + [(0, missing)])
    return signal


# ------------------------------------------------------------------------------------------------
# Griffin-Lim.
# ------------------------------------------------------------------------------------------------


def griffin_lim_from_magnitude(
    magnitude: jax.Array,
    config: SpectrogramConfig,
    *,
    num_iters: int = 32,
    momentum: float = 0.99,
    rng: jax.Array | None = None,
) -> jax.Array:
    """float32[..., frames, n_fft // 2 + 1] -> float32[..., frames * hop] (not jitted itself).

    Args:
      magnitude: target STFT magnitude.
      config: the STFT geometry.
      num_iters: projection rounds; each costs one STFT and one ISTFT.
      momentum: fast Griffin-Lim extrapolation in [0, 1); 0 = classic Griffin-Lim.
      rng: PRNG key of the random initial phase; None starts from zero phase.
    """
    num_frames = magnitude.shape[-2]
    num_samples = config.num_samples(num_frames)
    if rng is None:
        angles = jnp.ones(magnitude.shape, jnp.complex64)
    else:
        phase = jax.random.uniform(rng, magnitude.shape, jnp.float32, 0.0, 2 * np.pi)
        angles = jnp.exp(1j * phase).astype(jnp.complex64)
    magnitude = magnitude.astype(jnp.float32)
    # A signal of frames * hop samples has frames + 1 centred frames; the last one is dropped.
    project = lambda a: stft(istft(magnitude * a, config, num_samples), config)[..., :num_frames, :]
    beta = momentum / (1.0 + momentum)

    def body(_, carry):
        angles, previous = carry
        rebuilt = project(angles)
        update = rebuilt - beta * previous
        return update / (jnp.abs(update) + _EPS), rebuilt

    angles, _ = jax.lax.fori_loop(0, num_iters, body, (angles, jnp.zeros_like(angles)))
    return istft(magnitude * angles, config, num_samples)


@functools.partial(jax.jit, static_argnames=("config",))
def griffin_lim(
    log_mel: jax.Array,
    config: SpectrogramConfig,
    *,
    num_iters: int = 32,
    momentum: float = 0.99,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Jitted log-mel vocoder: float32[B, frames, n_mels] -> float32[B, frames * hop_length].

    Leading batch dimensions are optional ([frames, n_mels] -> [frames * hop_length]).

    `num_iters`, `momentum` and `rng` are traced, so changing them does not recompile; only
    `config` (and the input shape) is static.
    """
    return griffin_lim_from_magnitude(
        log_mel_to_linear(log_mel, config), config, num_iters=num_iters, momentum=momentum, rng=rng
    )


def spectral_convergence(
    waveform: jax.Array, magnitude: jax.Array, config: SpectrogramConfig
) -> jax.Array:
    """|| |STFT(x)| - S ||_F / ||S||_F per example: float32[..., T], [..., F, K] -> float32[...].

    The consistency measure Griffin-Lim decreases; STFT frames past `magnitude`'s are ignored.
    """
    rebuilt = jnp.abs(stft(waveform, config))[..., : magnitude.shape[-2], :]
    diff = jnp.sqrt(jnp.sum((rebuilt - magnitude) ** 2, axis=(-2, -1)))
    return diff / (jnp.sqrt(jnp.sum(magnitude**2, axis=(-2, -1))) + _EPS)


@dataclasses.dataclass(frozen=True)
class GriffinLimVocoder:
    """The vocoder interface: `spectrogram_config` and `__call__(log_mel) -> waveform`.

    Shapes: float32[B, frames, n_mels] -> float32[B, frames * hop_length] at
    `spectrogram_config.sample_rate`.
    """

    spectrogram_config: SpectrogramConfig = SpectrogramConfig()
    num_iters: int = 32
    momentum: float = 0.99
    seed: int = 0

    def check(self, config: SpectrogramConfig) -> None:
        """ValueError naming both configs when `config` is not the one this vocoder inverts."""
        check_compatible(config, self.spectrogram_config, "Griffin-Lim vocoder")

    def __call__(self, log_mel: jax.Array) -> jax.Array:
        log_mel = jnp.asarray(log_mel, jnp.float32)
        if log_mel.shape[-1] != self.spectrogram_config.n_mels:
            raise ValueError(
                f"Griffin-Lim vocoder expects {self.spectrogram_config.n_mels} mel bins "
                f"({self.spectrogram_config}), got log-mel of shape {log_mel.shape}"
            )
        return griffin_lim(
            log_mel,
            self.spectrogram_config,
            num_iters=self.num_iters,
            momentum=self.momentum,
            rng=jax.random.PRNGKey(self.seed),
        )

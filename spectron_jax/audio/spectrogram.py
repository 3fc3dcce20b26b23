"""Log-mel spectrograms: one config, three implementations (numpy, JAX, TensorFlow) that agree.

The same `SpectrogramConfig` object describes the target spectrogram everywhere: the seqio data
pipeline (TensorFlow, inside preprocessors), the model's spectrogram head (its `n_mels` and frame
rate) and the vocoder. `check_compatible` turns a mismatch into an error naming both configs,
never a silent resample.

Default: the features of the public SpeechT5 HiFi-GAN vocoder (`microsoft/speecht5_hifigan`,
HF `SpeechT5HifiGan`): 16 kHz, 1024-point FFT over a 1024-sample periodic Hann window, hop 256
(62.5 frames/s), 80 Slaney mel bins over 80-7600 Hz, magnitude (power 1) mel, log10, centred
frames with reflect padding. This equals `librosa.feature.melspectrogram(..., power=1.0)` with
those arguments, followed by `log10(max(mel, log_floor))`. SpeechT5 floors at 1e-10; we floor at
1e-5 by default (silence at -5 instead of -10 keeps the regression target's range compact); the
vocoder sees the same values in both cases everywhere but in near-silence.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpectrogramConfig:
    """Log-mel front end. Shapes: waveform float32[T] -> log-mel float32[frames, n_mels].

    frames = 1 + T // hop_length when `center` (librosa convention).
    """

    sample_rate: int = 16_000
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 256
    n_mels: int = 80
    fmin: float = 80.0
    fmax: float = 7600.0
    power: float = 1.0  # 1: magnitude mel (SpeechT5/HiFi-GAN); 2: power mel.
    log_floor: float = 1e-5
    log_base: float = 10.0
    center: bool = True  # Reflect-pad n_fft // 2 on both sides, as librosa does.
    # The public vocoder whose training features these are; recorded, never downloaded.
    vocoder: str = "microsoft/speecht5_hifigan"

    def __post_init__(self):
        problems = []
        if self.sample_rate <= 0:
            problems.append(f"sample_rate={self.sample_rate} must be positive")
        if self.win_length > self.n_fft:
            problems.append(f"win_length={self.win_length} exceeds n_fft={self.n_fft}")
        if self.hop_length <= 0:
            problems.append(f"hop_length={self.hop_length} must be positive")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            problems.append(
                f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin}, "
                f"fmax={self.fmax}, sample_rate={self.sample_rate}"
            )
        if self.n_mels <= 0:
            problems.append(f"n_mels={self.n_mels} must be positive")
        if self.log_floor <= 0:
            problems.append(f"log_floor={self.log_floor} must be positive")
        if self.power not in (1.0, 2.0):
            problems.append(f"power={self.power} must be 1.0 or 2.0")
        if problems:
            raise ValueError("Invalid SpectrogramConfig: " + "; ".join(problems))

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def log_silence(self) -> float:
        """The value of a silent bin: log(log_floor)."""
        return float(np.log(self.log_floor) / np.log(self.log_base))

    def num_frames(self, num_samples: int) -> int:
        if self.center:
            return 1 + num_samples // self.hop_length
        return max(0, 1 + (num_samples - self.n_fft) // self.hop_length)

    def num_samples(self, num_frames: int) -> int:
        """Samples a vocoder makes from `num_frames` frames (hop_length each)."""
        return num_frames * self.hop_length

    # The encoder front-end protocol (also met by the w2v-BERT fbank front end): `sample_rate`,
    # `feature_dim`, `features_numpy(float32[T]) -> float32[T', F]` and `features_tf(...)`.
    @property
    def feature_dim(self) -> int:
        return self.n_mels

    def features_numpy(self, waveform: np.ndarray) -> np.ndarray:
        return log_mel_numpy(waveform, self)

    def features_tf(self, waveform):
        return log_mel_tf(waveform, self)


def check_compatible(expected: SpectrogramConfig, actual: SpectrogramConfig, what: str) -> None:
    """Raises ValueError naming both configs when two components disagree on the spectrogram."""
    if expected != actual:
        diffs = {
            f.name: (getattr(expected, f.name), getattr(actual, f.name))
            for f in dataclasses.fields(SpectrogramConfig)
            if getattr(expected, f.name) != getattr(actual, f.name)
        }
        raise ValueError(
            f"Spectrogram config mismatch for {what}: fields (expected, got) {diffs}.\n"
            f"  expected: {expected}\n  got:      {actual}"
        )


# ------------------------------------------------------------------------------------------------
# Mel filter bank (Slaney scale and area normalisation, as librosa's default).
# ------------------------------------------------------------------------------------------------


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    mel = hz / f_sp
    return np.where(
        hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, mel
    )


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(
        mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel
    )


@functools.lru_cache(maxsize=16)
def mel_filter_bank(config: SpectrogramConfig) -> np.ndarray:
    """float32[n_fft // 2 + 1, n_mels]: linear-frequency magnitudes -> mel bins."""
    n_freqs = config.n_fft // 2 + 1
    fft_freqs = np.linspace(0, config.sample_rate / 2, n_freqs)
    mel_points = np.linspace(
        _hz_to_mel_slaney(config.fmin), _hz_to_mel_slaney(config.fmax), config.n_mels + 2
    )
    hz_points = _mel_to_hz_slaney(mel_points)
    fdiff = np.diff(hz_points)
    ramps = hz_points[:, None] - fft_freqs[None, :]  # [n_mels + 2, n_freqs]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))  # [n_mels, n_freqs]
    weights *= (2.0 / (hz_points[2:] - hz_points[:-2]))[:, None]  # Slaney area normalisation.
    return weights.T.astype(np.float32)


@functools.lru_cache(maxsize=16)
def analysis_window(config: SpectrogramConfig) -> np.ndarray:
    """float32[n_fft]: periodic Hann of win_length, zero-padded to n_fft at the centre."""
    n = np.arange(config.win_length)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / config.win_length)
    left = (config.n_fft - config.win_length) // 2
    padded = np.zeros(config.n_fft, dtype=np.float64)
    padded[left : left + config.win_length] = window
    return padded.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# numpy / JAX implementation (inference on single files and batches).
# ------------------------------------------------------------------------------------------------


def _frame_indices(config: SpectrogramConfig, num_padded: int) -> np.ndarray:
    num_frames = 1 + (num_padded - config.n_fft) // config.hop_length
    starts = np.arange(num_frames)[:, None] * config.hop_length
    return starts + np.arange(config.n_fft)[None, :]  # [frames, n_fft]


def _log_mel_from_frames(xp, frames, config: SpectrogramConfig):
    """[..., frames, n_fft] frames -> [..., frames, n_mels] with array module `xp` (jnp here)."""
    spectrum = xp.abs(xp.fft.rfft(frames * analysis_window(config), axis=-1))
    if config.power == 2.0:
        spectrum = spectrum**2
    mel = spectrum @ mel_filter_bank(config)
    return xp.log(xp.maximum(mel, config.log_floor)) / np.log(config.log_base)


def log_mel_numpy(waveform: np.ndarray, config: SpectrogramConfig) -> np.ndarray:
    """float32[..., T] -> float32[..., 1 + T // hop, n_mels] (centred). numpy + scipy.fft.

    Frames are a strided view (no copy) and the FFT runs on all cores: this path is what single-file
    inference uses, and it must be at least as fast as librosa (benchmarks/data_pipeline.py).
    """
    import scipy.fft

    waveform = np.asarray(waveform, dtype=np.float32)
    if config.center:
        pad = [(0, 0)] * (waveform.ndim - 1) + [(config.n_fft // 2, config.n_fft // 2)]
        waveform = np.pad(waveform, pad, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(waveform, config.n_fft, axis=-1)
    frames = frames[..., :: config.hop_length, :]  # [..., frames, n_fft]
    spectrum = np.abs(scipy.fft.rfft(frames * analysis_window(config), axis=-1, workers=-1))
    if config.power == 2.0:
        spectrum = spectrum**2
    # A 2-D matmul: numpy's batched 3-D matmul is several times slower here.
    mel = spectrum.reshape(-1, spectrum.shape[-1]) @ mel_filter_bank(config)
    mel = mel.reshape(spectrum.shape[:-1] + (config.n_mels,))
    return (np.log(np.maximum(mel, config.log_floor)) / np.log(config.log_base)).astype(np.float32)


def log_mel_jax(waveform, config: SpectrogramConfig):
    """float32[..., T] -> float32[..., 1 + T // hop, n_mels] (centred). Jittable; batch-friendly."""
    import jax.numpy as jnp

    waveform = jnp.asarray(waveform, dtype=jnp.float32)
    if config.center:
        pad = [(0, 0)] * (waveform.ndim - 1) + [(config.n_fft // 2, config.n_fft // 2)]
        waveform = jnp.pad(waveform, pad, mode="reflect")
    frames = waveform[..., _frame_indices(config, waveform.shape[-1])]
    return _log_mel_from_frames(jnp, frames, config)


# ------------------------------------------------------------------------------------------------
# TensorFlow implementation (inside seqio preprocessors; works on tf.data graphs).
# ------------------------------------------------------------------------------------------------


def log_mel_tf(waveform, config: SpectrogramConfig):
    """tf.float32[T] (or [B, T]) -> tf.float32[1 + T // hop, n_mels] (centred).

    Reflect padding needs T > n_fft // 2 samples; `audio.io` rejects shorter clips before this.
    """
    import tensorflow as tf

    waveform = tf.convert_to_tensor(waveform, dtype=tf.float32)
    if config.center:
        half = config.n_fft // 2
        paddings = [[0, 0]] * (len(waveform.shape) - 1) + [[half, half]]
        waveform = tf.pad(waveform, paddings, mode="REFLECT")
    frames = tf.signal.frame(waveform, config.n_fft, config.hop_length, pad_end=False)
    frames = frames * tf.constant(analysis_window(config))
    spectrum = tf.abs(tf.signal.rfft(frames, fft_length=[config.n_fft]))
    if config.power == 2.0:
        spectrum = tf.square(spectrum)
    mel = tf.tensordot(spectrum, tf.constant(mel_filter_bank(config)), axes=1)
    return tf.math.log(tf.maximum(mel, config.log_floor)) / np.log(config.log_base)

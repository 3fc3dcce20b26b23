"""w2v-BERT 2.0 front end: 80-bin Kaldi-compatible fbank, normalised, stacked by 2 (F = 160).

Computes what HF `SeamlessM4TFeatureExtractor` (the feature extractor of `facebook/w2v-bert-2.0`)
gives as `input_features` for one utterance, in numpy and in TensorFlow (for seqio
preprocessors), without importing transformers:

1. samples scaled to the int16 range (x 32768), as Kaldi reads 16-bit audio;
2. 25 ms frames (400 samples) every 10 ms (160), no centring: 1 + (T - 400) // 160 frames;
3. per frame: remove the DC offset, pre-emphasis 0.97 (first sample: x[0] - 0.97 x[0]), Povey
   window (symmetric Hann ** 0.85), 512-point FFT, power spectrum; no dither;
4. 80 triangular filters on the Kaldi mel scale (1127 ln(1 + f/700)), 20 Hz .. 8 kHz,
   triangles in mel space; `log(max(mel, 1.1920929e-07))`;
5. each mel bin normalised over the utterance: (x - mean) / sqrt(var + 1e-7), var with ddof=1;
6. pairs of consecutive frames concatenated: [N, 80] -> [N // 2, 160].

For an odd N, HF pads one zero frame and marks the last stacked frame as padding in its
`attention_mask`; we return only the N // 2 valid frames (HF's `input_features[:, :mask.sum()]`).
Both implementations compute in float64 and return float32.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class W2vBertFbankConfig:
    """w2v-BERT 2.0 front end (encoder front-end protocol, CONTRACTS.md section 5).

    Shapes: waveform float32[T] in [-1, 1] at `sample_rate` -> float32[T', feature_dim],
    T' = `num_frames(T)`.
    """

    sample_rate: int = 16_000
    num_mel_bins: int = 80
    stride: int = 2  # Consecutive frames concatenated into one feature vector.
    frame_length: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms
    fft_length: int = 512
    preemphasis: float = 0.97
    min_frequency: float = 20.0
    mel_floor: float = 1.192092955078125e-07  # float32 machine epsilon, as Kaldi.
    normalize: bool = True  # Per-utterance, per-bin mean and variance normalisation.
    variance_epsilon: float = 1e-7

    def __post_init__(self):
        problems = []
        if self.sample_rate <= 0:
            problems.append(f"sample_rate={self.sample_rate} must be positive")
        if not 0 < self.frame_length <= self.fft_length:
            problems.append(
                f"need 0 < frame_length <= fft_length, got {self.frame_length}, {self.fft_length}"
            )
        if self.hop_length <= 0 or self.stride <= 0 or self.num_mel_bins <= 0:
            problems.append("hop_length, stride and num_mel_bins must be positive")
        if not 0 <= self.min_frequency < self.sample_rate / 2:
            problems.append(f"min_frequency={self.min_frequency} outside [0, sample_rate/2)")
        if problems:
            raise ValueError("Invalid W2vBertFbankConfig: " + "; ".join(problems))

    @property
    def feature_dim(self) -> int:
        return self.num_mel_bins * self.stride

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / (self.hop_length * self.stride)

    @property
    def min_samples(self) -> int:
        """Shortest waveform that gives one stacked frame (and a defined variance)."""
        return self.frame_length + (max(self.stride, 2) - 1) * self.hop_length

    def num_frames(self, num_samples: int) -> int:
        """Stacked output frames for `num_samples` samples."""
        if num_samples < self.frame_length:
            return 0
        return (1 + (num_samples - self.frame_length) // self.hop_length) // self.stride

    def features_numpy(self, waveform: np.ndarray) -> np.ndarray:
        return fbank_numpy(waveform, self)

    def features_tf(self, waveform):
        return fbank_tf(waveform, self)


@functools.lru_cache(maxsize=8)
def kaldi_mel_filters(config: W2vBertFbankConfig) -> np.ndarray:
    """float64[fft_length // 2 + 1, num_mel_bins]: power spectrum -> Kaldi mel bins.

    Triangles are linear in mel (Kaldi), not in Hz; the Nyquist bin gets weight 0.
    """

    def to_mel(hz):
        return 1127.0 * np.log(1.0 + np.asarray(hz, np.float64) / 700.0)

    num_bins = config.fft_length // 2 + 1
    bin_mels = to_mel(config.sample_rate / config.fft_length * np.arange(num_bins))
    edges = np.linspace(
        to_mel(config.min_frequency), to_mel(config.sample_rate / 2), config.num_mel_bins + 2
    )
    widths = np.diff(edges)
    offsets = edges[None, :] - bin_mels[:, None]  # [bins, mels + 2]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


@functools.lru_cache(maxsize=8)
def povey_window(config: W2vBertFbankConfig) -> np.ndarray:
    """float64[frame_length]: Kaldi's Povey window, a symmetric Hann raised to 0.85."""
    return np.hanning(config.frame_length) ** 0.85


def _check_length(num_samples: int, config: W2vBertFbankConfig) -> None:
    if num_samples < config.min_samples:
        raise ValueError(
            f"waveform of {num_samples} samples is too short for the w2v-BERT fbank: need at "
            f"least {config.min_samples} ({1000 * config.min_samples / config.sample_rate:.0f} "
            f"ms at {config.sample_rate} Hz)"
        )


def _prepare_frames(xp, frames, config):
    """[N, frame_length] raw frames -> [N, fft_length] DC-removed, pre-emphasised, windowed."""
    frames = frames - xp.mean(frames, axis=-1, keepdims=True)
    first = frames[:, :1] * (1.0 - config.preemphasis)
    rest = frames[:, 1:] - config.preemphasis * frames[:, :-1]
    frames = xp.concatenate([first, rest], axis=-1) * povey_window(config)
    return frames


def _stack(xp, features, num_frames, config):
    """[N, M] -> [N // stride, M * stride]; the last N % stride frames are dropped."""
    usable = (num_frames // config.stride) * config.stride
    return xp.reshape(features[:usable], (-1, config.num_mel_bins * config.stride))


def fbank_numpy(waveform: np.ndarray, config: W2vBertFbankConfig) -> np.ndarray:
    """float32[T] in [-1, 1] -> float32[num_frames(T), feature_dim]."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"expected a mono waveform float32[T], got shape {waveform.shape}")
    _check_length(waveform.shape[0], config)
    samples = waveform.astype(np.float64) * 32768.0  # Kaldi reads int16 samples.
    num = 1 + (samples.shape[0] - config.frame_length) // config.hop_length
    index = np.arange(num)[:, None] * config.hop_length + np.arange(config.frame_length)
    frames = _prepare_frames(np, samples[index], config)
    power = np.abs(np.fft.rfft(frames, n=config.fft_length, axis=-1)) ** 2
    log_mel = np.log(np.maximum(power @ kaldi_mel_filters(config), config.mel_floor))
    if config.normalize:
        log_mel = (log_mel - log_mel.mean(0)) / np.sqrt(
            log_mel.var(0, ddof=1) + config.variance_epsilon
        )
    return _stack(np, log_mel, num, config).astype(np.float32)


def fbank_tf(waveform, config: W2vBertFbankConfig):
    """tf.float32[T] in [-1, 1] -> tf.float32[num_frames(T), feature_dim]; graph-safe.

    Too-short waveforms fail with a tf.debugging assertion naming the minimum length.
    """
    import tensorflow as tf

    waveform = tf.convert_to_tensor(waveform, dtype=tf.float32)
    tf.debugging.assert_rank(waveform, 1, message="expected a mono waveform float32[T]")
    tf.debugging.assert_greater_equal(
        tf.shape(waveform)[0],
        config.min_samples,
        message=f"waveform too short for the w2v-BERT fbank (need {config.min_samples} samples)",
    )
    samples = tf.cast(waveform, tf.float64) * 32768.0
    frames = tf.signal.frame(samples, config.frame_length, config.hop_length, pad_end=False)
    frames = _prepare_frames(tf.experimental.numpy, frames, config)
    spectrum = tf.signal.rfft(frames, fft_length=[config.fft_length])
    power = tf.math.square(tf.math.real(spectrum)) + tf.math.square(tf.math.imag(spectrum))
    mel = tf.linalg.matmul(power, tf.constant(kaldi_mel_filters(config)))
    log_mel = tf.math.log(tf.maximum(mel, config.mel_floor))
    if config.normalize:
        mean = tf.reduce_mean(log_mel, axis=0, keepdims=True)
        count = tf.cast(tf.shape(log_mel)[0], tf.float64)
        var = tf.reduce_sum(tf.square(log_mel - mean), axis=0, keepdims=True) / (count - 1.0)
        log_mel = (log_mel - mean) / tf.sqrt(var + config.variance_epsilon)
    return tf.cast(_stack(tf, log_mel, tf.shape(log_mel)[0], config), tf.float32)

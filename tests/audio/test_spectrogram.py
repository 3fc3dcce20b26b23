"""Log-mel: numpy, JAX and TensorFlow agree with each other and with librosa on real speech."""

import librosa
import numpy as np
import pytest

from spectron_jax.audio import io, spectrogram
from spectron_jax.audio.spectrogram import SpectrogramConfig

CONFIG = SpectrogramConfig()
# Tolerances, measured with `log_mel_*` on 18 real files (LJSpeech, FSDD, LLaMA-Questions; 5 s
# each): max |TF - JAX| 1e-6 (both float32 FFTs); max |numpy - JAX/TF| 1.9e-4; max |librosa -
# numpy| 9e-5 and |librosa - JAX/TF| 2.3e-4. The larger gaps sit only in near-floor bins, where
# log10 turns the float32 FFT's absolute rounding (~1e-8 of a mel value of ~1e-5) into 1e-4.
TF_JAX_ATOL = 1e-4  # The bound the data pipeline and inference are held to.
NUMPY_ATOL = 3e-4
LIBROSA_ATOL = 4e-4
MEAN_ATOL = 1e-5  # The mean |difference| over all bins: agreement is not only at the floor.

# One file of each source: LJSpeech (22.05 kHz) and FSDD (8 kHz), both resampled; LLaMA-Q (16 kHz).
RECORDINGS = (
    "ljspeech_subset/wavs/LJ001-0001.wav",
    "fsdd/recordings/3_jackson_7.wav",
    "llama_questions/1.wav",
)


def _librosa_log_mel(waveform: np.ndarray, config: SpectrogramConfig) -> np.ndarray:
    mel = librosa.feature.melspectrogram(
        y=waveform,
        sr=config.sample_rate,
        n_fft=config.n_fft,
        hop_length=config.hop_length,
        win_length=config.win_length,
        window="hann",
        center=True,
        pad_mode="reflect",
        power=config.power,
        n_mels=config.n_mels,
        fmin=config.fmin,
        fmax=config.fmax,
        htk=False,
        norm="slaney",
    )  # [n_mels, frames]
    return np.log10(np.maximum(mel, config.log_floor)).T


@pytest.fixture(scope="module")
def recordings(shared_data):
    waves = {}
    for rel in RECORDINGS:
        waveform, info = io.load_audio(shared_data / rel, CONFIG.sample_rate)
        waves[rel] = waveform[: 5 * CONFIG.sample_rate]  # 5 s at most keeps the test fast.
    return waves


@pytest.mark.needs_shared_data
@pytest.mark.parametrize("rel", RECORDINGS)
def test_tf_jax_numpy_agree_on_real_speech(recordings, rel):
    """Round trip of a real file: load_audio -> log-mel (TF, JAX, numpy) -> comparison."""
    waveform = recordings[rel]
    ref = spectrogram.log_mel_numpy(waveform, CONFIG)
    jax_out = np.asarray(spectrogram.log_mel_jax(waveform, CONFIG))
    tf_out = spectrogram.log_mel_tf(waveform, CONFIG).numpy()
    assert ref.shape == jax_out.shape == tf_out.shape == (CONFIG.num_frames(len(waveform)), 80)
    assert ref.std() > 0.3  # Speech, not a floor-only spectrogram.
    np.testing.assert_allclose(tf_out, jax_out, atol=TF_JAX_ATOL, rtol=0)
    np.testing.assert_allclose(jax_out, ref, atol=NUMPY_ATOL, rtol=0)
    assert np.abs(jax_out - ref).mean() < MEAN_ATOL


@pytest.mark.needs_shared_data
@pytest.mark.parametrize("rel", RECORDINGS)
def test_matches_librosa(recordings, rel):
    waveform = recordings[rel]
    expected = _librosa_log_mel(waveform, CONFIG)
    for out in (
        spectrogram.log_mel_numpy(waveform, CONFIG),
        np.asarray(spectrogram.log_mel_jax(waveform, CONFIG)),
        spectrogram.log_mel_tf(waveform, CONFIG).numpy(),
    ):
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, atol=LIBROSA_ATOL, rtol=0)
        assert np.abs(out - expected).mean() < MEAN_ATOL


def test_matches_librosa_power_mel_and_other_geometry():
    """Non-default fields (power 2, win < n_fft, 22.05 kHz) are honoured the way librosa does."""
    config = SpectrogramConfig(
        sample_rate=22050,
        n_fft=512,
        win_length=400,
        hop_length=160,
        n_mels=40,
        fmin=0,
        fmax=8000,
        power=2.0,
        log_floor=1e-8,
    )
    rng = np.random.default_rng(0)
    t = np.arange(22050) / 22050
    waveform = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.normal(size=t.size)).astype(
        np.float32
    )
    expected = _librosa_log_mel(waveform, config)
    np.testing.assert_allclose(
        spectrogram.log_mel_numpy(waveform, config), expected, atol=LIBROSA_ATOL, rtol=0
    )
    np.testing.assert_allclose(
        spectrogram.log_mel_tf(waveform, config).numpy(), expected, atol=LIBROSA_ATOL, rtol=0
    )


def test_batch_equals_per_item():
    rng = np.random.default_rng(1)
    batch = (0.1 * rng.normal(size=(3, 4000))).astype(np.float32)
    for fn in (
        spectrogram.log_mel_numpy,
        lambda x, c: np.asarray(spectrogram.log_mel_jax(x, c)),
        lambda x, c: spectrogram.log_mel_tf(x, c).numpy(),
    ):
        batched = fn(batch, CONFIG)
        assert batched.shape == (3, CONFIG.num_frames(4000), 80)
        for i in range(3):
            np.testing.assert_allclose(batched[i], fn(batch[i], CONFIG), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:n_fft=1024 is too large")
@pytest.mark.parametrize("num_samples", [513, 1024, 4000, 4096, 16000, 16001])
def test_frame_count_formula(num_samples):
    waveform = np.random.default_rng(2).normal(size=num_samples).astype(np.float32)
    expected = 1 + num_samples // CONFIG.hop_length  # librosa's centred count.
    assert CONFIG.num_frames(num_samples) == expected
    assert spectrogram.log_mel_numpy(waveform, CONFIG).shape[0] == expected
    assert spectrogram.log_mel_tf(waveform, CONFIG).shape[0] == expected
    assert _librosa_log_mel(waveform, CONFIG).shape[0] == expected
    assert CONFIG.num_samples(expected) == expected * CONFIG.hop_length


def test_silence_sits_at_the_floor():
    out = spectrogram.log_mel_numpy(np.zeros(2048, np.float32), CONFIG)
    np.testing.assert_allclose(out, CONFIG.log_silence, atol=0)
    assert CONFIG.log_silence == pytest.approx(-5.0)


def test_invalid_config_and_mismatch_name_the_problem():
    with pytest.raises(ValueError, match="fmax"):
        SpectrogramConfig(fmax=9000)
    with pytest.raises(ValueError, match="win_length"):
        SpectrogramConfig(win_length=2048)
    with pytest.raises(ValueError, match="test vocoder") as error:
        spectrogram.check_compatible(CONFIG, SpectrogramConfig(hop_length=200), "test vocoder")
    message = str(error.value)
    assert "'hop_length': (256, 200)" in message
    assert str(CONFIG) in message and str(SpectrogramConfig(hop_length=200)) in message

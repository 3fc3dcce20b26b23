"""Griffin-Lim: STFT/ISTFT consistency, reconstruction quality on real speech, shapes, batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectron_jax.audio import griffin_lim as gl
from spectron_jax.audio import io, spectrogram
from spectron_jax.audio.spectrogram import SpectrogramConfig

CONFIG = SpectrogramConfig()
# Mean |log-mel(GL(x)) - x| in log10 units after 32 fast-GL iterations on 3 s of LJ001-0001:
# measured 0.055 (0.063 without momentum; 0.29 with no iteration at all).
RECONSTRUCTION_L1_BOUND = 0.08


@pytest.fixture(scope="module")
def speech(shared_data):
    waveform, _ = io.load_audio(shared_data / "ljspeech_subset/wavs/LJ001-0001.wav", 16000)
    return waveform[: 3 * 16000]


def test_stft_matches_numpy_log_mel_and_istft_inverts():
    rng = np.random.default_rng(0)
    x = (0.1 * rng.normal(size=(2, 5000))).astype(np.float32)
    spectrum = gl.stft(jnp.asarray(x), CONFIG)
    # The magnitude is the one log_mel_numpy measures: same frames, window and padding.
    mel = np.abs(np.asarray(spectrum)) @ spectrogram.mel_filter_bank(CONFIG)
    np.testing.assert_allclose(
        np.log10(np.maximum(mel, CONFIG.log_floor)), spectrogram.log_mel_numpy(x, CONFIG), atol=2e-4
    )
    np.testing.assert_allclose(np.asarray(gl.istft(spectrum, CONFIG, 5000)), x, atol=1e-5)


def test_mel_pseudo_inverse_recovers_a_mel_of_a_smooth_magnitude():
    freqs = np.linspace(0, 1, CONFIG.n_fft // 2 + 1)
    magnitude = np.stack([1.0 + 0.5 * np.sin(2 * np.pi * k * freqs) for k in (1, 2, 3)])
    mel = (magnitude @ spectrogram.mel_filter_bank(CONFIG)).astype(np.float32)  # [3, n_mels]
    linear = np.asarray(gl.log_mel_to_linear(jnp.log10(mel), CONFIG))
    assert linear.shape == magnitude.shape and linear.min() >= 0.0
    # Mapping the estimate back onto the mel basis returns the input mel (least squares is exact
    # on the range of the filter bank).
    np.testing.assert_allclose(linear @ spectrogram.mel_filter_bank(CONFIG), mel, rtol=1e-3)


@pytest.mark.needs_shared_data
def test_reconstructs_real_speech(speech):
    log_mel = spectrogram.log_mel_numpy(speech, CONFIG)  # [frames, 80]
    out = np.asarray(gl.GriffinLimVocoder(CONFIG)(log_mel[None]))
    assert out.shape == (1, log_mel.shape[0] * CONFIG.hop_length)
    assert np.all(np.isfinite(out))
    rebuilt = spectrogram.log_mel_numpy(out[0], CONFIG)[: log_mel.shape[0]]
    l1 = float(np.abs(rebuilt - log_mel).mean())
    assert l1 < RECONSTRUCTION_L1_BOUND, l1


@pytest.mark.needs_shared_data
def test_convergence_improves_with_iterations(speech):
    log_mel = spectrogram.log_mel_numpy(speech[:16000], CONFIG)
    target = gl.log_mel_to_linear(log_mel, CONFIG)
    key = jax.random.PRNGKey(0)
    errors = {}
    for momentum in (0.0, 0.99):
        errors[momentum] = [
            float(
                gl.spectral_convergence(
                    gl.griffin_lim(log_mel, CONFIG, num_iters=n, momentum=momentum, rng=key),
                    target,
                    CONFIG,
                )
            )
            for n in (0, 4, 16, 48)
        ]
        assert np.all(np.diff(errors[momentum]) < 0), errors
    assert errors[0.99][-1] < 0.5 * errors[0.99][0], errors
    assert errors[0.99][-1] < errors[0.0][-1], errors  # Fast Griffin-Lim converges faster.


def test_batch_equals_per_item_and_length():
    rng = np.random.default_rng(2)
    log_mel = rng.uniform(-4, -1, size=(3, 11, CONFIG.n_mels)).astype(np.float32)
    # Zero-phase start: a random start is drawn for the whole batch, so it differs per shape.
    batched = np.asarray(gl.griffin_lim(log_mel, CONFIG, num_iters=4))
    assert batched.shape == (3, 11 * CONFIG.hop_length) and batched.dtype == np.float32
    single = np.asarray(gl.griffin_lim(log_mel[1], CONFIG, num_iters=4))
    assert single.shape == (11 * CONFIG.hop_length,)
    np.testing.assert_allclose(batched[1], single, atol=1e-5)


def test_vocoder_checks_its_config():
    vocoder = gl.GriffinLimVocoder(CONFIG, num_iters=2)
    vocoder.check(SpectrogramConfig())
    with pytest.raises(ValueError, match="Griffin-Lim vocoder") as error:
        vocoder.check(SpectrogramConfig(n_mels=64))
    assert "n_mels" in str(error.value)
    with pytest.raises(ValueError, match="80 mel bins"):
        vocoder(np.zeros((1, 4, 64), np.float32))

"""w2v-BERT fbank front end vs transformers' SeamlessM4TFeatureExtractor, and TF vs numpy.

Tolerance vs HF: 1e-4 absolute on the normalised features (unit variance per bin). Measured:
<= 1e-6 on real speech, <= 1e-5 on white noise; HF stores its FFT in complex64, we keep float64.
"""

import numpy as np
import pytest

from spectron_jax.audio.fbank import W2vBertFbankConfig, kaldi_mel_filters
from spectron_jax.audio.io import load_audio

transformers = pytest.importorskip("transformers")

CONFIG = W2vBertFbankConfig()
HF_TOL = 1e-4
TF_TOL = 1e-4


def _hf_features(waveform):
    """HF's valid stacked frames for one utterance: input_features[:attention_mask.sum()]."""
    extractor = transformers.SeamlessM4TFeatureExtractor()
    out = extractor(waveform, sampling_rate=16_000, return_tensors="np")
    features, mask = out["input_features"][0], out["attention_mask"][0]
    valid = int(mask.sum())
    np.testing.assert_array_equal(mask[:valid], 1)  # valid frames come first
    return features[:valid]


def _synthetic(num_samples, seed=0):
    """A chirp over noise with a stretch of digital silence (exercises the mel floor)."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / 16_000
    wave = 0.3 * np.sin(2 * np.pi * (100 + 2000 * t) * t) + 0.01 * rng.normal(size=num_samples)
    wave[num_samples // 3 : num_samples // 3 + 1200] = 0.0
    return wave.astype(np.float32)


def test_protocol_fields():
    assert CONFIG.sample_rate == 16_000 and CONFIG.feature_dim == 160
    assert CONFIG.frames_per_second == 50.0


def test_filter_bank_equals_transformers():
    from transformers.audio_utils import mel_filter_bank

    expected = mel_filter_bank(
        num_frequency_bins=257,
        num_mel_filters=80,
        min_frequency=20,
        max_frequency=8000,
        sampling_rate=16_000,
        norm=None,
        mel_scale="kaldi",
        triangularize_in_mel_space=True,
    )
    np.testing.assert_allclose(kaldi_mel_filters(CONFIG), expected, atol=1e-12, rtol=0)


@pytest.mark.needs_shared_data
def test_matches_transformers_on_real_speech(shared_data):
    path = shared_data / "llama_questions" / "1.wav"
    waveform, _ = load_audio(path, CONFIG.sample_rate)
    ours = CONFIG.features_numpy(waveform)
    assert ours.shape == (CONFIG.num_frames(len(waveform)), 160)
    np.testing.assert_allclose(ours, _hf_features(waveform), atol=HF_TOL, rtol=0)


# 16_000 samples: 98 frames (even); 16_160: 99 frames (odd; HF masks its padded last frame).
@pytest.mark.parametrize("num_samples", [16_000, 16_160, 561])
def test_matches_transformers_on_synthetic_audio(num_samples):
    waveform = _synthetic(num_samples)
    ours = CONFIG.features_numpy(waveform)
    expected = _hf_features(waveform)
    assert ours.shape == expected.shape == (CONFIG.num_frames(num_samples), 160)
    np.testing.assert_allclose(ours, expected, atol=HF_TOL, rtol=0)


def test_tensorflow_matches_numpy_in_a_graph():
    import tensorflow as tf

    waveform = _synthetic(12_345, seed=3)
    graph_fn = tf.function(CONFIG.features_tf, input_signature=[tf.TensorSpec([None], tf.float32)])
    ours_tf = graph_fn(tf.constant(waveform)).numpy()
    ours_np = CONFIG.features_numpy(waveform)
    assert ours_tf.shape == ours_np.shape == (CONFIG.num_frames(12_345), 160)
    assert ours_tf.dtype == np.float32
    np.testing.assert_allclose(ours_tf, ours_np, atol=TF_TOL, rtol=0)


def test_too_short_or_wrong_rank_fails_clearly():
    import tensorflow as tf

    with pytest.raises(ValueError, match="too short.*560"):
        CONFIG.features_numpy(np.zeros(559, np.float32))
    with pytest.raises(ValueError, match="mono"):
        CONFIG.features_numpy(np.zeros((2, 16_000), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="too short"):
        CONFIG.features_tf(tf.zeros([300]))
    assert CONFIG.num_frames(559) == 0 and CONFIG.num_frames(560) == 1


def test_bad_config_fails():
    with pytest.raises(ValueError, match="frame_length"):
        W2vBertFbankConfig(frame_length=600)

"""Incremental vocoding: the stream against whole-utterance vocoding, for HiFi-GAN (equal to float
rounding once context and look-ahead cover its receptive field) and Griffin-Lim (another phase
solution of the same magnitudes: compared on the log-mel the audio measures)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from spectron_jax.audio import griffin_lim, hifigan, spectrogram
from spectron_jax.audio.streaming import StreamingVocoder

SMALL_HIFIGAN = hifigan.HifiGanConfig(
    model_in_dim=8,
    upsample_initial_channel=16,
    upsample_rates=(2, 4),
    upsample_kernel_sizes=(4, 8),
    resblock_kernel_sizes=(3, 5),
    resblock_dilation_sizes=((1, 3), (1, 2)),
)


def _stream(vocoder, frames, chunk, **kw) -> tuple[np.ndarray, list[int]]:
    """The concatenated stream and the size of each emitted piece."""
    streaming = StreamingVocoder(vocoder, kw.pop("hop"), **kw)
    pieces = [streaming.push(frames[i : i + chunk]) for i in range(0, len(frames), chunk)]
    pieces.append(streaming.finish())
    return np.concatenate(pieces), [len(p) for p in pieces]


def test_hifigan_stream_equals_whole_utterance_vocoding():
    params = hifigan.init_params(SMALL_HIFIGAN, jax.random.PRNGKey(0))
    spec = spectrogram.SpectrogramConfig(n_mels=8, hop_length=8, win_length=32, n_fft=32)
    vocoder = hifigan.HifiGanVocoder(SMALL_HIFIGAN, params, spec)
    frames = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    whole = np.asarray(vocoder(frames))
    # This generator's receptive field is 12-16 frames each side (12 leaves errors ~5e-4).
    streamed, sizes = _stream(
        lambda f: np.asarray(vocoder(f)), frames, 8, hop=8, left_context=16, lookahead=16
    )
    assert len(streamed) == len(whole) == 40 * 8
    assert sizes[0] == 0 and sum(s > 0 for s in sizes) >= 3  # It streams, in pieces.
    np.testing.assert_allclose(streamed, whole, atol=1e-5)
    # Without look-ahead the joins lack the frames after them: the stream is then not equal.
    short, _ = _stream(
        lambda f: np.asarray(vocoder(f)), frames, 8, hop=8, left_context=16, lookahead=0
    )
    assert np.abs(short - whole).max() > 1e-3


def test_griffin_lim_stream_measures_as_the_same_log_mel():
    config = spectrogram.SpectrogramConfig()
    rng = np.random.default_rng(1)
    t = np.arange(16000 * 2) / 16000
    tone = 0.3 * np.sin(2 * np.pi * (200 + 150 * t) * t) + 0.01 * rng.normal(size=t.shape)
    frames = np.asarray(spectrogram.log_mel_numpy(tone.astype(np.float32), config))
    vocoder = griffin_lim.GriffinLimVocoder(config)
    whole = np.asarray(vocoder(frames))
    streamed, _ = _stream(
        lambda f: np.asarray(vocoder(f)),
        frames,
        16,
        hop=config.hop_length,
        left_context=16,
        lookahead=4,
    )
    assert len(streamed) == len(whole)
    # A centred STFT of T * hop samples has T + 1 frames; the last one has no target.
    measure = lambda x: np.asarray(spectrogram.log_mel_numpy(x, config))[: len(frames)]  # noqa: E731
    target_error = np.abs(measure(whole) - frames).mean()
    stream_error = np.abs(measure(streamed) - frames).mean()
    # The stated tolerance: the stream's log-mel is within 25% (relative) of whole-utterance
    # Griffin-Lim's distance to the target (measured: 0.067 vs 0.059), and no frame near a join
    # is off by more than twice whole-utterance Griffin-Lim's worst frame.
    assert stream_error <= 1.25 * target_error, (stream_error, target_error)
    per_frame = np.abs(measure(streamed) - frames).mean(axis=-1)
    assert per_frame.max() <= 2.0 * np.abs(measure(whole) - frames).mean(axis=-1).max()


def test_bad_streaming_settings_are_named():
    with pytest.raises(ValueError, match="crossfade=1000 samples must be in"):
        StreamingVocoder(lambda f: f, 160, lookahead=2, crossfade=1000)
    with pytest.raises(ValueError, match="frames must be"):
        StreamingVocoder(lambda f: f, 160).push(np.zeros(3))

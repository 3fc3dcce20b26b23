"""Streaming speech out: `decoding.stream` against `generate`, `inference.stream_speech`, and
`spectron continue --stream` (to a file and as PCM on stdout)."""

from __future__ import annotations

import io
import sys

import jax
import numpy as np
import pytest
import soundfile as sf
import spectron_testing as st
from inference_testing import make_tiny_checkpoint

from spectron_jax import cli, decoding, inference
from spectron_jax.audio.io import load_audio
from spectron_jax.decoding import DecodeConfig


@pytest.fixture(scope="module")
def stop_model():
    """A stop-head model whose three rows stop at different groups (threshold chosen below)."""
    config = st.tiny_config(stop_head=True, prenet_dropout_at_inference=False)
    batch = st.random_batch(config, batch_size=3)
    return st.tiny_model(config), st.init_params(config, batch), batch


def _joined(parts):
    text, chunks = parts[0], parts[1:]
    frames = np.concatenate([c["frames"] for c in chunks], axis=1)
    return text, frames, chunks


@pytest.mark.parametrize("chunk_groups", [1, 3])
def test_the_stream_put_together_is_generates_output(stop_model, chunk_groups):
    model, params, batch = stop_model
    options = DecodeConfig(max_text_tokens=6, max_frames=21, use_stop_logit=True)
    probs = jax.device_get(decoding.generate(model, params, batch, options)["stop_probs"])

    def first_over(t):  # The group each row would stop after at threshold t.
        return tuple(int(np.argmax(row > t)) if (row > t).any() else 99 for row in probs)

    # The threshold at which the rows stop at the most different groups (traced: no compile).
    threshold = max(np.unique(probs), key=lambda t: len(set(first_over(t))))
    options = DecodeConfig(
        max_text_tokens=6, max_frames=21, use_stop_logit=True, stop_threshold=float(threshold)
    )
    whole = jax.device_get(decoding.generate(model, params, batch, options))
    text, frames, chunks = _joined(
        list(decoding.stream(model, params, batch, options, chunk_groups=chunk_groups))
    )
    np.testing.assert_array_equal(text["text_tokens"], whole["text_tokens"])
    np.testing.assert_array_equal(chunks[-1]["frame_lengths"], whole["frame_lengths"])
    np.testing.assert_array_equal(chunks[-1]["stopped"], whole["stopped"])
    n = frames.shape[1]
    assert n == max(whole["frame_lengths"])  # The stream ends once every row has stopped.
    np.testing.assert_allclose(frames, whole["frames"][:, :n], atol=1e-5, rtol=0)
    assert [c["start"] for c in chunks] == list(range(0, n, 2 * chunk_groups))
    assert len(set(whole["frame_lengths"].tolist())) > 1, whole["frame_lengths"]


def test_a_chunk_larger_than_the_speech_and_text_only(stop_model):
    model, params, batch = stop_model
    options = DecodeConfig(max_text_tokens=6, max_frames=21)  # The shapes compiled above.
    whole = jax.device_get(decoding.generate(model, params, batch, options))
    _, frames, chunks = _joined(
        list(decoding.stream(model, params, batch, options, chunk_groups=20))
    )
    assert len(chunks) == 1 and frames.shape[1] == 21
    np.testing.assert_allclose(frames, whole["frames"], atol=1e-5, rtol=0)
    text_only = list(decoding.stream(model, params, batch, DecodeConfig(text_mode="text_only")))
    assert len(text_only) == 1
    with pytest.raises(ValueError, match="chunk_groups=0 must be >= 1"):
        next(decoding.stream(model, params, batch, options, chunk_groups=0))


@pytest.fixture()
def fsdd_files(shared_data):
    return [shared_data / "fsdd" / "recordings" / "3_george_0.wav"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny_model")
    make_tiny_checkpoint(model_dir)
    return model_dir


def test_stream_speech_gives_generates_frames_and_audio(checkpoint, fsdd_files):
    loaded = inference.load_model_for_inference(checkpoint)
    waveform, _ = load_audio(fsdd_files[0], loaded.config.spectrogram.sample_rate)
    features = inference.prompt_features(loaded.config, waveform, str(fsdd_files[0]))
    options = inference.decode_config(loaded, 1.0, fixed_duration=True, max_text_tokens=8)
    vocoder = inference.make_vocoder("griffin_lim", loaded.config.spectrogram)
    parts = list(inference.stream_speech(loaded, features, options, vocoder, chunk_groups=4))
    whole = inference.generate(loaded, [features], options)[0]
    assert parts[0] == whole.text
    chunks = parts[1:]
    frames = np.concatenate([c.frames for c in chunks])
    np.testing.assert_allclose(frames, whole.frames, atol=1e-5, rtol=0)
    audio = np.concatenate([c.audio for c in chunks])
    assert audio.size == len(whole.frames) * loaded.config.spectrogram.hop_length
    assert sum(c.audio.size > 0 for c in chunks) >= 3  # Audio leaves in several pieces,
    ready = [c.ready_seconds for c in chunks]
    assert ready == sorted(ready)  # each one as it was made.


def test_continue_stream_to_a_file_and_to_stdout(
    checkpoint, fsdd_files, tmp_path, capsys, monkeypatch
):
    common = ["continue", "--checkpoint", checkpoint, "--audio", fsdd_files[0]]
    common += ["--seconds", "1", "--max-text-tokens", "8", "--fixed-duration", "--stream"]
    wav = tmp_path / "out.wav"
    assert cli.main([str(a) for a in [*common, "--out", wav]]) == 0
    out, err = capsys.readouterr()
    assert "first audio after" in err and "transcript:" in out
    streamed, rate = sf.read(wav, dtype="float32")
    stdout = io.TextIOWrapper(io.BytesIO())  # `.buffer` takes the PCM bytes.
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli.main([str(a) for a in [*common, "--out", "-"]]) == 0
    monkeypatch.undo()
    _, err = capsys.readouterr()
    assert "transcript:" in err  # stdout carries only the audio.
    pcm = np.frombuffer(stdout.buffer.getvalue(), "<i2")
    assert rate == 16000 and pcm.size == streamed.size > 0
    np.testing.assert_allclose(pcm / 32767.0, streamed, atol=2 / 32767)
    with pytest.raises(SystemExit, match="needs --stream"):
        cli.main([str(a) for a in [*common[:-1], "--out", "-"]])

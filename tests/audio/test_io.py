"""load_audio / write_wav: real files, every kind of bad input, format and rate conversions."""

import os

import numpy as np
import pytest
import soundfile as sf

from spectron_jax.audio import io
from spectron_jax.audio.io import AudioError

RATE = 16000


def _tone(seconds=0.5, rate=RATE, freq=440.0, amp=0.3):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(waveform, rate):
    spectrum = np.abs(np.fft.rfft(waveform))
    return np.argmax(spectrum) * rate / len(waveform)


@pytest.mark.needs_shared_data
def test_loads_real_recordings(shared_data):
    wave, info = io.load_audio(shared_data / "ljspeech_subset/wavs/LJ001-0001.wav", RATE)
    assert info.source_rate == 22050 and info.changes == ("resampled 22050 Hz -> 16000 Hz",)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == pytest.approx(info.source_seconds * RATE, abs=2)
    wave, info = io.load_audio(shared_data / "llama_questions/1.wav", RATE)
    assert info.source_rate == RATE and info.changes == () and info.warnings == ()
    wave, info = io.load_audio(shared_data / "fsdd/recordings/0_jackson_0.wav", RATE)
    assert info.source_rate == 8000 and "resampled 8000 Hz -> 16000 Hz" in info.changes


# ------------------------------------------------------------------------------------------------
# Bad input: an AudioError naming the file and the problem.
# ------------------------------------------------------------------------------------------------


def _expect_error(path, problem, **kwargs):
    with pytest.raises(AudioError) as error:
        io.load_audio(path, RATE, **kwargs)
    message = str(error.value)
    assert str(path) in message, message
    assert problem in message, message
    return message


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.wav", "no such file")


def test_directory(tmp_path):
    _expect_error(tmp_path, "is a directory")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    _expect_error(path, "0 bytes")


def test_zero_sample_wav(tmp_path):
    path = tmp_path / "no_samples.wav"
    sf.write(path, np.zeros(0, np.float32), RATE)
    assert os.path.getsize(path) > 0  # A valid header with no frames.
    _expect_error(path, "zero samples")


def test_text_file_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 20)
    _expect_error(path, "not an audio file, or not in a format this reader knows")


def test_nan_samples(tmp_path):
    path = tmp_path / "nan.wav"
    wave = _tone()
    wave[100:103] = np.nan
    wave[200] = np.inf
    sf.write(path, wave, RATE, subtype="FLOAT")
    _expect_error(path, "4 NaN/inf samples")


def test_too_long(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, _tone(seconds=2.0), RATE)
    _expect_error(path, "over the limit of 1.5 s", max_seconds=1.5)
    assert len(io.load_audio(path, RATE, max_seconds=2.5)[0]) == 2 * RATE


# ------------------------------------------------------------------------------------------------
# Usable but unusual input: warnings and reported changes.
# ------------------------------------------------------------------------------------------------


def test_silent_file_warns(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(RATE, np.float32), RATE)
    wave, info = io.load_audio(path, RATE)
    assert len(wave) == RATE
    assert len(info.warnings) == 1 and "silent" in info.warnings[0]
    assert str(path) in info.warnings[0]


def test_clipped_file_warns(tmp_path):
    path = tmp_path / "clipped.wav"
    sf.write(path, np.clip(4 * _tone(), -1, 1), RATE, subtype="FLOAT")
    _, info = io.load_audio(path, RATE)
    assert any("clipped" in w for w in info.warnings), info.warnings


def test_stereo_is_downmixed(tmp_path):
    path = tmp_path / "stereo.wav"
    left, right = _tone(freq=440.0), _tone(freq=660.0, amp=0.1)
    sf.write(path, np.stack([left, right], axis=1), RATE, subtype="FLOAT")
    wave, info = io.load_audio(path, RATE)
    assert info.source_channels == 2
    assert info.changes == ("downmixed 2 channels to mono",)
    np.testing.assert_allclose(wave, (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("source_rate", [8000, 44100])
def test_other_rates_are_resampled(tmp_path, source_rate):
    path = tmp_path / f"tone_{source_rate}.wav"
    sf.write(path, _tone(seconds=1.0, rate=source_rate, freq=440.0), source_rate)
    wave, info = io.load_audio(path, RATE)
    assert info.source_rate == source_rate
    assert info.changes == (f"resampled {source_rate} Hz -> {RATE} Hz",)
    assert len(wave) == RATE  # One second at the model rate.
    assert _peak_hz(wave, RATE) == pytest.approx(440.0, abs=2.0)  # Pitch kept.
    assert np.abs(wave).max() == pytest.approx(0.3, abs=0.02)  # Level kept.


@pytest.mark.parametrize("fmt, subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_flac_and_ogg_load(tmp_path, fmt, subtype):
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, _tone(), RATE, format=fmt, subtype=subtype)
    wave, info = io.load_audio(path, RATE)
    assert info.changes == ()
    assert abs(len(wave) - len(_tone())) <= 0  # Both containers keep the exact length.
    assert _peak_hz(wave, RATE) == pytest.approx(440.0, abs=2.0)
    # FLAC is lossless up to 16-bit rounding; Vorbis is lossy but close at this level.
    tolerance = 1e-4 if fmt == "FLAC" else 0.05
    np.testing.assert_allclose(wave, _tone(), atol=tolerance)


# ------------------------------------------------------------------------------------------------
# write_wav.
# ------------------------------------------------------------------------------------------------


def test_write_wav_round_trip(tmp_path):
    path = tmp_path / "sub" / "out.wav"
    wave = _tone()
    io.write_wav(path, wave, RATE)
    back, info = io.load_audio(path, RATE)
    assert info.source_rate == RATE and info.changes == ()
    assert sf.info(path).subtype == "PCM_16"
    np.testing.assert_allclose(back, wave, atol=1.0 / 32768)  # 16-bit quantisation.
    assert os.listdir(path.parent) == ["out.wav"]  # No temporary left behind.


def test_write_wav_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "out.wav"
    io.write_wav(path, _tone(), RATE)
    before = path.read_bytes()
    real_write = sf.write

    def crash_midway(file, data, *args, **kwargs):
        real_write(file, data[: len(data) // 4], *args, **kwargs)  # Some bytes hit the disk...
        raise OSError("disk full")  # ...then the write fails.

    monkeypatch.setattr(sf, "write", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        io.write_wav(path, 0.5 * _tone(seconds=2.0), RATE)
    assert path.read_bytes() == before  # The old file is intact, not half-overwritten.
    assert os.listdir(tmp_path) == ["out.wav"]  # And the partial temporary is gone.
    with pytest.raises(OSError):
        io.write_wav(tmp_path / "new.wav", _tone(), RATE)
    assert not (tmp_path / "new.wav").exists()


def test_write_wav_rejects_multichannel(tmp_path):
    with pytest.raises(ValueError, match="mono"):
        io.write_wav(tmp_path / "x.wav", np.zeros((2, 100), np.float32), RATE)


# ------------------------------------------------------------------------------------------------
# Formats, headers that promise more than the file holds, libsndfile's errors in plain words.
# ------------------------------------------------------------------------------------------------


def test_every_readable_format_has_its_suffix():
    suffixes = io.readable_suffixes()
    assert {".wav", ".flac", ".ogg"} <= set(suffixes)
    if "MP3" in sf.available_formats():
        assert ".mp3" in suffixes


@pytest.mark.skipif("MP3" not in sf.available_formats(), reason="libsndfile without MP3")
def test_mp3_loads(tmp_path):
    path = tmp_path / "tone.mp3"
    sf.write(path, _tone(1.0), RATE)
    wave, info = io.load_audio(path, RATE)
    assert info.source_rate == RATE and abs(len(wave) - RATE) < 0.05 * RATE
    assert _peak_hz(wave, RATE) == pytest.approx(440.0, abs=5)


def test_wav_shorter_than_its_header_warns_with_both_lengths(tmp_path):
    full = tmp_path / "full.wav"
    sf.write(full, _tone(3.0), RATE, subtype="PCM_16")
    assert io.wav_header_frames(full) == 3 * RATE
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[: 44 + RATE * 2])  # 1 s of the 3 the header promises
    wave, info = io.load_audio(cut, RATE)
    assert len(wave) == RATE
    (warning,) = info.warnings
    assert warning == (
        f"{cut}: the header says 3.00 s (48000 frames) but the file holds 1.00 s (16000 "
        "frames): cut short?"
    )
    assert io.load_audio(full, RATE)[1].warnings == ()
    assert io.wav_header_frames(tmp_path / "full.wav") == 48000
    flac = tmp_path / "tone.flac"
    sf.write(flac, _tone(), RATE)
    assert io.wav_header_frames(flac) is None


def test_a_cut_flac_is_damaged_in_plain_words(tmp_path):
    flac = tmp_path / "tone.flac"
    sf.write(flac, _tone(3.0), RATE)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(flac.read_bytes()[:2000])
    message = _expect_error(cut, "damaged or cut short")
    assert "(" in message  # libsndfile's own words kept in parentheses

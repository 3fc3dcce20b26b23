"""Loading, validating and writing speech files.

`load_audio` reads every format libsndfile (via soundfile) reads here (`readable_suffixes`:
WAV, FLAC, OGG/Opus, MP3, AIFF, ...), downmixes, resamples to the model rate with soxr, and
reports every change it made in `AudioInfo.changes` and every oddity in `AudioInfo.warnings` (a
WAV holding less audio than its header says, silence, clipping). Bad input raises `AudioError`
naming the file and the problem in plain words (libsndfile's own message in parentheses); an
all-silent file only warns, since silence is valid audio (the CLI refuses it unless asked).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

DEFAULT_MAX_SECONDS = 600.0
# Peak below which a file is called silent (-80 dBFS).
SILENCE_PEAK = 1e-4
# Fraction of samples at full scale above which a file is reported as clipped.
CLIPPED_FRACTION = 0.01


# File suffixes of the formats libsndfile can read, by its format name (headerless RAW and the
# exotic ones left out); `readable_suffixes` keeps those this libsndfile build has.
_SUFFIXES = {
    "WAV": (".wav",),
    "FLAC": (".flac",),
    "OGG": (".ogg", ".oga", ".opus"),
    "MP3": (".mp3",),
    "AIFF": (".aiff", ".aif"),
    "AU": (".au", ".snd"),
    "CAF": (".caf",),
    "W64": (".w64",),
    "RF64": (".rf64",),
}
# libsndfile's messages in plain words.
_PLAIN_WORDS = (
    ("Format not recognised", "not an audio file, or not in a format this reader knows"),
    ("lost sync", "damaged or cut short (the decoder lost its place in the data)"),
    ("Unspecified internal error", "damaged or cut short"),
    ("psf_fseek", "damaged or cut short (the data ends before the file says it does)"),
    ("unknown format", "not an audio file, or not in a format this reader knows"),
)


class AudioError(ValueError):
    """A speech file that cannot be used; the message names the file and the problem."""


def readable_suffixes() -> tuple[str, ...]:
    """The file suffixes (".wav", ".mp3", ...) of the formats this libsndfile reads."""
    import soundfile as sf

    formats = sf.available_formats()
    return tuple(sorted({x for name, xs in _SUFFIXES.items() if name in formats for x in xs}))


def _plain(err: BaseException) -> str:
    """libsndfile's error in plain words, its own message kept in parentheses."""
    own = str(err).replace("\n", " ").strip()
    for needle, words in _PLAIN_WORDS:
        if needle in own:
            return f"{words} ({own})"
    return own or type(err).__name__


def wav_header_frames(path: str | os.PathLike) -> int | None:
    """The frames a RIFF/WAVE header promises (data chunk size / block align); None for other
    files, and for streaming headers that leave the size open."""
    import struct

    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        block_align = 0
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if chunk_id == b"data":
                if not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size // block_align
            body = f.read(size + (size & 1))
            if chunk_id == b"fmt " and len(body) >= 14:
                block_align = struct.unpack("<H", body[12:14])[0]


@dataclasses.dataclass(frozen=True)
class AudioInfo:
    """What was read and what was changed to make it model input."""

    path: str
    source_rate: int
    source_channels: int
    source_seconds: float
    changes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def validate_waveform(
    waveform: np.ndarray, rate: int, name: str, max_seconds: float = DEFAULT_MAX_SECONDS
) -> list[str]:
    """Checks a mono float waveform float32[T]; raises AudioError, returns warnings."""
    if waveform.ndim != 1:
        raise AudioError(f"{name}: expected mono float32[T], got shape {waveform.shape}")
    if waveform.size == 0:
        raise AudioError(f"{name}: audio is empty (zero samples)")
    if not np.all(np.isfinite(waveform)):
        bad = int(np.size(waveform) - np.count_nonzero(np.isfinite(waveform)))
        raise AudioError(f"{name}: audio has {bad} NaN/inf samples")
    seconds = waveform.size / rate
    if seconds > max_seconds:
        raise AudioError(
            f"{name}: audio is {seconds:.1f} s long, over the limit of {max_seconds:.1f} s "
            "(raise max_seconds to accept it)"
        )
    warnings = []
    peak = float(np.max(np.abs(waveform)))
    if peak < SILENCE_PEAK:
        warnings.append(f"{name}: audio is silent (peak {peak:.2e})")
    clipped = float(np.mean(np.abs(waveform) >= 0.999))
    if clipped > CLIPPED_FRACTION:
        warnings.append(f"{name}: {100 * clipped:.1f}% of samples are clipped at full scale")
    return warnings


def resample(waveform: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """float32[T] at source_rate -> float32[T * target / source] (soxr, high quality)."""
    if source_rate == target_rate:
        return waveform
    import soxr

    return soxr.resample(waveform, source_rate, target_rate, quality="HQ").astype(np.float32)


def load_audio(
    path: str | os.PathLike,
    sample_rate: int,
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> tuple[np.ndarray, AudioInfo]:
    """Reads a speech file as float32[T] mono at `sample_rate`.

    Raises AudioError for a missing, empty, unreadable (not audio), non-finite or too-long file.
    Multi-channel audio is averaged to mono and other rates are resampled; both are reported in
    `info.changes` and logged.
    """
    import soundfile as sf

    name = os.fspath(path)
    if not os.path.exists(name):
        raise AudioError(f"{name}: no such file")
    if os.path.isdir(name):
        raise AudioError(f"{name}: is a directory, not an audio file")
    if os.path.getsize(name) == 0:
        raise AudioError(f"{name}: file is empty (0 bytes)")
    try:
        meta = sf.info(name)
    except Exception as e:  # libsndfile's own errors are RuntimeError/LibsndfileError.
        raise AudioError(f"{name}: {_plain(e)}") from e
    if meta.frames == 0:
        raise AudioError(f"{name}: audio is empty (zero samples)")
    if meta.frames / meta.samplerate > max_seconds:
        # Checked before decoding so that a huge file is never read into memory.
        raise AudioError(
            f"{name}: audio is {meta.frames / meta.samplerate:.1f} s long, over the limit of "
            f"{max_seconds:.1f} s (raise max_seconds to accept it)"
        )
    try:
        data, rate = sf.read(name, dtype="float32", always_2d=True)  # [T, C]
    except Exception as e:
        raise AudioError(f"{name}: could not decode the audio: {_plain(e)}") from e

    changes, warnings = [], []
    promised = wav_header_frames(name) if name.lower().endswith(".wav") else None
    if promised is not None and promised > data.shape[0]:
        warnings.append(
            f"{name}: the header says {promised / rate:.2f} s ({promised} frames) but the file "
            f"holds {data.shape[0] / rate:.2f} s ({data.shape[0]} frames): cut short?"
        )
    if data.shape[1] > 1:
        changes.append(f"downmixed {data.shape[1]} channels to mono")
    waveform = data.mean(axis=1)
    if not np.all(np.isfinite(waveform)):
        validate_waveform(waveform, rate, name, max_seconds)  # Raises with the count.
    if rate != sample_rate:
        changes.append(f"resampled {rate} Hz -> {sample_rate} Hz")
        waveform = resample(waveform, rate, sample_rate)
    warnings += validate_waveform(waveform, sample_rate, name, max_seconds)
    for message in changes:
        logging.info("%s: %s", name, message)
    for message in warnings:
        logging.warning(message)
    info = AudioInfo(
        path=name,
        source_rate=int(rate),
        source_channels=int(data.shape[1]),
        source_seconds=data.shape[0] / rate,
        changes=tuple(changes),
        warnings=tuple(warnings),
    )
    return waveform.astype(np.float32), info


def wav_bytes(waveform: np.ndarray, sample_rate: int) -> bytes:
    """float32[T] as the bytes of a 16-bit PCM WAV file (what `write_wav` writes)."""
    import io

    import soundfile as sf

    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"wav_bytes expects mono float32[T], got shape {waveform.shape}")
    buffer = io.BytesIO()
    clipped = np.clip(np.nan_to_num(waveform), -1.0, 1.0)
    sf.write(buffer, clipped, sample_rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def write_wav(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int) -> None:
    """Writes float32[T] as 16-bit PCM, via a temporary file so a crash never leaves half a file."""
    import soundfile as sf

    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim != 1:
        raise ValueError(f"write_wav expects mono float32[T], got shape {waveform.shape}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # A unique temporary beside the target (same file system, so os.replace is atomic); removed
    # if writing fails, so neither a half-written target nor a stray temporary is ever left.
    # (The pid keeps two processes writing the same path apart; mkstemp would make it 0600.)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        sf.write(
            tmp,
            np.clip(np.nan_to_num(waveform), -1.0, 1.0),
            sample_rate,
            subtype="PCM_16",
            format="WAV",
        )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

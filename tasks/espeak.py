"""Offline speech synthesis with eSpeak NG, through the library bundled by `espeakng-loader`.

eSpeak NG keeps one global synthesiser per process, so `EspeakSynthesizer` is a process-wide
singleton guarded by a lock. Output: int16 at the library's own rate (22,050 Hz), mono.

Determinism: eSpeak NG's output for a text depends on how many utterances the process has
synthesised before (static state that neither `espeak_Initialize` nor `espeak_ng_SetRandSeed`
resets; we measured it). `synthesize_batch` therefore runs a list of requests in a fresh
interpreter that executes this file as a script, so the same request list always gives the same
waveforms, whatever the calling process did before. The script imports only numpy and ctypes (not
the `spectron_tasks` package, whose TensorFlow import would cost seconds per call).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np

# espeak_AUDIO_OUTPUT / espeak_PARAMETER / espeak_POSITION_TYPE values from speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_PARAM_RATE = 1
_PARAM_VOLUME = 2
_PARAM_PITCH = 3
_PARAM_RANGE = 4
_POS_CHARACTER = 1
_CHARS_UTF8 = 1

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


@dataclasses.dataclass(frozen=True)
class VoiceSettings:
    """How one synthetic speaker sounds.

    Attributes:
      voice: eSpeak voice name, e.g. "en-us", "en+f2", "en-us+m3", "en-gb-scotland" (use "en",
        not "en-gb").
      rate: words per minute (eSpeak's range is 80-450).
      pitch: base pitch, 0-100.
      pitch_range: pitch variation, 0-100 (0 = monotone).
    """

    voice: str
    rate: int = 175
    pitch: int = 50
    pitch_range: int = 50


class EspeakError(RuntimeError):
    """eSpeak NG could not be loaded or refused a request."""


class EspeakSynthesizer:
    """Text -> int16[T] waveform at `sample_rate` (22,050 Hz). Use `EspeakSynthesizer.get()`."""

    _instance: EspeakSynthesizer | None = None
    _instance_lock = threading.Lock()

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as e:
            raise EspeakError(
                "Synthetic speech needs the PyPI package `espeakng-loader` (it bundles eSpeak NG): "
                "pip install espeakng-loader"
            ) from e
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data_path = espeakng_loader.get_data_path().encode()
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed (returned {rate}); data at {data_path!r}")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        # Kept as an attribute: ctypes would otherwise free the callback while C still holds it.
        self._callback = _SYNTH_CALLBACK(self._collect)
        self._lib.espeak_SetSynthCallback(self._callback)
        self._lock = threading.Lock()

    @classmethod
    def get(cls) -> EspeakSynthesizer:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _collect(self, wav, num_samples, events) -> int:
        del events
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis.

    def synthesize(self, text: str, settings: VoiceSettings) -> np.ndarray:
        """Returns int16[T] at `self.sample_rate`. Raises EspeakError on an unknown voice."""
        with self._lock:
            if self._lib.espeak_SetVoiceByName(settings.voice.encode()) != 0:
                raise EspeakError(f"eSpeak NG has no voice named {settings.voice!r}")
            for param, value in (
                (_PARAM_RATE, settings.rate),
                (_PARAM_PITCH, settings.pitch),
                (_PARAM_RANGE, settings.pitch_range),
                (_PARAM_VOLUME, 100),
            ):
                self._lib.espeak_SetParameter(param, int(value), 0)
            self._chunks = []
            encoded = text.encode("utf-8")
            status = self._lib.espeak_Synth(
                encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
            if status != 0:
                raise EspeakError(f"espeak_Synth failed with status {status} for {text!r}")
            self._lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(chunks)


def _synthesize_requests(requests: list[dict]) -> tuple[np.ndarray, np.ndarray, int]:
    synth = EspeakSynthesizer.get()
    waves = [synth.synthesize(r["text"], VoiceSettings(**r["settings"])) for r in requests]
    lengths = np.array([len(w) for w in waves], dtype=np.int64)
    flat = np.concatenate(waves) if waves else np.zeros(0, np.int16)
    return flat.astype(np.int16), lengths, synth.sample_rate


def synthesize_batch(
    texts: list[str], settings: list[VoiceSettings]
) -> tuple[list[np.ndarray], int]:
    """Synthesises `texts[i]` with `settings[i]` in a fresh process (see module docstring).

    Returns:
      (waveforms, sample_rate): a list of int16[T_i] at `sample_rate` (22,050 Hz).
    """
    if len(texts) != len(settings):
        raise ValueError(f"{len(texts)} texts but {len(settings)} voice settings")
    requests = [
        {"text": t, "settings": dataclasses.asdict(s)} for t, s in zip(texts, settings, strict=True)
    ]
    with tempfile.TemporaryDirectory(prefix="spectron_espeak_") as tmp:
        request_path = os.path.join(tmp, "requests.json")
        output_path = os.path.join(tmp, "waves.npz")
        with open(request_path, "w", encoding="utf-8") as f:
            json.dump(requests, f)
        result = subprocess.run(
            # -P: the script's folder (tasks/) must not shadow installed modules.
            [sys.executable, "-P", os.path.abspath(__file__), request_path, output_path],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise EspeakError(
                f"eSpeak NG worker failed (exit {result.returncode}):\n{result.stderr[-2000:]}"
            )
        with np.load(output_path, allow_pickle=False) as data:
            flat, lengths, rate = data["waves"], data["lengths"], int(data["sample_rate"])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(texts))], rate


def _main(argv: list[str]) -> None:
    request_path, output_path = argv
    with open(request_path, encoding="utf-8") as f:
        requests = json.load(f)
    flat, lengths, rate = _synthesize_requests(requests)
    np.savez(output_path, waves=flat, lengths=lengths, sample_rate=np.int64(rate))


if __name__ == "__main__":
    _main(sys.argv[1:])

"""`spectron demo --checkpoint DIR`: a local web page to try a checkpoint (standard library server).

    browser --POST /api/continue (the audio file's bytes)--> server
    server --NDJSON lines, each sent as soon as it exists--> browser:
        {"event": "prompt", "spectrogram": PNG data URL, "seconds": ...}
        {"event": "text", "transcript": ..., "continuation": ...}
        {"event": "audio", "pcm": base64 16-bit PCM, "rate": ..., ...}   one per streamed chunk
        {"event": "done", "wav": "/audio/<n>.wav", "spectrogram": PNG data URL, ...}
      or {"event": "error", "message": ...} (a bad upload: nothing else is sent)

The page (assets/demo.html) uploads a file or records one (the browser's own format, decoded in
the page and sent as WAV), shows the transcript and continuation once the text is decoded, plays
the audio chunk by chunk while frames are still being generated (`inference.stream_speech`), and
then the prompt and continuation spectrograms and the whole WAV. A bad upload (not audio, empty,
too long or too big) is a message on the page; the server goes on serving. One generation runs at
a time (a lock): the page and finished audio are served meanwhile.
"""

from __future__ import annotations

import base64
import html
import http.server
import json
import logging
import os
import pathlib
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)
PAGE = pathlib.Path(__file__).parent / "assets" / "demo.html"
MAX_UPLOAD_BYTES = 50 * 2**20
MAX_PROMPT_SECONDS = 30.0
KEEP_WAVS = 32  # Finished continuations kept for the page's <audio> element.


class UploadError(ValueError):
    """An upload the demo cannot use; the message is shown on the page as it is."""


class Demo:
    """The loaded checkpoint, its vocoder and options, and the finished WAVs.

    Args:
      loaded: `inference.LoadedModel`.
      vocoder: from `inference.make_vocoder`.
      decode_config: the `decoding.DecodeConfig` every prompt is continued with.
      chunk_groups: frame groups per streamed chunk.
    """

    def __init__(self, loaded: Any, vocoder: Any, decode_config: Any, chunk_groups: int = 4):
        self.loaded, self.vocoder, self.decode_config = loaded, vocoder, decode_config
        self.chunk_groups = chunk_groups
        self.wavs: dict[str, bytes] = {}
        self._lock = threading.Lock()  # One generation at a time.
        self._wavs_lock = threading.Lock()  # `wavs` and its counter (served meanwhile).
        self._count = 0

    def prompt(self, data: bytes, filename: str) -> np.ndarray:
        """The upload as float32[S] at the model's rate; UploadError in plain words."""
        from spectron_jax.audio.io import AudioError, load_audio

        name = os.path.basename(filename) or "upload"
        if not data:
            raise UploadError(f"{name} is empty: choose or record an audio file")
        suffix = pathlib.Path(name).suffix or ".wav"
        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / f"upload{suffix}"
            path.write_bytes(data)
            try:
                waveform, info = load_audio(path, self.loaded.config.spectrogram.sample_rate)
            except AudioError as err:
                raise UploadError(str(err).replace(str(path), name)) from None
        seconds = waveform.size / self.loaded.config.spectrogram.sample_rate
        if seconds > MAX_PROMPT_SECONDS:
            raise UploadError(
                f"{name} is {seconds:.1f} s long; the demo takes prompts up to "
                f"{MAX_PROMPT_SECONDS:g} s"
            )
        if any("audio is silent" in w for w in info.warnings):
            raise UploadError(f"{name} is silent: there is nothing to transcribe or continue")
        return waveform

    def events(self, data: bytes, filename: str) -> Iterator[dict[str, Any]]:
        """The NDJSON events of one upload (see the module docstring)."""
        from spectron_jax import inference
        from spectron_jax.audio.io import wav_bytes
        from spectron_jax.evaluation.text import split_text

        try:
            waveform = self.prompt(data, filename)
        except UploadError as err:
            yield {"event": "error", "message": str(err)}
            return
        config = self.loaded.config
        rate = config.spectrogram.sample_rate
        prompt_mel = config.spectrogram.features_numpy(waveform)
        features = inference.prompt_features(config, waveform, filename)
        empty = np.zeros((0, config.n_mels), np.float32)
        yield {
            "event": "prompt",
            "seconds": waveform.size / rate,
            "spectrogram": _png_url(prompt_mel, empty),
        }
        with self._lock:
            parts = inference.stream_speech(
                self.loaded,
                features,
                self.decode_config,
                self.vocoder,
                chunk_groups=self.chunk_groups,
            )
            transcript, continuation = split_text(next(parts), prompt_seconds=waveform.size / rate)
            yield {"event": "text", "transcript": transcript, "continuation": continuation}
            audio, frames, first, stopped = [], [], None, False
            for chunk in parts:
                frames.append(chunk.frames)
                stopped = chunk.stopped
                if chunk.audio.size:
                    first = chunk.ready_seconds if first is None else first
                    audio.append(chunk.audio)
                    yield {
                        "event": "audio",
                        "pcm": base64.b64encode(_pcm16(chunk.audio)).decode("ascii"),
                        "rate": rate,
                        "first_audio_seconds": first,
                    }
        waveform_out = np.concatenate(audio) if audio else np.zeros(0, np.float32)
        with self._wavs_lock:
            self._count += 1
            key = f"{self._count}.wav"
            self.wavs[key] = wav_bytes(waveform_out, rate)
            for old in list(self.wavs)[:-KEEP_WAVS]:
                del self.wavs[old]
        yield {
            "event": "done",
            "wav": f"/audio/{key}",
            "seconds": waveform_out.size / rate,
            "stopped": stopped,
            "spectrogram": _png_url(prompt_mel, np.concatenate(frames)),
        }


def _pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(np.nan_to_num(audio), -1.0, 1.0) * 32767).astype("<i2").tobytes()


def _png_url(prompt: np.ndarray, continuation: np.ndarray) -> str:
    """A data URL of `evaluation.plots.save_spectrogram_png`'s figure."""
    from spectron_jax.evaluation.plots import save_spectrogram_png

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "spectrogram.png"
        save_spectrogram_png(path, prompt, continuation)
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


class Handler(http.server.BaseHTTPRequestHandler):
    """GET / (the page), GET /audio/<n>.wav, POST /api/continue. `server.demo` is the `Demo`."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name.
        demo: Demo = self.server.demo  # type: ignore[attr-defined]
        if self.path in ("/", "/index.html"):
            checkpoint = html.escape(str(getattr(self.server, "checkpoint", "")))
            page = PAGE.read_text().replace("__CHECKPOINT__", checkpoint)
            return self._send(200, "text/html; charset=utf-8", page.encode())
        key = self.path.removeprefix("/audio/")
        if self.path.startswith("/audio/") and key in demo.wavs:
            return self._send(200, "audio/wav", demo.wavs[key])
        return self._error(404, f"nothing at {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        demo: Demo = self.server.demo  # type: ignore[attr-defined]
        if self.path != "/api/continue":
            return self._error(404, f"nothing at {self.path}")
        size = int(self.headers.get("Content-Length") or 0)
        name = urllib.parse.unquote(self.headers.get("X-Filename", "upload"))
        if size > MAX_UPLOAD_BYTES:
            return self._error(
                413,
                f"{name} is {size / 2**20:.0f} MiB; the demo takes up to "
                f"{MAX_UPLOAD_BYTES // 2**20} MiB",
            )
        data = self.rfile.read(size) if size else b""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            for event in demo.events(data, name):
                self.wfile.write((json.dumps(event) + "\n").encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            logger.info("demo: the page went away during %s", name)
        except Exception as err:  # noqa: BLE001 - the page shows it; the server goes on.
            logger.exception("demo: %s failed", name)
            message = {"event": "error", "message": f"{name}: generation failed ({err})"}
            self.wfile.write((json.dumps(message) + "\n").encode())

    def _send(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
        self._send(code, "application/json", json.dumps({"message": message}).encode())

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name.
        logger.info("demo: " + format, *args)


def make_server(demo: Demo, host: str = "127.0.0.1", port: int = 7860, checkpoint: str = ""):
    """A `ThreadingHTTPServer` serving `demo` (port 0 = any free port: `server.server_port`)."""
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.demo, server.checkpoint = demo, checkpoint  # type: ignore[attr-defined]
    return server

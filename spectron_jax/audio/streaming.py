"""Incremental vocoding: log-mel frames arrive in chunks, audio leaves in chunks.

Method (a sliding window with left context, look-ahead and a cross-fade):

- each call vocodes the window `frames[emitted - left_context : available]` with the ordinary
  (whole-utterance) vocoder, so the new audio is made with `left_context` frames of history;
- it emits the samples of frames `[emitted, available - lookahead)`: the last `lookahead` frames
  are held back until later frames exist, so every emitted sample was vocoded with frames on
  both sides (HiFi-GAN's receptive field, Griffin-Lim's overlapping STFT windows);
- the first `crossfade` samples of each emission are cross-faded (linearly) with what the
  previous window made for the same samples, which hides the phase jump Griffin-Lim leaves
  between two windows' independent solutions (for a vocoder whose windows agree, as HiFi-GAN's
  do with enough context, both sides are equal and the fade changes nothing).

`finish()` vocodes what is left. With HiFi-GAN and context and look-ahead at least its receptive
field, the stream equals whole-utterance vocoding to float rounding; with Griffin-Lim it is
another (equally consistent) phase solution of the same magnitudes: tests compare the log-mel of
the two (tests/audio/test_streaming_vocoder.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Vocoder = Callable[[np.ndarray], np.ndarray]  # float32[T, n_mels] -> float32[T * hop]


class StreamingVocoder:
    """Turns a growing log-mel stream into audio chunks.

    Args:
      vocoder: float32[T, n_mels] -> float32[T * hop_length] (e.g. `inference.vocode` bound to
        a vocoder).
      hop_length: samples per frame.
      left_context: frames of history vocoded before the new ones.
      lookahead: frames held back until frames after them exist.
      crossfade: samples cross-faded at each join (at most `lookahead * hop_length`); default
        one frame (`hop_length`): for Griffin-Lim (16 frames of context, look-ahead 4) one
        frame measured best, longer fades of two phase solutions comb-filter (docs/STREAMING.md).
    """

    def __init__(
        self,
        vocoder: Vocoder,
        hop_length: int,
        *,
        left_context: int = 16,
        lookahead: int = 4,
        crossfade: int | None = None,
    ):
        if left_context < 0 or lookahead < 0:
            raise ValueError(f"left_context={left_context} and lookahead={lookahead} must be >= 0")
        self.vocoder, self.hop = vocoder, hop_length
        self.left_context, self.lookahead = left_context, lookahead
        self.crossfade = min(hop_length, lookahead * hop_length) if crossfade is None else crossfade
        if not 0 <= self.crossfade <= lookahead * hop_length:
            raise ValueError(
                f"crossfade={self.crossfade} samples must be in [0, lookahead * hop_length = "
                f"{lookahead * hop_length}]"
            )
        self._buffer: np.ndarray | None = None  # The frames from `_buffer_start` on.
        self._buffer_start = 0
        self._available = 0
        self._emitted = 0  # Frames whose samples have left.
        self._tail = np.zeros(0, np.float32)  # The last window's audio just past `_emitted`.

    def push(self, frames: np.ndarray) -> np.ndarray:
        """Adds float32[n, n_mels] frames; returns the audio now ready (maybe empty)."""
        frames = np.asarray(frames, np.float32)
        if frames.ndim != 2:
            raise ValueError(f"frames must be [n, n_mels], got shape {frames.shape}")
        if len(frames):
            old = self._buffer if self._buffer is not None else frames[:0]
            self._buffer = np.concatenate([old, frames], axis=0)
            self._available += len(frames)
        return self._emit(self._available - self.lookahead)

    def finish(self) -> np.ndarray:
        """The audio of every frame not emitted yet."""
        return self._emit(self._available)

    def _emit(self, until: int) -> np.ndarray:
        if until <= self._emitted:
            return np.zeros(0, np.float32)
        begin = max(0, self._emitted - self.left_context)
        window = self._buffer[begin - self._buffer_start :]
        audio = np.asarray(self.vocoder(window), np.float32)
        lo, hi = (self._emitted - begin) * self.hop, (until - begin) * self.hop
        out = audio[lo:hi].copy()
        fade = min(len(self._tail), self.crossfade, len(out))
        if fade:
            ramp = (np.arange(fade, dtype=np.float32) + 0.5) / fade
            out[:fade] = (1 - ramp) * self._tail[:fade] + ramp * out[:fade]
        self._tail = audio[hi : hi + self.crossfade]
        self._emitted = until
        keep = max(0, until - self.left_context)  # The next window starts there.
        self._buffer = self._buffer[keep - self._buffer_start :]
        self._buffer_start = keep
        return out

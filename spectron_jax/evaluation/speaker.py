"""Speaker encoders for the speaker-similarity metric (prompt vs generated continuation).

The interface (`SpeakerEncoder`) embeds one log-mel spectrogram of the model's `SpectrogramConfig`
(float32[T, n_mels], log10 units) into a vector; the metric is the cosine of two embeddings
(`metrics.cosine_similarity`). Working on the log-mel lets the metric compare the prompt and the
model's output before any vocoder.

Shipped implementation, no download: `MelStatsSpeakerEncoder`, an i-vector-free baseline: the
mean and standard deviation of mel-cepstral coefficients c1..cK over voiced frames, standardised
per dimension with cohort statistics and optionally projected (e.g. by LDA trained on labelled
speakers). Saved and loaded as a plain `.npz` (`save` / `load_speaker_encoder`), no pickle.

A stronger public encoder can be plugged in through the same interface: `microsoft/wavlm-base-
plus-sv` (transformers `WavLMForXVector`, 512-dim x-vectors, trained for speaker verification on
VoxCeleb). It reads 16 kHz waveforms, so its adapter vocodes the log-mel first (e.g. with
`GriffinLimVocoder` or the HiFi-GAN of `SpectrogramConfig.vocoder`), then embeds:

    class WavLMSpeakerEncoder:
        def __init__(self, model_dir, vocoder):     # a local save_pretrained folder
            self.fe = AutoFeatureExtractor.from_pretrained(model_dir)
            self.model = WavLMForXVector.from_pretrained(model_dir).eval()
            self.vocoder = vocoder
        def embed(self, log_mel):
            wav = np.asarray(self.vocoder(log_mel[None]))[0]
            inputs = self.fe(wav, sampling_rate=16000, return_tensors="pt")
            return self.model(**inputs).embeddings[0].detach().numpy()
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from spectron_jax.evaluation.metrics import mel_cepstrum


class SpeakerEncoder(Protocol):
    """Anything that embeds a log-mel float32[T, n_mels] into float32[D]."""

    def embed(self, log_mel: np.ndarray) -> np.ndarray: ...


# Frames within this many log10 units (30 dB of magnitude) of the utterance's loudest frame count
# as voiced; silence would otherwise pull every embedding towards the same "silence" vector.
_VOICED_RANGE = 1.5


@dataclasses.dataclass(frozen=True, eq=False)
class MelStatsSpeakerEncoder:
    """Mean and std of mel-cepstral coefficients over voiced frames: float32[2K] (or projected).

    Attributes:
      num_coefficients: K, cepstral coefficients c1..cK (c0, the loudness, is excluded).
      center: float[2K] subtracted from the raw statistics (cohort mean), or None.
      scale: float[2K] dividing them after centring (cohort std), or None.
      projection: float[2K, D] applied last (e.g. LDA), or None.
    """

    num_coefficients: int = 20
    center: np.ndarray | None = None
    scale: np.ndarray | None = None
    projection: np.ndarray | None = None

    def raw_stats(self, log_mel: np.ndarray) -> np.ndarray:
        """float[T, n_mels] -> float64[2K] before centring and projection."""
        log_mel = np.asarray(log_mel, np.float64)
        if log_mel.ndim != 2 or len(log_mel) == 0:
            raise ValueError(f"expected a non-empty log-mel float[T, n_mels], got {log_mel.shape}")
        if not 1 <= self.num_coefficients < log_mel.shape[1]:
            raise ValueError(
                f"num_coefficients={self.num_coefficients} must be in [1, {log_mel.shape[1]})"
            )
        energy = log_mel.mean(-1)
        voiced = log_mel[energy >= energy.max() - _VOICED_RANGE]
        cep = mel_cepstrum(voiced)[:, 1 : self.num_coefficients + 1]
        return np.concatenate([cep.mean(0), cep.std(0)])

    def embed(self, log_mel: np.ndarray) -> np.ndarray:
        x = self.raw_stats(log_mel)
        if self.center is not None:
            x = x - self.center
        if self.scale is not None:
            x = x / np.maximum(self.scale, 1e-8)
        if self.projection is not None:
            x = x @ self.projection
        return x.astype(np.float32)

    def with_cohort(self, log_mels: Sequence[np.ndarray]) -> MelStatsSpeakerEncoder:
        """A copy standardised by the statistics of `log_mels` (cohort normalisation).

        Centring removes what every utterance shares (channel, language), so the cosine measures
        how speakers differ rather than that all of them are speech.
        """
        stats = np.stack([self.raw_stats(m) for m in log_mels])
        return dataclasses.replace(self, center=stats.mean(0), scale=stats.std(0) + 1e-3)

    def save(self, path: str | os.PathLike) -> None:
        """Writes a `.npz` that `load_speaker_encoder` reads."""
        arrays = {"num_coefficients": np.asarray(self.num_coefficients)}
        for name in ("center", "scale", "projection"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.asarray(value, np.float64)
        np.savez(path, kind=np.asarray("mel_stats"), **arrays)


def load_speaker_encoder(path: str | os.PathLike) -> MelStatsSpeakerEncoder:
    """Reads a `MelStatsSpeakerEncoder` `.npz` (`allow_pickle=False`).

    Raises:
      FileNotFoundError: no such file; ValueError: not a speaker-encoder file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"speaker encoder file {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any numpy read failure means "not our file"
        raise ValueError(f"{path}: not a .npz speaker encoder file ({err})") from err
    if "kind" not in data or str(data["kind"]) != "mel_stats":
        raise ValueError(f"{path}: not a MelStatsSpeakerEncoder file (no kind='mel_stats')")
    return MelStatsSpeakerEncoder(
        num_coefficients=int(data["num_coefficients"]),
        center=data["center"] if "center" in data else None,
        scale=data["scale"] if "scale" in data else None,
        projection=data["projection"] if "projection" in data else None,
    )

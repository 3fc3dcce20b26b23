"""A tiny random-init Spectron saved as a training checkpoint, for CLI and evaluation tests."""

from __future__ import annotations

import dataclasses
import pathlib

import spectron_testing

from spectron_jax import checkpoints
from spectron_jax.config import SpectronConfig
from spectron_jax.models import SpectronModel


def tiny_inference_config() -> SpectronConfig:
    """The tiny test model with the default 80-bin log-mel (so the shipped tasks fit it) and the
    tiny vocabulary's 1000 ids (embedding rounded to 1024)."""
    config = spectron_testing.tiny_config(n_mels=80)
    return dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, vocab_size=1024))


def make_tiny_checkpoint(model_dir: pathlib.Path, step: int = 3, vocabulary=None):
    """Writes `model_dir/checkpoints/<step>` (params, config and vocabulary, as training does)
    and returns (config, params).

    Args:
      vocabulary: the model's vocabulary; default the shipped tiny SentencePiece model.
    """
    config = tiny_inference_config()
    batch = spectron_testing.random_batch(config, batch_size=1)
    params = spectron_testing.init_params(config, batch, seed=1)
    checkpoints.save_for_inference(model_dir, SpectronModel(config, vocabulary), params, step)
    return config, params

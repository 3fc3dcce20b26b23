"""Checkpoint in, frames and audio out: load, featurise, decode, vocode.

    wav --load_audio--> float32[S] --front end--> float32[T_p, F_enc] --pad to a bucket--> batch
        --decoding.generate--> text + log-mel frames --vocoder--> float32[S'] --write_wav--> wav

A model with a stop head ends its speech by itself (`decode_config`: the stop logit is on unless
`fixed_duration`); the requested seconds are then the longest it may speak.

The text is the decoder's one text (the prompt transcript followed by the continuation or the
answer); cutting it in two is evaluation's (`evaluation.text.split_text`). Checkpoints are the
trainer's (`checkpoints.py` knows their layout): the model config, its vocabulary and the params
of the newest step are all that is read.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectron_jax.audio.spectrogram import SpectrogramConfig
from spectron_jax.config import SpectronConfig
from spectron_jax.nn.layers import ceil_div

logger = logging.getLogger(__name__)
PyTree = Any

# Prompts are padded to a multiple of this many frames, so that prompts of similar length share
# one compiled decode program (each new shape is a new XLA compile).
PROMPT_BUCKET_FRAMES = 64


@dataclasses.dataclass
class LoadedModel:
    """A model ready for decoding.

    Attributes:
      model: the `SpectronModel`.
      params: its parameter tree (unboxed arrays).
      vocabulary: the vocabulary of its text ids (the model's, as the checkpoint stores it).
      step: the checkpoint step the params come from.
    """

    model: Any
    params: PyTree
    vocabulary: Any
    step: int

    @property
    def config(self) -> SpectronConfig:
        return self.model.config


# ------------------------------------------------------------------------------------------------
# Checkpoints (the layout is `checkpoints.py`'s).
# ------------------------------------------------------------------------------------------------


def abstract_params(model: Any) -> PyTree:
    """`ShapeDtypeStruct`s of the model's unboxed parameters (nothing allocated)."""
    import flax.linen as nn

    from spectron_jax.models import example_input_shapes

    shapes = example_input_shapes(model.config)
    return jax.eval_shape(
        lambda rng: nn.unbox(model.get_initial_variables(rng, shapes)["params"]),
        jax.random.PRNGKey(0),
    )


def load_model_for_inference(
    checkpoint_dir: str | os.PathLike, vocabulary_file: str | os.PathLike | None = None
) -> LoadedModel:
    """Reads the model config, vocabulary and params of the newest step of a checkpoint dir.

    Args:
      checkpoint_dir: a model dir, its `checkpoints/` dir, or one step dir.
      vocabulary_file: the tokenizer file, for checkpoints that do not store theirs (older
        ones); overrides the stored one.

    Returns:
      The loaded model (params on the default device).

    Raises:
      FileNotFoundError: no checkpoint; `checkpoints.MissingVocabularyError`: no vocabulary
        stored nor given; ValueError: config missing, vocabulary too large for the decoder, or
        the step unreadable (truncated files) or not the model its config describes (the
        message names the step and the other steps there are).
    """
    from spectron_jax import checkpoints
    from spectron_jax.models import SpectronModel

    step_dir = checkpoints.find_step_dir(checkpoint_dir)
    try:
        config = checkpoints.read_model_config(step_dir)
        vocabulary = checkpoints.read_vocabulary(step_dir, vocabulary_file)
        model = SpectronModel(config, vocabulary)
        model.check_vocabulary_fits()
        abstract = abstract_params(model)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: sharding, abstract)
        params = checkpoints.load_subtrees(
            {"p": abstract}, step_dir, {"p": "params"}, {"p": shardings}
        )["p"]
    except (FileNotFoundError, checkpoints.ConfigMismatchError):
        raise
    except Exception as err:  # noqa: BLE001 - Orbax / tensorstore / JSON errors of a bad step
        raise ValueError(_unreadable_step_message(step_dir, err)) from err
    logger.info("loaded %s (step %s)", step_dir, step_dir.name)
    return LoadedModel(model=model, params=params, vocabulary=vocabulary, step=int(step_dir.name))


def _unreadable_step_message(step_dir: Any, err: BaseException) -> str:
    """Names the step, what failed, and the other steps beside it that could be tried."""
    why = str(err).splitlines()[0][:300] if str(err) else ""
    others = sorted(
        (int(p.name) for p in step_dir.parent.iterdir() if p.name.isdigit()), reverse=True
    )
    others = [s for s in others if s != int(step_dir.name)]
    hint = (
        f"; other steps there: {', '.join(map(str, others[:5]))} (pass one as "
        f"{step_dir.parent}/<step>)"
        if others
        else ""
    )
    if isinstance(err, ValueError) and why:
        return f"checkpoint {step_dir}: {why}{hint}"
    return f"checkpoint {step_dir} is unreadable ({type(err).__name__}: {why or 'no detail'}){hint}"


# ------------------------------------------------------------------------------------------------
# Prompts -> batch.
# ------------------------------------------------------------------------------------------------


def front_end(config: SpectronConfig) -> Any:
    """The encoder front end of `config` (CONTRACTS.md section 5)."""
    if config.encoder_front_end == "log_mel":
        return config.spectrogram
    from spectron_jax.audio.fbank import W2vBertFbankConfig

    return W2vBertFbankConfig(sample_rate=config.spectrogram.sample_rate)


def prompt_features(
    config: SpectronConfig, waveform: np.ndarray, name: str = "prompt"
) -> np.ndarray:
    """float32[S] at the model's rate -> float32[T_p, F_enc] encoder features.

    Raises:
      AudioError: the clip is too short for the front end or for one encoder output frame.
    """
    from spectron_jax.audio.io import AudioError

    fe = front_end(config)
    min_samples = getattr(fe, "min_samples", getattr(fe, "n_fft", 0) // 2 + 1)
    if waveform.size < min_samples:
        raise AudioError(
            f"{name}: {waveform.size} samples is too short for the encoder front end (needs at "
            f"least {min_samples})"
        )
    features = np.asarray(fe.features_numpy(waveform), np.float32)
    if config.prefix_length(len(features)) < 1:
        raise AudioError(f"{name}: {len(features)} feature frames give no encoder output")
    return features


def num_frames_for(config: SpectronConfig, seconds: float) -> int:
    """Target frames for `seconds` of speech, rounded up to a multiple of `reduction_factor`."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    r = config.reduction_factor
    frames = math.ceil(seconds * config.spectrogram.frames_per_second)
    return ceil_div(frames, r) * r


def prompt_batch(
    model: Any,
    features: Sequence[np.ndarray],
    num_frames: int,
    bucket: int = PROMPT_BUCKET_FRAMES,
    prompt_frames: int | None = None,
) -> dict[str, np.ndarray]:
    """A model batch (CONTRACTS.md section 2) holding prompts only.

    Args:
      model: the `SpectronModel` (its config, and its BOS id).
      features: per example float32[T_p_i, F_enc], the front end's output.
      num_frames: frames to generate (the `target_frames` length; multiple of reduction_factor).
      bucket: T_p is padded up to a multiple of this.
      prompt_frames: pad T_p to at least this (one compile for batches of different prompts).

    Returns:
      Batch of B = len(features): `encoder_features` float32[B, T_p, F_enc], `encoder_mask`,
      text keys of length 1 holding BOS, `target_frames` zeros float32[B, num_frames, n_mels] and
      an all-zero `frame_mask`.
    """
    config = model.config
    b = len(features)
    t_p = max(bucket, ceil_div(max(len(f) for f in features), bucket) * bucket, prompt_frames or 0)
    enc = np.zeros((b, t_p, config.encoder_feature_dim), np.float32)
    mask = np.zeros((b, t_p), np.int32)
    for i, f in enumerate(features):
        enc[i, : len(f)] = f
        mask[i, : len(f)] = 1
    return {
        "encoder_features": enc,
        "encoder_mask": mask,
        "decoder_input_tokens": np.full((b, 1), model.bos_id, np.int32),
        "decoder_target_tokens": np.zeros((b, 1), np.int32),
        "decoder_loss_weights": np.zeros((b, 1), np.float32),
        "text_part": np.zeros((b, 1), np.int32),
        "target_frames": np.zeros((b, num_frames, config.n_mels), np.float32),
        "frame_mask": np.zeros((b, num_frames), np.int32),
    }


# ------------------------------------------------------------------------------------------------
# Generation and vocoding.
# ------------------------------------------------------------------------------------------------


def decode_ids(vocabulary: Any, ids: np.ndarray, length: int) -> str:
    """The first `length` ids as text; ids outside the vocabulary (padding rows of the
    embedding) are dropped rather than crashing the tokenizer."""
    ids = [int(i) for i in np.asarray(ids)[:length] if 0 <= int(i) < vocabulary.vocab_size]
    return vocabulary.decode(ids)


@dataclasses.dataclass
class Generation:
    """One example's output.

    Attributes:
      text: everything the model wrote (transcript + continuation), EOS excluded.
      frames: float32[T, n_mels] generated log-mel (valid frames only).
      stopped: the stop logit ended the speech (False: it ran to `max_frames`).
      audio: float32[S] the vocoded frames, where the caller vocoded them.
    """

    text: str
    frames: np.ndarray
    stopped: bool = False
    audio: np.ndarray | None = None


def decode_config(
    loaded: LoadedModel, seconds: float, *, fixed_duration: bool = False, **options
) -> Any:
    """The `decoding.DecodeConfig` of `continue` / `ask`: up to `seconds` of speech.

    With a stop head the model ends its speech itself and `seconds` is the longest it may
    speak; `fixed_duration` (or a model without a stop head) generates exactly `seconds`.

    Args:
      loaded: the model (its config, stop head and BOS / EOS).
      seconds: the speech duration (rounded up to whole frame groups).
      fixed_duration: ignore the stop head.
      **options: other `DecodeConfig` fields (sampling, `stop_threshold`, `seed`, ...).
    """
    from spectron_jax import decoding

    return decoding.DecodeConfig.for_model(
        loaded.model,
        fixed_duration=fixed_duration,
        max_frames=num_frames_for(loaded.config, seconds),
        **options,
    )


def generate(
    loaded: LoadedModel,
    features: Sequence[np.ndarray],
    decode_config: Any,
    prompt_frames: int | None = None,
) -> list[Generation]:
    """Decodes a batch of prompts.

    Args:
      loaded: the model.
      features: per example float32[T_p_i, F_enc] (the front end's output).
      decode_config: a `decoding.DecodeConfig` (`decode_config` builds the default one);
        `max_frames` sets the target frames, the most there are with the stop logit.
      prompt_frames: pad the prompts to at least this many frames (see `prompt_batch`).

    Returns:
      One `Generation` per prompt.
    """
    from spectron_jax import decoding

    batch = prompt_batch(
        loaded.model, features, decode_config.max_frames, prompt_frames=prompt_frames
    )
    out = decoding.generate(loaded.model, loaded.params, batch, decode_config)
    out = jax.device_get(out)
    results = []
    for i in range(len(features)):
        text = decode_ids(loaded.vocabulary, out["text_tokens"][i], int(out["text_lengths"][i]))
        n = int(out["frame_lengths"][i])
        frames = np.asarray(out["frames"][i, :n], np.float32)
        results.append(Generation(text=text, frames=frames, stopped=bool(out["stopped"][i])))
    return results


def make_vocoder(
    kind: str, spectrogram_config: SpectrogramConfig, vocoder_dir: str | None = None
) -> Any:
    """A vocoder (float32[B, T, n_mels] -> float32[B, samples]) for the model's spectrograms.

    Args:
      kind: "griffin_lim" (no weights needed) or "hifigan" (a local HF SpeechT5HifiGan folder).
      spectrogram_config: the model's target spectrogram; a vocoder trained on another one is
        an error naming both configs.
      vocoder_dir: the HiFi-GAN folder (config.json + model.safetensors).
    """
    if kind == "griffin_lim":
        from spectron_jax.audio.griffin_lim import GriffinLimVocoder

        return GriffinLimVocoder(spectrogram_config=spectrogram_config)
    if kind == "hifigan":
        if not vocoder_dir:
            raise ValueError("--vocoder hifigan needs --vocoder-dir (a local HF HiFi-GAN folder)")
        from spectron_jax.convert.hf_hifigan import load_hf_hifigan

        return load_hf_hifigan(vocoder_dir, expected=spectrogram_config)
    raise ValueError(f"unknown vocoder {kind!r}; use griffin_lim or hifigan")


def vocode(vocoder: Any, frames: np.ndarray) -> np.ndarray:
    """float32[T, n_mels] -> float32[T * hop] (empty for T = 0)."""
    if len(frames) == 0:
        return np.zeros(0, np.float32)
    return np.asarray(vocoder(jnp.asarray(frames)[None]))[0].astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Streaming: audio while the frames are still being generated.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SpeechChunk:
    """One piece of a streamed continuation.

    Attributes:
      audio: float32[S] the new samples (empty while the vocoder waits for look-ahead frames).
      frames: float32[n, n_mels] the new log-mel frames.
      ready_seconds: wall seconds from the call to when this chunk was ready.
      stopped: the model's stop head has ended the speech.
    """

    audio: np.ndarray
    frames: np.ndarray
    ready_seconds: float
    stopped: bool = False


def streaming_vocoder(vocoder: Any) -> Any:
    """An `audio.streaming.StreamingVocoder` over `vocoder` with context that suits it: HiFi-GAN
    32 frames each side (the public generator's receptive field is ~24 frames), Griffin-Lim 16
    frames of history and 4 of look-ahead (measured best: docs/STREAMING.md)."""
    from spectron_jax.audio.hifigan import HifiGanVocoder
    from spectron_jax.audio.streaming import StreamingVocoder

    hop = vocoder.spectrogram_config.hop_length
    if isinstance(vocoder, HifiGanVocoder):
        return StreamingVocoder(lambda f: vocode(vocoder, f), hop, left_context=32, lookahead=32)
    return StreamingVocoder(lambda f: vocode(vocoder, f), hop, left_context=16, lookahead=4)


def stream_speech(
    loaded: LoadedModel,
    features: np.ndarray,
    decode_config: Any,
    vocoder: Any,
    *,
    chunk_groups: int = 4,
    prompt_frames: int | None = None,
) -> Iterator[str | SpeechChunk]:
    """Decodes one prompt as a stream: yields its text (str) first, then `SpeechChunk`s.

    Frames come from `decoding.stream` (`chunk_groups` frame groups per compiled call) and are
    vocoded incrementally (`streaming_vocoder`); the last chunk flushes the vocoder. Put
    together, the frames are `generate`'s and the audio is the streaming vocoder's.

    Args:
      loaded: the model; features: float32[T_p, F_enc] the prompt's front-end features.
      decode_config: a `decoding.DecodeConfig` (see `decode_config`).
      vocoder: from `make_vocoder`.
      chunk_groups: frame groups per chunk.
      prompt_frames: pad the prompt to at least this many frames (see `prompt_batch`).
    """
    import time

    from spectron_jax import decoding

    began = time.perf_counter()
    batch = prompt_batch(
        loaded.model, [features], decode_config.max_frames, prompt_frames=prompt_frames
    )
    parts = decoding.stream(
        loaded.model, loaded.params, batch, decode_config, chunk_groups=chunk_groups
    )
    text = next(parts)
    yield decode_ids(loaded.vocabulary, text["text_tokens"][0], int(text["text_lengths"][0]))
    speech, made, stopped = streaming_vocoder(vocoder), 0, False
    for part in parts:
        n = int(part["frame_lengths"][0]) - made  # Frames of this row in this chunk.
        frames = np.asarray(part["frames"][0, :n], np.float32)
        made, stopped = made + n, bool(part["stopped"][0])
        yield SpeechChunk(speech.push(frames), frames, time.perf_counter() - began, stopped)
    empty = np.zeros((0, loaded.config.n_mels), np.float32)
    yield SpeechChunk(speech.finish(), empty, time.perf_counter() - began, stopped)

"""Speech in, speech out with a trained checkpoint: load, featurise, decode, split text, vocode.

    wav --load_audio--> float32[S] --front end--> float32[T_p, F_enc] --pad to a bucket--> batch
        --decoding.generate--> text ids + log-mel frames --vocoder--> float32[S'] --write_wav--> wav

The decoder writes one text: the prompt transcript followed by the continuation (or the answer),
with no separator between them [paper: one cross-entropy over the whole transcript]. Where the
prompt's words are known (evaluation, `--transcript` in the CLI) `split_text` cuts the text at the
word alignment with them; otherwise at an estimate from the prompt's duration and a speaking rate.

Checkpoints are the trainer's (`checkpoints.Checkpointer`): `<model_dir>/checkpoints/<step>/`
with `state/` (a `TrainState`, of which only `params` is read here) and `config/` (the model
config JSON). `save_for_inference` writes the same layout (tests, converted weights).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from spectron_jax.audio.spectrogram import SpectrogramConfig
from spectron_jax.config import SpectronConfig

logger = logging.getLogger(__name__)
PyTree = Any

# Prompts are padded to a multiple of this many frames, so that prompts of similar length share
# one compiled decode program (each new shape is a new XLA compile).
PROMPT_BUCKET_FRAMES = 64
# Typical read-speech rate (LibriSpeech: about 2.7 words/s): the fallback cut of `split_text`.
DEFAULT_WORDS_PER_SECOND = 2.5
BOS_ID = 3  # Of the tiny vocabulary and the feature converter's default.


@dataclasses.dataclass
class LoadedModel:
    """A model ready for decoding.

    Attributes:
      model: the `SpectronModel`.
      params: its parameter tree (unboxed arrays).
      vocabulary: the seqio vocabulary of its text ids.
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
# Checkpoints.
# ------------------------------------------------------------------------------------------------


class SentencePieceText:
    """The decode side of a SentencePiece model (`vocab_size`, `decode`), without seqio.

    Importing seqio pulls in TensorFlow (tens of seconds on a busy CPU), which a command-line
    call that only turns ids into words should not pay.
    """

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
        self._sp = spm.SentencePieceProcessor(model_file=os.fspath(model_file))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    @property
    def eos_id(self) -> int | None:
        return self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def special_ids(vocabulary: Any) -> dict[str, int]:
    """`bos_id` / `eos_id` of a vocabulary for `DecodeConfig` (only those it defines)."""
    out = {}
    for name in ("bos_id", "eos_id"):
        value = getattr(vocabulary, name, None)
        if isinstance(value, int) and value >= 0:
            out[name] = value
    return out


def load_vocabulary(path: str | os.PathLike | None) -> Any:
    """A vocabulary for decoding: a SentencePiece `.model` file, an HF `tokenizer.json`, or
    (None) the tiny SentencePiece model shipped in `spectron_jax/assets`."""
    if path is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_spm.model")
    if os.fspath(path).endswith(".json"):
        from spectron_jax.vocabularies import HFTokenizerVocabulary

        return HFTokenizerVocabulary(path)
    return SentencePieceText(path)


def find_step_dir(checkpoint_dir: str | os.PathLike) -> epath.Path:
    """The checkpoint step directory for a model dir, its `checkpoints/` dir or a step dir.

    The newest complete step is chosen (unfinished `*.orbax-checkpoint-tmp-*` saves are ignored).

    Raises:
      FileNotFoundError: naming the directory and what was looked for.
    """
    path = epath.Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if (path / "state").is_dir() and (path / "config").is_dir():
        return path
    for candidate in (path / "checkpoints", path):
        if not candidate.is_dir():
            continue
        steps = sorted(int(p.name) for p in candidate.iterdir() if p.name.isdigit())
        if steps:
            return candidate / str(steps[-1])
    raise FileNotFoundError(
        f"no checkpoint in {path}: expected a model dir with checkpoints/<step>/, a checkpoints "
        "dir with <step>/ folders, or a step dir with state/ and config/"
    )


def read_model_config(step_dir: str | os.PathLike) -> SpectronConfig:
    """The `SpectronConfig` saved beside the state (JSON, no pickle)."""
    import orbax.checkpoint as ocp

    config_dir = epath.Path(step_dir) / "config"
    raw = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(config_dir)
    if not raw or "decoder" not in raw:
        raise ValueError(
            f"{config_dir} holds no Spectron model config (got keys {sorted(raw or {})}); was the "
            "checkpoint written by spectron_jax.train?"
        )
    return SpectronConfig.from_dict(raw)


def _abstract_params(model: Any) -> PyTree:
    import flax.linen as nn

    from spectron_jax.models import example_input_shapes

    shapes = example_input_shapes(model.config)
    return jax.eval_shape(
        lambda rng: nn.unbox(model.get_initial_variables(rng, shapes)["params"]),
        jax.random.PRNGKey(0),
    )


def load_model_for_inference(
    checkpoint_dir: str | os.PathLike, vocabulary: Any = None
) -> LoadedModel:
    """Reads the model config and params of the newest step of a checkpoint directory.

    Args:
      checkpoint_dir: a model dir, its `checkpoints/` dir, or one step dir.
      vocabulary: the vocabulary the model was trained with (anything with `vocab_size` and
        `decode`, e.g. a seqio vocabulary); default: the shipped tiny SentencePiece model (see
        `load_vocabulary`). Checkpoints do not store it.

    Returns:
      The loaded model (params on the default device).

    Raises:
      FileNotFoundError: no checkpoint; ValueError: config missing or vocabulary too large.
    """
    from spectron_jax import checkpoints
    from spectron_jax.models import SpectronModel

    step_dir = find_step_dir(checkpoint_dir)
    config = read_model_config(step_dir)
    model = SpectronModel(config)
    abstract = _abstract_params(model)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: sharding, abstract)
    params = checkpoints.load_subtrees(
        {"p": abstract}, step_dir, {"p": "params"}, {"p": shardings}
    )["p"]
    if vocabulary is None:
        vocabulary = load_vocabulary(None)
    if vocabulary.vocab_size > config.decoder.vocab_size:
        raise ValueError(
            f"vocabulary has {vocabulary.vocab_size} ids but the model's decoder only "
            f"{config.decoder.vocab_size}: pass the vocabulary the checkpoint was trained with"
        )
    logger.info("loaded %s (step %s)", step_dir, step_dir.name)
    return LoadedModel(model=model, params=params, vocabulary=vocabulary, step=int(step_dir.name))


def save_for_inference(
    directory: str | os.PathLike, config: SpectronConfig, params: PyTree, step: int = 0
) -> epath.Path:
    """Writes `params` and `config` the way training does (`<directory>/checkpoints/<step>`).

    The inverse of `load_model_for_inference`, for converted weights and tests; the optimizer
    state is left empty.

    Returns:
      The step directory.
    """
    from spectron_jax import checkpoints
    from spectron_jax.trainer import TrainState

    ckpt = checkpoints.Checkpointer(
        epath.Path(directory) / "checkpoints",
        checkpoints.CheckpointConfig(async_save=False),
    )
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state={})
    model_config = json.loads(json.dumps(config.to_dict(), default=str))
    ckpt.save(step, state, {"batches_consumed": 0}, model_config, force=True)
    ckpt.close()
    return epath.Path(directory) / "checkpoints" / str(step)


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
    return -(-frames // r) * r


def prompt_batch(
    config: SpectronConfig,
    features: Sequence[np.ndarray],
    num_frames: int,
    bucket: int = PROMPT_BUCKET_FRAMES,
    prompt_frames: int | None = None,
) -> dict[str, np.ndarray]:
    """A model batch (CONTRACTS.md section 2) holding prompts only.

    Args:
      config: the model config.
      features: per example float32[T_p_i, F_enc], the front end's output.
      num_frames: frames to generate (the `target_frames` length; multiple of reduction_factor).
      bucket: T_p is padded up to a multiple of this.
      prompt_frames: pad T_p to at least this (one compile for batches of different prompts).

    Returns:
      Batch of B = len(features): `encoder_features` float32[B, T_p, F_enc], `encoder_mask`,
      text keys of length 1 holding BOS, `target_frames` zeros float32[B, num_frames, n_mels] and
      an all-zero `frame_mask`.
    """
    b = len(features)
    t_p = max(bucket, -(-max(len(f) for f in features) // bucket) * bucket, prompt_frames or 0)
    enc = np.zeros((b, t_p, config.encoder_feature_dim), np.float32)
    mask = np.zeros((b, t_p), np.int32)
    for i, f in enumerate(features):
        enc[i, : len(f)] = f
        mask[i, : len(f)] = 1
    return {
        "encoder_features": enc,
        "encoder_mask": mask,
        "decoder_input_tokens": np.full((b, 1), BOS_ID, np.int32),
        "decoder_target_tokens": np.zeros((b, 1), np.int32),
        "decoder_loss_weights": np.zeros((b, 1), np.float32),
        "text_part": np.zeros((b, 1), np.int32),
        "target_frames": np.zeros((b, num_frames, config.n_mels), np.float32),
        "frame_mask": np.zeros((b, num_frames), np.int32),
    }


# ------------------------------------------------------------------------------------------------
# Text.
# ------------------------------------------------------------------------------------------------


def decode_ids(vocabulary: Any, ids: np.ndarray, length: int) -> str:
    """The first `length` ids as text; ids outside the vocabulary (padding rows of the
    embedding) are dropped rather than crashing the tokenizer."""
    ids = [int(i) for i in np.asarray(ids)[:length] if 0 <= int(i) < vocabulary.vocab_size]
    return vocabulary.decode(ids)


def _edit_row(ref: Sequence[str], hyp: Sequence[str]) -> np.ndarray:
    """int[len(hyp) + 1]: word edit distance between `ref` and each prefix hyp[:k]."""
    prev = np.arange(len(hyp) + 1)
    for i, word in enumerate(ref, start=1):
        cur = np.empty_like(prev)
        cur[0] = i
        for k in range(1, len(hyp) + 1):
            cur[k] = min(prev[k] + 1, cur[k - 1] + 1, prev[k - 1] + (hyp[k - 1] != word))
        prev = cur
    return prev


def split_at_reference(words: Sequence[str], prompt: Sequence[str], rest: Sequence[str]) -> int:
    """The cut k of `words` at which words[:k] aligns with `prompt` and words[k:] with `rest`.

    min_k ED(prompt, words[:k]) + ED(rest, words[k:]) equals the edit distance of the whole text
    to prompt + rest, so this is the alignment of the whole text with the whole reference, cut at
    the reference's boundary. Ties go to the earliest cut, so that words the model adds after
    the prompt's (a verbose answer: "it is paris") count as its continuation.
    """
    head = _edit_row(prompt, words)  # ED(prompt, words[:k])
    tail = _edit_row(rest[::-1], words[::-1])[::-1]  # ED(rest, words[k:])
    return int(np.argmin(head + tail))  # argmin takes the first of equal minima


def split_text(
    text: str,
    *,
    prompt_text: str | None = None,
    reference_rest: str | None = None,
    prompt_seconds: float | None = None,
    words_per_second: float = DEFAULT_WORDS_PER_SECOND,
) -> tuple[str, str]:
    """Cuts the model's text into (prompt transcript, continuation or answer).

    With `prompt_text` (the prompt's words) the cut follows the word alignment (see
    `split_at_reference`; `reference_rest` is the reference continuation where known). Without
    it, the first round(prompt_seconds * words_per_second) words are called the transcript: an
    estimate, since the model writes no separator.
    """
    from spectron_jax.evaluation.metrics import normalize_text

    words = text.split()
    if prompt_text is not None:
        norm = [normalize_text(w) for w in words]
        k = split_at_reference(norm, normalize_text(prompt_text).split(),
                               normalize_text(reference_rest or "").split())
    elif prompt_seconds is not None:
        k = min(len(words), int(round(prompt_seconds * words_per_second)))
    else:
        raise ValueError("split_text needs prompt_text or prompt_seconds")
    return " ".join(words[:k]), " ".join(words[k:])


# ------------------------------------------------------------------------------------------------
# Generation and vocoding.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Generation:
    """One example's output.

    Attributes:
      text: everything the model wrote (transcript + continuation), EOS excluded.
      frames: float32[T, n_mels] generated log-mel (valid frames only).
    """

    text: str
    frames: np.ndarray


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
      decode_config: a `decoding.DecodeConfig`; `max_frames` sets the target frames.
      prompt_frames: pad the prompts to at least this many frames (see `prompt_batch`).

    Returns:
      One `Generation` per prompt.
    """
    from spectron_jax import decoding

    batch = prompt_batch(
        loaded.config, features, decode_config.max_frames, prompt_frames=prompt_frames
    )
    out = decoding.generate(loaded.model, loaded.params, batch, decode_config)
    out = jax.device_get(out)
    results = []
    for i in range(len(features)):
        text = decode_ids(loaded.vocabulary, out["text_tokens"][i], int(out["text_lengths"][i]))
        n = int(out["frame_lengths"][i])
        results.append(Generation(text=text, frames=np.asarray(out["frames"][i, :n], np.float32)))
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


def save_spectrogram_png(
    path: str | os.PathLike,
    prompt: np.ndarray,
    continuation: np.ndarray,
    title: str = "",
    reference: np.ndarray | None = None,
) -> None:
    """Writes a PNG of the prompt and continuation log-mels (and a reference continuation).

    Args:
      path: output file.
      prompt: float32[T_p, n_mels]; continuation / reference: float32[T, n_mels].
      title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("prompt", prompt), ("generated continuation", continuation)]
    if reference is not None:
        panels.append(("reference continuation", reference))
    # One colour scale for every panel, so that loudness is comparable between them.
    values = np.concatenate([np.ravel(m) for _, m in panels] + [np.zeros(1)])
    vmin, vmax = (np.percentile(values, [1, 99.5]) if values.size > 1 else (0.0, 1.0))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), squeeze=False)
    for ax, (name, mel) in zip(axes[:, 0], panels, strict=True):
        if len(mel):
            ax.imshow(np.asarray(mel).T, origin="lower", aspect="auto", interpolation="nearest",
                      vmin=vmin, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("mel bin")
    axes[-1, 0].set_xlabel("frame")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)

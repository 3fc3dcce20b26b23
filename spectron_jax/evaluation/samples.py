"""Speech samples while training: generated continuations as spectrogram images and audio.

`speech_samples` is `train.sample_fn` (gin/runs/pretrain.gin): every `train.eval_every` steps
and at the end of the run it decodes the first `num_examples` prompts of a validation split
free-running (greedy transcript and continuation, then `reduction_factor` frames per step for
the reference continuation's duration), and writes

  <model_dir>/samples/step_<N>/<split>-<i>-{reference,generated}.wav   (Griffin-Lim)
  <model_dir>/samples/step_<N>/<split>-spectrograms.png               (prompt | continuation)
  TensorBoard: images `samples/<split>/spectrograms`, audio `samples/<split>/generated`,
               scalars `samples/<split>/{exact_match,dtw_l1}` (over these few examples).

`write_samples` is shared with the end-of-run counting evaluation (`evaluation/counting.py`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

import gin
from spectron_jax.evaluation.metrics import dtw_l1, normalize_text

logger = logging.getLogger(__name__)


def task_vocabulary(mixture_or_task_name: str):
    """The transcript vocabulary of a registered seqio task or mixture."""
    import seqio

    import spectron_tasks  # noqa: F401 - registers the tasks

    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    return provider.output_features["prompt_transcript"].vocabulary


def reference_texts(
    target_tokens: np.ndarray, text_part: np.ndarray, decode: Callable[[list[int]], str]
) -> tuple[list[str], list[str]]:
    """(prompt texts, continuation texts) of a batch, from `decoder_target_tokens`/`text_part`.

    The feature converter drops the strings; the ids are the tokenised texts, so decoding them
    gives the references back (the EOS target, the last part-2 slot, is left out).
    """
    prompts, conts = [], []
    for tokens, part in zip(np.asarray(target_tokens), np.asarray(text_part), strict=True):
        prompts.append(decode([int(t) for t in tokens[part == 1]]))
        cont = [int(t) for t in tokens[part == 2]][:-1]
        conts.append(decode(cont))
    return prompts, conts


def write_samples(
    samples: Sequence[Mapping[str, Any]],
    directory: str,
    split: str,
    spectrogram_config: Any,
    prompt_is_log_mel: bool,
) -> dict[str, np.ndarray]:
    """Griffin-Lim WAVs (reference and generated) and one PNG of the spectrograms.

    When the encoder reads the target log-mel, the prompt's frames are prepended, so that each
    WAV plays prompt then continuation.

    Returns:
      {"image": uint8[H, W, 3], "audio": float32[N, T, 1]} for TensorBoard (generated audio).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spectron_jax.audio.griffin_lim import GriffinLimVocoder
    from spectron_jax.audio.io import write_wav

    os.makedirs(directory, exist_ok=True)
    vocoder = GriffinLimVocoder(spectrogram_config)
    audios = []
    fig, axes = plt.subplots(len(samples), 2, figsize=(10, 2.2 * len(samples)), squeeze=False)
    for i, s in enumerate(samples):
        for j, kind in enumerate(("reference", "generated")):
            frames = np.asarray(s[kind], np.float32)
            if prompt_is_log_mel:
                frames = np.concatenate([np.asarray(s["prompt_features"], np.float32), frames])
            wave = np.asarray(vocoder(frames))
            wave = wave / max(1.0, float(np.abs(wave).max()) / 0.95)
            path = os.path.join(directory, f"{split}-{i}-{kind}.wav")
            write_wav(path, wave, spectrogram_config.sample_rate)
            if kind == "generated":
                audios.append(wave)
            ax = axes[i, j]
            ax.imshow(frames.T, origin="lower", aspect="auto", cmap="magma")
            ax.set_title(f"{kind}: {s[f'{kind}_text']}", fontsize=8)
            if prompt_is_log_mel:
                ax.axvline(len(s["prompt_features"]) - 0.5, color="cyan", lw=1)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    png = os.path.join(directory, f"{split}-spectrograms.png")
    fig.savefig(png, dpi=80)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    longest = max(len(a) for a in audios)
    audio = np.stack([np.pad(a, (0, longest - len(a))) for a in audios])[..., None]
    return {"image": image, "audio": audio.astype(np.float32)}


def decode_batch(
    model: Any,
    params: Any,
    batch: Mapping[str, Any],
    decode_text: Callable[[list[int]], str],
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Free-running greedy decoding of a model batch, one dict per example.

    The frames are generated for the batch's `target_frames` length and cut to the reference
    continuation's duration.

    Returns:
      Per example: `prompt_features` float32[T_p, F], `reference` and `generated` frames
      float32[T_i, n_mels], `prompt_text`, `reference_text` (prompt + continuation) and
      `generated_text`.
    """
    from spectron_jax.decoding import DecodeConfig, generate

    batch = {k: np.asarray(v) for k, v in batch.items()}
    config = DecodeConfig(
        max_text_tokens=batch["decoder_target_tokens"].shape[1] + 4,
        max_frames=batch["target_frames"].shape[1],
        text_mode="free",
        seed=seed,
    )
    out = jax.device_get(generate(model, params, batch, config))
    prompts, continuations = reference_texts(
        batch["decoder_target_tokens"], batch["text_part"], decode_text
    )
    examples = []
    for i in range(len(prompts)):
        n_ref = int(batch["frame_mask"][i].sum())
        n_gen = max(int(out["frame_lengths"][i]), 1)
        ids = [int(t) for t in out["text_tokens"][i, : out["text_lengths"][i]]]
        examples.append(
            {
                "prompt_features": batch["encoder_features"][
                    i, : int(batch["encoder_mask"][i].sum())
                ],
                "reference": batch["target_frames"][i, :n_ref],
                "generated": out["frames"][i, :n_gen][:n_ref],
                "prompt_text": prompts[i],
                "reference_text": f"{prompts[i]} {continuations[i]}",
                "generated_text": decode_text(ids),
            }
        )
    return examples


@gin.configurable
def speech_samples(
    *,
    model: Any,
    params: Any,
    model_dir: str,
    step: int,
    writer: Any = None,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    splits: Sequence[str] = ("validation",),
    num_examples: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """Generates speech for a few validation prompts; writes WAVs, a PNG and TensorBoard media.

    Every process must call it (the decode is one jitted program over the run's parameters);
    only process 0 writes files and events.

    Args:
      model, params: the model being trained and its current parameters.
      model_dir: samples go to `<model_dir>/samples/step_<step>/`.
      step: the training step (TensorBoard step and folder name).
      writer: a `metrics.MetricsLogger` (or a clu writer); None writes files only.
      mixture_or_task_name, task_feature_lengths: the task and lengths the run trains on.
      splits: splits to sample from (the first `num_examples` examples of each, in order).
      num_examples: prompts per split (the decode batch).
      seed: pre-net dropout / sampling seed of the decode.

    Returns:
      `<split>/exact_match` (free-running transcript vs reference) and `<split>/dtw_l1`
      (generated vs reference continuation) over the sampled examples.
    """
    from spectron_jax.train import seqio_dataset_fn

    vocab = task_vocabulary(mixture_or_task_name)
    config = model.config
    figures: dict[str, float] = {}
    directory = os.path.join(model_dir, "samples", f"step_{step}")
    for split in splits:
        make = seqio_dataset_fn(
            mixture_or_task_name,
            task_feature_lengths,
            num_examples,
            split=split,
            shuffle=False,
            repeat=False,
        )
        batch = next(iter(make(0, 1, seed, 0)), None)
        if batch is None:
            raise ValueError(f"speech_samples: split {split!r} of {mixture_or_task_name} is empty")
        samples = decode_batch(model, params, batch, vocab.decode, seed)
        figures[f"{split}/exact_match"] = float(
            np.mean(
                [
                    normalize_text(s["generated_text"]) == normalize_text(s["reference_text"])
                    for s in samples
                ]
            )
        )
        figures[f"{split}/dtw_l1"] = float(
            np.mean([dtw_l1(s["generated"], s["reference"]) for s in samples])
        )
        if jax.process_index() != 0:
            continue
        media = write_samples(
            samples, directory, split, config.spectrogram, config.encoder_front_end == "log_mel"
        )
        if writer is not None:
            w = getattr(writer, "writer", writer)
            w.write_images(step, {f"samples/{split}/spectrograms": media["image"][None]})
            w.write_audios(
                step,
                {f"samples/{split}/generated": media["audio"]},
                sample_rate=config.spectrogram.sample_rate,
            )
            w.write_texts(
                step,
                {
                    f"samples/{split}/transcripts": "  \n".join(
                        f"{s['generated_text']!r} (reference {s['reference_text']!r})"
                        for s in samples
                    )
                },
            )
    logger.info("speech samples @ %d written to %s", step, directory)
    return figures

"""Speech samples while training: generated continuations as spectrogram images and audio.

`SpeechSamples` is an evaluator of `train.train` (gin/runs/pretrain.gin): every `every` steps
and after the last step it decodes the first `num_examples` prompts of a validation split
free-running (greedy transcript and continuation, then `reduction_factor` frames per step for
the reference continuation's duration), and writes

  <model_dir>/samples/step_<N>/<split>-<i>-{reference,generated}.wav   (Griffin-Lim)
  <model_dir>/samples/step_<N>/<split>-spectrograms.png               (prompt | continuation)
  TensorBoard: images `samples/<split>/spectrograms`, audio `samples/<split>/generated`,
               scalars `samples/<split>/{exact_match,dtw_l1}` (over these few examples).

`decode_batch` and `write_samples` are shared with corpus-specific evaluators (the tiny run's
`spectron_tasks.counting_evaluation`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np

from spectron_jax import data
from spectron_jax.evaluation import plots
from spectron_jax.evaluation.metrics import dtw_l1, normalize_text
from spectron_jax.interfaces import EvalContext

logger = logging.getLogger(__name__)


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
    from spectron_jax.audio.griffin_lim import GriffinLimVocoder
    from spectron_jax.audio.io import write_wav

    os.makedirs(directory, exist_ok=True)
    vocoder = GriffinLimVocoder(spectrogram_config)
    audios, rows = [], []
    for i, s in enumerate(samples):
        row = {f"{kind}_text": s[f"{kind}_text"] for kind in ("reference", "generated")}
        for kind in ("reference", "generated"):
            frames = np.asarray(s[kind], np.float32)
            if prompt_is_log_mel:
                frames = np.concatenate([np.asarray(s["prompt_features"], np.float32), frames])
            wave = np.asarray(vocoder(frames))
            wave = wave / max(1.0, float(np.abs(wave).max()) / 0.95)
            write_wav(
                os.path.join(directory, f"{split}-{i}-{kind}.wav"),
                wave,
                spectrogram_config.sample_rate,
            )
            if kind == "generated":
                audios.append(wave)
            row[kind] = frames
        rows.append(row)
    prompt_frames = [len(s["prompt_features"]) for s in samples] if prompt_is_log_mel else None
    image = plots.sample_grid_png(
        os.path.join(directory, f"{split}-spectrograms.png"), rows, prompt_frames
    )
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
        bos_id=model.bos_id,
        eos_id=model.eos_id,
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


def write_media(
    writer: Any, step: int, prefix: str, media: Mapping[str, np.ndarray], sample_rate: int
) -> None:
    """`write_samples`' image and audio to TensorBoard as `<prefix>/spectrograms|generated`.

    `writer` is a `summaries.MetricsLogger` or a clu metric writer (None: nothing is written).
    """
    if writer is None:
        return
    w = getattr(writer, "writer", writer)
    w.write_images(step, {f"{prefix}/spectrograms": media["image"][None]})
    w.write_audios(step, {f"{prefix}/generated": media["audio"]}, sample_rate=sample_rate)


def sample_figures(samples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """`exact_match` (free-running transcript vs reference) and `dtw_l1` (generated vs
    reference continuation), each a mean over the samples."""
    exact = [
        normalize_text(s["generated_text"]) == normalize_text(s["reference_text"]) for s in samples
    ]
    return {
        "exact_match": float(np.mean(exact)),
        "dtw_l1": float(np.mean([dtw_l1(s["generated"], s["reference"]) for s in samples])),
    }


@gin.configurable
class SpeechSamples:
    """Generated speech for a few validation prompts: WAVs, a PNG and TensorBoard media.

    Every process must run it (the decode is one jitted program over the run's parameters);
    only process 0 writes files and events.

    Attributes:
      mixture_or_task_name, task_feature_lengths: the task and lengths the run trains on.
      splits: splits to sample from (the first `num_examples` examples of each, in order).
      num_examples: prompts per split (the decode batch).
      seed: pre-net dropout / sampling seed of the decode.
      every: steps between samples; 0 = only after the last step.
      name: TensorBoard prefix of the figures and media.
    """

    def __init__(
        self,
        mixture_or_task_name: str = gin.REQUIRED,
        task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
        splits: Sequence[str] = ("validation",),
        num_examples: int = 4,
        seed: int = 0,
        every: int = 1000,
        name: str = "samples",
    ):
        self.mixture_or_task_name = mixture_or_task_name
        self.task_feature_lengths = dict(task_feature_lengths)
        self.splits = tuple(splits)
        self.num_examples = num_examples
        self.seed = seed
        self.every = every
        self.name = name

    def first_batch(self, model: Any, split: str) -> Mapping[str, Any]:
        """The first `num_examples` examples of `split`, laid out by the model's converter."""
        make = data.seqio_dataset_fn(
            self.mixture_or_task_name,
            self.task_feature_lengths,
            self.num_examples,
            model=model,
            split=split,
            shuffle=False,
            repeat=False,
        )
        batch = next(iter(make(0, 1, self.seed, 0)), None)
        if batch is None:
            raise ValueError(
                f"SpeechSamples: split {split!r} of {self.mixture_or_task_name} is empty"
            )
        return batch

    def run(self, context: EvalContext) -> dict[str, float]:
        """Samples every split at `context.step` into `<model_dir>/samples/step_<step>/`.

        Returns:
          `<split>/exact_match` and `<split>/dtw_l1` over the sampled examples.
        """
        model, step = context.model, context.step
        config = model.config
        figures: dict[str, float] = {}
        directory = os.path.join(context.model_dir, "samples", f"step_{step}")
        for split in self.splits:
            batch = self.first_batch(model, split)
            samples = decode_batch(model, context.params, batch, model.vocabulary.decode, self.seed)
            figures.update({f"{split}/{k}": v for k, v in sample_figures(samples).items()})
            if jax.process_index() != 0:
                continue
            media = write_samples(
                samples, directory, split, config.spectrogram, config.encoder_front_end == "log_mel"
            )
            prefix = f"{self.name}/{split}"
            write_media(context.writer, step, prefix, media, config.spectrogram.sample_rate)
            if context.writer is not None:
                transcripts = "  \n".join(
                    f"{s['generated_text']!r} (reference {s['reference_text']!r})" for s in samples
                )
                w = getattr(context.writer, "writer", context.writer)
                w.write_texts(step, {f"{prefix}/transcripts": transcripts})
        logger.info("speech samples @ %d written to %s", step, directory)
        return figures

"""The tiny run's end-of-run evaluation on the counting corpora (`synthetic_counting`), and
its samples: the figures its targets are set in, beside the corpus they belong to.

On each evaluation split (training voices `validation`, and `validation_unseen_voices`):

  (a) `first_word_accuracy`: the first word of the free-running greedy transcript equals the
      prompt's first number word. Every later word is "previous + 1", so this is the one word
      that shows real recognition.
  (b) `exact_match`: the whole free-running greedy transcript (prompt and continuation) equals
      the reference, after `normalize_text`.
  (c) teacher-forced continuation spectrogram L1 (`tf_l1`, ground-truth text and frames fed)
      next to two baselines on the same frames: always predicting the mean training frame
      (`tf_l1_mean_frame`) and copying the previous frame group (`tf_l1_copy_previous`; the first
      group, which has no previous one, gets the mean frame). Ratios: `tf_l1_ratio_mean` and
      `tf_l1_ratio_copy`.
  (d) free-running: the continuation generated after the generated text, for the reference's
      duration, against the reference with `dtw_l1` (alignment-tolerant), next to the DTW-L1 of
      the mean frame (`dtw_l1_mean_frame`).
  (e) with a stop head, self-stopped: the same decode ended by the stop logit (at most the
      batch's frame slots) and not cut: `dtw_l1_stopped` against the reference, the length
      error in frames (`length_error_frames_mae`, `length_error_frames_mean`, > 0 = too long)
      and `hit_max_fraction`, the examples that ran to the maximum without stopping.

L1 figures are pooled: mean |pred - target| over mel bins and every valid frame of the split.
`CountingEvaluator` (gin-configurable, an evaluator of `train.train` run once after the last
step) computes all of this, prints the figures next to `CountingTargets`, writes
`final_eval.json`, and writes Griffin-Lim WAVs and a spectrogram PNG of a few prompts to
`<model_dir>/samples` (and to TensorBoard).

Not imported by `spectron_tasks/__init__.py`: it imports the evaluation package, whose data
module imports `spectron_tasks` (gin files import it by name).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from spectron_jax import data
from spectron_jax.evaluation.metrics import dtw_l1, normalize_text
from spectron_jax.evaluation.runner import length_figures
from spectron_jax.evaluation.samples import decode_batch, write_media, write_samples
from spectron_jax.interfaces import EvalContext

logger = logging.getLogger(__name__)

DEFAULT_SPLITS = ("validation", "validation_unseen_voices")
UNSEEN_SPLIT = "validation_unseen_voices"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CountingTargets:
    """The figures the tiny run must reach (docs/RESULTS.md); `unseen` = unseen voices.

    Attributes:
      first_word: minimum first-number recognition accuracy.
      exact_match: minimum free-running transcript exact match.
      tf_l1_ratio: maximum teacher-forced L1 / mean-frame L1 (and tf_l1 < copy-previous L1).
    """

    first_word: float = 0.98
    exact_match: float = 0.95
    tf_l1_ratio: float = 0.42
    first_word_unseen: float = 0.90
    exact_match_unseen: float = 0.90
    tf_l1_ratio_unseen: float = 0.60

    def for_split(self, split: str) -> dict[str, float]:
        unseen = split == UNSEEN_SPLIT
        return {
            "first_word_accuracy": self.first_word_unseen if unseen else self.first_word,
            "exact_match": self.exact_match_unseen if unseen else self.exact_match,
            "tf_l1_ratio_mean": self.tf_l1_ratio_unseen if unseen else self.tf_l1_ratio,
        }


# ------------------------------------------------------------------------------------------------
# The figures (numpy; tests feed hand-made predictions).
# ------------------------------------------------------------------------------------------------


def first_word(text: str) -> str:
    """The first word of `normalize_text(text)`; "" for empty text."""
    words = normalize_text(text).split()
    return words[0] if words else ""


def _check_texts(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        raise ValueError("no examples")


def first_word_accuracy(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of examples whose hypothesis starts with the reference's first word."""
    _check_texts(hypotheses, references)
    hits = [
        first_word(h) == first_word(r) != "" for h, r in zip(hypotheses, references, strict=True)
    ]
    return float(np.mean(hits))


def exact_match_accuracy(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of examples whose normalised hypothesis equals the normalised reference."""
    _check_texts(hypotheses, references)
    hits = [
        normalize_text(h) == normalize_text(r) for h, r in zip(hypotheses, references, strict=True)
    ]
    return float(np.mean(hits))


def _mask3(mask: np.ndarray) -> np.ndarray:
    return (np.asarray(mask) > 0).astype(np.float64)[..., None]


def mean_frame(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float[B, T, M], int[B, T] -> float64[M]: the mean over valid frames."""
    m = _mask3(mask)
    count = m.sum()
    if count == 0:
        raise ValueError("no valid frames to average")
    return (np.asarray(frames, np.float64) * m).sum((0, 1)) / count


def pooled_l1(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Mean |pred - target| over mel bins and all valid frames: float[B, T, M] x2, [B, T]."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"expected float[B, T, M] of one shape, got {pred.shape}, {target.shape}")
    m = np.asarray(mask) > 0
    if not m.any():
        raise ValueError("no valid frames")
    return float(np.abs(pred - target).mean(-1)[m].mean())


def copy_previous_group(target: np.ndarray, reduction_factor: int, fill: np.ndarray) -> np.ndarray:
    """The copy-previous-group baseline: frame t predicted by frame t - r.

    Args:
      target: float[B, T, M] reference frames (T a multiple of `reduction_factor`).
      reduction_factor: r, frames per decoder step (the model sees group j - 1 at slot j).
      fill: float[M] prediction of the first group, which has no previous group.

    Returns:
      float64[B, T, M].
    """
    r = reduction_factor
    target = np.asarray(target, np.float64)
    out = np.empty_like(target)
    out[:, :r] = np.asarray(fill, np.float64)
    out[:, r:] = target[:, :-r]
    return out


def teacher_forced_figures(
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    mean: np.ndarray,
    reduction_factor: int,
) -> dict[str, float]:
    """(c): model L1, mean-frame L1, copy-previous-group L1 and the two ratios (pooled)."""
    l1 = pooled_l1(pred, target, mask)
    l1_mean = pooled_l1(np.broadcast_to(mean, np.shape(target)), target, mask)
    l1_copy = pooled_l1(copy_previous_group(target, reduction_factor, mean), target, mask)
    return {
        "tf_l1": l1,
        "tf_l1_mean_frame": l1_mean,
        "tf_l1_copy_previous": l1_copy,
        "tf_l1_ratio_mean": l1 / l1_mean,
        "tf_l1_ratio_copy": l1 / l1_copy,
    }


def dtw_figures(
    generated: Sequence[np.ndarray], references: Sequence[np.ndarray], mean: np.ndarray
) -> dict[str, float]:
    """(d): mean `dtw_l1` of generated vs reference continuations, and of the mean frame.

    Args:
      generated: float[T_i, M] per example (free-running continuations).
      references: float[T'_i, M] per example.
      mean: float[M] the mean training frame (repeated for the reference's length).
    """
    if len(generated) != len(references) or not references:
        raise ValueError(f"{len(generated)} generated vs {len(references)} references")
    model = [dtw_l1(g, r) for g, r in zip(generated, references, strict=True)]
    base = [dtw_l1(np.broadcast_to(mean, np.shape(r)), r) for r in references]
    return {
        "dtw_l1": float(np.mean(model)),
        "dtw_l1_mean_frame": float(np.mean(base)),
        "dtw_l1_ratio_mean": float(np.mean(model) / np.mean(base)),
    }


def check_targets(figures: Mapping[str, float], split: str, targets: CountingTargets) -> list[str]:
    """Names of the targets a split's figures miss ([] = all met)."""
    missed = []
    want = targets.for_split(split)
    for name in ("first_word_accuracy", "exact_match"):
        if not figures[name] >= want[name]:
            missed.append(f"{split}/{name} {figures[name]:.3f} < {want[name]}")
    if not figures["tf_l1_ratio_mean"] <= want["tf_l1_ratio_mean"]:
        missed.append(
            f"{split}/tf_l1_ratio_mean {figures['tf_l1_ratio_mean']:.3f} > "
            f"{want['tf_l1_ratio_mean']}"
        )
    if not figures["tf_l1"] < figures["tf_l1_copy_previous"]:
        missed.append(f"{split}/tf_l1 not below copy-previous-group L1")
    return missed


def format_report(
    figures: Mapping[str, Mapping[str, float]], targets: CountingTargets, step: int
) -> str:
    """A table of every split's figures with the targets beside them."""
    lines = [f"Counting evaluation at step {step} (free-running = greedy, no teacher forcing)"]
    rows = [
        ("first-number recognition", "first_word_accuracy", ">= {:.0%}", "{:.1%}"),
        ("transcript exact match", "exact_match", ">= {:.0%}", "{:.1%}"),
        ("teacher-forced L1", "tf_l1", "", "{:.4f}"),
        ("  mean-frame L1", "tf_l1_mean_frame", "", "{:.4f}"),
        ("  copy-previous-group L1", "tf_l1_copy_previous", "", "{:.4f}"),
        ("  L1 / mean-frame L1", "tf_l1_ratio_mean", "<= {:.2f}x", "{:.3f}x"),
        ("  L1 / copy-previous L1", "tf_l1_ratio_copy", "< 1.00x", "{:.3f}x"),
        ("free-running DTW-L1", "dtw_l1", "", "{:.4f}"),
        ("  mean-frame DTW-L1", "dtw_l1_mean_frame", "", "{:.4f}"),
        ("self-stopped DTW-L1 (uncut)", "dtw_l1_stopped", "", "{:.4f}"),
        ("  length error |gen - ref|, frames", "length_error_frames_mae", "", "{:.2f}"),
        ("  length error gen - ref, frames", "length_error_frames_mean", "", "{:+.2f}"),
        ("  ran to the maximum, no stop", "hit_max_fraction", "", "{:.1%}"),
    ]
    for split, figs in figures.items():
        want = targets.for_split(split)
        lines.append(f"  {split} ({int(figs.get('num_examples', 0))} examples)")
        for label, key, target_fmt, fmt in rows:
            if key not in figs:
                continue
            target = target_fmt.format(want[key]) if "{" in target_fmt else target_fmt
            lines.append(f"    {label:<28} {fmt.format(figs[key]):>10}   {target}")
        missed = check_targets(figs, split, targets)
        lines.append("    targets: " + ("all met" if not missed else "MISSED " + "; ".join(missed)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Running the model.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _teacher_forced_fn(module: Any):
    def fn(params, batch, rng):
        _, frames, _ = module.apply(
            {"params": params}, batch, deterministic=True, rngs={"dropout": rng}
        )
        return frames

    return jax.jit(fn)


def teacher_forced_frames(model: Any, params: Any, batch: Mapping[str, Any], seed: int = 0):
    """float32[B, T_f, n_mels]: post-net frames with the ground-truth text and frames fed."""
    inputs = {k: jnp.asarray(v) for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
    return np.asarray(_teacher_forced_fn(model.module)(params, inputs, jax.random.PRNGKey(seed)))


def self_stopped_batch(
    model: Any, params: Any, batch: Mapping[str, Any], seed: int = 0, threshold: float = 0.5
) -> list[dict[str, Any]]:
    """Free-running greedy decoding ended by the stop logit, one dict per example.

    The options are `samples.decode_batch`'s (so the compiled program is shared) with the stop
    logit on: a row ends after the first group whose stop probability exceeds `threshold`, or
    at the batch's `target_frames` length.

    Returns:
      Per example: `generated` float32[T_i, n_mels] (uncut), `generated_frames` T_i,
      `reference_frames` (valid frames of the reference) and `stopped`.
    """
    from spectron_jax.decoding import DecodeConfig, generate

    batch = {k: np.asarray(v) for k, v in batch.items()}
    config = DecodeConfig.for_model(
        model,
        max_text_tokens=batch["decoder_target_tokens"].shape[1] + 4,
        max_frames=batch["target_frames"].shape[1],
        stop_threshold=threshold,
        seed=seed,
    )
    out = jax.device_get(generate(model, params, batch, config))
    examples = []
    for i, n_gen in enumerate(np.asarray(out["frame_lengths"])):
        examples.append(
            {
                "generated": np.asarray(out["frames"][i, : int(n_gen)]),
                "generated_frames": int(n_gen),
                "reference_frames": int(batch["frame_mask"][i].sum()),
                "stopped": bool(out["stopped"][i]),
            }
        )
    return examples


def self_stopped_figures(
    examples: Sequence[Mapping[str, Any]],
    references: Sequence[np.ndarray],
    num_dtw_examples: int,
) -> dict[str, float]:
    """(e): `dtw_l1_stopped` over the first `num_dtw_examples` and the length figures.

    Args:
      examples: `self_stopped_batch` outputs, one per example.
      references: float[T'_i, M] reference continuations, aligned with `examples`.
      num_dtw_examples: examples of the DTW figure.
    """
    if len(examples) != len(references) or not examples:
        raise ValueError(f"{len(examples)} self-stopped vs {len(references)} references")
    pairs = zip(examples[:num_dtw_examples], references[:num_dtw_examples], strict=True)
    dtw = [dtw_l1(ex["generated"], ref) for ex, ref in pairs]
    return {
        "dtw_l1_stopped": float(np.mean(dtw)),
        **length_figures(
            [ex["generated_frames"] for ex in examples],
            [ex["reference_frames"] for ex in examples],
            [ex["stopped"] for ex in examples],
        ),
    }


def evaluate_split(
    model: Any,
    params: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    decode_text: Callable[[list[int]], str],
    mean: np.ndarray,
    *,
    max_examples: int,
    num_dtw_examples: int,
    num_samples: int,
    seed: int = 0,
    stop_threshold: float = 0.5,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """All figures of one split, and the first `num_samples` examples for WAVs/PNG.

    (e) needs a second decode of each batch, with the stop logit; it runs only for a model with
    a stop head, at `stop_threshold`.

    Returns:
      (figures, samples): samples hold `prompt_features`, `reference`, `generated` frames and
      the reference / generated texts.
    """

    r = model.config.reduction_factor
    hyps, refs, prompts = [], [], []
    tf_pred, tf_target, tf_mask = [], [], []
    gen_frames, ref_frames, samples, stopped = [], [], [], []
    n = 0
    for batch in batches:
        if n >= max_examples:
            break
        batch = {k: np.asarray(v) for k, v in batch.items()}
        tf_pred.append(teacher_forced_frames(model, params, batch, seed))
        tf_target.append(batch["target_frames"])
        tf_mask.append(batch["frame_mask"])
        examples = decode_batch(model, params, batch, decode_text, seed)
        for ex in examples:
            hyps.append(ex["generated_text"])
            refs.append(ex["reference_text"])
            prompts.append(ex["prompt_text"])
            gen_frames.append(ex["generated"])
            ref_frames.append(ex["reference"])
        samples.extend(examples[: num_samples - len(samples)])
        n += len(examples)
        if model.config.stop_head:
            stopped.extend(self_stopped_batch(model, params, batch, seed, stop_threshold))
    if not n:
        raise ValueError("the evaluation split gave no batches")
    mask = np.concatenate(tf_mask)
    figures = {
        "num_examples": float(len(hyps)),
        "first_word_accuracy": first_word_accuracy(hyps, prompts),
        "exact_match": exact_match_accuracy(hyps, refs),
        **teacher_forced_figures(np.concatenate(tf_pred), np.concatenate(tf_target), mask, mean, r),
        **dtw_figures(gen_frames[:num_dtw_examples], ref_frames[:num_dtw_examples], mean),
    }
    if stopped:
        figures.update(self_stopped_figures(stopped, ref_frames, num_dtw_examples))
    wrong = [
        (h, t) for h, t in zip(hyps, refs, strict=True) if normalize_text(h) != normalize_text(t)
    ]
    for h, t in wrong[:5]:
        logger.info("transcript mismatch: %r (reference %r)", h, t)
    return figures, samples


# ------------------------------------------------------------------------------------------------
# The evaluator.
# ------------------------------------------------------------------------------------------------


def mean_training_frame(
    train_dataset_fn: Callable[..., Iterable[Mapping[str, Any]]], seed: int, num_batches: int
) -> np.ndarray:
    """float64[n_mels]: the mean valid frame of the first `num_batches` training batches (the
    baselines' prediction)."""
    batches = list(itertools.islice(train_dataset_fn(0, 1, seed, 0), num_batches))
    frames = np.concatenate([b["target_frames"] for b in batches])
    masks = np.concatenate([b["frame_mask"] for b in batches])
    return mean_frame(frames, masks)


@gin.configurable
class CountingEvaluator:
    """The counting figures on every split, once after the last step (`train.evaluators`).

    Attributes:
      mixture_or_task_name, task_feature_lengths: the task and lengths the run trained on.
      splits: evaluation splits.
      batch_size: evaluation batch (divide the split size by it: the last partial batch is
        dropped).
      max_examples: examples per split.
      mean_frame_batches: training batches averaged for the mean frame.
      num_dtw_examples: examples of (d) per split (DTW is O(T^2) in Python).
      num_samples: examples per split written as WAVs and drawn in the PNG.
      targets: printed beside the figures; default `CountingTargets()`.
      stop_threshold: stop probability that ends the self-stopped decode (stop-head models).
      every: steps between evaluations; 0 = only after the last step.
      name: TensorBoard prefix of the figures and media.
    """

    def __init__(
        self,
        mixture_or_task_name: str = gin.REQUIRED,
        task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
        splits: Sequence[str] = DEFAULT_SPLITS,
        batch_size: int = 50,
        max_examples: int = 200,
        mean_frame_batches: int = 8,
        num_dtw_examples: int = 64,
        num_samples: int = 4,
        targets: CountingTargets | None = None,
        every: int = 0,
        name: str = "final",
        stop_threshold: float = 0.5,
    ):
        self.mixture_or_task_name = mixture_or_task_name
        self.task_feature_lengths = dict(task_feature_lengths)
        self.splits = tuple(splits)
        self.batch_size = batch_size
        self.max_examples = max_examples
        self.mean_frame_batches = mean_frame_batches
        self.num_dtw_examples = num_dtw_examples
        self.num_samples = num_samples
        self.targets = targets or CountingTargets()
        self.every = every
        self.name = name
        self.stop_threshold = stop_threshold

    def split_batches(self, model: Any, split: str, seed: int) -> Iterable[Mapping[str, Any]]:
        """The split in order, once, laid out by the model's feature converter."""
        make = data.seqio_dataset_fn(
            self.mixture_or_task_name,
            self.task_feature_lengths,
            self.batch_size,
            model=model,
            split=split,
            shuffle=False,
            repeat=False,
        )
        return make(0, 1, seed, 0)

    def run(self, context: EvalContext) -> dict[str, float]:
        """Every split's figures at `context.step`; writes `final_eval.json` and the samples.

        The mean training frame comes from `context.train_dataset_fn`; decoding and pre-net
        dropout use `context.seed`; texts are decoded with the model's vocabulary.

        Returns:
          Flat figures, `<split>/<name>`.
        """
        if context.train_dataset_fn is None:
            raise ValueError("CountingEvaluator needs the run's train_dataset_fn (mean frame)")
        model, seed = context.model, context.seed
        mean = mean_training_frame(context.train_dataset_fn, seed, self.mean_frame_batches)
        per_split: dict[str, dict[str, float]] = {}
        for split in self.splits:
            figures, samples = evaluate_split(
                model,
                context.params,
                self.split_batches(model, split, seed),
                model.vocabulary.decode,
                mean,
                max_examples=self.max_examples,
                num_dtw_examples=self.num_dtw_examples,
                num_samples=self.num_samples,
                seed=seed,
                stop_threshold=self.stop_threshold,
            )
            per_split[split] = figures
            if samples and jax.process_index() == 0:
                self.write_samples(context, split, samples)
        if jax.process_index() == 0:
            self.write_report(context.model_dir, context.step, per_split)
        return {f"{split}/{k}": v for split, figs in per_split.items() for k, v in figs.items()}

    def write_samples(
        self, context: EvalContext, split: str, samples: Sequence[Mapping[str, Any]]
    ) -> None:
        """WAVs and a PNG in `<model_dir>/samples`, and the same media in TensorBoard."""
        config = context.model.config
        media = write_samples(
            samples,
            os.path.join(context.model_dir, "samples"),
            split,
            config.spectrogram,
            config.encoder_front_end == "log_mel",
        )
        write_media(
            context.writer,
            context.step,
            f"{self.name}/{split}",
            media,
            config.spectrogram.sample_rate,
        )

    def write_report(
        self, model_dir: str, step: int, per_split: Mapping[str, Mapping[str, float]]
    ) -> None:
        """Prints the figures beside the targets and writes them to `final_eval.json`."""
        print(format_report(per_split, self.targets, step), flush=True)
        with open(os.path.join(model_dir, "final_eval.json"), "w", encoding="utf-8") as f:
            json.dump(
                {"step": step, "figures": per_split, "targets": dataclasses.asdict(self.targets)},
                f,
                indent=1,
            )

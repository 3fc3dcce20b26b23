"""End-of-run figures for counting tasks (the embedded default run), and its samples.

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

L1 figures are pooled: mean |pred - target| over mel bins and every valid frame of the split.
`counting_evaluation` (gin-configurable) runs all of this at the end of `train.train` (its
`final_eval_fn`), prints the figures next to `CountingTargets`, writes `final_eval.json`, and
writes Griffin-Lim WAVs and a spectrogram PNG of a few prompts to `<model_dir>/samples`
(and to TensorBoard).
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

import jax
import jax.numpy as jnp
import numpy as np

import gin
from spectron_jax.evaluation.metrics import dtw_l1, normalize_text
from spectron_jax.evaluation.samples import decode_batch, task_vocabulary, write_samples

logger = logging.getLogger(__name__)

DEFAULT_SPLITS = ("validation", "validation_unseen_voices")
UNSEEN_SPLIT = "validation_unseen_voices"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CountingTargets:
    """The figures the embedded default run must reach (issue 4); `unseen` = unseen voices.

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
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """All figures of one split, and the first `num_samples` examples for WAVs/PNG.

    Returns:
      (figures, samples): samples hold `prompt_features`, `reference`, `generated` frames and
      the reference / generated texts.
    """

    r = model.config.reduction_factor
    hyps, refs, prompts = [], [], []
    tf_pred, tf_target, tf_mask = [], [], []
    gen_frames, ref_frames, samples = [], [], []
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
    wrong = [
        (h, t) for h, t in zip(hyps, refs, strict=True) if normalize_text(h) != normalize_text(t)
    ]
    for h, t in wrong[:5]:
        logger.info("transcript mismatch: %r (reference %r)", h, t)
    return figures, samples


@gin.configurable
def counting_evaluation(
    *,
    model: Any,
    params: Any,
    model_dir: str,
    step: int,
    train_dataset_fn: Callable[..., Iterable[Mapping[str, Any]]],
    seed: int = 0,
    writer: Any = None,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    splits: Sequence[str] = DEFAULT_SPLITS,
    batch_size: int = 50,
    max_examples: int = 200,
    mean_frame_batches: int = 8,
    num_dtw_examples: int = 64,
    num_samples: int = 4,
    targets: CountingTargets | None = None,
) -> dict[str, float]:
    """The end-of-run counting figures on every split (a `train.final_eval_fn`).

    Args:
      model, params: the trained model and its parameters.
      model_dir: `final_eval.json` and `samples/` go here.
      step: the step the figures belong to.
      train_dataset_fn: the run's training batches; the first `mean_frame_batches` give the
        mean training frame of the baselines.
      seed: decoding / pre-net dropout seed.
      writer: a `metrics.MetricsLogger` for TensorBoard images and audio (optional).
      mixture_or_task_name, task_feature_lengths: the task and lengths the run trained on.
      splits: evaluation splits.
      batch_size: evaluation batch (divide the split size by it: the last partial batch is
        dropped).
      max_examples: examples per split.
      mean_frame_batches: training batches averaged for the mean frame.
      num_dtw_examples: examples of (d) per split (DTW is O(T^2) in Python).
      num_samples: examples per split written as WAVs and drawn in the PNG.
      targets: printed beside the figures; default `CountingTargets()`.

    Returns:
      Flat figures, `<split>/<name>`.
    """
    from spectron_jax.train import seqio_dataset_fn

    targets = targets or CountingTargets()
    vocab = task_vocabulary(mixture_or_task_name)
    train_batches = itertools.islice(train_dataset_fn(0, 1, seed, 0), mean_frame_batches)
    train_batches = list(train_batches)
    frames = [b["target_frames"] for b in train_batches]
    masks = [b["frame_mask"] for b in train_batches]
    mean = mean_frame(np.concatenate(frames), np.concatenate(masks))

    config = model.config
    is_log_mel = config.encoder_front_end == "log_mel"
    per_split: dict[str, dict[str, float]] = {}
    sample_dir = os.path.join(model_dir, "samples")
    for split in splits:
        make = seqio_dataset_fn(
            mixture_or_task_name,
            task_feature_lengths,
            batch_size,
            split=split,
            shuffle=False,
            repeat=False,
        )
        figures, samples = evaluate_split(
            model,
            params,
            make(0, 1, seed, 0),
            vocab.decode,
            mean,
            max_examples=max_examples,
            num_dtw_examples=num_dtw_examples,
            num_samples=num_samples,
            seed=seed,
        )
        per_split[split] = figures
        if samples and jax.process_index() == 0:
            media = write_samples(samples, sample_dir, split, config.spectrogram, is_log_mel)
            if writer is not None:
                w = getattr(writer, "writer", writer)
                w.write_images(step, {f"final/{split}/spectrograms": media["image"][None]})
                w.write_audios(
                    step,
                    {f"final/{split}/generated": media["audio"]},
                    sample_rate=config.spectrogram.sample_rate,
                )
    report = format_report(per_split, targets, step)
    if jax.process_index() == 0:
        print(report, flush=True)
        with open(os.path.join(model_dir, "final_eval.json"), "w", encoding="utf-8") as f:
            json.dump(
                {"step": step, "figures": per_split, "targets": dataclasses.asdict(targets)},
                f,
                indent=1,
            )
    return {f"{split}/{k}": v for split, figs in per_split.items() for k, v in figs.items()}

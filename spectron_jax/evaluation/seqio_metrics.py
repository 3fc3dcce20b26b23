"""seqio metrics of the Spectron tasks: what `t5x.eval` and train-time `infer_eval` report.

seqio decodes the model's predicted ids (transcript then continuation, no separator) with the
task's vocabulary and hands each prediction and its example to the task's `postprocess_fn`;
targets go the same way with `is_target=True`. `postprocess` turns both into
`{"transcript", "continuation"}` (a prediction is cut at its word alignment with the example's
prompt words, `evaluation.text.split_text`), and the metric functions score lists of them:

  text_metrics   transcript WER and exact match (what the model heard), continuation WER,
                 word accuracy and exact match (what it went on to say);
  qa_metrics     the transcript's, and the paper's spoken-QA match: the reference answer occurs
                 in the generated answer (`metrics.qa_match`);
  frame_metrics  the generated frames (aux of `predict_with_aux`: `frames`, `frame_lengths`)
                 against the example's `continuation_frames`: DTW-L1 in log-mel units and the
                 length ratio. seqio runs it on its own decoding pass with aux (T5X's
                 evaluators decode once for the text metrics and once more for these).

Evaluators read the targets from the field named by `TARGET_FIELD` (seqio's Evaluator and
T5X's infer default to "targets", which these tasks do not have: bind
`seqio.Evaluator.target_field_name` / `infer.output_vocab_feature_name` to it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spectron_jax.evaluation import metrics
from spectron_jax.evaluation.text import split_text

# The text feature seqio decodes targets and predictions with (its vocabulary is the task's).
TARGET_FIELD = "continuation_transcript"

Parts = Mapping[str, str]


def _text(value: Any) -> str:
    """An example's string feature (bytes from tf.data, or str) as str."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def postprocess(
    output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> dict[str, Any]:
    """A seqio `postprocess_fn`: target or prediction -> {"transcript", "continuation"} (and,
    for a target whose example has them, its reference "frames" float32[T, n_mels]).

    Args:
      output: the decoded text (a prediction, or the decoded target field).
      example: the task example (its `prompt_text` and `continuation_text`).
      is_target: True for the reference.

    Returns:
      The reference's two texts (from the example), or the prediction cut at its alignment with
      the example's prompt words.

    Raises:
      ValueError: without an example carrying `prompt_text` (nothing to cut the text at).
    """
    if example is None or "prompt_text" not in example:
        raise ValueError(
            "spectron postprocess needs the task example's prompt_text to cut the prediction "
            "into transcript and continuation"
        )
    prompt = _text(example["prompt_text"])
    continuation = _text(example.get("continuation_text", b""))
    if is_target:
        target: dict[str, Any] = {"transcript": prompt, "continuation": continuation}
        if "continuation_frames" in example:  # The reference speech, for frame_metrics.
            target["frames"] = np.asarray(example["continuation_frames"], np.float32)
        return target
    transcript, rest = split_text(_text(output), prompt_text=prompt, reference_rest=continuation)
    return {"transcript": transcript, "continuation": rest}


def _check(targets: Sequence[Parts], predictions: Sequence[Parts]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
    if not targets:
        raise ValueError("no examples to score")


def _exact(refs: Sequence[str], hyps: Sequence[str]) -> float:
    return float(
        np.mean(
            [
                metrics.normalize_text(r) == metrics.normalize_text(h)
                for r, h in zip(refs, hyps, strict=True)
            ]
        )
    )


def _transcript_metrics(targets: Sequence[Parts], predictions: Sequence[Parts]) -> dict:
    refs = [t["transcript"] for t in targets]
    hyps = [p["transcript"] for p in predictions]
    return {
        "transcript_wer": metrics.word_error_rate(refs, hyps),
        "transcript_exact_match": _exact(refs, hyps),
    }


def text_metrics(targets: Sequence[Parts], predictions: Sequence[Parts]) -> dict[str, float]:
    """seqio metric_fn (targets, predictions) of speech-continuation tasks.

    Returns fractions in [0, 1] (WERs may pass 1): transcript_wer, transcript_exact_match,
    continuation_wer, continuation_word_accuracy (mean per example, `metrics.word_accuracy`),
    continuation_exact_match.
    """
    _check(targets, predictions)
    refs = [t["continuation"] for t in targets]
    hyps = [p["continuation"] for p in predictions]
    out = _transcript_metrics(targets, predictions)
    out["continuation_wer"] = (
        metrics.word_error_rate(refs, hyps) if any(map(metrics.normalize_text, refs)) else 0.0
    )
    out["continuation_word_accuracy"] = float(
        np.mean([metrics.word_accuracy(r, h) for r, h in zip(refs, hyps, strict=True)])
    )
    out["continuation_exact_match"] = _exact(refs, hyps)
    return out


def qa_metrics(targets: Sequence[Parts], predictions: Sequence[Parts]) -> dict[str, float]:
    """seqio metric_fn (targets, predictions) of spoken question answering: transcript_wer,
    transcript_exact_match, and qa_accuracy (the reference answer found in the generated one)."""
    _check(targets, predictions)
    out = _transcript_metrics(targets, predictions)
    out["qa_accuracy"] = metrics.qa_accuracy(
        [p["continuation"] for p in predictions], [t["continuation"] for t in targets]
    )
    return out


def frame_metrics(
    targets: Sequence[Mapping[str, Any]],
    predictions: Sequence[Parts],
    aux_values: Mapping[str, Sequence[Any]],
) -> dict[str, float]:
    """seqio predict_with_aux metric_fn: generated vs reference frames.

    Args:
      targets: postprocessed targets with "frames" float32[T_ref, M].
      predictions: postprocessed predictions (unused: the frames come in aux).
      aux_values: {"frames": float[T_max, M] per example, "frame_lengths": int per example}.

    Returns:
      frame_dtw_l1: mean DTW-L1 (log-mel units, `metrics.dtw_l1`) over the examples that
        generated at least one frame; frame_length_ratio: mean generated / reference frames;
        frame_empty_fraction: the fraction that generated none.
    """
    _check(targets, predictions)
    if "frames" not in aux_values or any("frames" not in t for t in targets):
        raise ValueError(
            "frame_metrics needs aux 'frames' (predict_with_aux) and targets with reference "
            "frames (examples with continuation_frames)"
        )
    lengths = aux_values.get("frame_lengths", [len(f) for f in aux_values["frames"]])
    distances, ratios, empty = [], [], 0
    for target, frames, length in zip(targets, aux_values["frames"], lengths, strict=True):
        generated = np.asarray(frames, np.float32)[: int(length)]
        reference = np.asarray(target["frames"], np.float32)
        ratios.append(len(generated) / max(len(reference), 1))
        if len(generated) and len(reference):
            distances.append(metrics.dtw_l1(generated, reference))
        else:
            empty += 1
    return {
        "frame_dtw_l1": float(np.mean(distances)) if distances else float("nan"),
        "frame_length_ratio": float(np.mean(ratios)),
        "frame_empty_fraction": empty / len(targets),
    }

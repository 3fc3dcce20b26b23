"""Greedy-CTC word error rate of a stage-1 encoder on held-aside speech, as a `train` evaluator.

`CtcWerEvaluator` reads each `task:split` through the model's own `CtcFeatureConverter` (every
utterance gives its prompt half and its continuation half, as in training), decodes each row
greedily (`CtcEncoderModel.predict_batch_with_aux`) and scores the transcripts with
`evaluation.metrics.word_error_rate` (corpus WER over normalised text) against the labels the
row was built with. A split whose data folder is absent (FSDD on a machine without
`../shared/data/fsdd`) is skipped with the reason in the log and in the JSON report.

It sits beside `evaluation/` (it needs `data` and `evaluation.metrics`), above the model module
`ctc_encoder`, which stays importable without seqio.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from spectron_jax import data
from spectron_jax.evaluation.metrics import char_error_rate, word_error_rate
from spectron_jax.interfaces import EvalContext

logger = logging.getLogger(__name__)

# Held-aside speech: eSpeak NG voices never used in training, and FSDD takes 0-4 (recordings
# never trained on, by the same 6 real speakers whose takes 5-44 are the training split).
DEFAULT_SPLITS = (
    "spectron_synthetic_counting:validation_unseen_voices",
    "spectron_fsdd_counting:test",
)


def parse_split(spec: str) -> tuple[str, str]:
    """ "task:split" -> (task, split)."""
    task, sep, split = spec.partition(":")
    if not sep or not task or not split:
        raise ValueError(f"split {spec!r} is not 'task:split'")
    return task, split


@functools.lru_cache(maxsize=8)
def _greedy_fn(model: Any):
    return jax.jit(model.predict_batch_with_aux)


def decode_rows(
    model: Any, params: Any, batches: Iterable[Mapping[str, np.ndarray]], max_examples: int
) -> list[dict[str, str]]:
    """[{"reference", "hypothesis"}] for the first `max_examples` rows of `batches`.

    Both sides are decoded with `model.vocabulary`: the reference from the row's `ctc_labels`,
    the hypothesis from its greedy CTC ids.
    """
    rows: list[dict[str, str]] = []
    decode = model.vocabulary.decode
    for batch in batches:
        if len(rows) >= max_examples:
            break
        inputs = {k: jnp.asarray(batch[k]) for k in ("encoder_features", "encoder_mask")}
        ids, aux = _greedy_fn(model)(params, inputs)
        ids, lengths = np.asarray(ids), np.asarray(aux["lengths"])
        labels, label_mask = np.asarray(batch["ctc_labels"]), np.asarray(batch["ctc_label_mask"])
        for i in range(ids.shape[0]):
            rows.append(
                {
                    "reference": decode(labels[i][label_mask[i] > 0].tolist()),
                    "hypothesis": decode(ids[i, : lengths[i]].tolist()),
                }
            )
    return rows[:max_examples]


def score_rows(rows: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """`wer`, `cer` (corpus rates over normalised text), `exact_match` and `num_examples`."""
    if not rows:
        raise ValueError("the evaluation split gave no rows")
    refs = [r["reference"] for r in rows]
    hyps = [r["hypothesis"] for r in rows]
    exact = [" ".join(r.split()) == " ".join(h.split()) for r, h in zip(refs, hyps, strict=True)]
    return {
        "wer": word_error_rate(refs, hyps),
        "cer": char_error_rate(refs, hyps),
        "exact_match": float(np.mean(exact)),
        "num_examples": float(len(rows)),
    }


@gin.configurable
class CtcWerEvaluator:
    """Greedy CTC WER per held-aside split (TensorBoard `<name>/<task>/<split>/wer`, ...).

    Process 0 writes the figures, the skipped splits and the first `num_logged` transcripts of
    each split to `<model_dir>/<name>/step_<N>.json`.

    Attributes:
      task_feature_lengths: the lengths the run trains with (rows longer than them are dropped
        by the converter, as in training).
      splits: "task:split" names.
      batch_size: rows per decoded batch (the last partial batch of a split is dropped).
      max_examples: rows per split.
      num_logged: transcripts per split in the JSON report.
      every: steps between evaluations; 0 = only after the last step.
      name: TensorBoard prefix.
    """

    def __init__(
        self,
        task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
        splits: Sequence[str] = DEFAULT_SPLITS,
        batch_size: int = 20,
        max_examples: int = 400,
        num_logged: int = 8,
        every: int = 0,
        name: str = "asr",
    ):
        self.task_feature_lengths = dict(task_feature_lengths)
        self.splits = tuple(splits)
        for spec in self.splits:
            parse_split(spec)
        self.batch_size = batch_size
        self.max_examples = max_examples
        self.num_logged = num_logged
        self.every = every
        self.name = name

    def split_rows(self, context: EvalContext, spec: str) -> list[dict[str, str]]:
        """The decoded rows of one split, in order.

        Raises:
          FileNotFoundError: the split's data folder is absent.
        """
        task, split = parse_split(spec)
        make = data.seqio_dataset_fn(
            task,
            self.task_feature_lengths,
            self.batch_size,
            model=context.model,
            split=split,
            shuffle=False,
            repeat=False,
        )
        batches = make(0, 1, context.seed, 0)
        return decode_rows(context.model, context.params, batches, self.max_examples)

    def run(self, context: EvalContext) -> dict[str, float]:
        """Figures `<task>/<split>/{wer,cer,exact_match,num_examples}` at `context.step`."""
        figures: dict[str, float] = {}
        report: dict[str, Any] = {"step": context.step, "splits": {}, "skipped": {}}
        for spec in self.splits:
            task, split = parse_split(spec)
            try:
                rows = self.split_rows(context, spec)
            except FileNotFoundError as err:
                reason = str(err).splitlines()[0]
                logger.warning("%s: skipping %s: %s", self.name, spec, reason)
                report["skipped"][spec] = reason
                continue
            scores = score_rows(rows)
            figures.update({f"{task}/{split}/{k}": v for k, v in scores.items()})
            report["splits"][spec] = {**scores, "examples": rows[: self.num_logged]}
            logger.info(
                "%s step %d %s: WER %.3f over %d rows (e.g. %r -> %r)",
                self.name,
                context.step,
                spec,
                scores["wer"],
                len(rows),
                rows[0]["reference"],
                rows[0]["hypothesis"],
            )
        if jax.process_index() == 0 and context.model_dir:
            directory = os.path.join(context.model_dir, self.name)
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"step_{context.step}.json"), "w") as f:
                json.dump(report, f, indent=1)
        return figures

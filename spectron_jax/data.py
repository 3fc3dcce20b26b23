"""Batches for training and evaluation: seqio tasks through the model's own feature converter.

A `DatasetFn` is `(shard_index, num_shards, seed, skip_batches) -> iterator of host batches`; it
must be deterministic for a seed, so that skipping `skip_batches` resumes exactly. The seqio one
here builds the feature converter from the model (`SpectronModel.feature_converter()`: the
model's BOS / EOS ids and reduction factor), and refuses a task whose vocabulary is not the
model's, naming both.

    seqio task --get_dataset(feature_converter=model's)--> model batches --batch(B / hosts)-->
    numpy dicts (strings dropped by `numeric` before they reach the device)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import gin
import numpy as np

from spectron_jax import vocabularies
from spectron_jax.interfaces import Model

# (shard_index, num_shards, seed, skip_batches) -> iterator of this process's batches.
DatasetFn = Callable[[int, int, int, int], Iterable[Mapping[str, Any]]]

# Task features whose ids the model's vocabulary must have produced.
TEXT_FEATURES = ("prompt_transcript", "continuation_transcript", "targets")


def numeric(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Drops string features (ids, texts): only arrays go to the device."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype.kind in "biuf":
            out[k] = v
    return out


def check_task_vocabulary(mixture_or_task_name: str, model: Model) -> None:
    """Raises ValueError when a text feature of the task uses another vocabulary than the model.

    Raises:
      ValueError: naming the task, the feature and both vocabularies; or the model's
        vocabulary does not fit its decoder.
    """
    import seqio

    import spectron_tasks  # noqa: F401 - registers the built-in tasks

    model.check_vocabulary_fits()
    task = seqio.get_mixture_or_task(mixture_or_task_name)
    for name in TEXT_FEATURES:
        feature = task.output_features.get(name)
        if feature is None or feature.vocabulary is None:
            continue
        if not vocabularies.same_vocabulary(feature.vocabulary, model.vocabulary):
            raise ValueError(
                f"task {mixture_or_task_name!r} encodes {name} with "
                f"{vocabularies.describe(feature.vocabulary)}, but the model's vocabulary is "
                f"{vocabularies.describe(model.vocabulary)}: register the task with the model's "
                "vocabulary, or bind spectron_model.vocabulary to the task's"
            )


@gin.configurable
def seqio_dataset_fn(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    *,
    model: Model = gin.REQUIRED,
    split: str = "train",
    shuffle: bool = True,
    repeat: bool = True,
) -> DatasetFn:
    """A `DatasetFn` over a seqio task through the model's feature converter.

    Args:
      mixture_or_task_name: registered task (the built-in tasks register on import).
      task_feature_lengths: seqio feature lengths.
      batch_size: GLOBAL batch size; each process reads batch_size / process_count.
      model: the model the batches are for: its converter lays them out (BOS / EOS ids,
        reduction factor) and its vocabulary must be the task's.
      split: split name.
      shuffle: shuffle (deterministically, by the seed).
      repeat: repeat forever (training).

    Returns:
      The dataset function; each process reads its own shard (seqio ShardInfo).

    Raises:
      ValueError: the task's vocabulary is not the model's.
    """
    check_task_vocabulary(mixture_or_task_name, model)

    def make(shard_index: int, num_shards: int, seed: int, skip: int) -> Iterator[dict]:
        import seqio

        if batch_size % num_shards:
            raise ValueError(f"batch_size {batch_size} not divisible by {num_shards} processes")
        ds = seqio.get_dataset(
            mixture_or_task_name,
            task_feature_lengths=dict(task_feature_lengths),
            dataset_split=split,
            shuffle=shuffle,
            num_epochs=None if repeat else 1,
            shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
            feature_converter=model.feature_converter(),
            seed=seed,
        )
        ds = ds.batch(batch_size // num_shards, drop_remainder=True).skip(skip)
        return ds.as_numpy_iterator()

    return make

"""The validation loss: the model's `loss_fn` metrics averaged over a few held-out batches."""

from __future__ import annotations

import itertools
from typing import Any

import gin
import jax

from spectron_jax import data, partitioning
from spectron_jax import trainer as trainer_lib
from spectron_jax.interfaces import EvalContext


def mean_eval_metrics(
    trainer: trainer_lib.Trainer,
    params: Any,
    dataset_fn: data.DatasetFn,
    num_batches: int,
    seed: int,
    mesh: jax.sharding.Mesh,
) -> dict[str, float]:
    """Mean eval-step metrics over the first `num_batches` batches of `dataset_fn`."""
    totals: dict[str, float] = {}
    n = 0
    batches = dataset_fn(jax.process_index(), jax.process_count(), seed, 0)
    for host_batch in itertools.islice(batches, num_batches):
        batch = partitioning.host_local_batch_to_global(data.numeric(host_batch), mesh)
        for k, v in trainer_lib.metrics_to_host(trainer.eval_step(params, batch)).items():
            totals[k] = totals.get(k, 0.0) + v
        n += 1
    return {k: v / max(n, 1) for k, v in totals.items()}


@gin.configurable
class LossEvaluator:
    """Loss and its terms on validation batches, every `every` steps (TensorBoard `eval/`).

    Attributes:
      dataset_fn: the validation `DatasetFn` (not shuffled, not repeated).
      num_batches: batches per evaluation.
      every: steps between evaluations; 0 = only at the end.
      name: TensorBoard prefix.
    """

    def __init__(
        self,
        dataset_fn: data.DatasetFn = gin.REQUIRED,
        num_batches: int = 20,
        every: int = 1000,
        name: str = "eval",
    ):
        self.dataset_fn = dataset_fn
        self.num_batches = num_batches
        self.every = every
        self.name = name

    def run(self, context: EvalContext) -> dict[str, float]:
        return mean_eval_metrics(
            context.trainer,
            context.params,
            self.dataset_fn,
            self.num_batches,
            context.seed,
            context.mesh,
        )

r"""`python -m spectron_jax.train`: flags + gin, then the plain, typed `train(...)`.

Usage:
  python -m spectron_jax.train \
    --gin_file=gin/spectron_tiny.gin [--gin_file=...] \
    --gin.MODEL_DIR="'/tmp/run'" --gin.TRAIN_STEPS=1000 [--gin_search_paths=gin]

`--gin.X=V` is shorthand for `--gin_bindings=X=V` (T5X's convention). Multi-host: pass
--coordinator_address/--num_processes/--process_id, or nothing on Cloud TPU and under SLURM
(`jax.distributed.initialize()` detects them).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags
from etils import epath
from jax.experimental import multihost_utils

import gin
from spectron_jax import checkpoints, metrics, partitioning
from spectron_jax import trainer as trainer_lib

if __name__ == "__main__":
    # `python -m spectron_jax.train` runs this file as `__main__`, while gin files
    # `import spectron_jax.train`: flags and configurables would be registered in both modules
    # (DuplicateFlagError, ambiguous gin selectors), so run the importable module instead.
    from spectron_jax.train import console_main

    console_main()
    sys.exit(0)

logger = logging.getLogger(__name__)

# (shard_index, num_shards, seed, skip_batches) -> iterator of this process's batches. It must
# be deterministic for a given seed, so that skipping `skip_batches` resumes exactly.
DatasetFn = Callable[[int, int, int, int], Iterable[Mapping[str, Any]]]


@dataclasses.dataclass
class TrainResult:
    """What `train` returns (tests inspect it)."""

    state: trainer_lib.TrainState
    step: int
    last_metrics: dict[str, float]
    init_source: str
    checkpoint_dir: str


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """`jax.distributed.initialize` from explicit values, or auto-detected on TPU / SLURM.

    Single-process runs (no coordinator, no cluster environment) skip it.
    """
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES"):
        jax.distributed.initialize()
    else:
        return
    logger.info(
        "jax.distributed: process %d of %d, %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )


@gin.configurable
def seqio_dataset_fn(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    split: str = "train",
    shuffle: bool = True,
    repeat: bool = True,
) -> DatasetFn:
    """A `DatasetFn` over a seqio task through `SpectronFeatureConverter`.

    Args:
      mixture_or_task_name: registered task (import `spectron_tasks` to register).
      task_feature_lengths: seqio feature lengths.
      batch_size: GLOBAL batch size; each process reads batch_size / process_count.
      split: split name.
      shuffle: shuffle (deterministically, by the seed).
      repeat: repeat forever (training).

    Returns:
      The dataset function; each process reads its own shard (seqio ShardInfo).
    """

    def make(shard_index: int, num_shards: int, seed: int, skip: int) -> Iterator[dict]:
        import seqio

        import spectron_tasks  # noqa: F401 - registers the tasks
        from spectron_jax.feature_converter import SpectronFeatureConverter

        if batch_size % num_shards:
            raise ValueError(f"batch_size {batch_size} not divisible by {num_shards} processes")
        ds = seqio.get_dataset(
            mixture_or_task_name,
            task_feature_lengths=dict(task_feature_lengths),
            dataset_split=split,
            shuffle=shuffle,
            num_epochs=None if repeat else 1,
            shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
            feature_converter=SpectronFeatureConverter(),
            seed=seed,
        )
        ds = ds.batch(batch_size // num_shards, drop_remainder=True).skip(skip)
        return ds.as_numpy_iterator()

    return make


def _model_config_dict(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return {"model": type(model).__name__}
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _numeric(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Drops string features (ids, texts): only arrays go to the device."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype.kind in "biuf":
            out[k] = v
    return out


class _Preemption:
    """SIGTERM (and JAX's preemption sync point where available) -> save and stop."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logger.warning("SIGTERM: will save a checkpoint and exit after this step")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        flag = self.requested
        if jax.process_count() > 1:
            try:
                flag = flag or multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service not enabled (e.g. CPU)
                pass
            # Every process must stop at the same step, or the save deadlocks.
            flag = bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))
        return flag

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@gin.configurable
def train(
    model: Any = gin.REQUIRED,
    dataset_fn: DatasetFn = gin.REQUIRED,
    model_dir: str = gin.REQUIRED,
    num_steps: int = gin.REQUIRED,
    *,
    mesh: jax.sharding.Mesh | None = None,
    optimizer: trainer_lib.OptimizerConfig | None = None,
    grad_accum_steps: int = 1,
    checkpoint_config: checkpoints.CheckpointConfig | None = None,
    init_checkpoint: str | None = None,
    init_subtrees: Sequence[str] | Mapping[str, str] | None = None,
    eval_dataset_fn: DatasetFn | None = None,
    eval_every: int = 0,
    eval_batches: int = 10,
    log_every: int = 10,
    seed: int = 0,
    batch_callback: Callable[[int, Mapping[str, Any]], None] | None = None,
    clock: Callable[[], float] | None = None,
    final_eval_fn: Callable[..., Mapping[str, float]] | None = None,
    sample_fn: Callable[..., Mapping[str, float]] | None = None,
) -> TrainResult:
    """Trains `model` to `num_steps`, resuming from `model_dir` if it holds checkpoints.

    Args:
      model: BaseModel-shaped model (CONTRACTS.md section 3).
      dataset_fn: this process's training batches (see `DatasetFn`).
      model_dir: checkpoints (`checkpoints/`), TensorBoard events and the operative gin config.
      num_steps: the total step count to reach (not "more steps").
      mesh: device mesh; default `partitioning.create_mesh()` (gin-configurable).
      optimizer: optimizer settings; default `OptimizerConfig()` (gin-configurable).
      grad_accum_steps: micro-batches per step.
      checkpoint_config: save / keep policy; a final checkpoint is always written.
      init_checkpoint: converted / pretrained weights for a fresh run (see `load_subtrees`).
      init_subtrees: params subtrees to take from `init_checkpoint`; None = all params.
      eval_dataset_fn: validation batches; evaluated every `eval_every` steps and at the end.
      eval_every: steps between evaluations (`eval_dataset_fn` and `sample_fn`); 0 = only at
        the end.
      eval_batches: batches per evaluation.
      log_every: steps between metric writes.
      seed: seeds parameter init, dropout and the data order.
      batch_callback: called with (step, host batch) for every batch trained on (tests).
      clock: seconds for the time-based checkpoint policy (tests); default monotonic.
      final_eval_fn: run once after the last step (not after a preemption) as
        `final_eval_fn(model=, params=, model_dir=, step=, train_dataset_fn=, seed=, writer=)`;
        its figures go to TensorBoard under `final/` (e.g. `evaluation.counting`).
      sample_fn: generated speech for TensorBoard, run with the evaluation (every `eval_every`
        steps and at the end) as `sample_fn(model=, params=, model_dir=, step=, writer=)`; its
        figures go under `samples/` (e.g. `evaluation.samples.speech_samples`).

    Returns:
      The final state and metrics.

    Raises:
      trainer_lib.NonFiniteLossError: the loss became NaN/Inf (names the step and the last
        good checkpoint; the bad step was not applied and nothing after it was saved).
    """
    model_dir_path = epath.Path(model_dir)
    model_dir_path.mkdir(parents=True, exist_ok=True)
    mesh = mesh or partitioning.create_mesh()
    trainer = trainer_lib.Trainer(model, mesh, optimizer, grad_accum_steps=grad_accum_steps)
    ckpt_kwargs = {"clock": clock} if clock else {}
    ckpt = checkpoints.Checkpointer(
        model_dir_path / "checkpoints", checkpoint_config, **ckpt_kwargs
    )
    model_config = _model_config_dict(model)
    shard, num_shards = jax.process_index(), jax.process_count()
    if jax.process_index() == 0:
        (model_dir_path / "config.gin").write_text(gin.config_str())

    # ---- abstract state, then resume -> init checkpoint -> scratch -----------------------------
    it = iter(dataset_fn(shard, num_shards, seed, 0))
    first = _numeric(next(it))
    global_first = partitioning.host_local_batch_to_global(first, mesh)
    abstract_state = trainer.setup(global_first)
    rng = jax.random.key(seed)
    init_rng, dropout_rng = jax.random.split(rng)
    state, data_pos, source = checkpoints.resume_or_init(
        ckpt,
        abstract_state,
        lambda: trainer.init_state(init_rng),
        init_checkpoint=init_checkpoint,
        init_subtrees=init_subtrees,
    )
    consumed = int(data_pos.get("batches_consumed", 0))
    if data_pos.get("seed", seed) != seed:
        logger.warning(
            "checkpoint data seed %s differs from --seed %s; keeping the checkpoint's",
            data_pos["seed"],
            seed,
        )
        seed = int(data_pos["seed"])
    if consumed:
        it = iter(dataset_fn(shard, num_shards, seed, consumed))
    else:
        it = itertools.chain([first], it)
    step = int(jax.device_get(state.step))
    logger.info(
        "train: %s; at step %d of %d; %d batches already consumed",
        source,
        step,
        num_steps,
        consumed,
    )

    # ---- compile once (AOT); XLA's FLOP count of the step feeds MFU -----------------
    flops = metrics.compiled_flops(trainer.compile_train_step(global_first, dropout_rng))
    writer = metrics.MetricsLogger(str(model_dir_path / "tensorboard"), num_steps, flops)
    preemption = _Preemption()
    last: dict[str, float] = {}

    def data_state() -> dict[str, Any]:
        return {"batches_consumed": consumed, "seed": seed}

    def run_evaluations() -> None:
        if eval_dataset_fn is not None:
            writer.log_eval(
                step, evaluate(trainer, state, eval_dataset_fn, eval_batches, seed, mesh)
            )
        if sample_fn is not None:
            figures = sample_fn(
                model=model,
                params=state.params,
                model_dir=str(model_dir_path),
                step=step,
                writer=writer,
            )
            writer.log_eval(step, figures, prefix="samples")

    try:
        writer.start(step)
        while step < num_steps:
            host_batch = next(it)
            if batch_callback is not None:
                batch_callback(step, host_batch)
            numeric = _numeric(host_batch)
            writer.count_batch(numeric)
            batch = partitioning.host_local_batch_to_global(numeric, mesh)
            state, step_metrics = trainer.train_step(state, batch, dropout_rng)
            consumed += 1
            if not bool(jax.device_get(step_metrics["finite"])):
                ckpt.wait()
                good = ckpt.latest_good_step()
                where = f"{ckpt.directory}/{good}" if good is not None else "none (no checkpoint)"
                raise trainer_lib.NonFiniteLossError(
                    f"non-finite loss or gradient at step {step + 1} (loss "
                    f"{float(jax.device_get(step_metrics['loss']))}); the step was not applied. "
                    f"Last good checkpoint: {where}"
                )
            step += 1
            if step % log_every == 0 or step == num_steps:
                last = trainer_lib.metrics_to_host(step_metrics)
                writer.log_train(step, last)
            ckpt.save(step, state, data_state(), model_config)
            if eval_every and step % eval_every == 0:
                run_evaluations()
                writer.start(step)  # evaluation time is not training time (steps/s, ETA)
            if step == 1 and jax.process_index() == 0:
                (model_dir_path / "config.gin").write_text(gin.operative_config_str())
            if preemption.should_stop(step):
                logger.warning("train: preempted at step %d; saving and exiting", step)
                break
        ckpt.save(step, state, data_state(), model_config, force=True)
        if not (eval_every and step % eval_every == 0):
            run_evaluations()
        if final_eval_fn is not None and step >= num_steps:
            figures = final_eval_fn(
                model=model,
                params=state.params,
                model_dir=str(model_dir_path),
                step=step,
                train_dataset_fn=dataset_fn,
                seed=seed,
                writer=writer,
            )
            writer.log_eval(step, figures, prefix="final")
    finally:
        preemption.restore()
        ckpt.close()
        writer.close()
    return TrainResult(
        state=state,
        step=step,
        last_metrics=last,
        init_source=source,
        checkpoint_dir=str(ckpt.directory),
    )


def evaluate(
    trainer: trainer_lib.Trainer,
    state: trainer_lib.TrainState,
    dataset_fn: DatasetFn,
    num_batches: int,
    seed: int,
    mesh: jax.sharding.Mesh,
) -> dict[str, float]:
    """Mean eval-step metrics over the first `num_batches` batches of `dataset_fn`."""
    totals: dict[str, float] = {}
    n = 0
    data = dataset_fn(jax.process_index(), jax.process_count(), seed, 0)
    for host_batch in itertools.islice(data, num_batches):
        batch = partitioning.host_local_batch_to_global(_numeric(host_batch), mesh)
        for k, v in trainer_lib.metrics_to_host(trainer.eval_step(state.params, batch)).items():
            totals[k] = totals.get(k, 0.0) + v
        n += 1
    return {k: v / max(n, 1) for k, v in totals.items()}


@gin.configurable
def evaluate_checkpoint(
    model: Any = gin.REQUIRED,
    dataset_fn: DatasetFn = gin.REQUIRED,
    model_dir: str = gin.REQUIRED,
    num_batches: int = 100,
    *,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Evaluates the newest readable checkpoint of `model_dir`; writes `eval/*` scalars.

    Returns:
      Mean eval metrics.

    Raises:
      FileNotFoundError: no readable checkpoint.
    """
    mesh = mesh or partitioning.create_mesh()
    trainer = trainer_lib.Trainer(model, mesh)
    first = _numeric(next(iter(dataset_fn(jax.process_index(), jax.process_count(), seed, 0))))
    abstract = trainer.setup(partitioning.host_local_batch_to_global(first, mesh))
    ckpt = checkpoints.Checkpointer(epath.Path(model_dir) / "checkpoints")
    try:
        restored = ckpt.restore_latest(abstract)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no readable checkpoint in {model_dir}/checkpoints")
    result = evaluate(trainer, restored.state, dataset_fn, num_batches, seed, mesh)
    writer = metrics.MetricsLogger(
        str(epath.Path(model_dir) / "tensorboard_eval"), restored.step, peak_flops=float("nan")
    )
    writer.log_eval(restored.step, result)
    writer.close()
    return result


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin files (repeatable; later ones override).")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings; --gin.X=V is the same as X=V.")
flags.DEFINE_list(
    "gin_search_paths", [".", "gin"], "Directories searched for gin files and their includes."
)
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train() or evaluate_checkpoint().")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port.")
flags.DEFINE_integer("num_processes", None, "jax.distributed process count.")
flags.DEFINE_integer("process_id", None, "jax.distributed index of this process.")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """`--gin.X=V` -> `--gin_bindings=X=V` (absl cannot define flags with dots)."""
    out = []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            out.append("--gin_bindings=" + arg[len("--gin.") :])
        else:
            out.append(arg)
    return out


def parse_gin(
    files: Sequence[str],
    bindings: Sequence[str],
    search_paths: Sequence[str],
    finalize: bool = True,
) -> None:
    """Parses gin files and bindings with the search paths (also used by tests).

    With `finalize`, a `%gin.REQUIRED` macro left unset is an error naming it.
    """
    for path in search_paths:
        gin.add_config_file_search_path(path)
    gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=finalize)


def main(argv: Sequence[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    # Orbax logs every save phase at INFO through absl; keep the console to our progress lines.
    logging.getLogger("absl").setLevel(logging.WARNING)
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    if FLAGS.mode == "eval":
        evaluate_checkpoint()
    else:
        train()


def console_main() -> None:
    """The command line (`python -m spectron_jax.train`, setup.py's `spectron-train`)."""
    app.run(main, argv=rewrite_gin_args(sys.argv))

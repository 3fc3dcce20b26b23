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

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
from absl import app, flags
from etils import epath
from jax.experimental import multihost_utils

from spectron_jax import checkpoints, config_check, data, multihost, partitioning, summaries
from spectron_jax import trainer as trainer_lib
from spectron_jax.data import DatasetFn
from spectron_jax.evaluation.loss import mean_eval_metrics
from spectron_jax.interfaces import EvalContext, Evaluator

if __name__ == "__main__":
    # `python -m spectron_jax.train` runs this file as `__main__`, while gin files
    # `import spectron_jax.train`: flags and configurables would be registered in both modules
    # (DuplicateFlagError, ambiguous gin selectors), so run the importable module instead.
    from spectron_jax.train import console_main

    console_main()
    sys.exit(0)

logger = logging.getLogger(__name__)


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
    auto: bool = False,
) -> None:
    """`jax.distributed.initialize` from explicit values, or auto-detected (Cloud TPU, SLURM).

    Auto-detection runs where `auto` is set (`--distributed`, which launch/tpu/tpu.sh passes:
    a Cloud TPU VM names its workers only through its metadata server) or the environment says
    several processes take part (SLURM_NTASKS > 1, TPU_WORKER_HOSTNAMES naming more than one
    host, MEGASCALE_COORDINATOR_ADDRESS). Single-process runs skip it.
    """
    env = os.environ
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    several = (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or len(hosts) > 1
        or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))
    )
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif auto or several:
        jax.distributed.initialize()
    else:
        return
    logger.info(
        "jax.distributed: process %d of %d, %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
    )


def _model_config_dict(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return {"model": type(model).__name__}
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


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
            # Every process must stop at the same step, or the save deadlocks; a notice to any
            # one of them (not only process 0) stops them all.
            flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
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
    init_checkpoints: checkpoints.InitSources | None = None,
    evaluators: Sequence[Evaluator] = (),
    log_every: int = 10,
    seed: int = 0,
    batch_callback: Callable[[int, Mapping[str, Any]], None] | None = None,
    clock: Callable[[], float] | None = None,
    lost_process_timeout_s: float = 30.0,
) -> TrainResult:
    """Trains `model` to `num_steps`, resuming from `model_dir` if it holds checkpoints.

    Args:
      model: BaseModel-shaped model (CONTRACTS.md section 3).
      dataset_fn: this process's training batches (see `DatasetFn`).
      model_dir: checkpoints (`checkpoints/`), TensorBoard events and the operative gin config.
      num_steps: the total step count to reach (not "more steps").
      mesh, optimizer: defaults `partitioning.create_mesh()`, `OptimizerConfig()` (gin).
      grad_accum_steps: micro-batches per step.
      checkpoint_config: save / keep policy; a final checkpoint is always written.
      init_checkpoint: converted / pretrained weights for a fresh run (see `load_subtrees`).
      init_subtrees: params subtrees to take from `init_checkpoint`; None = all params.
      init_checkpoints: several sources, {checkpoint: subtrees}, e.g. `{'/s1/checkpoints':
        {'encoder': 'params/encoder'}, '/s2/checkpoints': {'decoder': 'params/decoder'}}`.
      evaluators: `interfaces.Evaluator`s, run every `evaluator.every` steps and after the
        last one (not after a preemption); figures go to TensorBoard under `evaluator.name/`.
      log_every: steps between metric writes.
      lost_process_timeout_s: a process silent this long ends the others, naming it and the
        last checkpoint (`multihost.Watchdog`), instead of a hang in the next collective.
      seed: seeds parameter init, dropout and the data order.
      batch_callback, clock: for tests: called with (step, host batch) for every batch trained
        on; seconds for the time-based checkpoint policy (default monotonic).

    Returns the final state and metrics; raises `trainer_lib.NonFiniteLossError` when the loss
    becomes NaN/Inf (see `_Run.train_step`).
    """
    model_dir_path = epath.Path(model_dir)
    model_dir_path.mkdir(parents=True, exist_ok=True)
    mesh = mesh or partitioning.create_mesh()
    trainer = trainer_lib.Trainer(model, mesh, optimizer, grad_accum_steps=grad_accum_steps)
    ckpt = checkpoints.Checkpointer(
        model_dir_path / "checkpoints",
        checkpoint_config,
        vocabulary=getattr(model, "vocabulary", None),
        **({"clock": clock} if clock else {}),
    )
    if jax.process_index() == 0:
        (model_dir_path / "config.gin").write_text(gin.config_str())
    stop_watching = _watch_peers(ckpt, lost_process_timeout_s)
    # Checked before anything is built: a bad init config fails in seconds.
    sources = checkpoints.init_sources(init_checkpoint, init_subtrees, init_checkpoints)
    init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
    # From here on SIGTERM saves and stops (a notice during start-up or compile included).
    preemption = _Preemption()
    with _undone_on_error(preemption.restore, stop_watching):
        start = _start(trainer, ckpt, dataset_fn, mesh, seed, init_rng, sources)
        logger.info("train: %s; at step %d of %d", start.source, start.step, num_steps)
        flops = _compile(trainer, start, dropout_rng, num_steps)
    writer = summaries.MetricsLogger(str(model_dir_path / "tensorboard"), num_steps, flops)
    run = _Run(model, trainer, ckpt, writer, str(model_dir_path), dataset_fn, start.state)
    run.step, run.consumed, run.seed = start.step, start.consumed, start.seed
    last: dict[str, float] = {}
    try:
        run.writer.start(run.step)
        while run.step < num_steps:
            host_batch = next(start.batches)
            if batch_callback is not None:
                batch_callback(run.step, host_batch)
            step_metrics = run.train_step(host_batch, dropout_rng)
            if run.step % log_every == 0 or run.step == num_steps:
                last = trainer_lib.metrics_to_host(step_metrics)
                run.writer.log_train(run.step, last)
            run.save()
            if run.evaluate([e for e in evaluators if _due(e, run.step)]):
                run.writer.start(run.step)  # Evaluation time is not training time (steps/s).
            if run.step == 1 and jax.process_index() == 0:
                (model_dir_path / "config.gin").write_text(gin.operative_config_str())
            if preemption.should_stop(run.step):
                logger.warning("train: preempted at step %d; saving and exiting", run.step)
                break
        run.save(force=True)
        if run.step >= num_steps:  # Not after a preemption: the restarted run will get there.
            run.evaluate([e for e in evaluators if not _due(e, run.step)])  # Not run twice.
    finally:
        preemption.restore()
        ckpt.close()
        run.writer.close()
        stop_watching()
    return TrainResult(run.state, run.step, last, start.source, str(ckpt.directory))


def _compile(trainer: trainer_lib.Trainer, start: _Start, rng: jax.Array, num_steps: int) -> float:
    """Compiles the train step once (AOT); returns XLA's FLOP count of it, which feeds MFU
    (NaN for a run restarted after its last step: it has no step to compile)."""
    if start.step >= num_steps:
        return float("nan")
    return summaries.compiled_flops(trainer.compile_train_step(start.first_batch, rng))


@contextlib.contextmanager
def _undone_on_error(*undo: Callable[[], None]) -> Iterator[None]:
    """Runs `undo` (the SIGTERM handler, the watchdog) if the block raises, then re-raises."""
    try:
        yield
    except BaseException:
        for fn in undo:
            fn()
        raise


def _watch_peers(ckpt: checkpoints.Checkpointer, timeout_s: float) -> Callable[[], None]:
    """With several processes, starts the watchdog that ends this one when a peer is lost;
    returns what stops it."""
    if jax.process_count() == 1:
        return lambda: None

    def restart_from() -> str:
        step = ckpt.latest_good_step()
        where = f"step {step} in {ckpt.directory}" if step is not None else "none yet"
        return f"Last checkpoint: {where}; restart every process to resume from it."

    return multihost.Watchdog(timeout_s, describe=restart_from).start().stop


def _due(evaluator: Evaluator, step: int) -> bool:
    """Whether a periodic evaluator runs after `step`."""
    return bool(evaluator.every) and step % evaluator.every == 0


@dataclasses.dataclass
class _Start:
    """Where a run starts: its state, batches and data position (resumed or fresh)."""

    state: trainer_lib.TrainState
    batches: Iterator[Mapping[str, Any]]
    first_batch: Any  # The global first batch (shapes for setup and compile).
    step: int
    consumed: int
    seed: int
    source: str


def _start(
    trainer: trainer_lib.Trainer,
    ckpt: checkpoints.Checkpointer,
    dataset_fn: DatasetFn,
    mesh: jax.sharding.Mesh,
    seed: int,
    init_rng: jax.Array,
    sources: checkpoints.InitSources,
) -> _Start:
    """Abstract state from the first batch, then resume -> init checkpoint -> scratch; the batch
    iterator continues exactly after the batches a resumed run already consumed."""
    shard, num_shards = jax.process_index(), jax.process_count()
    it = iter(dataset_fn(shard, num_shards, seed, 0))
    first = data.numeric(next(it))
    global_first = partitioning.host_local_batch_to_global(first, mesh)
    state, data_pos, source = checkpoints.resume_or_init(
        ckpt,
        trainer.setup(global_first),
        lambda: trainer.init_state(init_rng),
        sources,
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
    return _Start(state, it, global_first, step, consumed, seed, source)


@dataclasses.dataclass
class _Run:
    """The moving parts of a training run, and the three things the loop does with them."""

    model: Any
    trainer: trainer_lib.Trainer
    ckpt: checkpoints.Checkpointer
    writer: summaries.MetricsLogger
    model_dir: str
    dataset_fn: DatasetFn
    state: trainer_lib.TrainState
    step: int = 0
    consumed: int = 0  # Batches trained on, the data position a checkpoint records.
    seed: int = 0

    def train_step(self, host_batch: Mapping[str, Any], dropout_rng: jax.Array) -> dict:
        """One optimizer step on a host batch; a non-finite loss stops the run, naming the step
        and the last good checkpoint (the bad step is not applied, nothing after it saved)."""
        numeric = data.numeric(host_batch)
        self.writer.count_batch(numeric)
        batch = partitioning.host_local_batch_to_global(numeric, self.trainer.mesh)
        state, step_metrics = self.trainer.train_step(self.state, batch, dropout_rng)
        if not bool(jax.device_get(step_metrics["finite"])):
            self.ckpt.wait()
            good = self.ckpt.latest_good_step()
            where = f"{self.ckpt.directory}/{good}" if good is not None else "none (no checkpoint)"
            raise trainer_lib.NonFiniteLossError(
                f"non-finite loss or gradient at step {self.step + 1} (loss "
                f"{float(jax.device_get(step_metrics['loss']))}); the step was not applied. "
                f"Last good checkpoint: {where}"
            )
        self.state, self.step, self.consumed = state, self.step + 1, self.consumed + 1
        return step_metrics

    def save(self, force: bool = False) -> None:
        position = {"batches_consumed": self.consumed, "seed": self.seed}
        self.ckpt.save(self.step, self.state, position, _model_config_dict(self.model), force)

    def evaluate(self, evaluators: Sequence[Evaluator]) -> bool:
        """Runs `evaluators` on the current parameters; True if any ran."""
        context = EvalContext(
            model=self.model,
            params=self.state.params,
            step=self.step,
            model_dir=self.model_dir,
            writer=self.writer,
            trainer=self.trainer,
            mesh=self.trainer.mesh,
            train_dataset_fn=self.dataset_fn,
            seed=self.seed,
        )
        for evaluator in evaluators:
            self.writer.log_eval(self.step, evaluator.run(context), prefix=evaluator.name)
        return bool(evaluators)


@gin.configurable
def evaluate_checkpoint(
    model: Any = gin.REQUIRED,
    dataset_fn: DatasetFn = gin.REQUIRED,
    model_dir: str = gin.REQUIRED,
    num_batches: int = 100,
    *,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
    output_json: str | None = None,
) -> dict[str, float]:
    """Evaluates the newest readable checkpoint of `model_dir`; writes `eval/*` scalars.

    Args:
      output_json: also write {"step", "metrics"} there (for scripts), process 0 only.

    Returns:
      Mean eval metrics.

    Raises:
      FileNotFoundError: no readable checkpoint.
    """
    mesh = mesh or partitioning.create_mesh()
    trainer = trainer_lib.Trainer(model, mesh)
    first = data.numeric(next(iter(dataset_fn(jax.process_index(), jax.process_count(), seed, 0))))
    abstract = trainer.setup(partitioning.host_local_batch_to_global(first, mesh))
    ckpt = checkpoints.Checkpointer(epath.Path(model_dir) / "checkpoints")
    try:
        restored = ckpt.restore_latest(abstract)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no readable checkpoint in {model_dir}/checkpoints")
    result = mean_eval_metrics(trainer, restored.state.params, dataset_fn, num_batches, seed, mesh)
    writer = summaries.MetricsLogger(
        str(epath.Path(model_dir) / "tensorboard_eval"), restored.step, peak_flops=float("nan")
    )
    writer.log_eval(restored.step, result)
    writer.close()
    if output_json and jax.process_index() == 0:
        record = {"step": restored.step, "metrics": {k: float(v) for k, v in result.items()}}
        epath.Path(output_json).write_text(json.dumps(record, indent=2))
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
flags.DEFINE_bool(
    "distributed", False, "jax.distributed with auto-detection (every Cloud TPU VM worker)."
)
flags.DEFINE_bool("verbose", False, "Show the traceback of the errors explained in one message.")
flags.DEFINE_bool("check_config", False, "Only check the config (config_check) and exit.")

# Failures the command line explains in one message, with their exit codes: a bad config (2,
# nothing was started) and run-time failures (1). The message names the setting, the step or
# the checkpoint; the traceback adds nothing a user can act on.
EXPLAINED_ERRORS = {
    config_check.ConfigError: 2,
    trainer_lib.NonFiniteLossError: 1,
    checkpoints.UnreadableCheckpointsError: 1,
    checkpoints.CheckpointSaveError: 1,
    checkpoints.ConfigMismatchError: 1,
}


@contextlib.contextmanager
def explained_errors(verbose: bool = False) -> Iterator[None]:
    """`EXPLAINED_ERRORS` become "error: <message>" on stderr and their exit code (with
    `verbose` they propagate, traceback and all)."""
    try:
        yield
    except tuple(EXPLAINED_ERRORS) as err:
        if verbose:
            raise
        print(f"error: {config_check.without_gin_context(err)}", file=sys.stderr, flush=True)
        code = next(c for kind, c in EXPLAINED_ERRORS.items() if isinstance(err, kind))
        raise SystemExit(code) from None


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
    initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed
    )
    with explained_errors(FLAGS.verbose):
        warnings = config_check.parse_and_check(
            FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths
        )
        if warnings:
            logger.warning("config warnings:\n%s", "\n".join(map(str, warnings)))
        if FLAGS.check_config:
            print(f"config OK ({len(warnings)} warnings): {', '.join(FLAGS.gin_file)}")
            return
        if FLAGS.mode == "eval":
            evaluate_checkpoint()
        else:
            train()


def console_main() -> None:
    """The command line (`python -m spectron_jax.train`, setup.py's `spectron-train`)."""
    app.run(main, argv=rewrite_gin_args(sys.argv))

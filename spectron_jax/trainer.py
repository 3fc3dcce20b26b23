"""Train state, optimizer, and the partitioned train / eval steps.

The model is anything with the T5X `BaseModel` shape of docs/CONTRACTS.md section 3:
`get_initial_variables(rng, input_shapes, input_types)` and
`loss_fn(params, batch, dropout_rng) -> (loss, metrics)`; an optional `trainable_mask(params)`
(bool tree) keeps frozen subtrees (the pretrained encoder) outside the optimizer.

Initialisation is abstract-first (flax lm1b / T5X): `jax.eval_shape` gives shapes and logical
axis names without allocating, the rules table turns them into `NamedSharding`s, and the real
init is `jit(..., out_shardings=...)` so every parameter is born on its shard.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from spectron_jax import partitioning

PyTree = Any
Batch = Mapping[str, Any]


@flax.struct.dataclass
class TrainState:
    """Everything a step updates; the unit saved in checkpoints.

    Attributes:
      step: int32[] number of optimizer steps taken.
      params: the unboxed parameter tree.
      opt_state: optax state; frozen parameters have none (`set_to_zero` is stateless).
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/Inf; the state of that step was not applied."""


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule.

    Attributes:
      name: "adamw" or "adafactor".
      learning_rate: peak learning rate after warmup.
      warmup_steps: linear warmup from 0.
      decay: "cosine", "linear" (both to `end_lr_fraction` x peak at `decay_steps`), "rsqrt"
        (peak x sqrt(warmup / step) after warmup, T5's schedule) or "constant".
      decay_steps: step at which cosine / linear decay ends (usually the run's num_steps).
      end_lr_fraction: final learning rate as a fraction of the peak.
      weight_decay: decoupled weight decay (AdamW) / weight_decay_rate (Adafactor).
      b1: Adam beta1.
      b2: Adam beta2.
      eps: Adam epsilon.
      clip_norm: global-norm gradient clipping threshold over trainable params; 0 = off.
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    decay: str = "cosine"
    decay_steps: int = 10_000
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-9
    clip_norm: float = 1.0


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Warmup then decay, as a function of the optimizer step."""
    peak, warm = config.learning_rate, max(config.warmup_steps, 0)
    warmup = optax.linear_schedule(0.0, peak, max(warm, 1))
    rest = max(config.decay_steps - warm, 1)
    end = peak * config.end_lr_fraction
    if config.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, rest, alpha=config.end_lr_fraction)
    elif config.decay == "linear":
        decay = optax.linear_schedule(peak, end, rest)
    elif config.decay == "rsqrt":

        def decay(count):
            return peak * jnp.sqrt(max(warm, 1) / (count + max(warm, 1)))
    elif config.decay == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown decay {config.decay!r}; use cosine, linear, rsqrt or constant")
    if warm == 0:
        return decay
    return optax.join_schedules([warmup, decay], [warm])


def clamped_to_run(config: OptimizerConfig, total_steps: int) -> OptimizerConfig:
    """`config` fitted to a run of `total_steps`: decay ends at the last step and warm-up takes
    at most half the run (a 4-step smoke test of a 200-warm-up config then still decays)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = min(config.warmup_steps, total_steps // 2)
    if warmup != config.warmup_steps:
        logging.warning(
            "warmup_steps %d clamped to %d for a run of %d steps",
            config.warmup_steps,
            warmup,
            total_steps,
        )
    return dataclasses.replace(config, warmup_steps=warmup, decay_steps=total_steps)


def inner_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """The optimizer of `config` with its schedule and clipping, for every leaf it is given."""
    schedule = make_schedule(config)
    if config.name == "adamw":
        inner = optax.adamw(
            schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
        )
    elif config.name == "adafactor":
        inner = optax.adafactor(
            schedule,
            weight_decay_rate=config.weight_decay or None,
            # Clipping is done below on the global norm; Adafactor's own update clipping stays.
        )
    else:
        raise ValueError(f"unknown optimizer {config.name!r}; use adamw or adafactor")
    if config.clip_norm > 0:
        inner = optax.chain(optax.clip_by_global_norm(config.clip_norm), inner)
    return inner


def make_optimizer(config: OptimizerConfig, trainable: PyTree) -> optax.GradientTransformation:
    """Optimizer over trainable leaves; frozen leaves get `set_to_zero` and no state.

    Args:
      config: optimizer settings.
      trainable: bool tree matching the params (True = trained), or a function of the params
        giving one.

    Returns:
      An optax transformation whose updates are zero on frozen leaves.
    """

    def labels(params):
        mask = trainable(params) if callable(trainable) else trainable
        return jax.tree.map(lambda t: "trainable" if t else "frozen", mask)

    return optax.multi_transform(
        {"trainable": inner_optimizer(config), "frozen": optax.set_to_zero()},
        labels if callable(trainable) else labels(None),
    )


def trainable_mask(model: Any, params: PyTree) -> PyTree:
    """The model's `trainable_mask(params)` where it has one, else all True."""
    if hasattr(model, "trainable_mask"):
        return model.trainable_mask(params)
    return jax.tree.map(lambda _: True, params)


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------


def _masked_global_norm(tree: PyTree, mask: PyTree) -> jax.Array:
    leaves = [
        jnp.sum(jnp.square(g.astype(jnp.float32)))
        for g, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask), strict=True)
        if m
    ]
    return jnp.sqrt(sum(leaves)) if leaves else jnp.zeros((), jnp.float32)


@gin.configurable
class Trainer:
    """Owns the optimizer, shardings and compiled steps for one model on one mesh.

    Attributes:
      model: the model (BaseModel shape).
      mesh: device mesh.
      param_specs: logical `PartitionSpec` of every parameter (set by `setup`).
      state_shardings: `TrainState` of `NamedSharding`s (set by `setup`).
      abstract_state: `TrainState` of `jax.ShapeDtypeStruct`s with shardings.
    """

    def __init__(
        self,
        model: Any,
        mesh: Mesh,
        optimizer: OptimizerConfig | None = None,
        grad_accum_steps: int = 1,
        rules: tuple[tuple[str, Any], ...] = partitioning.LOGICAL_AXIS_RULES,
    ):
        """Creates the trainer.

        Args:
          model: object with `get_initial_variables` and `loss_fn` (CONTRACTS.md section 3).
          mesh: device mesh (`partitioning.create_mesh`).
          optimizer: optimizer settings; default `OptimizerConfig()` (gin-configurable).
          grad_accum_steps: micro-batches per step; the batch's leading dim must divide by it.
            Gradients are the mean over micro-batches of each micro-batch's mean-loss gradient.
          rules: logical-axis rules.
        """
        self.model = model
        self.mesh = mesh
        self.config = optimizer or OptimizerConfig()
        self.grad_accum_steps = grad_accum_steps
        self.rules = rules
        self.schedule = make_schedule(self.config)
        self.param_specs: PyTree = None
        self.state_shardings: TrainState | None = None
        self.abstract_state: TrainState | None = None
        self._train_step = None
        self._compiled = None
        self._eval_step = None

    # -- initialisation ------------------------------------------------------------------------

    def _init_fn(self, input_shapes, input_types):
        def init(rng):
            variables = self.model.get_initial_variables(rng, input_shapes, input_types)
            params = nn.unbox(variables["params"])
            return TrainState(
                step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params)
            )

        return init

    def setup(self, batch: Batch) -> TrainState:
        """Computes the abstract state and its shardings from an example batch; allocates nothing.

        Args:
          batch: a (global) batch, or `jax.ShapeDtypeStruct`s of one (only shapes are used).

        Returns:
          The abstract `TrainState` (ShapeDtypeStructs carrying their `NamedSharding`s).
        """
        input_shapes = {k: tuple(v.shape) for k, v in batch.items()}
        input_types = {k: v.dtype for k, v in batch.items()}
        rng = jax.random.key(0)  # shapes only
        with partitioning.axis_rules(self.mesh, self.rules):
            boxed = jax.eval_shape(
                lambda r: self.model.get_initial_variables(r, input_shapes, input_types), rng
            )["params"]
        param_specs = partitioning.logical_specs(boxed)
        self.param_specs = param_specs
        abstract_params = nn.unbox(boxed)
        self.trainable = trainable_mask(self.model, abstract_params)
        self.tx = make_optimizer(self.config, self.trainable)
        self._init = self._init_fn(input_shapes, input_types)
        abstract = jax.eval_shape(self._init, rng)
        specs = TrainState(
            step=jax.sharding.PartitionSpec(),
            params=param_specs,
            opt_state=partitioning.follow_param_specs(
                abstract.opt_state, abstract_params, param_specs
            ),
        )
        self.state_shardings = partitioning.tree_shardings(abstract, specs, self.mesh, self.rules)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract,
            self.state_shardings,
        )
        partitioning.log_shardings(self.state_shardings.params, abstract.params, "param shardings")
        return self.abstract_state

    def init_state(self, rng: jax.Array, batch: Batch | None = None) -> TrainState:
        """Initialises a sharded `TrainState`, each leaf created directly on its shard.

        Args:
          rng: PRNG key for parameter init.
          batch: example batch for `setup` (not needed if `setup` was called).

        Returns:
          The fresh state.
        """
        if batch is not None:
            self.setup(batch)
        if self.abstract_state is None:
            raise ValueError("call setup(batch) or pass a batch before init_state")
        with partitioning.axis_rules(self.mesh, self.rules):
            return jax.jit(self._init, out_shardings=self.state_shardings)(rng)

    # -- steps -----------------------------------------------------------------------------------

    def _grads(self, params, batch, rng):
        def loss_of(p, b, r):
            loss, metrics = self.model.loss_fn(p, b, r)
            return loss, metrics

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        k = self.grad_accum_steps
        if k == 1:
            (loss, metrics), grads = grad_fn(params, batch, rng)
            return loss, metrics, grads

        def split(x):  # [B, ...] -> [k, B/k, ...]
            if x.shape[0] % k:
                raise ValueError(f"batch dim {x.shape[0]} not divisible by grad_accum_steps={k}")
            return x.reshape((k, x.shape[0] // k) + x.shape[1:])

        micro = jax.tree.map(split, dict(batch))

        def body(carry, xs):
            mb, i = xs
            (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
            acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
            return acc, None

        zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), (zeros[0][0], zeros[0][1], zeros[1])
        )
        (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(k)))
        return jax.tree.map(lambda x: x / k, (loss, metrics, grads))

    def _step(self, state: TrainState, batch: Batch, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        loss, metrics, grads = self._grads(state.params, batch, rng)
        grad_norm = _masked_global_norm(grads, self.trainable)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        # A non-finite step is not applied: the returned state stays the last good one, so a
        # NaN can never reach a checkpoint; the host sees `finite` and stops the run.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = dict(metrics)
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            learning_rate=self.schedule(state.step),
            finite=finite,
        )
        return new, metrics

    def _jitted_train_step(self):
        if self._train_step is None:
            self._train_step = jax.jit(
                self._step,
                in_shardings=(
                    self.state_shardings,
                    partitioning.batch_sharding(self.mesh),
                    partitioning.replicated(self.mesh),
                ),
                out_shardings=(self.state_shardings, partitioning.replicated(self.mesh)),
                donate_argnums=(0,),
            )
        return self._train_step

    def train_step(self, state: TrainState, batch: Batch, rng: jax.Array):
        """One optimizer step (compiled once; `state` is donated).

        Args:
          state: sharded train state (invalid after the call: its buffers are donated).
          batch: global batch sharded by `partitioning.batch_sharding`.
          rng: base dropout key; folded with the step inside.

        Returns:
          (new_state, metrics): metrics are scalar arrays, incl. loss, grad_norm, learning_rate
          and `finite` (False = the step was skipped because the loss or gradient was NaN/Inf).
        """
        if self._compiled is not None:
            return self._compiled(state, batch, rng)
        with partitioning.axis_rules(self.mesh, self.rules):
            return self._jitted_train_step()(state, batch, rng)

    def compile_train_step(self, batch: Batch, rng: jax.Array) -> jax.stages.Compiled:
        """AOT-compiles the train step for this batch shape; later `train_step` calls reuse it.

        Returns:
          The compiled step (its `cost_analysis()` gives XLA's FLOP count).
        """
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        with partitioning.axis_rules(self.mesh, self.rules):
            lowered = self._jitted_train_step().lower(self.abstract_state, abstract_batch, rng)
        self._compiled = lowered.compile()
        return self._compiled

    def _eval(self, params: PyTree, batch: Batch):
        loss, metrics = self.model.loss_fn(params, batch, None)
        metrics = dict(metrics)
        metrics["loss"] = loss
        return metrics

    def eval_step(self, params: PyTree, batch: Batch) -> dict[str, jax.Array]:
        """Deterministic loss and metrics of one batch (no dropout)."""
        if self._eval_step is None:
            self._eval_step = jax.jit(
                self._eval,
                in_shardings=(self.state_shardings.params, partitioning.batch_sharding(self.mesh)),
                out_shardings=partitioning.replicated(self.mesh),
            )
        with partitioning.axis_rules(self.mesh, self.rules):
            return self._eval_step(params, batch)


def metrics_to_host(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    """Fetches scalar metrics to Python floats (a sync point; call once per logged step)."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}

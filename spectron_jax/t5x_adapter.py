"""T5X adapter: train `SpectronModel` with `python -m t5x.train` where t5x is installed.

T5X is not on PyPI, so the project never depends on it. This module is split in two:

* Pure helpers (importable anywhere, no t5x): `params_axes_from_logical` builds the legacy
  `params_axes` collection T5X's partitioner reads from our flax logical-partitioning metadata;
  `t5x_logical_axis_rules` translates our rules table (mesh axes data/fsdp/tensor) to T5X's
  two-axis mesh (data/model); `spectron_t5x_model` / `spectron_t5x_optimizer` (the built-in
  trainer's optimizer: a frozen encoder gets no updates and no state) and
  `learning_rate_schedule` (the same schedule, for T5X's summaries) are the gin entry points;
  `t5x_predictions` gives T5X the text ids it decodes and the frames as aux.
* `SpectronT5XModel`, a `t5x.models.BaseModel` subclass, built on first attribute access
  (`t5x_adapter.SpectronT5XModel`); without t5x that access raises an ImportError that says how
  to install it.

How T5X consumes it (t5x/train.py, train_state.py, partitioning.py):
  - `model.FEATURE_CONVERTER_CLS(pack=..., use_custom_packing_ops=...)` builds the converter,
    so the instance binds the wrapped model's `reduction_factor`, `bos_id`, `eos_id` (which come
    from its vocabulary). `pack` must be False (fixed-slot layout): gin/t5x/spectron_tiny_train.gin
    sets `DatasetConfig.pack = False`.
  - `input_vocabulary` / `output_vocabulary` are the wrapped model's vocabulary (a seqio one).
  - `get_initial_variables` returns `{"params": arrays, "params_axes": {..."<name>_axes":
    AxisMetadata(names)}}`; `FlaxOptimTrainState.create` checks that every parameter has axes and
    `PjitPartitioner.get_mesh_axes` maps them with `flax.linen.partitioning.logical_to_mesh_axes`.
  - Metrics are clu `Metric`s (`AveragePerStep` for our batch-mean scalars).

Known limitations (T5X semantics that differ from spectron_jax.train):
  - T5X's `logical_to_mesh_axes` does not replicate a dimension that its mesh axis does not
    divide (our `partitioning.logical_to_mesh_spec` does): size the mesh to divide the model.
  - T5X sums gradients over microbatches while our loss is a batch mean: with
    `Trainer.num_microbatches = k` the effective learning rate is k times larger.
  - The learning-rate schedule lives inside the optax optimizer (`OptaxWrapper` ignores T5X's
    `learning_rate_fn`, which is only logged): bind `learning_rate_fn` to
    `learning_rate_schedule` with the same optimizer config so the log shows the true rate.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen.partitioning import AxisMetadata

# At import: spectron_jax.data registers gin configurables, so not after gin locks.
from spectron_jax import data, partitioning, vocabularies
from spectron_jax.config import SpectronConfig
from spectron_jax.feature_converter import SpectronFeatureConverter
from spectron_jax.models import INPUT_TYPES, SpectronModel
from spectron_jax.partitioning import LOGICAL_AXIS_RULES
from spectron_jax.trainer import OptimizerConfig, clamped_to_run, make_optimizer, make_schedule

_T5X_INSTALL_HINT = (
    "spectron_jax.t5x_adapter.SpectronT5XModel needs T5X, which is not on PyPI: install it from "
    "source (git clone https://github.com/google-research/t5x && pip install -e ./t5x) or train "
    "with the built-in trainer: python -m spectron_jax.train --gin_file=gin/spectron_tiny.gin"
)

# Our mesh axes -> T5X's PjitPartitioner mesh axes ("data", "model"). fsdp is data parallelism
# with sharded parameters: in T5X that is the data axis (its parameter_partitioning_dims=2 rules).
_TENSOR_AXIS = "model"


# ------------------------------------------------------------------------------------------------
# Pure helpers (no t5x).
# ------------------------------------------------------------------------------------------------


def _logical_names(leaf: Any) -> tuple[str | None, ...]:
    """Logical axis names of a boxed leaf, deduplicated for flax's `logical_to_mesh_axes`.

    flax (and so T5X) rejects a name used twice in one array ("Dimensions ... occur more than
    once"), e.g. a 2-D conv kernel ("conv", "conv", None, "mlp"). A mesh axis can shard one
    dimension at most anyway, so later repeats become None: the same sharding our
    `partitioning.logical_to_mesh_spec` gives.
    """
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    ndim = len(getattr(value, "shape", ()))
    if not isinstance(leaf, nn.Partitioned):
        return (None,) * ndim  # no metadata: replicated
    names = tuple(leaf.names)
    if len(names) != ndim:
        raise ValueError(f"logical names {names} do not match shape {value.shape}")
    seen: set[str] = set()
    out: list[str | None] = []
    for name in names:
        if isinstance(name, str) and name in seen:
            out.append(None)
            continue
        if isinstance(name, str):
            seen.add(name)
        out.append(name)
    return tuple(out)


def params_axes_from_logical(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The legacy `params_axes` collection T5X reads, from flax logical-partitioning metadata.

    Args:
      variables: `{"params": tree}` whose leaves are `nn.LogicallyPartitioned` boxes (as returned
        by `SpectronModel.get_initial_variables`, or its `jax.eval_shape`); unboxed leaves are
        allowed and get all-None (replicated) names.

    Returns:
      A nested dict mirroring `params` in which the leaf `name` becomes `name + "_axes"` holding
      `flax.linen.partitioning.AxisMetadata(names=(...))`, one name per dimension (what
      `flax.linen.partitioning.param_with_axes` would have sown).
    """
    if "params" not in variables:
        raise ValueError(f"expected a variables dict with 'params', got keys {sorted(variables)}")

    def convert(tree: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, sub in tree.items():
            if isinstance(sub, Mapping):
                out[key] = convert(sub)
            else:
                out[f"{key}_axes"] = AxisMetadata(names=_logical_names(sub))
        return out

    return convert(variables["params"])


def unbox_with_axes(variables: Mapping[str, Any]) -> flax.core.FrozenDict:
    """`{"params": plain arrays, "params_axes": ...}`: the variables layout T5X expects.

    Frozen, like legacy flax's `init`: T5X maps optimizer states (built on `params`) against
    `flax_partitioning.get_axis_names(params_axes)`, which is a FrozenDict, so the two trees
    must have the same container type.
    """
    return flax.core.freeze(
        {
            # `.value`, not `nn.unbox`: unbox adds sharding constraints under the caller's
            # rules (T5X's), which reject repeated names; T5X's out_shardings place the arrays.
            "params": jax.tree.map(
                lambda x: x.value if isinstance(x, nn.Partitioned) else x,
                dict(variables["params"]),
                is_leaf=lambda x: isinstance(x, nn.Partitioned),
            ),
            "params_axes": params_axes_from_logical(variables),
        }
    )


def _mesh_axis(axes: Any, shard_params_over_data: bool) -> Any:
    """Translates one rule's mesh axes to T5X's ("data", "model") mesh."""
    if axes is None:
        return None
    translated = []
    for axis in axes if isinstance(axes, tuple) else (axes,):
        if axis == "data":
            new = "data"
        elif axis == "fsdp":
            new = "data" if shard_params_over_data else None
        elif axis == "tensor":
            new = _TENSOR_AXIS
        else:
            raise ValueError(f"unknown mesh axis {axis!r} in the logical-axis rules")
        if new is not None and new not in translated:
            translated.append(new)
    if not translated:
        return None
    return translated[0] if len(translated) == 1 else tuple(translated)


def t5x_logical_axis_rules(
    shard_params_over_data: bool = False,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> tuple[tuple[str, Any], ...]:
    """Our logical-axis rules table for T5X's `PjitPartitioner` (mesh axes "data", "model").

    `data` -> "data", `tensor` -> "model", `fsdp` -> "data" when `shard_params_over_data` (T5X's
    2-D parameter sharding) and replicated otherwise (T5X's default 1-D rules). A batch rule
    over (data, fsdp) becomes plain "data".

    Args:
      shard_params_over_data: shard the `embed` parameter dimension over the data axis.
      rules: our table (`partitioning.LOGICAL_AXIS_RULES`).

    Returns:
      `(logical_name, mesh_axis_or_None)` pairs, in our table's priority order.
    """
    out = []
    for name, axes in rules:
        # (data, fsdp) batch rules collapse to "data" either way.
        out.append((name, _mesh_axis(axes, shard_params_over_data)))
    return tuple(out)


def _numpy_dtype(dtype: Any) -> Any:
    """T5X passes the dataset's `tf.DType`s as `input_types`; jnp wants numpy dtypes."""
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


def _import_t5x():
    try:
        from t5x import metrics as t5x_metrics
        from t5x import models as t5x_models
        from t5x import optimizers as t5x_optimizers
    except ImportError as e:
        raise ImportError(_T5X_INSTALL_HINT) from e
    return t5x_models, t5x_metrics, t5x_optimizers


def learning_rate_schedule(optimizer: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The optimizer's learning rate by step, for T5X's summaries (gin:
    `trainer.Trainer.learning_rate_fn`): the schedule `spectron_t5x_optimizer` trains with."""
    return make_schedule(clamped_to_run(optimizer, total_steps))


def spectron_t5x_optimizer(config: SpectronConfig, optimizer: OptimizerConfig, total_steps: int):
    """A T5X `OptaxWrapper` around the built-in trainer's optimizer.

    Args:
      config: the model config (says whether the encoder is frozen).
      optimizer: `trainer.OptimizerConfig` (AdamW or Adafactor, warm-up and decay, clipping over
        the trainable parameters), fitted to the run by `trainer.clamped_to_run`.
      total_steps: the run's steps (T5X's TRAIN_STEPS): decay ends there, warm-up takes at most
        half of it.
    """
    _, _, t5x_optimizers = _import_t5x()
    optimizer = clamped_to_run(optimizer, total_steps)
    model = SpectronModel(config)
    return t5x_optimizers.OptaxWrapper(make_optimizer(optimizer, model.trainable_mask))


def t5x_predictions(
    outputs: Mapping[str, jax.Array], aux: Mapping[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`SpectronModel.predict_batch_with_aux` output in T5X's shape: the text ids int32[B, L]
    (transcript then continuation, EOS-terminated: what T5X decodes with the vocabulary) as the
    prediction, the frames float32[B, T, n_mels] beside the lengths in aux."""
    return outputs["text_tokens"], {"frames": outputs["frames"], **aux}


def spectron_t5x_model(
    config: SpectronConfig,
    optimizer_def: Any,
    vocabulary: Any = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    decode_options: Mapping[str, Any] | None = None,
):
    """Gin entry point (dynamic registration): `MODEL = @t5x_adapter.spectron_t5x_model()`.

    Needs t5x when called, not when the gin file is parsed.

    Args:
      config: the model config.
      optimizer_def: a T5X optimizer (`spectron_t5x_optimizer`).
      vocabulary: a seqio vocabulary (`spectron.vocabulary()`); default the shipped tiny one.
      bos_id, eos_id: override the vocabulary's special ids.
      decode_options: `decoding.DecodeConfig` fields for predict / infer / eval (max_text_tokens,
        max_frames, temperature, ...); T5X passes none of its own.
    """
    vocabulary = vocabulary if vocabulary is not None else vocabularies.default_vocabulary()
    model = SpectronModel(config, vocabulary, bos_id=bos_id, eos_id=eos_id)
    return _adapter_class()(model, optimizer_def, decode_options)


def _check_task_vocabulary(cfg: Any, feature_converter_cls: Any) -> None:
    """Raises ValueError when `cfg`'s task encodes its text with another vocabulary than the
    model behind `feature_converter_cls` (`spectron_jax.data.check_task_vocabulary`).

    T5X's train verifies vocabularies only for its `BaseTransformerModel`s; ours is not one, so
    a task left on the tiny vocabulary would otherwise train silently with the wrong ids.
    """
    model = getattr(feature_converter_cls, "spectron_model", None)
    if model is None:
        return  # Not this adapter's converter: nothing to compare with.
    task = cfg.mixture_or_task_name
    data.check_task_vocabulary(getattr(task, "name", task), model)


def get_dataset(cfg, shard_id, num_shards, feature_converter_cls, **kwargs):
    """`t5x.utils.get_dataset` after `_check_task_vocabulary` (gin: `train.get_dataset_fn`)."""
    from t5x import utils

    _check_task_vocabulary(cfg, feature_converter_cls)
    return utils.get_dataset(cfg, shard_id, num_shards, feature_converter_cls, **kwargs)


def get_training_eval_datasets(cfg, shard_id, num_shards, eval_steps, feature_converter_cls, **kw):
    """`t5x.utils.get_training_eval_datasets` after `_check_task_vocabulary`
    (gin: `train.train_eval_get_dataset_fn`)."""
    from t5x import utils

    _check_task_vocabulary(cfg, feature_converter_cls)
    return utils.get_training_eval_datasets(
        cfg, shard_id, num_shards, eval_steps, feature_converter_cls, **kw
    )


# ------------------------------------------------------------------------------------------------
# The BaseModel subclass (needs t5x; built on first use).
# ------------------------------------------------------------------------------------------------


@functools.cache
def _adapter_class() -> type:
    t5x_models, t5x_metrics, _ = _import_t5x()
    from clu import metrics as clu_metrics

    class SpectronT5XModel(t5x_models.BaseModel):
        """`SpectronModel` behind T5X's `BaseModel` interface.

        Attributes:
          spectron: the wrapped `SpectronModel` (its methods do the work; it owns the
            vocabulary, the special ids and the reduction factor).
          module: the flax `Spectron` module.
          FEATURE_CONVERTER_CLS: the wrapped model's converter (T5X calls it with `pack=` and
            `use_custom_packing_ops=`).
          decode_options: `decoding.DecodeConfig` fields of every prediction.
        """

        FEATURE_CONVERTER_CLS = SpectronFeatureConverter

        def __init__(self, spectron: SpectronModel, optimizer_def: Any, decode_options=None):
            super().__init__(optimizer_def=optimizer_def)
            self.spectron = spectron
            self.decode_options = dict(decode_options or {})
            self.config = spectron.config
            self.module = spectron.module

            def feature_converter_cls(*, pack=False, use_custom_packing_ops=False, **kw):
                del use_custom_packing_ops  # nothing to pack
                if pack:
                    raise ValueError(
                        "Spectron's fixed-slot batches cannot be packed: set "
                        "train/utils.DatasetConfig.pack = False (and train_eval/...)"
                    )
                return spectron.feature_converter(pack=False, **kw)

            # For get_dataset / get_training_eval_datasets, which T5X hands only this callable.
            feature_converter_cls.spectron_model = spectron
            self.FEATURE_CONVERTER_CLS = feature_converter_cls

        @property
        def input_vocabulary(self):
            return self.spectron.vocabulary

        @property
        def output_vocabulary(self):
            return self.spectron.vocabulary

        def get_initial_variables(self, rng, input_shapes, input_types=None):
            """`{"params", "params_axes"}` from the batch shapes T5X reads off the dataset."""
            shapes = {k: tuple(input_shapes[k]) for k in INPUT_TYPES if k in input_shapes}
            types = {k: _numpy_dtype(v) for k, v in (input_types or {}).items() if k in INPUT_TYPES}
            # No logical rules inside init: flax's unbox would constrain each param under T5X's
            # rules and reject a repeated name (the conv kernels' ("conv", "conv", ...)). The
            # partitioner's out_shardings (from params_axes, deduplicated) place them anyway.
            with nn.logical_axis_rules(()):
                variables = self.spectron.get_initial_variables(rng, shapes, types)
            return unbox_with_axes(variables)

        def _metrics(self, loss, metrics, batch):
            num_examples = jnp.asarray(batch["decoder_target_tokens"].shape[0])
            out = {
                k: t5x_metrics.AveragePerStep(total=jnp.asarray(v, jnp.float32))
                for k, v in metrics.items()
            }
            out["loss"] = t5x_metrics.AveragePerStep(total=jnp.asarray(loss, jnp.float32))
            out["timing/seqs_per_second"] = t5x_metrics.TimeRate.from_model_output(
                numerator=num_examples
            )
            out["timing/steps_per_second"] = t5x_metrics.StepsPerTime.from_model_output()
            out["timing/seconds"] = t5x_metrics.Time()
            out["timing/seqs"] = t5x_metrics.Sum(num_examples)
            out["non_padding_fraction/frames"] = clu_metrics.Average.from_model_output(
                batch["frame_mask"].astype(jnp.float32)
            )
            return out

        def loss_fn(self, params, batch, dropout_rng):
            loss, metrics = self.spectron.loss_fn(params, batch, dropout_rng)
            return loss, self._metrics(loss, metrics, batch)

        def eval_fn(self, params, batch):
            loss, metrics = self.spectron.loss_fn(params, batch, None)
            return loss, self._metrics(loss, metrics, batch)

        def predict_batch_with_aux(self, params, batch, rng=None, **decode_options):
            """(text ids int32[B, L], {"frames", "text_lengths", "frame_lengths", ...})."""
            options = {**self.decode_options, **decode_options}
            outputs, aux = self.spectron.predict_batch_with_aux(params, batch, rng=rng, **options)
            return t5x_predictions(outputs, aux)

        def score_batch(self, params, batch, return_intermediates=False):
            if return_intermediates:
                raise NotImplementedError("SpectronT5XModel.score_batch: no intermediates")
            return self.spectron.score_batch(params, batch)

    return SpectronT5XModel


@functools.cache
def _partitioner_class() -> type:
    try:
        from t5x import partitioning as t5x_partitioning
    except ImportError as e:
        raise ImportError(_T5X_INSTALL_HINT) from e

    class MeshSetFn(t5x_partitioning.PjittedFnWithContext):
        """T5X's partitioned callable that also sets its mesh (`jax.set_mesh`).

        T5X enters only the legacy `with Mesh(...)`, which Flax's `with_logical_constraint`
        does not see: every activation constraint of the model would silently be dropped (XLA
        then chooses activation shardings alone; see `partitioning.axis_rules`).
        """

        def __call__(self, *args, **kwargs):
            with partitioning.axis_rules(self._mesh, self._logical_axis_rules):
                return self._pjitted_fn(*args, **kwargs)

        def lower(self, *args, **kwargs):
            with partitioning.axis_rules(self._mesh, self._logical_axis_rules):
                return self._pjitted_fn.lower(*args, **kwargs)

    class SpectronPjitPartitioner(t5x_partitioning.PjitPartitioner):
        """T5X's `PjitPartitioner` whose CPU mesh follows `num_partitions` and whose partitioned
        functions apply the model's activation sharding constraints (`MeshSetFn`).

        On CPUs T5X's `default_mesh` ignores `num_partitions` and puts every local device on
        "model" (a (processes, local devices) mesh), so 8 fake devices split the model 8 ways
        (the tiny model's 2 KV heads cannot). Here CPU devices form (devices / num_partitions,
        num_partitions) over ("data", "model"), as T5X does on GPUs and TPUs; other backends,
        and an explicit model_parallel_submesh or ici_mesh_shape, keep T5X's mesh.
        """

        @functools.cached_property
        def mesh(self) -> jax.sharding.Mesh:
            devices = jax.devices(self._backend)
            explicit = self._model_parallel_submesh or self._ici_mesh_shape
            if devices[-1].platform != "cpu" or explicit:
                return t5x_partitioning.default_mesh(
                    self._num_partitions,
                    self._model_parallel_submesh,
                    self._backend,
                    self._ici_mesh_shape,
                    self._dcn_mesh_shape,
                )
            model = self._num_partitions or 1
            if len(devices) % model:
                raise ValueError(
                    f"num_partitions={model} does not divide the {len(devices)} devices"
                )
            return jax.sharding.Mesh(np.asarray(devices).reshape(-1, model), ("data", "model"))

        def partition(self, fn, in_axis_resources, out_axis_resources, **kwargs):
            partitioned = super().partition(fn, in_axis_resources, out_axis_resources, **kwargs)
            return MeshSetFn(partitioned._pjitted_fn, self.mesh, self._logical_axis_rules)

    return SpectronPjitPartitioner


def pjit_partitioner(**kwargs: Any) -> Any:
    """Gin entry point: `partitioner = @t5x_adapter.pjit_partitioner()`, T5X's PjitPartitioner
    arguments (`SpectronPjitPartitioner`: the same, with a CPU mesh that follows num_partitions
    and the model's activation constraints applied)."""
    return _partitioner_class()(**kwargs)


def __getattr__(name: str) -> Any:
    # PEP 562: the subclass exists only where t5x imports; everything else works without it.
    if name == "SpectronT5XModel":
        return _adapter_class()
    if name == "SpectronPjitPartitioner":
        return _partitioner_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

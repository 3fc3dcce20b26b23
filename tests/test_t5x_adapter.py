"""The T5X adapter: params_axes, axis rules, frozen-encoder optimizer and gin file without t5x;
the BaseModel subclass and T5X's own train-state/partitioner plumbing where t5x imports.

T5X is not on PyPI. Point `SPECTRON_T5X_SRC` at its source, and at the sources it needs that are
not on PyPI either (airio, jestimator), joined with os.pathsep; this module puts them on sys.path
(after the installed packages) and on the PYTHONPATH of the `python -m t5x.train` runs:

    SPECTRON_T5X_SRC=/src/t5x:/src/airio:/src/jestimator pytest -m slow tests/test_t5x_adapter.py

Without t5x the tests that need it skip.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from flax.linen import partitioning as flax_partitioning
from jax.sharding import PartitionSpec

from spectron_jax import partitioning, t5x_adapter, trainer
from spectron_jax.feature_converter import SpectronFeatureConverter
from spectron_jax.models import SpectronModel, example_input_shapes

REPO = pathlib.Path(__file__).resolve().parents[1]
T5X_GIN = "gin/t5x/spectron_tiny_train.gin"
# The task the train file reads (the file-backed variant: its data iterator is checkpointed).
TRAIN_TASK = "spectron_synthetic_counting_files"
T5X_PRETRAIN_GIN = "t5x/configs/runs/pretrain.gin"
T5X_SKIP_REASON = (
    "t5x is not importable: set SPECTRON_T5X_SRC to the sources of t5x, airio and jestimator "
    "(os.pathsep-joined) to run T5X's trainer"
)


def _t5x_src_paths() -> list[str]:
    """The source folders of SPECTRON_T5X_SRC (os.pathsep-joined), in order."""
    return [p for p in os.environ.get("SPECTRON_T5X_SRC", "").split(os.pathsep) if p]


# In-process tests import t5x from the same sources the t5x.train runs use.
sys.path.extend(p for p in _t5x_src_paths() if p not in sys.path)


def _t5x_importable() -> bool:
    try:
        import t5x  # noqa: F401
    except ImportError:
        return False
    return True


def _t5x_gin_root() -> str | None:
    """The folder holding T5X's `t5x/configs/runs/pretrain.gin`: a SPECTRON_T5X_SRC entry, else
    the installed t5x package's parent; None where neither has it."""
    import importlib.util

    roots = list(_t5x_src_paths())
    try:
        spec = importlib.util.find_spec("t5x")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        roots.append(str(pathlib.Path(spec.origin).resolve().parents[1]))
    return next((r for r in roots if (pathlib.Path(r) / T5X_PRETRAIN_GIN).is_file()), None)


def _t5x_subprocess_env(*extra_paths, **variables) -> dict[str, str]:
    """The environment of a `python -m t5x.train` run: SPECTRON_T5X_SRC's folders (and
    `extra_paths`) before the caller's PYTHONPATH, and one CPU device, as a user runs it:
    tests/conftest.py's 8 fake devices would give T5X's partitioner a (data 1, model 8) mesh
    that the tiny model's 2 KV heads cannot split (and t5x.train then hangs at exit on its
    checkpoint threads instead of returning)."""
    paths = [*_t5x_src_paths(), *map(str, extra_paths)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    env.pop("XLA_FLAGS", None)
    env.update(variables)
    return env


def _run_t5x(module: str, gin_file: str, log, *args, extra_paths=(), **variables) -> str:
    """Runs `python -m <module> --gin_file=<gin_file> <args>` from the repo root with output to
    `log` (readable when the run fails); returns the log after asserting exit code 0."""
    search = f"--gin_search_paths={REPO},{REPO / 'gin'}"  # gin/: the model files' own includes
    cmd = [sys.executable, "-m", module, search, f"--gin_file={gin_file}"]
    env = _t5x_subprocess_env(*extra_paths, **variables)
    with open(log, "w") as out:
        proc = subprocess.run(
            [*cmd, *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=1200,
        )
    text = pathlib.Path(log).read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def _run_t5x_train(tmp_path, *args, extra_paths=(), **variables) -> str:
    """Runs `python -m t5x.train` on gin/t5x/spectron_tiny_train.gin for 2 steps of batch 4 into
    `tmp_path / "model"`, with `args` after the defaults; returns its log and asserts success
    and a step-2 checkpoint."""
    text = _run_t5x(
        "t5x.train",
        T5X_GIN,
        tmp_path / "t5x_train.log",
        f"--gin.MODEL_DIR='{tmp_path / 'model'}'",
        "--gin.TRAIN_STEPS=2",
        "--gin.BATCH_SIZE=4",
        "--gin.train.eval_period=2",
        "--gin.train.eval_steps=1",
        "--gin.utils.SaveCheckpointConfig.period=2",
        "--gin.seqio.Evaluator.num_examples=4",
        *args,
        extra_paths=extra_paths,
        **variables,
    )
    checkpoints = sorted(p.name for p in (tmp_path / "model").glob("checkpoint_*"))
    assert "checkpoint_2" in checkpoints, (checkpoints, text[-2000:])
    return text


def _tiny_config(**overrides):
    from spectron_jax import config as config_lib  # noqa: F401  (registers the configurables)

    with gin.unlock_config():
        gin.clear_config()
        gin.parse_config_files_and_bindings(
            [str(REPO / "gin/models/tiny.gin")],
            [f"spectron.spectron_config.{k} = {v!r}" for k, v in overrides.items()],
        )
        config = gin.query_parameter("spectron.spectron_model.config").scoped_configurable_fn()
        gin.clear_config()
    return config


@pytest.fixture(scope="module")
def tiny_config():
    return _tiny_config()


@pytest.fixture(scope="module")
def abstract_variables(tiny_config):
    model = SpectronModel(tiny_config)
    shapes = example_input_shapes(tiny_config)
    return jax.eval_shape(lambda r: model.get_initial_variables(r, shapes), jax.random.PRNGKey(0))


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def _boxed_leaves(variables):
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(variables["params"], is_leaf=is_box)[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in flat}


# ------------------------------------------------------------------------------------------------
# Without t5x.
# ------------------------------------------------------------------------------------------------


def test_params_axes_cover_every_param_with_its_logical_names(abstract_variables):
    axes = t5x_adapter.params_axes_from_logical(abstract_variables)
    boxed = _boxed_leaves(abstract_variables)
    flat_axes = _flat(axes)
    assert all(k.endswith("_axes") for k in flat_axes)
    assert {k[: -len("_axes")] for k in flat_axes} == set(boxed)
    for path, leaf in boxed.items():
        names = flat_axes[path + "_axes"].names
        assert isinstance(flat_axes[path + "_axes"], flax_partitioning.AxisMetadata)
        assert len(names) == leaf.value.ndim, path
        # Same names as the flax metadata, except that repeats (2-D conv taps) become None.
        for i, (ours, theirs) in enumerate(zip(names, leaf.names, strict=True)):
            repeated = theirs is not None and theirs in leaf.names[:i]
            assert ours == (None if repeated else theirs), (path, names, leaf.names)
    assert flat_axes["decoder/embedder/embedding_axes"].names == ("vocab", "embed")
    conv = flat_axes["encoder/subsampling/conv1/kernel_axes"].names
    assert conv == ("conv", None, None, "mlp")
    # flax's own reader (what T5X's FlaxOptimTrainState calls) strips "_axes" and gives specs.
    specs = _flat(flax_partitioning.get_axis_names(axes))
    assert set(specs) == set(boxed)
    assert specs["decoder/embedder/embedding"] == PartitionSpec("vocab", "embed")


def test_params_axes_unboxed_leaves_are_replicated_and_bad_input_fails():
    variables = {"params": {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))}}}
    axes = t5x_adapter.params_axes_from_logical(variables)
    assert axes["dense"]["kernel_axes"].names == (None, None)
    assert axes["dense"]["bias_axes"].names == (None,)
    with pytest.raises(ValueError, match="'params'"):
        t5x_adapter.params_axes_from_logical({"cache": {}})
    bad = {"params": {"w": nn.LogicallyPartitioned(jnp.zeros((2, 3)), names=("embed",))}}
    with pytest.raises(ValueError, match="do not match shape"):
        t5x_adapter.params_axes_from_logical(bad)


def test_unbox_with_axes_gives_plain_arrays(tiny_config):
    model = SpectronModel(tiny_config)
    variables = jax.eval_shape(
        lambda r: model.get_initial_variables(r, example_input_shapes(tiny_config)),
        jax.random.PRNGKey(0),
    )
    out = t5x_adapter.unbox_with_axes(variables)
    assert set(out) == {"params", "params_axes"}
    assert isinstance(out["params"], flax.core.FrozenDict)
    leaves = jax.tree.leaves(out["params"])
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_t5x_rules_table_translates_ours():
    rules = dict(t5x_adapter.t5x_logical_axis_rules())
    assert set(rules) == {name for name, _ in partitioning.LOGICAL_AXIS_RULES}
    assert rules["batch"] == "data" and rules["activation_batch"] == "data"
    assert rules["embed"] is None
    for name in ("vocab", "mlp", "heads", "kv_heads", "activation_mlp"):
        assert rules[name] == "model"
    assert set(rules.values()) <= {"data", "model", None}
    assert dict(t5x_adapter.t5x_logical_axis_rules(shard_params_over_data=True))["embed"] == "data"
    with pytest.raises(ValueError, match="unknown mesh axis"):
        t5x_adapter.t5x_logical_axis_rules(rules=(("embed", "pipeline"),))


@pytest.mark.parametrize("fsdp", [False, True])
def test_t5x_param_shardings_equal_ours(abstract_variables, fsdp):
    """T5X's mapping (flax logical_to_mesh_axes over params_axes + translated rules) shards every
    tiny parameter exactly as our partitioning does on the equivalent mesh."""
    devices = jax.devices()[:4]
    ours = {"data": 2, "fsdp": 1, "tensor": 2} if not fsdp else {"data": 1, "fsdp": 2, "tensor": 2}
    mesh = partitioning.create_mesh(**ours, devices=devices)
    # T5X's mesh has two axes; its "data" plays our data (or fsdp) axis, "model" our tensor axis.
    rename = {"model": "tensor", "data": "fsdp" if fsdp else "data"}
    t5x_rules = t5x_adapter.t5x_logical_axis_rules(shard_params_over_data=fsdp)
    specs = _flat(
        flax_partitioning.get_axis_names(t5x_adapter.params_axes_from_logical(abstract_variables))
    )
    for path, leaf in _boxed_leaves(abstract_variables).items():
        theirs = flax_partitioning.logical_to_mesh_axes(specs[path], t5x_rules)
        theirs = tuple(rename.get(a, a) if a else None for a in theirs)
        mine = partitioning.logical_to_mesh_spec(PartitionSpec(*leaf.names), leaf.value.shape, mesh)
        mine = tuple(mine) + (None,) * (leaf.value.ndim - len(mine))
        assert theirs == mine, path


_CONSTANT_ADAMW = trainer.OptimizerConfig(
    learning_rate=1e-2, warmup_steps=0, decay="constant", clip_norm=0.0
)


def test_optimizer_from_the_params_keeps_a_frozen_encoder_out():
    """What T5X's OptaxWrapper gets: the labels come from the params when it initialises."""
    model = SpectronModel(_tiny_config(encoder_frozen=True))
    # trainable_mask looks at the top-level component only: small arrays under the real names.
    rng = np.random.default_rng(0)
    params = {
        top: {
            "dense": {
                "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                "bias": jnp.zeros((4,), jnp.float32),
            }
        }
        for top in ("encoder", "connector", "decoder", "pre_net", "post_net")
    }
    tx = trainer.make_optimizer(_CONSTANT_ADAMW, model.trainable_mask)
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    for top, sub in updates.items():
        peak = max(float(jnp.abs(u).max()) for u in jax.tree.leaves(sub))
        assert (peak == 0.0) == (top == "encoder"), (top, peak)
    # No Adam moments for the frozen encoder: the trainable group's state masks it out.
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    adam = next(
        s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")
    )
    assert all(is_masked(x) for x in jax.tree.leaves(adam.mu["encoder"], is_leaf=is_masked))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(adam.mu["decoder"]))
    # With a trainable encoder, every component moves.
    tx = trainer.make_optimizer(_CONSTANT_ADAMW, SpectronModel(_tiny_config()).trainable_mask)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert float(jnp.abs(updates["encoder"]["dense"]["kernel"]).max()) > 0


# Stand-ins for the t5x names T5X's run files and ours bind, where t5x is not importable.
_T5X_STUB_MODULES = {
    "partitioning": ("PjitPartitioner", "standard_logical_axis_rules"),
    "utils": (
        "DatasetConfig",
        "CheckpointConfig",
        "SaveCheckpointConfig",
        "RestoreCheckpointConfig",
        "create_learning_rate_scheduler",
    ),
    "trainer": ("Trainer",),
    "gin_utils": ("summarize_gin_config",),
}


def _write_t5x_stub(root: pathlib.Path) -> None:
    """A `t5x` package of do-nothing callables and a pretrain.gin declaring the macros T5X's
    declares as required, so that gin's dynamic registration can import and bind them."""
    package = root / "t5x"
    (package / "configs" / "runs").mkdir(parents=True)
    for folder in (package, package / "configs", package / "configs" / "runs"):
        (folder / "__init__.py").write_text("")  # gin reads includes as package resources
    for module, names in _T5X_STUB_MODULES.items():
        body = "".join(f"def {name}(*args, **kwargs):\n    pass\n\n\n" for name in names)
        (package / f"{module}.py").write_text(body)
    (package / "configs" / "runs" / "pretrain.gin").write_text(
        "MIXTURE_OR_TASK_NAME = %gin.REQUIRED\nTASK_FEATURE_LENGTHS = %gin.REQUIRED\n"
        "TRAIN_STEPS = %gin.REQUIRED\nMODEL_DIR = %gin.REQUIRED\nBATCH_SIZE = 128\n"
        "USE_CACHED_TASKS = True\n"
    )


def _parse_t5x_gin(tmp_path, bindings=(), gin_file=T5X_GIN):
    """Parses a T5X train gin file (default gin/t5x/spectron_tiny_train.gin); T5X's
    pretrain.gin (and its modules) come from SPECTRON_T5X_SRC or the installed t5x when found,
    else from `_write_t5x_stub` (removed from sys.path and sys.modules again after parsing; gin
    in interactive mode then, as each parse registers the stub's new functions again)."""
    root = _t5x_gin_root()
    stub = None
    if root is None:
        stub = tmp_path / "t5x_stub"
        _write_t5x_stub(stub)
        root = str(stub)
        sys.path.insert(0, root)
        gin.enter_interactive_mode()
    gin.clear_config()
    for path in (root, str(REPO), str(REPO / "gin")):
        gin.add_config_file_search_path(path)
    try:
        gin.parse_config_files_and_bindings(
            [gin_file],
            [f"MODEL_DIR = '{tmp_path / 'model'}'", *bindings],
            # `train_script` is __main__ (t5x.train when run for real, pytest here).
            skip_unknown=["train_script.train"],
        )
    finally:
        if stub is not None:
            sys.path.remove(root)
            for name in [m for m in sys.modules if m == "t5x" or m.startswith("t5x.")]:
                del sys.modules[name]
            gin.exit_interactive_mode()


def test_t5x_gin_parses_and_binds_our_parts(tmp_path):
    import seqio

    import spectron_tasks  # noqa: F401  (registers the task)

    try:
        _parse_t5x_gin(tmp_path)
        model_ref = gin.query_parameter("%MODEL")
        assert model_ref.selector.endswith("t5x_adapter.spectron_t5x_model")
        config = gin.query_parameter("t5x_adapter.spectron_t5x_model.config")
        config = (
            config.scoped_configurable_fn() if hasattr(config, "scoped_configurable_fn") else config
        )
        lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
        task = gin.query_parameter("%MIXTURE_OR_TASK_NAME")
        assert task == TRAIN_TASK
        assert task in seqio.TaskRegistry.names()
        assert set(lengths) == set(SpectronFeatureConverter.TASK_FEATURES)
        assert lengths["continuation_frames"] % config.reduction_factor == 0
        assert gin.query_parameter("%USE_CACHED_TASKS") is False
        # The optimizer config builds from the gin bindings alone; the logged schedule is the
        # optimizer's, peak after the warm-up.
        optimizer = gin.query_parameter("%OPTIMIZER").scoped_configurable_fn()
        assert optimizer.learning_rate == gin.query_parameter("%LEARNING_RATE")
        steps = gin.query_parameter("%TRAIN_STEPS")
        schedule = t5x_adapter.learning_rate_schedule(optimizer, steps)
        np.testing.assert_allclose(schedule(optimizer.warmup_steps), optimizer.learning_rate)
        assert float(schedule(steps)) == pytest.approx(0.1 * optimizer.learning_rate)
    finally:
        gin.clear_config()


def _built_in_base_experiment() -> tuple:
    """(model config, optimizer config, feature lengths, task, steps, batch) of
    gin/spectron_base.gin, parsed as the built-in trainer parses it."""
    from spectron_jax import config as config_lib
    from spectron_jax import train

    gin.clear_config()
    try:
        train.parse_gin(
            ["gin/spectron_base.gin"],
            ["MODEL_DIR = '/tmp/x'", "INIT_CHECKPOINT = '/tmp/enc'"],
            [str(REPO), str(REPO / "gin")],
        )
        return _experiment(config_lib.spectron_config(), trainer.OptimizerConfig())
    finally:
        gin.clear_config()


def _experiment(config, optimizer) -> tuple:
    names = ("%TASK_FEATURE_LENGTHS", "%MIXTURE_OR_TASK_NAME", "%TRAIN_STEPS", "%BATCH_SIZE")
    return (config, optimizer, *(gin.query_parameter(n) for n in names))


def test_t5x_base_gin_is_the_built_in_base_experiment(tmp_path):
    """gin/t5x/spectron_base_train.gin builds the model, optimizer, task, lengths, steps and
    batch of gin/spectron_base.gin; its encoder init is scoped, so that T5X's resume from
    MODEL_DIR does not apply the assignment map."""
    import spectron_tasks  # noqa: F401  (registers the task)

    want = _built_in_base_experiment()
    try:
        _parse_t5x_gin(
            tmp_path,
            ["INITIAL_CHECKPOINT_PATH = '/ckpt/w2v_bert_t5x/checkpoint_0'"],
            gin_file="gin/t5x/spectron_base_train.gin",
        )
        config = gin.query_parameter("t5x_adapter.spectron_t5x_model.config")
        optimizer = gin.query_parameter("%OPTIMIZER").scoped_configurable_fn()
        # What spectron_t5x_optimizer builds: the schedule fitted to TRAIN_STEPS.
        optimizer = trainer.clamped_to_run(optimizer, gin.query_parameter("%TRAIN_STEPS"))
        got = _experiment(config.scoped_configurable_fn(), optimizer)
        assert got == want
        assert want[0].encoder_frozen and want[0].dtype == "bfloat16"
        assert gin.query_parameter("t5x_adapter.t5x_logical_axis_rules.shard_params_over_data")
        init = "init/utils.RestoreCheckpointConfig"
        assert repr(gin.query_parameter(f"{init}.path")) == "%INITIAL_CHECKPOINT_PATH"
        assert gin.query_parameter("%INITIAL_CHECKPOINT_PATH").endswith("w2v_bert_t5x/checkpoint_0")
        assert gin.query_parameter(f"{init}.assignment_map") == (("(?!target/encoder/).*", None),)
        assert gin.query_parameter(f"{init}.fallback_to_scratch") is True
        with pytest.raises(ValueError):
            gin.query_parameter("utils.RestoreCheckpointConfig.assignment_map")
        assert gin.query_parameter("utils.SaveCheckpointConfig.save_dataset") is False
    finally:
        gin.clear_config()


def test_adapter_class_without_t5x_says_how_to_get_it():
    if _t5x_importable():
        pytest.skip("t5x is installed")
    with pytest.raises(ImportError, match="not on PyPI"):
        t5x_adapter.SpectronT5XModel  # noqa: B018
    with pytest.raises(AttributeError):
        t5x_adapter.NoSuchThing  # noqa: B018


# ------------------------------------------------------------------------------------------------
# With t5x.
# ------------------------------------------------------------------------------------------------


def _t5x_model(config):
    optimizer = t5x_adapter.spectron_t5x_optimizer(config, trainer.OptimizerConfig(), 10)
    return t5x_adapter.spectron_t5x_model(config, optimizer)


def _tf_types(shapes):
    import tensorflow as tf

    floats = ("encoder_features", "decoder_loss_weights", "target_frames")
    return {k: tf.float32 if k in floats else tf.int32 for k in shapes}


def test_adapter_through_t5x_train_state_and_partitioner(tiny_config):
    pytest.importorskip("t5x")
    from t5x import partitioning as t5x_partitioning
    from t5x import train_state as t5x_train_state

    model = _t5x_model(tiny_config)
    assert isinstance(model, t5x_adapter.SpectronT5XModel)
    converter = model.FEATURE_CONVERTER_CLS(pack=False, use_custom_packing_ops=False)
    assert converter.reduction_factor == tiny_config.reduction_factor
    with pytest.raises(ValueError, match="pack"):
        model.FEATURE_CONVERTER_CLS(pack=True, use_custom_packing_ops=False)

    # What t5x.utils.TrainStateInitializer does: abstract init with the dataset's tf dtypes,
    # FlaxOptimTrainState (validates params_axes), then the partitioner's mesh axes.
    shapes = example_input_shapes(tiny_config, batch_size=2)
    types = _tf_types(shapes)

    def init(rng):
        variables = model.get_initial_variables(rng, shapes, types)
        return t5x_train_state.FlaxOptimTrainState.create(model.optimizer_def, variables)

    state = jax.eval_shape(init, jax.random.PRNGKey(0))
    partitioner = t5x_partitioning.PjitPartitioner(
        num_partitions=1, logical_axis_rules=t5x_adapter.t5x_logical_axis_rules()
    )
    mesh_axes = partitioner.get_mesh_axes(state)
    assert mesh_axes.params["decoder"]["embedder"]["embedding"] == PartitionSpec("model", None)
    assert mesh_axes.params["encoder"]["subsampling"]["conv1"]["kernel"] == PartitionSpec(
        None, None, None, "model"
    )


@pytest.mark.slow
def test_adapter_loss_and_score_match_the_model(tiny_config):
    pytest.importorskip("t5x")
    model = _t5x_model(tiny_config)
    shapes = example_input_shapes(tiny_config, batch_size=2)
    types = _tf_types(shapes)
    variables = jax.jit(lambda r: model.get_initial_variables(r, shapes, types))(
        jax.random.PRNGKey(0)
    )
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.normal(size=s), types[k].as_numpy_dtype) for k, s in shapes.items()}
    batch.update({k: jnp.ones(shapes[k], jnp.int32) for k in ("encoder_mask", "frame_mask")})
    batch["decoder_loss_weights"] = jnp.ones(shapes["decoder_loss_weights"])
    batch["text_part"] = jnp.ones(shapes["text_part"], jnp.int32)
    params = variables["params"]
    loss, metrics = jax.jit(model.loss_fn)(params, batch, jax.random.PRNGKey(1))
    ref = jax.jit(SpectronModel(tiny_config).loss_fn)
    ref_loss, ref_metrics = ref(flax.core.unfreeze(params), batch, jax.random.PRNGKey(1))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"].compute(), ref_loss, rtol=1e-6)
    for k, v in ref_metrics.items():
        np.testing.assert_allclose(metrics[k].compute(), v, rtol=1e-6)
    eval_loss, _ = jax.jit(model.eval_fn)(params, batch)
    np.testing.assert_allclose(eval_loss, ref(params, batch, None)[0], rtol=1e-6)
    assert jax.jit(model.score_batch)(params, batch).shape == (2,)


TEXT_METRICS = (
    "transcript_wer",
    "transcript_exact_match",
    "continuation_wer",
    "continuation_word_accuracy",
    "continuation_exact_match",
)


def _jsonl(path) -> list[dict]:
    import json

    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _assert_infer_outputs(out_dir: pathlib.Path, mode: str, num_examples: int) -> list[dict]:
    (path,) = out_dir.glob(f"spectron_synthetic_counting-{mode}.jsonl-*-of-*[0-9]")
    rows = _jsonl(path)
    assert len(rows) == num_examples
    for row in rows:
        assert set(row["inputs"]) == {"id", "prompt_text", "continuation_text"}, row["inputs"]
    return rows


@pytest.mark.slow
def test_t5x_train_eval_infer_with_the_gin_files(tmp_path):
    """The documented short commands: t5x.train for 4 steps (the file's 200 warm-up steps
    clamp to the run), t5x.eval (the tasks' seqio metrics), t5x.infer in predict_with_aux and
    score modes (one JSON line per example)."""
    pytest.importorskip("t5x", reason=T5X_SKIP_REASON)
    model_dir = tmp_path / "model"
    train_log = _run_t5x(
        "t5x.train",
        T5X_GIN,
        tmp_path / "train.log",
        f"--gin.MODEL_DIR='{model_dir}'",
        "--gin.TRAIN_STEPS=4",
        "--gin.BATCH_SIZE=4",
        "--gin.train.eval_period=4",
        "--gin.train.eval_steps=1",
        "--gin.utils.SaveCheckpointConfig.period=4",
        "--gin.seqio.Evaluator.num_examples=8",
    )
    assert "warmup_steps 30 clamped to 2 for a run of 4 steps" in train_log
    # The logged learning rate is the optimizer's: 2e-3 peak at step 2, cosine to 2e-4 at 4.
    rates = [
        float(line.split("learning_rate/current=")[1].split(",")[0])
        for line in train_log.splitlines()
        if "collection=train " in line and "learning_rate/current=" in line
    ]
    assert rates and all(2e-4 <= r <= 2e-3 for r in rates), rates
    # Train-time infer_eval reported the metrics.
    for name in TEXT_METRICS:
        assert f"{TRAIN_TASK}/{name} at step 4" in train_log, name
    checkpoint = model_dir / "checkpoint_4"
    assert checkpoint.is_dir()

    eval_dir = tmp_path / "eval"
    _run_t5x(
        "t5x.eval",
        "gin/t5x/spectron_tiny_eval.gin",
        tmp_path / "eval.log",
        f"--gin.CHECKPOINT_PATH='{checkpoint}'",
        f"--gin.EVAL_OUTPUT_DIR='{eval_dir}'",
        "--gin.utils.DatasetConfig.batch_size=4",
        "--gin.seqio.Evaluator.num_examples=8",
    )
    (metrics,) = _jsonl(eval_dir / "inference_eval" / "spectron_synthetic_counting-metrics.jsonl")
    assert metrics["step"] == 4
    for name in TEXT_METRICS:
        assert 0.0 <= metrics[name] <= 10.0, (name, metrics)
    # The frames of predict_with_aux scored against the examples' own continuation frames.
    assert 0.0 <= metrics["frame_length_ratio"] <= 10.0, metrics
    assert 0.0 <= metrics["frame_empty_fraction"] <= 1.0, metrics
    assert "frame_dtw_l1" in metrics

    for mode in ("predict_with_aux", "score"):
        out_dir = tmp_path / f"infer_{mode}"
        _run_t5x(
            "t5x.infer",
            "gin/t5x/spectron_tiny_infer.gin",
            tmp_path / f"infer_{mode}.log",
            f"--gin.CHECKPOINT_PATH='{checkpoint}'",
            f"--gin.INFER_OUTPUT_DIR='{out_dir}'",
            "--gin.utils.DatasetConfig.batch_size=4",
            f"--gin.infer.mode='{mode}'",
        )
        rows = _assert_infer_outputs(out_dir, mode, num_examples=200)
        if mode == "score":
            assert all(np.isfinite(r["score"]) and r["score"] < 0 for r in rows)
        else:
            for row in rows:
                assert isinstance(row["prediction"], str)
                frames = np.asarray(row["aux"]["frames"])
                assert frames.shape == (96, 80) and np.isfinite(frames).all()
                assert 0 <= row["aux"]["frame_lengths"] <= 96
    back = _convert_and_continue(checkpoint, tmp_path)

    # T5X starts from the twice-converted checkpoint: step 4 restored (and saved again as it
    # was), step 5 trained.
    restarted = tmp_path / "from_converted"
    _run_t5x(
        "t5x.train",
        T5X_GIN,
        tmp_path / "from_converted.log",
        f"--gin.MODEL_DIR='{restarted}'",
        "--gin.TRAIN_STEPS=5",
        "--gin.BATCH_SIZE=4",
        "--gin.train.eval_period=5",
        "--gin.train.eval_steps=1",
        "--gin.train.infer_eval_dataset_cfg=None",
        "--gin.utils.SaveCheckpointConfig.period=5",
        f"--gin.utils.RestoreCheckpointConfig.path='{back}'",
        "--gin.utils.RestoreCheckpointConfig.mode='specific'",
        "--gin.utils.SaveCheckpointConfig.save_dataset=False",
    )
    _assert_same_state(restarted / "checkpoint_4", checkpoint)
    assert (restarted / "checkpoint_5" / "state").is_dir()


def _t5x_state(step_dir: pathlib.Path) -> dict:
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore(step_dir / "state")


def _assert_same_state(got_dir: pathlib.Path, want_dir: pathlib.Path) -> None:
    """Two T5X checkpoints hold the same tree (keys, parameters, moments, step) bit for bit."""
    got, want = _t5x_state(got_dir), _t5x_state(want_dir)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def _convert_and_continue(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    """The T5X checkpoint converted to the project's layout (optimizer state included);
    `spectron continue` speaks from it, and its parameters are the T5X ones bit for bit.
    Converted back, it is the T5X checkpoint key for key; returns that checkpoint_N."""
    import orbax.checkpoint as ocp
    import soundfile

    from spectron_jax import inference
    from spectron_jax.convert import t5x_checkpoint

    converted = tmp_path / "converted"
    tiny_gin = str(REPO / "gin/models/tiny.gin")
    args = ["--t5x", str(checkpoint), "--out", str(converted), "--gin_file", tiny_gin]
    assert t5x_checkpoint.main(args) == 0
    loaded = inference.load_model_for_inference(converted)
    stored = ocp.PyTreeCheckpointer().restore(checkpoint / "state")["target"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(loaded.params):
        want = stored
        for key in path:
            want = want[key.key]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want), err_msg=str(path))
    prompt = tmp_path / "prompt.wav"
    t = np.arange(16000) / 16000
    soundfile.write(prompt, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    out = tmp_path / "continued.wav"
    cli = [sys.executable, "-m", "spectron_jax.cli", "continue", "--checkpoint", str(converted)]
    proc = subprocess.run(
        [*cli, "--audio", str(prompt), "--out", str(out), "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    audio, rate = soundfile.read(out)
    assert rate > 0 and 0 < len(audio) <= 1.1 * rate and np.isfinite(audio).all()

    back = tmp_path / "back_to_t5x"
    assert t5x_checkpoint.main(["--to_t5x", str(converted), "--out", str(back)]) == 0
    _assert_same_state(back / checkpoint.name, checkpoint)
    return back / checkpoint.name


def test_partitioner_puts_cpu_devices_on_data():
    """T5X's own CPU mesh puts all 8 fake devices on "model"; ours follows num_partitions."""
    pytest.importorskip("t5x")
    from t5x import partitioning as t5x_partitioning

    rules = t5x_adapter.t5x_logical_axis_rules()
    assert t5x_partitioning.PjitPartitioner(num_partitions=1).mesh.shape["model"] == 8
    mesh = t5x_adapter.pjit_partitioner(num_partitions=1, logical_axis_rules=rules).mesh
    assert dict(mesh.shape) == {"data": 8, "model": 1}
    mesh = t5x_adapter.pjit_partitioner(num_partitions=2, logical_axis_rules=rules).mesh
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    with pytest.raises(ValueError, match="num_partitions=3 does not divide the 8 devices"):
        t5x_adapter.pjit_partitioner(num_partitions=3).mesh  # noqa: B018


def test_partitioned_functions_apply_activation_constraints():
    """Under T5X's own partitioned callable Flax's activation constraints are dropped (T5X
    enters only the legacy mesh context): nothing reaches the program. Under ours the
    constraint is in it, splitting the batch over data."""
    pytest.importorskip("t5x")
    from t5x import partitioning as t5x_partitioning

    def double(x):
        return nn.with_logical_constraint(2 * x, ("activation_batch", "activation_embed"))

    def constraints(lowered) -> list[str]:
        return [line for line in lowered.as_text().splitlines() if "sharding_constraint" in line]

    rules = t5x_adapter.t5x_logical_axis_rules()
    x = np.ones((8, 3), np.float32)
    ours = t5x_adapter.pjit_partitioner(num_partitions=1, logical_axis_rules=rules)
    # T5X's callable (legacy mesh context and the rules only) on the same (data 8) mesh.
    theirs = t5x_partitioning.PjittedFnWithContext(jax.jit(double), ours.mesh, rules)
    assert constraints(theirs.lower(x)) == []
    (applied,) = constraints(ours.partition(double, None, None).lower(x))
    assert '[{"data"}, {}]' in applied
    np.testing.assert_array_equal(ours.partition(double, None, None)(x), 2 * x)


@pytest.mark.slow
def test_t5x_train_on_8_devices(tmp_path):
    """t5x.train with the gin file on 8 fake CPU devices, batch 8 over data: trains, evaluates
    (loss and seqio metrics) and checkpoints."""
    pytest.importorskip("t5x", reason=T5X_SKIP_REASON)
    text = _run_t5x_train(
        tmp_path,
        "--gin.BATCH_SIZE=8",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    assert f"{TRAIN_TASK}/transcript_wer at step 2" in text


def _t5x_params(step_dir: pathlib.Path) -> dict:
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore(step_dir / "state")["target"]


@pytest.mark.slow
def test_t5x_resume_consumes_the_same_examples(tmp_path):
    """4 steps straight vs 2 steps, a restart, 2 more: bit-identical parameters, because the
    file-backed task's data iterator is saved in the checkpoint (save_dataset) and the data seed
    is fixed. The optimizer's schedule is pinned to 4 steps in both runs."""
    pytest.importorskip("t5x", reason=T5X_SKIP_REASON)
    common = [
        "--gin.BATCH_SIZE=4",
        "--gin.train.eval_period=2",
        "--gin.train.eval_steps=1",
        "--gin.train.infer_eval_dataset_cfg=None",
        "--gin.utils.SaveCheckpointConfig.period=2",
        "--gin.t5x_adapter.spectron_t5x_optimizer.total_steps=4",
        "--gin.t5x_adapter.learning_rate_schedule.total_steps=4",
    ]

    def train(model_dir, steps, log):
        args = [f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}", *common]
        return _run_t5x("t5x.train", T5X_GIN, tmp_path / log, *args)

    train(tmp_path / "straight", 4, "straight.log")
    train(tmp_path / "resumed", 2, "first.log")
    assert (tmp_path / "resumed" / "checkpoint_2" / "dataset").is_dir()
    log = train(tmp_path / "resumed", 4, "second.log")
    assert "checkpoint_2" in log
    straight = _t5x_params(tmp_path / "straight" / "checkpoint_4")
    resumed = _t5x_params(tmp_path / "resumed" / "checkpoint_4")
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(straight), jax.tree.leaves(resumed), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=str(path))


@pytest.mark.slow
def test_t5x_starts_from_a_converted_encoder(tmp_path):
    """gin/t5x/init_encoder.gin (the base run's init) at tiny scale: an encoder-only Orbax tree
    (as convert.to_orbax writes one) -> `--to_t5x` -> t5x.train with the encoder frozen. After
    2 steps the encoder is the converted one bit for bit and the rest trained from scratch; a
    restart resumes from MODEL_DIR without applying the assignment map again."""
    pytest.importorskip("t5x", reason=T5X_SKIP_REASON)
    import orbax.checkpoint as ocp

    from spectron_jax import inference
    from spectron_jax.convert import t5x_checkpoint

    model = SpectronModel(_tiny_config(encoder_frozen=True))
    rng = np.random.default_rng(0)
    encoder = jax.tree.map(
        lambda a: (0.02 * rng.normal(size=a.shape)).astype(a.dtype),
        inference.abstract_params(model)["encoder"],
    )
    ocp.PyTreeCheckpointer().save(tmp_path / "w2v_bert", {"encoder": encoder})
    source, converted = str(tmp_path / "w2v_bert"), tmp_path / "w2v_bert_t5x"
    assert t5x_checkpoint.main(["--to_t5x", source, "--out", str(converted)]) == 0
    init = [
        "--gin_file=gin/t5x/init_encoder.gin",
        f"--gin.INITIAL_CHECKPOINT_PATH='{converted / 'checkpoint_0'}'",
        "--gin.spectron.spectron_config.encoder_frozen=True",
        "--gin.train.infer_eval_dataset_cfg=None",
    ]
    first = _run_t5x_train(tmp_path, *init)
    assert "None replacement using pattern=(?!target/encoder/)" in first
    state = _t5x_state(tmp_path / "model" / "checkpoint_2")
    assert int(state["state"]["step"]) == 2
    # Frozen: no optimizer moments for the encoder.
    assert not [k for k in t5x_checkpoint.flat_by_key(state["state"]) if "/encoder/" in k]
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(state["target"]["encoder"]),
        jax.tree.leaves(encoder),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want, err_msg=str(path))

    (tmp_path / "t5x_train.log").rename(tmp_path / "first.log")
    second = _run_t5x_train(tmp_path, *init, "--gin.TRAIN_STEPS=3")
    assert "None replacement" not in second
    resumed = _t5x_state(tmp_path / "model" / "checkpoint_3")
    assert int(resumed["state"]["step"]) == 3


# ------------------------------------------------------------------------------------------------
# A Gemma-layout vocabulary (pad 0, eos 1, bos 2, unk 3) through the adapter and t5x.train.
# ------------------------------------------------------------------------------------------------

GEMMA_BOS, GEMMA_EOS, GEMMA_UNK = 2, 1, 3


@pytest.fixture(scope="module")
def gemma_vocab_path(tmp_path_factory) -> str:
    import t5x_bos2_task

    return t5x_bos2_task.train_gemma_style_vocabulary(
        tmp_path_factory.mktemp("gemma_vocab") / "gemma_style.model"
    )


def _gemma_vocab_bindings(vocab_path: str) -> list[tuple[str, str]]:
    """(name, value) gin overrides: the model's vocabulary and the task encoded with it."""
    import t5x_bos2_task

    return [
        ("t5x_adapter.spectron_t5x_model.vocabulary", "@spectron.vocabulary()"),
        ("spectron.vocabulary.path", repr(str(vocab_path))),
        ("MIXTURE_OR_TASK_NAME", repr(t5x_bos2_task.TASK)),
    ]


def _assert_gemma_layout(batch, vocab_size: int):
    """Every decoder input starts with Gemma's BOS; each target row holds one EOS; no UNK."""
    inputs = np.asarray(batch["decoder_input_tokens"])
    targets = np.asarray(batch["decoder_target_tokens"])
    np.testing.assert_array_equal(inputs[:, 0], GEMMA_BOS)
    assert not (inputs[:, 1:] == GEMMA_BOS).any(), inputs
    np.testing.assert_array_equal((targets == GEMMA_EOS).sum(axis=1), 1)
    assert not (inputs == GEMMA_UNK).any() and not (targets == GEMMA_UNK).any(), (inputs, targets)
    assert inputs.max() < vocab_size and targets.max() < vocab_size
    # 2 + 2 one-piece words, then EOS: the targets are the inputs shifted by one.
    n_text = np.asarray(batch["decoder_loss_weights"]).sum(axis=1).astype(int)
    np.testing.assert_array_equal(n_text, 5)
    np.testing.assert_array_equal(targets[:, :4], inputs[:, 1:5])
    np.testing.assert_array_equal(targets[:, 4], GEMMA_EOS)


def test_adapter_takes_special_ids_from_a_gemma_vocabulary(tiny_config, gemma_vocab_path):
    pytest.importorskip("t5x")
    from spectron_jax import vocabularies

    vocab = vocabularies.vocabulary(gemma_vocab_path)
    assert vocab.tokenizer.bos_id() == GEMMA_BOS and vocab.tokenizer.unk_id() == GEMMA_UNK
    optimizer = t5x_adapter.spectron_t5x_optimizer(tiny_config, trainer.OptimizerConfig(), 10)
    model = t5x_adapter.spectron_t5x_model(tiny_config, optimizer, vocabulary=vocab)
    assert model.input_vocabulary is vocab and model.output_vocabulary is vocab
    assert model.spectron.vocabulary is vocab
    assert (model.spectron.bos_id, model.spectron.eos_id) == (GEMMA_BOS, GEMMA_EOS)
    converter = model.FEATURE_CONVERTER_CLS(pack=False, use_custom_packing_ops=False)
    assert isinstance(converter, SpectronFeatureConverter)
    assert (converter.bos_id, converter.eos_id) == (GEMMA_BOS, GEMMA_EOS)
    assert converter.reduction_factor == tiny_config.reduction_factor
    # Explicit ids win over the vocabulary's.
    model = t5x_adapter.spectron_t5x_model(tiny_config, optimizer, vocabulary=vocab, bos_id=7)
    converter = model.FEATURE_CONVERTER_CLS(pack=False, use_custom_packing_ops=False)
    assert (converter.bos_id, converter.eos_id) == (7, GEMMA_EOS)
    # The default stays the shipped tiny vocabulary (bos 3), the gin file's tasks' own.
    model = t5x_adapter.spectron_t5x_model(tiny_config, optimizer)
    assert vocabularies.vocabulary_file(model.input_vocabulary) == vocabularies.TINY_SPM_PATH
    assert model.FEATURE_CONVERTER_CLS(pack=False).bos_id == 3


@pytest.mark.slow
def test_t5x_train_with_a_gemma_vocabulary_starts_batches_with_bos_2(tmp_path, gemma_vocab_path):
    """gin/t5x/spectron_tiny_train.gin with the model's vocabulary overridden on the command line
    by a Gemma-layout SentencePiece model and a task encoded with it: the model the gin file builds,
    its converter's batches and the batches t5x.train trains on all start with BOS 2."""
    pytest.importorskip("t5x", reason=T5X_SKIP_REASON)
    import seqio
    import t5x_bos2_task

    from spectron_jax import vocabularies

    cache = tmp_path / "cache"
    t5x_bos2_task.register(gemma_vocab_path, str(cache))
    bindings = _gemma_vocab_bindings(gemma_vocab_path)

    # In-process: the gin file + the same overrides build the adapter over the Gemma vocabulary;
    # its converter (called as t5x.utils.get_dataset calls it) lays out the task's batches.
    try:
        _parse_t5x_gin(tmp_path, [f"{name} = {value}" for name, value in bindings])
        model = gin.query_parameter("%MODEL").scoped_configurable_fn()
        lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
        assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == t5x_bos2_task.TASK
    finally:
        gin.clear_config()
    assert isinstance(model, t5x_adapter.SpectronT5XModel)
    assert vocabularies.vocabulary_file(model.input_vocabulary) == gemma_vocab_path
    task = seqio.get_mixture_or_task(t5x_bos2_task.TASK)
    for feature in ("prompt_transcript", "continuation_transcript"):
        assert task.output_features[feature].vocabulary == model.output_vocabulary
    converter = model.FEATURE_CONVERTER_CLS(pack=False, use_custom_packing_ops=False)
    assert (converter.bos_id, converter.eos_id) == (GEMMA_BOS, GEMMA_EOS)
    ds = seqio.get_dataset(
        t5x_bos2_task.TASK,
        task_feature_lengths=dict(lengths),
        feature_converter=converter,
        dataset_split="train",
        batch_size=8,
    )
    batch = next(ds.as_numpy_iterator())
    assert batch["decoder_input_tokens"].shape[0] == 8
    _assert_gemma_layout(batch, model.output_vocabulary.vocab_size)

    # t5x.train, the overrides as --gin. flags; tests/t5x_bos2_task.gin registers the task in
    # the trainer's process and records the first batch its get_dataset_fn returns.
    batch_log = tmp_path / "first_train_batch.npz"
    _run_t5x_train(
        tmp_path,
        "--gin_file=tests/t5x_bos2_task.gin",
        *(f"--gin.{name}={value}" for name, value in bindings),
        # A generator-backed task: its iterator cannot be saved.
        "--gin.utils.SaveCheckpointConfig.save_dataset=False",
        extra_paths=[REPO / "tests"],
        **{
            t5x_bos2_task.ENV_VOCAB: gemma_vocab_path,
            t5x_bos2_task.ENV_CACHE: str(cache),
            t5x_bos2_task.ENV_BATCH_LOG: str(batch_log),
        },
    )
    with np.load(batch_log) as recorded:
        recorded = dict(recorded)
    assert recorded["decoder_input_tokens"].shape[0] == 4  # --gin.BATCH_SIZE=4, one device
    _assert_gemma_layout(recorded, model.output_vocabulary.vocab_size)

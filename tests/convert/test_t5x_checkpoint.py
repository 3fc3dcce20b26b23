"""T5X `checkpoint_N` <-> the project's layout: parameters and optimizer moments bit-exact both
ways, the step kept, the CLI's loader and the trainer's restore read the result; wrong
architecture, wrong optimizer, wrong directory and a non-empty output fail clearly.

The T5X checkpoint is written here with Orbax in T5X's layout (`checkpoint_N/state`: `target` =
the parameters, `state` = step and `param_states` = flax's state dict of the optax state with
empty nodes removed, as T5X's OptaxWrapper saves it); tests/test_t5x_adapter.py converts a real
one, and starts t5x.train from a converted one, where t5x is installed.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from spectron_jax import config as config_lib
from spectron_jax import inference
from spectron_jax.convert import t5x_checkpoint
from spectron_jax.models import SpectronModel

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_GIN = str(REPO / "gin/models/tiny.gin")


def _tiny_model(*bindings: str) -> SpectronModel:
    import gin

    config_lib.config_from_gin_file(TINY_GIN, (str(REPO),))
    gin.parse_config(bindings)
    try:
        return SpectronModel(config_lib.spectron_config())
    finally:
        gin.clear_config()


def _t5x_param_states(opt_state) -> dict:
    """What T5X's OptaxWrapper saves: flax's state dict of the optax state, empty nodes gone
    (built with flax, independently of the converter's own key mapping)."""
    from flax import serialization, traverse_util

    flat = traverse_util.flatten_dict(serialization.to_state_dict(opt_state), sep="/")
    return traverse_util.unflatten_dict(flat, sep="/")


def _adam_state(model, params):
    """A real AdamW state of the built-in optimizer with non-zero moments."""
    from spectron_jax import trainer

    optimizer = trainer.make_optimizer(trainer.OptimizerConfig(), model.trainable_mask)
    state = optimizer.init(params)
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(np.asarray(x).dtype), state)


def _write_t5x_checkpoint(directory: pathlib.Path, params, opt_state, step: int) -> pathlib.Path:
    """`directory/checkpoint_<step>/state` in T5X's tree."""
    tree = {
        "target": params,
        "state": {
            "step": np.asarray(step, np.int32),
            "param_states": _t5x_param_states(opt_state),
        },
    }
    step_dir = directory / f"checkpoint_{step}"
    ocp.PyTreeCheckpointer().save(step_dir / "state", tree)
    return step_dir


@pytest.fixture(scope="module")
def t5x_run(tmp_path_factory):
    """(model, its random numpy params, an AdamW state, a T5X checkpoint_7 of them)."""
    model = _tiny_model()
    abstract = inference.abstract_params(model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)
    opt_state = _adam_state(model, params)
    step_dir = _write_t5x_checkpoint(tmp_path_factory.mktemp("t5x"), params, opt_state, step=7)
    return model, params, opt_state, step_dir


def _assert_trees_equal(got, want):
    got_leaves, got_def = jax.tree_util.tree_flatten(got)
    want_leaves, want_def = jax.tree_util.tree_flatten(want)
    assert len(got_leaves) == len(want_leaves) and got_leaves
    for a, b in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_converted_checkpoint_loads_bit_exactly_for_inference(t5x_run, tmp_path):
    model, params, _, step_dir = t5x_run
    out = tmp_path / "converted"
    args = ["--t5x", str(step_dir), "--out", str(out), "--gin_file", TINY_GIN, "--params_only"]
    assert t5x_checkpoint.main(args) == 0
    assert (out / "checkpoints" / "7").is_dir()
    loaded = inference.load_model_for_inference(out)
    assert loaded.model.config == model.config
    got = jax.tree_util.tree_leaves_with_path(loaded.params)
    want = dict(jax.tree_util.tree_leaves_with_path(params))
    assert len(got) == len(want)
    for path, leaf in got:
        np.testing.assert_array_equal(np.asarray(leaf), want[path], err_msg=str(path))


def test_wrong_architecture_names_the_parameter(t5x_run, tmp_path, capsys):
    _, _, _, step_dir = t5x_run
    out = tmp_path / "converted"
    code = t5x_checkpoint.main(
        [
            "--t5x",
            str(step_dir),
            "--out",
            str(out),
            "--gin_file",
            TINY_GIN,
            "--gin",
            "spectron.decoder_config.mlp_dim = 512",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "target: decoder/layers_0/mlp/down/kernel is" in err
    assert "float32[768, 256] but the model has float32[512, 256]" in err
    assert not out.exists()


def test_not_a_t5x_checkpoint_and_a_non_empty_output(t5x_run, tmp_path, capsys):
    model, _, _, step_dir = t5x_run
    with pytest.raises(FileNotFoundError, match="not a T5X checkpoint"):
        t5x_checkpoint.convert(tmp_path, tmp_path / "out", model)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        t5x_checkpoint.convert(step_dir, taken, model)
    assert (taken / "keep.txt").read_text() == "mine"


def test_trainer_init_takes_components_of_a_t5x_checkpoint(t5x_run):
    """`train.init_checkpoints = {T5X checkpoint_N: {'decoder': 'target/decoder', ...}}`."""
    from spectron_jax import checkpoints

    model, params, _, step_dir = t5x_run
    abstract = inference.abstract_params(model)
    fresh = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
    loaded = checkpoints.load_subtrees(fresh, step_dir, {"decoder": "target/decoder"}, shardings)
    for got, want in zip(
        jax.tree.leaves(loaded["decoder"]), jax.tree.leaves(params["decoder"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert not np.asarray(jax.tree.leaves(loaded["encoder"])[0]).any()  # left as it was


def _restore_train_state(model_dir: pathlib.Path, model):
    """What the built-in trainer's resume does: restore onto its abstract TrainState."""
    from spectron_jax import checkpoints, trainer

    abstract = inference.abstract_params(model)
    optimizer = trainer.make_optimizer(trainer.OptimizerConfig(), model.trainable_mask)
    state = trainer.TrainState(
        step=jax.ShapeDtypeStruct((), np.int32),
        params=abstract,
        opt_state=jax.eval_shape(optimizer.init, abstract),
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), state)
    ckpt = checkpoints.Checkpointer(model_dir / "checkpoints")
    try:
        return ckpt.restore_latest(state)
    finally:
        ckpt.close()


def test_optimizer_state_converts_both_ways_bit_exactly(t5x_run, tmp_path):
    """T5X -> ours: the trainer resumes the AdamW moments; ours -> T5X: the same tree T5X
    wrote, key for key; the second trip back equals the first."""
    model, params, opt_state, step_dir = t5x_run
    ours = tmp_path / "ours"
    assert (
        t5x_checkpoint.main(["--t5x", str(step_dir), "--out", str(ours), "--gin_file", TINY_GIN])
        == 0
    )
    restored = _restore_train_state(ours, model)
    assert restored.step == 7 and int(restored.state.step) == 7
    _assert_trees_equal(restored.state.params, params)
    _assert_trees_equal(restored.state.opt_state, opt_state)

    back = tmp_path / "t5x_again"
    assert t5x_checkpoint.main(["--to_t5x", str(ours), "--out", str(back)]) == 0
    original = ocp.PyTreeCheckpointer().restore(step_dir / "state")
    again = ocp.PyTreeCheckpointer().restore(back / "checkpoint_7" / "state")
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(original)
    _assert_trees_equal(again, original)


def test_wrong_optimizer_is_named_and_params_only_still_converts(t5x_run, tmp_path, capsys):
    _, _, _, step_dir = t5x_run
    out = tmp_path / "adafactor"
    args = ["--t5x", str(step_dir), "--out", str(out), "--gin_file", TINY_GIN]
    assert t5x_checkpoint.main([*args, "--gin", "OptimizerConfig.name = 'adafactor'"]) == 2
    err = capsys.readouterr().err
    assert "state/param_states: no " in err and "optimizer config differs" in err
    assert not out.exists()


def test_converted_pretrained_tree_becomes_a_t5x_target_at_step_0(tmp_path):
    """A plain Orbax tree (as `convert.to_orbax` writes converted weights) -> checkpoint_0 with
    the tree under `target` and no optimizer state (T5X's partial init fills the rest)."""
    encoder = {"encoder": {"proj": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
    source = tmp_path / "w2v_bert"
    ocp.PyTreeCheckpointer().save(source, encoder)
    out = tmp_path / "t5x"
    assert t5x_checkpoint.main(["--to_t5x", str(source), "--out", str(out)]) == 0
    written = ocp.PyTreeCheckpointer().restore(out / "checkpoint_0" / "state")
    assert int(written["state"]["step"]) == 0 and "param_states" not in written["state"]
    np.testing.assert_array_equal(
        written["target"]["encoder"]["proj"]["kernel"], encoder["encoder"]["proj"]["kernel"]
    )
    assert t5x_checkpoint.main(["--to_t5x", str(source), "--out", str(out)]) == 2  # not empty
    assert (
        t5x_checkpoint.main(["--to_t5x", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
        == 2
    )

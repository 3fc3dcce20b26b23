"""T5X `checkpoint_N` -> the project's layout: parameters bit-exact, step kept, the CLI's loader
reads the result; wrong architecture, wrong directory and a non-empty output fail clearly.

The T5X checkpoint is written here with Orbax in T5X's layout (`checkpoint_N/state`: `target` =
the parameters, `state` = step and optimizer `param_states`), as `t5x.train` through the adapter
writes it; tests/test_t5x_adapter.py converts a real one where t5x is installed.
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


def _write_t5x_checkpoint(directory: pathlib.Path, params, step: int) -> pathlib.Path:
    """`directory/checkpoint_<step>/state` in T5X's tree (one Adam-like moment per parameter)."""
    tree = {
        "target": params,
        "state": {
            "step": np.asarray(step, np.int32),
            "param_states": {"mu": jax.tree.map(np.zeros_like, params)},
        },
    }
    step_dir = directory / f"checkpoint_{step}"
    ocp.PyTreeCheckpointer().save(step_dir / "state", tree)
    return step_dir


@pytest.fixture(scope="module")
def t5x_run(tmp_path_factory):
    """(model, its random numpy params, a T5X checkpoint_7 of them)."""
    model = _tiny_model()
    abstract = inference.abstract_params(model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)
    step_dir = _write_t5x_checkpoint(tmp_path_factory.mktemp("t5x"), params, step=7)
    return model, params, step_dir


def test_converted_checkpoint_loads_bit_exactly_for_inference(t5x_run, tmp_path):
    model, params, step_dir = t5x_run
    out = tmp_path / "converted"
    assert (
        t5x_checkpoint.main(["--t5x", str(step_dir), "--out", str(out), "--gin_file", TINY_GIN])
        == 0
    )
    assert (out / "checkpoints" / "7").is_dir()
    loaded = inference.load_model_for_inference(out)
    assert loaded.model.config == model.config
    got = jax.tree_util.tree_leaves_with_path(loaded.params)
    want = dict(jax.tree_util.tree_leaves_with_path(params))
    assert len(got) == len(want)
    for path, leaf in got:
        np.testing.assert_array_equal(np.asarray(leaf), want[path], err_msg=str(path))


def test_wrong_architecture_names_the_parameter(t5x_run, tmp_path, capsys):
    _, _, step_dir = t5x_run
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
    assert "['decoder']['layers_0']['mlp']" in err
    assert "float32[768, 256] but the model has float32[512, 256]" in err
    assert not out.exists()


def test_not_a_t5x_checkpoint_and_a_non_empty_output(t5x_run, tmp_path, capsys):
    model, _, step_dir = t5x_run
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

    model, params, step_dir = t5x_run
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

"""A T5X `checkpoint_N` -> the project's checkpoint layout, so every CLI command reads it.

    python -m spectron_jax.convert.t5x_checkpoint --t5x /runs/t5x_tiny/checkpoint_3000 \
        --gin_file gin/models/tiny.gin --out /runs/tiny_from_t5x [--vocab FILE]
    spectron continue --checkpoint /runs/tiny_from_t5x prompt.wav

T5X (with `gin/t5x/*.gin` and `t5x_adapter`) saves an Orbax PyTree under `checkpoint_N/state`:
`target` (the parameters, the same tree `SpectronModel` builds) and `state` (`step` and the
optimizer's `param_states`). A T5X checkpoint records no model config of ours, so the
architecture comes from the model gin file the run used (`--gin_file`, `--gin` bindings); every
parameter's name, shape and dtype is checked against it, then read with
`checkpoints.load_subtrees`, as inference reads ours. The output is `<out>/checkpoints/<N>/`
with the parameters (bit-exact), the step, the config and the vocabulary
(`checkpoints.save_for_inference`; no optimizer state). The built-in trainer can also take
components of a T5X checkpoint without this command:
`train.init_checkpoints = {'/runs/t5x_tiny/checkpoint_3000':
{'encoder': 'target/encoder', 'decoder': 'target/decoder'}}`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

PyTree = Any


def read_t5x_checkpoint(step_dir: str | os.PathLike, model: Any) -> tuple[PyTree, int]:
    """(parameters shaped like `model`'s, on the default device; step) of a T5X `checkpoint_N`
    directory.

    Raises:
      FileNotFoundError: `step_dir` has no `state` item (not a T5X checkpoint).
      ValueError: a parameter's stored shape or dtype differs from the model's, or the
        checkpoint lacks parameters the model has.
    """
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    from spectron_jax import checkpoints
    from spectron_jax.inference import abstract_params

    state_dir = epath.Path(step_dir) / "state"
    if not (state_dir / "_METADATA").exists():
        raise FileNotFoundError(
            f"{step_dir} is not a T5X checkpoint: no {state_dir}/_METADATA (pass a "
            "checkpoint_N directory of a T5X model dir)"
        )
    stored = checkpoints.tree_metadata(state_dir)
    if "target" not in stored or "state" not in stored:
        raise ValueError(f"{state_dir} holds {sorted(stored)}, not T5X's target and state")
    abstract = abstract_params(model)
    _check_against(stored["target"], abstract, str(state_dir))
    # The parameters as inference loads ours; then the step, a scalar beside them.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
    subtrees = {name: f"target/{name}" for name in abstract}
    params = checkpoints.load_subtrees(abstract, step_dir, subtrees, shardings)
    step = ocp.PyTreeCheckpointer().restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item={"state": {"step": np.empty((), np.int32)}},
            restore_args={"state": {"step": ocp.RestoreArgs(restore_type=np.ndarray)}},
            partial_restore=True,
        ),
    )["state"]["step"]
    return params, int(step)


def _check_against(stored: PyTree, abstract: PyTree, where: str) -> None:
    """Every model parameter is stored with its shape and dtype; names the first that is not."""
    import jax

    stored_leaves = {jax.tree_util.keystr(p): m for p, m in _flat(stored)}
    for path, want in _flat(abstract):
        key = jax.tree_util.keystr(path)
        got = stored_leaves.get(key)
        if got is None:
            raise ValueError(f"{where}: no parameter {key} (the model gin file differs?)")
        if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            raise ValueError(
                f"{where}: {key} is {got.dtype}{list(got.shape)} but the model has "
                f"{want.dtype}{list(want.shape)} (the model gin file differs?)"
            )


def _flat(tree: PyTree) -> list:
    import jax

    return jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict)
    )[0]


def convert(step_dir: str | os.PathLike, out: str | os.PathLike, model: Any) -> str:
    """Writes T5X `step_dir` as `<out>/checkpoints/<N>/`; returns that directory.

    Raises:
      FileExistsError: `out` exists and is not empty (nothing is overwritten).
    """
    from spectron_jax import checkpoints

    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty: choose a new --out")
    params, step = read_t5x_checkpoint(step_dir, model)
    return os.fspath(checkpoints.save_for_inference(out, model, params, step=step))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t5x", required=True, help="a T5X checkpoint_N directory")
    parser.add_argument("--out", required=True, help="new model dir to write")
    parser.add_argument("--gin_file", required=True, help="the run's model gin file")
    parser.add_argument("--gin", action="append", default=[], help="extra gin bindings")
    parser.add_argument("--vocab", default=None, help="tokenizer file (default: the tiny one)")
    args = parser.parse_args(argv)

    from spectron_jax import config as config_lib
    from spectron_jax import vocabularies
    from spectron_jax.models import SpectronModel

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config_lib.config_from_gin_file(args.gin_file, (repo, os.getcwd()))
    import gin

    gin.parse_config(args.gin)
    vocabulary = vocabularies.vocabulary(args.vocab, light=True) if args.vocab else None
    model = SpectronModel(config_lib.spectron_config(), vocabulary)
    try:
        written = convert(args.t5x, args.out, model)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""T5X `checkpoint_N` <-> the project's checkpoint layout, lossless both ways.

T5X -> project (every CLI command reads the result; the built-in trainer resumes it):
    python -m spectron_jax.convert.t5x_checkpoint --t5x /runs/t5x_tiny/checkpoint_3000 \
        --gin_file gin/models/tiny.gin --out /runs/tiny_from_t5x [--vocab FILE] [--params_only]
    spectron continue --checkpoint /runs/tiny_from_t5x prompt.wav
project -> T5X (a `t5x.train` run starts from it through `utils.RestoreCheckpointConfig`):
    python -m spectron_jax.convert.t5x_checkpoint --to_t5x /runs/tiny --out /runs/tiny_t5x
    python -m spectron_jax.convert.t5x_checkpoint --to_t5x /ckpt/w2v_bert --out /ckpt/w2v_bert_t5x

The layouts. T5X (through `gin/t5x/*.gin` and `t5x_adapter`) writes one Orbax PyTree,
`checkpoint_N/state`: `target` (the parameters: the tree `SpectronModel` builds) and `state`
(`step`, and `param_states`: the optax state as flax's state dict, where tuple positions become
the keys "0", "1", ... and empty states vanish). Ours is `checkpoints/N/state` = `TrainState`
(`step`, `params`, `opt_state`) beside the data position, the model config and the vocabulary.
Every array leaf has the same key path in both (`t5x_key`), so arrays are copied, never
recomputed: the conversion is bit-exact both ways, optimizer moments included.

- T5X -> project: a T5X checkpoint records no model config of ours, so the architecture comes
  from the model gin file the run used (`--gin_file`, `--gin` bindings), and the optimizer
  state is fitted to the built-in optimizer (`trainer.OptimizerConfig`; only `name` changes its
  shape; `--gin "OptimizerConfig.name = 'adafactor'"` for Adafactor runs). Every name, shape
  and dtype is checked. The data position is not carried over (T5X's is a tf.data iterator
  state): a built-in run resumed from the result reads its pipeline from the start.
  `--params_only` writes what inference needs (`checkpoints.save_for_inference`).
- project -> T5X: a model dir, its `checkpoints/` or a step dir gives its step, parameters and
  optimizer state as they are; any other Orbax PyTree directory (converted pretrained weights,
  `spectron_jax.convert.to_orbax`) becomes `target` at step 0 without optimizer state, for
  T5X's partial init (`gin/t5x/base.gin`: the encoder from it, the rest from scratch).
  `<out>/checkpoint_N` has no `dataset/` item: start T5X from it with
  `utils.RestoreCheckpointConfig.path` (mode 'specific'), not as a MODEL_DIR to resume.

The built-in trainer can also take components of a T5X checkpoint without this command:
`train.init_checkpoints = {'/runs/t5x_tiny/checkpoint_3000':
{'encoder': 'target/encoder', 'decoder': 'target/decoder'}}`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

PyTree = Any


# ----------------------------------------------------------------------------------------------
# Key paths: the one correspondence between the two layouts
# ----------------------------------------------------------------------------------------------


def t5x_key(path: tuple) -> str:
    """The "/"-joined key of a leaf as flax's state dict (and so T5X) names it: dict keys and
    namedtuple fields as they are, sequence positions as "0", "1", ...

    Both our Orbax trees (lists, dicts) and live optax states (tuples, namedtuples) give the same
    key for the same leaf.
    """
    import jax

    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        else:
            raise TypeError(f"cannot name the tree path entry {entry!r} in T5X's layout")
    return "/".join(parts)


def flat_by_key(tree: PyTree) -> dict[str, Any]:
    """{t5x_key: leaf} of every array leaf (empty states and None have none)."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array)[0]
    return {t5x_key(path): leaf for path, leaf in leaves}


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b": x} -> {"a": {"b": x}}: flax's state-dict layout of `flat_by_key`'s output."""
    out: dict[str, Any] = {}
    for key, leaf in flat.items():
        node = out
        *parents, last = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return out


def fitted(flat: Mapping[str, Any], template: PyTree, where: str) -> PyTree:
    """The arrays of `flat` ({t5x_key: array}) in the structure of `template` (abstract arrays).

    Raises:
      ValueError: a key of the template is missing from `flat`, has another shape or dtype, or
        `flat` holds keys the template does not have (a different optimizer).
    """
    import jax

    leaves, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=_is_array)
    values = []
    for path, want in leaves:
        key = t5x_key(path)
        if key not in flat:
            raise ValueError(f"{where}: no {key} (the model or optimizer config differs?)")
        got = flat[key]
        if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            raise ValueError(
                f"{where}: {key} is {np.dtype(got.dtype)}{list(got.shape)} but the model has "
                f"{np.dtype(want.dtype)}{list(want.shape)} (the model gin file differs?)"
            )
        values.append(got)
    extra = sorted(set(flat) - {t5x_key(p) for p, _ in leaves})
    if extra:
        raise ValueError(
            f"{where}: {len(extra)} arrays the config does not have, e.g. {extra[0]} (another "
            "optimizer? bind OptimizerConfig.name, or pass --params_only)"
        )
    return jax.tree_util.tree_unflatten(treedef, values)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Mapping)


def _read_numpy(pytree_dir: Any) -> PyTree:
    """A whole Orbax PyTree directory as host numpy arrays (no template needed)."""
    import jax
    import orbax.checkpoint as ocp

    from spectron_jax import checkpoints

    stored = checkpoints.tree_metadata(pytree_dir)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
    return ocp.PyTreeCheckpointer().restore(
        pytree_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args)
    )


# ----------------------------------------------------------------------------------------------
# T5X -> project
# ----------------------------------------------------------------------------------------------


def read_t5x_checkpoint(
    step_dir: str | os.PathLike, model: Any, optimizer: Any = None
) -> tuple[PyTree, PyTree | None, int]:
    """(parameters shaped like `model`'s, the optimizer state or None, step) of a T5X
    `checkpoint_N` directory, as host arrays.

    Args:
      step_dir: the T5X `checkpoint_N` directory.
      model: the `SpectronModel` it was trained as.
      optimizer: the `trainer.OptimizerConfig` it was trained with; None reads no optimizer
        state.

    Raises:
      FileNotFoundError: `step_dir` has no `state` item (not a T5X checkpoint).
      ValueError: a parameter or moment is missing, or its shape or dtype differs.
    """
    import jax
    from etils import epath

    from spectron_jax import trainer
    from spectron_jax.inference import abstract_params

    state_dir = epath.Path(step_dir) / "state"
    if not (state_dir / "_METADATA").exists():
        raise FileNotFoundError(
            f"{step_dir} is not a T5X checkpoint: no {state_dir}/_METADATA (pass a "
            "checkpoint_N directory of a T5X model dir)"
        )
    stored = _read_numpy(state_dir)
    if "target" not in stored or "state" not in stored:
        raise ValueError(f"{state_dir} holds {sorted(stored)}, not T5X's target and state")
    abstract = abstract_params(model)
    params = fitted(flat_by_key(stored["target"]), abstract, f"{state_dir} target")
    opt_state = None
    if optimizer is not None:
        template = jax.eval_shape(
            trainer.make_optimizer(optimizer, model.trainable_mask).init, abstract
        )
        moments = flat_by_key(stored["state"].get("param_states", {}))
        opt_state = fitted(moments, template, f"{state_dir} state/param_states")
    return params, opt_state, int(stored["state"]["step"])


def convert(
    step_dir: str | os.PathLike, out: str | os.PathLike, model: Any, optimizer: Any = None
) -> str:
    """Writes T5X `step_dir` as `<out>/checkpoints/<N>/`; returns that directory.

    `optimizer` (a `trainer.OptimizerConfig`) carries the optimizer state over; None writes the
    parameters only.

    Raises:
      FileExistsError: `out` exists and is not empty (nothing is overwritten).
    """
    from spectron_jax import checkpoints

    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty: choose a new --out")
    params, opt_state, step = read_t5x_checkpoint(step_dir, model, optimizer)
    written = checkpoints.save_for_inference(out, model, params, step=step, opt_state=opt_state)
    return os.fspath(written)


# ----------------------------------------------------------------------------------------------
# project -> T5X
# ----------------------------------------------------------------------------------------------


def write_t5x_checkpoint(
    model_dir: str | os.PathLike, step: int, params: PyTree, opt_state: PyTree = None
) -> str:
    """Writes `<model_dir>/checkpoint_<step>/state` in T5X's layout; returns the step dir.

    Args:
      model_dir: the T5X model dir to write into.
      step: the optimizer step.
      params: the parameter tree (T5X's `target`).
      opt_state: our optimizer state (optax objects or as Orbax restores it), or None.
    """
    import orbax.checkpoint as ocp

    state: dict[str, Any] = {"step": np.asarray(step, np.int32)}
    moments = flat_by_key(opt_state) if opt_state is not None else {}
    if moments:
        state["param_states"] = nested(moments)
    tree = {"target": nested(flat_by_key(params)), "state": state}
    options = ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True)
    manager = ocp.CheckpointManager(os.fspath(model_dir), item_names=("state",), options=options)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))
    manager.wait_until_finished()
    manager.close()
    return os.path.join(os.fspath(model_dir), f"checkpoint_{step}")


def to_t5x(source: str | os.PathLike, out: str | os.PathLike) -> str:
    """Writes a project checkpoint (model dir, `checkpoints/` or step dir: step, parameters and
    optimizer state) or a plain Orbax PyTree directory (converted weights: the whole tree as
    `target`, step 0) as T5X's `<out>/checkpoint_N`; returns that directory.

    Raises:
      FileExistsError: `out` exists and is not empty.
      FileNotFoundError: `source` holds no checkpoint.
    """
    from etils import epath

    from spectron_jax import checkpoints

    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty: choose a new --out")
    source = epath.Path(source)
    if (source / "_METADATA").exists() and not (source / "state").is_dir():
        return write_t5x_checkpoint(out, 0, _read_numpy(source))
    step_dir = checkpoints.find_step_dir(source)
    stored = _read_numpy(step_dir / "state")
    return write_t5x_checkpoint(out, int(stored["step"]), stored["params"], stored.get("opt_state"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--t5x", help="a T5X checkpoint_N directory to convert to ours")
    direction.add_argument("--to_t5x", help="a project checkpoint (or Orbax tree) to convert")
    parser.add_argument("--out", required=True, help="new model dir to write")
    parser.add_argument("--gin_file", help="with --t5x: the run's model gin file")
    parser.add_argument("--gin", action="append", default=[], help="extra gin bindings")
    parser.add_argument("--vocab", default=None, help="tokenizer file (default: the tiny one)")
    parser.add_argument("--params_only", action="store_true", help="no optimizer state")
    args = parser.parse_args(argv)
    try:
        if args.to_t5x:
            written = to_t5x(args.to_t5x, args.out)
        else:
            if not args.gin_file:
                parser.error("--t5x needs --gin_file (the run's model gin file)")
            model, optimizer = _model_from_gin(args.gin_file, args.gin, args.vocab)
            written = convert(args.t5x, args.out, model, None if args.params_only else optimizer)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


def _model_from_gin(gin_file: str, bindings: list[str], vocab: str | None) -> tuple[Any, Any]:
    """(SpectronModel, trainer.OptimizerConfig) bound by a model gin file and bindings."""
    import gin

    from spectron_jax import config as config_lib
    from spectron_jax import trainer, vocabularies
    from spectron_jax.models import SpectronModel

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config_lib.config_from_gin_file(gin_file, (repo, os.getcwd()))
    gin.parse_config(bindings)
    vocabulary = vocabularies.vocabulary(vocab, light=True) if vocab else None
    return SpectronModel(config_lib.spectron_config(), vocabulary), trainer.OptimizerConfig()


if __name__ == "__main__":
    sys.exit(main())

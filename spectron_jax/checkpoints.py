"""Orbax checkpoints: the layout on disk (both ways), save and keep policies, resume order, and
partial init. Nothing else in the package knows where a checkpoint keeps what.

Each checkpoint step directory `<model_dir>/checkpoints/<step>/` holds:
  state/       the `TrainState` (sharded arrays; async save),
  data/        JSON {"batches_consumed": n, "seed": s}: the data-iterator position, so a resumed
               run skips exactly the batches it already trained on,
  config/      JSON model config (`SpectronConfig.to_dict()`, spectrogram config included),
  vocabulary/  the tokenizer file itself (`tiny_spm.model`, `tokenizer.json`, ...) and
               `vocabulary.json` (file name, sha256, vocab size, extra ids, BOS / EOS / PAD),
so that a step directory is all a tool needs: `find_step_dir`, `read_model_config` and
`read_vocabulary` read it, `save_for_inference` writes it for converted weights. Checkpoints
from before `vocabulary/` existed still load where the caller names the vocabulary file.

Orbax writes a step into a `*.orbax-checkpoint-tmp-*` directory and renames it when complete, so a
process killed mid-save leaves only a tmp directory, which step listing ignores: resuming always
finds the previous complete step. A step that is complete on disk but unreadable (truncated files)
is skipped with a warning in favour of the one before it and moved to `unreadable/<step>` (kept,
never deleted), so the run saves that step again. When every step is unreadable the run stops
and says so, unless `CheckpointConfig.fresh_start_if_unreadable` asks for a fresh start.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from spectron_jax.nn import frame_heads, stack

PyTree = Any
logger = logging.getLogger(__name__)

VOCABULARY_ITEM = "vocabulary"
VOCABULARY_JSON = "vocabulary.json"
# Where unreadable steps go (a non-numeric name: Orbax's step listing ignores it).
UNREADABLE_DIR = "unreadable"


class MissingVocabularyError(FileNotFoundError):
    """A checkpoint that records no vocabulary, with no vocabulary file given either."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (a full disk, a read-only directory); the steps written
    before it are intact."""


class UnreadableCheckpointsError(RuntimeError):
    """Every checkpoint step in a model dir failed to restore (nothing is started over them)."""


class ConfigMismatchError(ValueError):
    """A checkpoint was written by a differently built model: never taken for a damaged one."""


class LayerLayoutError(ConfigMismatchError):
    """The checkpoint holds the layers scanned where the model unrolls them, or the reverse."""


class FrameHeadMismatchError(ConfigMismatchError):
    """The checkpoint's frame head (`SpectronConfig.frame_head`) is not the config's."""


def _check_frame_head(expected: Mapping[str, Any], stored: Mapping[str, Any], what: str) -> None:
    """Raises `FrameHeadMismatchError` when the two `{"params": ...}` trees' heads differ."""
    want = frame_heads.kind_of_params(dict(expected.get("params", {})))
    got = frame_heads.kind_of_params(dict(stored.get("params", {})))
    if want and got and want != got:
        raise FrameHeadMismatchError(
            f"{what} was written with frame_head={got!r}; the config asks for frame_head="
            f"{want!r}. Set spectron.spectron_config.frame_head = {got!r} to resume it, or "
            "start a new model dir with train.init_checkpoint taking only the subtrees both "
            "heads share (encoder, connector, decoder, pre_net)."
        )


def tree_metadata(directory: str | epath.Path) -> dict[str, Any]:
    """The nested-dict tree (leaves: array metadata) of an Orbax PyTree directory (no arrays)."""
    meta = ocp.PyTreeCheckpointer().metadata(epath.Path(directory))
    meta = getattr(meta, "item_metadata", meta)
    return dict(getattr(meta, "tree", meta))


# ----------------------------------------------------------------------------------------------
# The vocabulary item: the tokenizer file and the special ids, as plain files.
# ----------------------------------------------------------------------------------------------


class _VocabularyHandler(ocp.CheckpointHandler):
    """Copies the tokenizer file into the step's `vocabulary/` item, beside `vocabulary.json`."""

    def save(self, directory: epath.Path, args: VocabularySave) -> None:
        if jax.process_index() != 0:  # One writer: the directory is shared by all hosts.
            return
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.file, os.fspath(directory / os.path.basename(args.file)))
        (directory / VOCABULARY_JSON).write_text(json.dumps(args.record, indent=2))

    def restore(self, directory: epath.Path, args: Any = None) -> dict[str, Any]:
        del args
        return json.loads((epath.Path(directory) / VOCABULARY_JSON).read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(_VocabularyHandler, for_save=True)
@dataclasses.dataclass
class VocabularySave(ocp.args.CheckpointArgs):
    """Save args of the vocabulary item: the tokenizer file and its JSON record."""

    file: str
    record: dict[str, Any]


@ocp.args.register_with_handler(_VocabularyHandler, for_restore=True)
@dataclasses.dataclass
class VocabularyRestore(ocp.args.CheckpointArgs):
    """Restore args of the vocabulary item (Orbax needs both; `read_vocabulary` reads the plain
    files instead)."""


def vocabulary_record(vocabulary: Any) -> VocabularySave | None:
    """What a checkpoint stores of a model's vocabulary (None for one without a file)."""
    from spectron_jax import vocabularies

    path = vocabularies.vocabulary_file(vocabulary)
    if path is None:
        logger.warning(
            "checkpoint: vocabulary %s has no file to store; tools will need it passed",
            vocabularies.describe(vocabulary),
        )
        return None
    ids = vocabularies.special_ids(vocabulary)
    record = {
        "file": os.path.basename(path),
        "sha256": vocabularies.file_digest(path),
        "vocab_size": int(vocabulary.vocab_size),
        "extra_ids": int(getattr(vocabulary, "extra_ids", 0)),
        **ids.to_dict(),
    }
    return VocabularySave(file=path, record=record)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and what to keep.

    Attributes:
      every_steps: save when step % every_steps == 0 (0 = never by step count).
      every_minutes: also save when this many minutes passed since the last save (0 = off).
      keep_last: keep the newest K checkpoints.
      keep_every: additionally keep every checkpoint whose step is a multiple of M (0 = off).
      async_save: write in a background thread while training continues.
      fresh_start_if_unreadable: when every checkpoint in the directory is unreadable, train
        from scratch (they are set aside) instead of stopping with `UnreadableCheckpointsError`.
    """

    every_steps: int = 1000
    every_minutes: float = 0.0
    keep_last: int = 3
    keep_every: int = 0
    async_save: bool = True
    fresh_start_if_unreadable: bool = False


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore_latest` found."""

    step: int
    state: PyTree
    data: dict[str, Any]
    config: dict[str, Any] | None


class Checkpointer:
    """Thin policy layer over `ocp.CheckpointManager` (one per model dir)."""

    def __init__(
        self,
        directory: str | epath.Path,
        config: CheckpointConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        vocabulary: Any = None,
    ):
        """Opens (or creates) the checkpoint directory.

        Args:
          directory: the model dir's checkpoint directory.
          config: save / keep policy.
          clock: seconds, injectable so time-based saving is testable.
          vocabulary: the model's vocabulary, stored in every step (None: not stored).
        """
        self.directory = epath.Path(directory)
        self.config = config or CheckpointConfig()
        self.clock = clock
        self._vocabulary = vocabulary_record(vocabulary) if vocabulary is not None else None
        self._last_save_time = clock()
        self._in_flight: int | None = None  # The step of a background save not yet waited for.
        self._failure: CheckpointSaveError | None = None
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(max(self.config.keep_last, 1))]
        if self.config.keep_every > 0:
            policies.append(ocp.checkpoint_managers.EveryNSteps(self.config.keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=self.config.async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "config", VOCABULARY_ITEM),
            options=options,
        )

    # -- saving ----------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Step- or time-based decision, identical on every process."""
        cfg = self.config
        due = cfg.every_steps > 0 and step % cfg.every_steps == 0
        if cfg.every_minutes > 0:
            timed = self.clock() - self._last_save_time >= cfg.every_minutes * 60
            if jax.process_count() > 1:
                # Host clocks differ; process 0 decides so that all processes enter the save.
                timed = bool(multihost_utils.broadcast_one_to_all(np.asarray(timed)))
            due = due or timed
        return due

    def save(
        self,
        step: int,
        state: PyTree,
        data: Mapping[str, Any],
        model_config: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves the state, data position and model config if the policy says so (or `force`).

        Args:
          step: the number of optimizer steps taken (the checkpoint's name).
          state: the train state (sharded arrays).
          data: the data-iterator position, JSON-serialisable.
          model_config: the model config, JSON-serialisable.
          force: save regardless of the policy.

        Returns:
          True if a save was started.
        """
        if step in self.manager.all_steps():
            return False
        if not (force or self.should_save(step)):
            return False
        items = {
            "state": ocp.args.StandardSave(state),
            "data": ocp.args.JsonSave(dict(data)),
            "config": ocp.args.JsonSave(dict(model_config or {})),
        }
        if self._vocabulary is not None:
            items[VOCABULARY_ITEM] = self._vocabulary
        try:
            # An earlier background save's failure surfaces here too: name that step.
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as err:  # noqa: BLE001 - every write failure is the same message
            raise self._save_failed(self._in_flight or step, err) from err
        self._in_flight = step if self.config.async_save else None
        self._last_save_time = self.clock()
        logger.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def wait(self) -> None:
        """Blocks until a background save is on disk.

        Raises:
          CheckpointSaveError: the save failed (nothing of it is listed as a step).
        """
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self._save_failed(self._in_flight, err) from err
        self._in_flight = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    def _save_failed(self, step: int | None, err: BaseException) -> CheckpointSaveError:
        """The error of a failed save, naming the step, the cause, and the intact checkpoint."""
        if isinstance(err, CheckpointSaveError):
            return err
        if self._failure is not None:  # Orbax raises a background failure again on close.
            return self._failure
        self._in_flight = None
        try:
            good = self.latest_good_step()
        except Exception:  # noqa: BLE001 - the directory itself may be what failed
            good = None
        kept = f"step {good} in {self.directory}" if good is not None else "none"
        why = str(err).splitlines()[0][:300] if str(err) else ""
        self._failure = CheckpointSaveError(
            f"saving checkpoint step {step} to {self.directory} failed ({type(err).__name__}: "
            f"{why}). Orbax writes a step into a temporary directory and renames it only when "
            f"complete, so nothing half-written is listed. Newest complete checkpoint: {kept}. "
            "Free disk space or fix the directory's permissions, then restart to resume from it."
        )
        return self._failure

    # -- restoring ------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Complete checkpoint steps on disk, oldest first (unfinished saves excluded)."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_good_step(self) -> int | None:
        """The newest step whose save has finished (the one a failure message should name)."""
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, step: int, abstract_state: PyTree) -> Restored:
        """Restores one step onto the shardings of `abstract_state` (ShapeDtypeStructs).

        Raises:
          LayerLayoutError: the step stores layers scanned where the model unrolls them (or the
            reverse): a config mismatch, named, never taken for a damaged checkpoint.
          FrameHeadMismatchError: the step's frame head is not the model's.
        """
        state_dir = self.directory / str(step) / "state"
        if state_dir.is_dir():
            # A TrainState is no mapping: its params are what can be laid out either way.
            params = getattr(abstract_state, "params", None)
            expected = abstract_state if params is None else {"params": params}
            stored = tree_metadata(state_dir)
            _check_frame_head(expected, stored, f"checkpoint step {step} in {self.directory}")
            mismatches = stack.layout_mismatches(expected, stored)
            if mismatches:
                raise LayerLayoutError(
                    f"checkpoint step {step} in {self.directory} was written with the other "
                    f"`scan_layers` ({'; '.join(mismatches)}): set "
                    "spectron.decoder_config.scan_layers / spectron.conformer_config.scan_layers "
                    "to the checkpoint's layout to resume it, or start a new model dir with "
                    "train.init_checkpoint pointing at it (init converts the layout)"
                )
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return Restored(step=step, state=out.state, data=dict(out.data), config=out.config)

    def restore_latest(self, abstract_state: PyTree) -> Restored | None:
        """Newest readable checkpoint; unreadable ones are skipped with a warning and set aside
        (`set_aside`), so that the run writes those steps again and `keep_last` counts good
        checkpoints only.

        Returns:
          The restored checkpoint, or None when the directory holds none.

        Raises:
          UnreadableCheckpointsError: every step is unreadable, unless
            `config.fresh_start_if_unreadable` (then they are set aside and None returned).
        """
        unreadable: dict[int, str] = {}
        for step in reversed(self.steps()):
            try:
                restored = self.restore(step, abstract_state)
            except ConfigMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 - any read failure means "try the previous"
                unreadable[step] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                logger.warning(
                    "checkpoint: step %d in %s is unreadable (%s); falling back to the previous "
                    "checkpoint",
                    step,
                    self.directory,
                    unreadable[step],
                )
                continue
            self.set_aside(sorted(unreadable))
            return restored
        if unreadable and not self.config.fresh_start_if_unreadable:
            listing = "; ".join(f"step {s}: {why}" for s, why in sorted(unreadable.items()))
            raise UnreadableCheckpointsError(
                f"every checkpoint in {self.directory} is unreadable ({listing}). Nothing was "
                "changed. Copy good checkpoints back, or start over with "
                "--gin.checkpoints.CheckpointConfig.fresh_start_if_unreadable=True (they are "
                f"then moved to {self.directory / UNREADABLE_DIR})."
            )
        if unreadable:
            logger.warning("checkpoint: every step is unreadable; training from scratch as asked")
        self.set_aside(sorted(unreadable))
        return None

    def set_aside(self, steps: Sequence[int]) -> None:
        """Moves unreadable step dirs to `<directory>/unreadable/<step>[.n]`: kept for a look,
        out of Orbax's step list (so those steps are saved again), never deleted."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory / UNREADABLE_DIR
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target, n = aside / str(step), 0
                while target.exists():
                    n += 1
                    target = aside / f"{step}.{n}"
                (self.directory / str(step)).rename(target)
                logger.warning("checkpoint: unreadable step %d moved to %s", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("checkpoints.set_aside")
        self.manager.reload()


# ----------------------------------------------------------------------------------------------
# Resume order and partial init
# ----------------------------------------------------------------------------------------------


def _get_path(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for key in path.strip("/").split("/"):
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(f"path {path!r}: no key {key!r} (have {sorted(node)[:20]})")
        node = node[key]
    return node


def _set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    keys = path.strip("/").split("/")
    node = tree
    for key in keys[:-1]:
        node = node[key]
    if keys[-1] not in node:
        raise KeyError(f"path {path!r} is not in the target tree")
    node[keys[-1]] = value


def _nest(path: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for key in reversed(path.strip("/").split("/")):
        out = {key: out}
    return out


def _pytree_dir(source: str | epath.Path) -> epath.Path:
    """A plain Orbax PyTree directory, the `state` item of a step dir, or that of the newest step
    of a model dir."""
    source = epath.Path(source)
    if (source / "state" / "_METADATA").exists():  # a step dir (ours, or T5X's checkpoint_N)
        return source / "state"
    if (source / "_METADATA").exists() or (source / "_CHECKPOINT_METADATA").exists():
        if (source / "state").is_dir():
            return source / "state"
        return source
    steps = sorted(int(p.name) for p in source.iterdir() if p.name.isdigit())
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {source}")
    return source / str(steps[-1]) / "state"


def load_subtrees(
    params: dict[str, Any],
    source: str | epath.Path,
    subtrees: Mapping[str, str] | Sequence[str],
    shardings: PyTree,
) -> dict[str, Any]:
    """Partial init: replaces subtrees of `params` with the same-shaped arrays of a checkpoint.

    Args:
      params: the fresh parameter tree (nested dicts).
      source: a plain Orbax PyTree directory (converted weights), a checkpoint step directory,
        or a model dir (its newest step is used).
      subtrees: target path -> source path ("encoder" -> "params/encoder"), or a list of paths
        that are the same in both (paths are "/"-separated).
      shardings: `NamedSharding`s of `params`.

    Returns:
      A new params tree; everything outside `subtrees` is the fresh init. Layers stored in the
      other layout (`layers_{i}` where the model scans `layers`, or the reverse) are stacked or
      unstacked on the way in.

    Raises:
      KeyError: a path is missing; ValueError: a shape differs; FrameHeadMismatchError: the
      whole params tree is asked for and the checkpoint's frame head is another.
    """
    if not isinstance(subtrees, Mapping):
        subtrees = {p: p for p in subtrees}
    directory = _pytree_dir(source)
    target: dict[str, Any] = {}
    for dst, src in subtrees.items():
        fresh, shard = _get_path(params, dst), _get_path(shardings, dst)
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), fresh, shard
        )
        _merge(target, _nest(src, abstract))
    stored = tree_metadata(directory)
    _check_frame_head(target, stored, str(directory))
    relayout = bool(stack.layout_mismatches(target, stored))
    request = stack.abstract_in_layout_of(target, stored) if relayout else target
    restored = ocp.PyTreeCheckpointer().restore(
        directory,
        args=ocp.args.PyTreeRestore(
            item=request,
            restore_args=ocp.checkpoint_utils.construct_restore_args(request),
            partial_restore=True,
        ),
    )
    if relayout:
        logger.info("init: %s stores the layers in the other layout; converting", directory)
        restored = stack.in_layout_of(restored, target)
        restored = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), restored, target)
    out = jax.tree.map(lambda x: x, params)  # fresh containers; leaves shared
    for dst, src in subtrees.items():
        loaded, fresh = _get_path(restored, src), _get_path(params, dst)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(fresh), strict=True):
            if a.shape != b.shape:
                raise ValueError(f"{src}: checkpoint shape {a.shape} != model shape {b.shape}")
        _set_path(out, dst, loaded)
        logger.info("init: loaded %s from %s:%s", dst, directory, src)
    return out


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> None:
    for k, v in b.items():
        if k in a and isinstance(a[k], dict) and isinstance(v, Mapping):
            _merge(a[k], v)
        else:
            a[k] = v


InitSources = Mapping[str, Mapping[str, str] | Sequence[str] | None]


def init_sources(
    init_checkpoint: str | None = None,
    init_subtrees: Mapping[str, str] | Sequence[str] | None = None,
    init_checkpoints: InitSources | None = None,
) -> dict[str, Mapping[str, str] | Sequence[str] | None]:
    """Joins the one-source arguments and the {checkpoint: subtrees} form into one dict.

    Raises:
      ValueError: two sources fill the same target subtree (or one of them the whole tree).
    """
    sources = dict(init_checkpoints or {})
    if init_checkpoint:
        if init_checkpoint in sources:
            raise ValueError(f"init checkpoint {init_checkpoint} is named twice")
        sources[init_checkpoint] = init_subtrees
    owners: dict[str, str] = {}
    for source, subtrees in sources.items():
        for dst in _targets(subtrees):
            for other, owner in owners.items():
                if _nested(dst, other) or _nested(other, dst):
                    raise ValueError(
                        f"init subtree {dst or 'params'!r} of {source} overlaps "
                        f"{other or 'params'!r} of {owner}: each parameter has one source"
                    )
            owners[dst] = source
    return sources


def _nested(inner: str, outer: str) -> bool:
    """Whether params path `inner` lies in `outer` ("" is the whole tree)."""
    return outer == "" or inner == outer or inner.startswith(outer + "/")


def _targets(subtrees: Mapping[str, str] | Sequence[str] | None) -> list[str]:
    if subtrees is None:
        return [""]
    return list(subtrees.keys() if isinstance(subtrees, Mapping) else subtrees)


def resume_or_init(
    checkpointer: Checkpointer,
    abstract_state: PyTree,
    init_fn: Callable[[], PyTree],
    sources: InitSources | None = None,
) -> tuple[PyTree, dict[str, Any], str]:
    """Resume order: newest readable checkpoint in the model dir -> init checkpoints -> scratch.

    Args:
      checkpointer: the model dir's checkpointer.
      abstract_state: `TrainState` of ShapeDtypeStructs with shardings.
      init_fn: creates a fresh sharded state.
      sources: {converted / pretrained weights (see `load_subtrees`): the params subtrees to
        take from it, None = all of "params"}, e.g. a stage-1 encoder and a stage-2 decoder
        (`init_sources` joins and checks them). Everything no source names is the fresh init.

    Returns:
      (state, data position dict, a sentence saying where the state came from).
    """
    restored = checkpointer.restore_latest(abstract_state)
    if restored is not None:
        source = f"resumed from {checkpointer.directory}/{restored.step}"
        logger.info("init: %s", source)
        return restored.state, restored.data, source
    state = init_fn()
    params, said = state.params, []
    for checkpoint, subtrees in init_sources(init_checkpoints=sources).items():
        subtrees = subtrees if subtrees is not None else {"": "params"}
        if not isinstance(subtrees, Mapping):
            subtrees = {p: p for p in subtrees}
        if "" in subtrees:  # the whole params tree
            wrapped = load_subtrees(
                {"p": params}, checkpoint, {"p": subtrees[""]}, {"p": _shardings_of(params)}
            )
            params = wrapped["p"]
        else:
            params = load_subtrees(params, checkpoint, subtrees, _shardings_of(params))
        said.append(f"{checkpoint} ({', '.join(s or 'params' for s in subtrees)})")
    state = state.replace(params=params)
    source = f"initialised from {'; '.join(said)}" if said else "initialised from scratch"
    logger.info("init: %s", source)
    return state, {"batches_consumed": 0}, source


def _shardings_of(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x.sharding, tree)


# ----------------------------------------------------------------------------------------------
# The layout, read side: what inference, evaluation and conversion tools call.
# ----------------------------------------------------------------------------------------------


def find_step_dir(checkpoint_dir: str | os.PathLike) -> epath.Path:
    """The checkpoint step directory for a model dir, its `checkpoints/` dir or a step dir.

    The newest complete step is chosen (unfinished `*.orbax-checkpoint-tmp-*` saves are ignored).

    Raises:
      FileNotFoundError: naming the directory and what was looked for.
    """
    path = epath.Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if (path / "state").is_dir() and (path / "config").is_dir():
        return path
    for candidate in (path / "checkpoints", path):
        if not candidate.is_dir():
            continue
        steps = sorted(int(p.name) for p in candidate.iterdir() if p.name.isdigit())
        if steps:
            return candidate / str(steps[-1])
    raise FileNotFoundError(
        f"no checkpoint in {path}: expected a model dir with checkpoints/<step>/, a checkpoints "
        "dir with <step>/ folders, or a step dir with state/ and config/"
    )


def read_model_config(step_dir: str | os.PathLike) -> Any:
    """The `SpectronConfig` saved beside the state (JSON, no pickle).

    Raises:
      ValueError: the step holds no Spectron model config.
    """
    from spectron_jax.config import SpectronConfig

    config_dir = epath.Path(step_dir) / "config"
    raw = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(config_dir)
    if not raw or "decoder" not in raw:
        raise ValueError(
            f"{config_dir} holds no Spectron model config (got keys {sorted(raw or {})}); was the "
            "checkpoint written by spectron_jax.train?"
        )
    return SpectronConfig.from_dict(raw)


def read_vocabulary_record(step_dir: str | os.PathLike) -> dict[str, Any] | None:
    """`vocabulary/vocabulary.json` of a step, with `path` set to the stored file; None if the
    checkpoint predates stored vocabularies."""
    item = epath.Path(step_dir) / VOCABULARY_ITEM
    if not (item / VOCABULARY_JSON).exists():
        return None
    record = json.loads((item / VOCABULARY_JSON).read_text())
    record["path"] = os.fspath(item / record["file"])
    return record


def read_vocabulary(
    step_dir: str | os.PathLike, vocabulary_file: str | os.PathLike | None = None
) -> Any:
    """The vocabulary of a checkpoint: the stored file, or `vocabulary_file` for old ones.

    A given file overrides the stored one (with a warning where they differ).

    Raises:
      MissingVocabularyError: neither is there; the message names the `--vocab` flag.
    """
    from spectron_jax import vocabularies

    record = read_vocabulary_record(step_dir)
    if vocabulary_file is not None:
        if record is not None and vocabularies.file_digest(vocabulary_file) != record["sha256"]:
            logger.warning(
                "vocabulary %s differs from the one stored in %s (%s); using the given file",
                vocabulary_file,
                step_dir,
                record["file"],
            )
        return vocabularies.vocabulary(vocabulary_file, light=True)
    if record is None:
        raise MissingVocabularyError(
            f"checkpoint {step_dir} stores no vocabulary (it was written before checkpoints "
            "carried one): pass the tokenizer file it was trained with, --vocab FILE "
            f"(the default tiny model is {vocabularies.TINY_SPM_PATH})"
        )
    return vocabularies.vocabulary(record["path"], extra_ids=record["extra_ids"], light=True)


def save_for_inference(
    directory: str | os.PathLike,
    model: Any,
    params: PyTree,
    step: int = 0,
    opt_state: PyTree = None,
) -> epath.Path:
    """Writes `params`, the model config and vocabulary the way training does.

    The inverse of `inference.load_model`, for converted weights and tests: the layout of
    `<directory>/checkpoints/<step>/`, with `opt_state` (None: an empty optimizer state, which
    inference needs and training cannot resume).

    Returns:
      The step directory.
    """
    from spectron_jax.trainer import TrainState

    ckpt = Checkpointer(
        epath.Path(directory) / "checkpoints",
        CheckpointConfig(async_save=False),
        vocabulary=model.vocabulary,
    )
    state = TrainState(
        step=np.asarray(step, np.int32),
        params=params,
        opt_state={} if opt_state is None else opt_state,
    )
    config = json.loads(json.dumps(model.config.to_dict(), default=str))
    ckpt.save(step, state, {"batches_consumed": 0}, config, force=True)
    ckpt.close()
    return epath.Path(directory) / "checkpoints" / str(step)

"""One validation pass over a training run's gin config, before anything heavy starts.

`python -m spectron_jax.train --gin_file=... --check_config` runs only this; every run runs it
first. It parses the files, then the command-line bindings, and checks:
  - every `--gin.NAME=V` macro is one the files define or use (gin accepts any new macro
    silently, so a typo such as TRAIN_STEPZ would otherwise leave the file's value in force);
    unknown configurables and parameters (gin's own errors) are reported the same way, with the
    closest known names;
  - the types and ranges of the run's numbers (steps, batch, learning rate, warm-up, checkpoint
    and log periods, feature lengths);
  - the task name against the registered ones;
  - the batch against the process count and the mesh's data-parallel devices;
  - the feature lengths against the task's data: the first `DATA_EXAMPLES` (200) examples of
    the training split are read untrimmed; more than `MAX_TRUNCATED_FRACTION` (5%) of them
    longer than a length is an error, fewer a warning with the count (a few long outliers are
    normal in speech: the tiny run's 96 continuation frames cut 3 of its first 200);
  - TRAIN_STEPS against the warm-up and the checkpoint period (warnings).
Errors come as one block naming each setting, its value and what would be valid
(`ConfigError`); the command line prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax

DATA_EXAMPLES = 200
MAX_TRUNCATED_FRACTION = 0.05
_MACRO_BINDING = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")
_MACRO_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*) = ", re.MULTILINE)
_MACRO_USE = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)")
# (selector, type, minimum) of the numbers a run is made of; absent selectors are skipped.
_NUMBERS = (
    ("train.num_steps", int, 1),
    ("train/seqio_dataset_fn.batch_size", int, 1),
    ("train.log_every", int, 1),
    ("train.grad_accum_steps", int, 1),
    ("OptimizerConfig.learning_rate", float, 0.0),
    ("OptimizerConfig.warmup_steps", int, 0),
    ("checkpoints.CheckpointConfig.every_steps", int, 0),
    ("checkpoints.CheckpointConfig.keep_last", int, 1),
)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a setting: its name, the value it has, and what would be valid."""

    setting: str
    value: Any
    valid: str

    def __str__(self) -> str:
        if self.value is NO_VALUE:
            return f"  {self.setting}: {self.valid}"
        return f"  {self.setting} = {self.value!r}: {self.valid}"


NO_VALUE = object()  # A Problem about a whole binding (its text is the setting).


class ConfigError(ValueError):
    """The config has problems; the message lists every one."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        super().__init__("\n".join([f"the config has {count}:", *map(str, problems)]))


def parse_and_check(
    files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]
) -> list[Problem]:
    """Parses `files` then `bindings` (as the run does) and checks the result.

    Returns:
      The warnings (problems a run survives).

    Raises:
      ConfigError: naming every setting that is wrong.
    """
    for path in search_paths:
        gin.add_config_file_search_path(path)
    try:
        gin.parse_config_files_and_bindings(list(files), [], finalize_config=False)
    except (ValueError, OSError) as err:
        raise ConfigError([_gin_problem(err, " ".join(files))]) from None
    parsed = gin.config_str()
    known = set(_MACRO_NAME.findall(parsed)) | set(_MACRO_USE.findall(parsed))
    problems = [p for b in bindings for p in _unknown_macro(b, known)]
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except (ValueError, SyntaxError) as err:
            problems.append(_gin_problem(err, f"--gin.{binding}"))
    try:
        gin.finalize()
    except (ValueError, RuntimeError) as err:
        problems.append(_gin_problem(err, "the config"))
    if problems:
        raise ConfigError(problems)
    return check_operative()


def check_operative() -> list[Problem]:
    """Checks the parsed config's values; returns the warnings, raises `ConfigError`."""
    errors: list[Problem] = []
    for selector, kind, minimum in _NUMBERS:
        value = _value(selector)
        if value is not _ABSENT:
            errors += _number_problem(selector, value, kind, minimum)
    if errors:  # The checks below read these numbers.
        raise ConfigError(errors)
    errors += _model_problems()
    errors += _task_problems()
    errors += _batch_problems()
    warnings = _schedule_warnings()
    if not errors:
        data_errors, data_warnings = _length_problems()
        errors += data_errors
        warnings += data_warnings
    if errors:
        raise ConfigError(errors)
    return warnings


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


def _unknown_macro(binding: str, known: set[str]) -> list[Problem]:
    """A `NAME = value` binding whose NAME no file defines or uses."""
    match = _MACRO_BINDING.match(binding)
    if not match or "." in binding.split("=")[0] or "/" in binding.split("=")[0]:
        return []
    name = match.group(1)
    if name in known:
        return []
    valid = f"no file defines or uses {name}{_closest(name, known)}"
    return [Problem(f"--gin.{binding.strip()}", NO_VALUE, valid)]


def _gin_problem(err: BaseException, setting: str) -> Problem:
    """Gin's own error (unknown configurable or parameter, bad syntax) as a Problem, with the
    closest known names."""
    message = without_gin_context(err) or type(err).__name__
    message = message.splitlines()[0]
    unknown = re.search(r"No configurable matching '([^']+)'", message)
    if unknown:
        message += _closest(unknown.group(1).split(".")[-1], _configurable_names())
    unknown = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", message)
    if unknown:
        message += _closest(unknown.group(2), _parameter_names(unknown.group(1)))
    return Problem(setting, NO_VALUE, message)


def without_gin_context(err: BaseException) -> str:
    """The message of `err` without the "In call to configurable ..." lines gin appends."""
    context = ("In call to configurable", "In file", "In bindings string")
    lines = str(err).splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith(context))


def _configurable_names() -> set[str]:
    from gin import config as gin_config

    return {selector.split(".")[-1] for selector, _ in gin_config._REGISTRY.items()}


def _parameter_names(configurable: str) -> set[str]:
    import inspect

    from gin import config as gin_config

    found = gin_config._REGISTRY.get_match(configurable)
    if found is None:
        return set()
    try:
        return set(inspect.signature(found.wrapped).parameters)
    except (TypeError, ValueError):
        return set()


def _closest(name: str, candidates: set[str] | Sequence[str]) -> str:
    close = difflib.get_close_matches(name, sorted(candidates), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------

_ABSENT = object()


def _value(selector: str) -> Any:
    """The bound value of `selector`, macros resolved; `_ABSENT` if nothing binds it."""
    try:
        value = gin.query_parameter(selector)
    except ValueError:
        return _ABSENT
    seen = 0
    while isinstance(value, gin.config.ConfigurableReference) and seen < 10:
        if value.configurable.name != "macro":
            return value  # A configurable (a model, a dataset fn): not a plain value.
        value = gin.query_parameter(f"%{value.scoped_selector.split('/')[0]}")
        seen += 1
    return value


def _number_problem(selector: str, value: Any, kind: type, minimum: float) -> list[Problem]:
    name = selector.split(".")[-1]
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok_type = ok_type and float(value).is_integer()
    if not ok_type:
        kind_name = "an integer" if kind is int else "a number"
        return [Problem(selector, value, f"{name} must be {kind_name}, got {type(value).__name__}")]
    if (value <= minimum) if kind is float else (value < minimum):
        bound = f"> {minimum}" if kind is float else f">= {minimum}"
        return [Problem(selector, value, f"{name} must be {bound}")]
    return []


def _model_problems() -> list[Problem]:
    """The model config as the run will build it: its dataclasses' own checks (a frame head
    that does not exist, a primer that is no multiple of the reduction factor, ...) name the
    field. Configs without a Spectron model (the recipe's first stages) have nothing to build."""
    if "spectron.spectron_config()" not in gin.config_str():  # No `@spectron.spectron_config()`.
        return []
    # Only now: the config names it, so the module is imported already. Importing it first
    # would register its configurables after the config was locked (a run of another model).
    from spectron_jax import config as config_lib

    try:
        config_lib.spectron_config()
    except (ValueError, TypeError) as err:
        message = without_gin_context(err).splitlines()[0]
        return [Problem("the model config (spectron.spectron_config)", NO_VALUE, message)]
    return []


def _task_problems() -> list[Problem]:
    import seqio

    import spectron_tasks  # noqa: F401  (registers the built-in tasks)

    selector = "train/seqio_dataset_fn.mixture_or_task_name"
    name = _value(selector)
    if name is _ABSENT:
        return []
    registered = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    if name not in registered:
        valid = f"no such seqio task or mixture{_closest(name, registered)}"
        return [Problem(selector, name, valid)]
    lengths = _value("train/seqio_dataset_fn.task_feature_lengths")
    if not isinstance(lengths, Mapping):
        return [Problem("TASK_FEATURE_LENGTHS", lengths, "must be a dict of feature -> length")]
    return [
        Problem(f"TASK_FEATURE_LENGTHS['{k}']", v, "must be an integer >= 1")
        for k, v in lengths.items()
        if not isinstance(v, int) or isinstance(v, bool) or v < 1
    ]


def _batch_problems() -> list[Problem]:
    """The global batch splits over the processes and the mesh's data-parallel devices."""
    from spectron_jax import partitioning

    batch = _value("train/seqio_dataset_fn.batch_size")
    if batch is _ABSENT:
        return []
    try:
        mesh = partitioning.create_mesh()
    except ValueError as err:
        return [Problem("create_mesh", NO_VALUE, without_gin_context(err))]
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    processes = jax.process_count()
    step = math.lcm(replicas, processes)
    if batch % step:
        where = f"data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} devices"
        if processes > 1:
            where += f" and {processes} processes"
        valid = f"must divide by {step} ({where}): e.g. {max(step, batch // step * step)}"
        return [Problem("BATCH_SIZE", batch, valid)]
    return []


def _schedule_warnings() -> list[Problem]:
    steps = _value("train.num_steps")
    if steps is _ABSENT:
        return []
    out = []
    warmup = _value("OptimizerConfig.warmup_steps")
    if warmup is not _ABSENT and warmup >= steps:
        valid = f"longer than the run ({steps} steps): the peak learning rate is never reached"
        out.append(Problem("WARMUP_STEPS", warmup, valid))
    every = _value("checkpoints.CheckpointConfig.every_steps")
    if every is not _ABSENT and every > steps:
        valid = f"more than TRAIN_STEPS = {steps}: only the final checkpoint is written"
        out.append(Problem("CHECKPOINT_EVERY_STEPS", every, valid))
    return out


def _length_problems() -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings): feature lengths against the first `DATA_EXAMPLES` untrimmed training
    examples of the task."""
    import numpy as np
    import seqio

    name = _value("train/seqio_dataset_fn.mixture_or_task_name")
    lengths = _value("train/seqio_dataset_fn.task_feature_lengths")
    split = _value("train/seqio_dataset_fn.split")
    split = "train" if split is _ABSENT else split
    if DATA_EXAMPLES <= 0 or name is _ABSENT or not isinstance(lengths, Mapping):
        return [], []
    try:
        dataset = seqio.get_mixture_or_task(name).get_dataset(
            sequence_length=dict(lengths), split=split, shuffle=False, trim_output_features=False
        )
        examples = list(dataset.take(DATA_EXAMPLES).as_numpy_iterator())
    except Exception as err:  # noqa: BLE001 - whatever stops the read stops the run too
        why = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        return [Problem(f"{name}, split", split, f"the task's data cannot be read: {why}")], []
    errors, warnings = [], []
    for feature, limit in sorted(lengths.items()):
        sizes = [np.shape(ex[feature])[0] for ex in examples if feature in ex]
        over = [s for s in sizes if s > limit]
        if not over:
            continue
        problem = Problem(
            f"TASK_FEATURE_LENGTHS['{feature}']",
            limit,
            f"{len(over)} of the first {len(sizes)} examples of {name}:{split} are longer (up "
            f"to {max(over)}) and would be cut; {max(sizes)} keeps every one",
        )
        too_many = len(over) > MAX_TRUNCATED_FRACTION * len(sizes)
        (errors if too_many else warnings).append(problem)
    return errors, warnings

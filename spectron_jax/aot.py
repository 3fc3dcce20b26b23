"""Ahead-of-time compile of a gin experiment's train step for a TPU slice, on any machine.

    python -m spectron_jax.aot --gin_file=gin/spectron_base.gin --topology=v5p:4x4x4
    python -m spectron_jax.aot --gin_file=gin/spectron_base.gin --topology=v5e:2x4 \\
        --gin.BATCH_SIZE=32 --remat=minimal --find-max-batch --json=/tmp/aot.json

It builds the real train step (the config's model, optimizer, mesh rules and
`train.grad_accum_steps`; `create_mesh.*` shapes the mesh over the slice's chips) over abstract
TPU devices from `libtpu` (`pip install -e ".[tpu]"`; no TPU needed), compiles it, and prints:
per-chip memory (arguments, outputs, temporaries, code) against the chip's HBM; XLA's FLOPs per
step against the model-FLOPs formula (`spectron_jax/flops.py`); the bytes each kind of collective
moves per step (instructions inside loops counted once per trip); the shardings of the largest
arrays and every replicated parameter over 1 MiB; and a roofline estimate of the step time and
MFU from the chip figures in CHIPS. It exits 1 when the step does not fit in HBM.
`--find-max-batch` searches, under each remat policy (`--search-remats`), the largest global
batch (multiples of data x fsdp) that fits: a prediction from one compile's memory, checked by
`--max-batch-checks` more. `--decode-batch N` also
compiles `decoding.generate` for N prompts (text up to the config's text length, then its frame
length, or `--decode-frames`) and prints its memory and an HBM-bound frame-step time. Run with
JAX_PLATFORMS=cpu; set nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

# libtpu asks the (absent) TPU metadata server for these unless they are set.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from spectron_jax import config as config_lib  # noqa: E402
from spectron_jax import decoding, models, partitioning, train, vocabularies  # noqa: E402
from spectron_jax import flops as flops_lib  # noqa: E402
from spectron_jax import trainer as trainer_lib  # noqa: E402
from spectron_jax.nn import stack  # noqa: E402

GiB = 1024**3
REMAT_SEARCH = stack.REMAT_POLICIES  # What --find-max-batch tries by default.


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of a TPU generation (Cloud TPU system-architecture pages).

    Attributes:
      hbm_bytes: HBM capacity.
      peak_flops: dense bf16 FLOP/s.
      hbm_bandwidth: bytes/s.
      ici_bandwidth: inter-chip bytes/s, all links of one chip together.
    """

    hbm_bytes: float
    peak_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float


CHIPS = {
    "v4": Chip(32 * GiB, 275e12, 1228e9, 2400e9 / 8),
    "v5e": Chip(16 * GiB, 197e12, 819e9, 1600e9 / 8),
    "v5p": Chip(95 * GiB, 459e12, 2765e9, 4800e9 / 8),
    "v6e": Chip(32 * GiB, 918e12, 1640e9, 3584e9 / 8),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})


def chip_of(topology: str) -> Chip:
    """The CHIPS entry of a topology name such as "v5e:2x4"."""
    generation = topology.split(":")[0].lower()
    if generation not in CHIPS:
        raise ValueError(f"topology {topology!r}: generation not in {sorted(CHIPS)}")
    return CHIPS[generation]


def device_figures(topology: str, num_devices: int) -> Chip:
    """The chip figures per device: libtpu describes v4 slices with one device per TensorCore
    (`v4:2x2x1`: 4 chips, 8 devices), so each device gets its share of the chip."""
    chips = math.prod(int(d) for d in topology.split(":")[1].split("x"))
    share = max(num_devices // chips, 1)
    chip = chip_of(topology)
    return Chip(*(getattr(chip, f.name) / share for f in dataclasses.fields(Chip)))


def tpu_devices(topology: str) -> list[Any]:
    """Abstract devices of a TPU slice (needs libtpu; compiles, never runs)."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as err:  # noqa: BLE001 - libtpu missing or the name unknown: say which
        hint = "is libtpu installed (pip install -e '.[tpu]')?"
        if "lockfile" in str(err):  # One libtpu per machine unless told otherwise.
            hint = (
                "another process holds libtpu (a second compile on this machine?): wait for it, "
                "or set ALLOW_MULTIPLE_LIBTPU_LOAD=1 where no TPU is attached"
            )
        raise RuntimeError(
            f"cannot describe TPU topology {topology!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); {hint}"
        ) from err


# ------------------------------------------------------------------------------------------------
# HLO: collectives per step.
# ------------------------------------------------------------------------------------------------

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(?:to_apply|calls|body|condition|branch_computations)=\{?([^,}]+)")
_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def _shape_sizes(text: str) -> list[int]:
    """Bytes of each array shape in an HLO result type (a tuple has several)."""
    sizes = []
    for dtype, dims in _SHAPE.findall(text):
        count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        sizes.append(count * _DTYPE_BYTES.get(dtype, 4))
    return sizes


def _result_bytes(kind: str, is_start: bool, result_type: str) -> int:
    sizes = _shape_sizes(result_type)
    if is_start and kind in ("all-gather", "collective-permute") and sizes:
        return max(sizes)  # The async tuple is (operand, result[, context]): the result.
    return sum(sizes)


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """Computation name -> its instruction lines, and the entry computation's name."""
    computations: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(2)
            computations[current] = []
            entry = current if match.group(1) else entry
        elif current is not None and line.strip() and line.strip() != "}":
            computations[current].append(line)
    return computations, entry


def _trip_count(condition: list[str]) -> float:
    """A counted loop's trips: the integer constant its condition compares the counter to."""
    counts = [
        int(c) for line in condition for c in re.findall(r"s32\[\]\S* constant\((\d+)\)", line)
    ]
    return float(max(counts)) if counts else 1.0


def collective_bytes(hlo: str) -> dict[str, float]:
    """Bytes one chip sends for each kind of collective, per execution of the entry computation.

    From each instruction's per-chip result size and its replica-group size n, as ring
    algorithms move them (`_WIRE`: an all-reduce sends 2 (n - 1) / n of its size).

    An instruction inside a while body counts once per trip (the trip count is the constant
    the loop's condition compares against: L for a scanned stack of L layers); an async pair
    counts once (its `-start`, whose tuple also holds the operand: only the result counts).
    """
    computations, entry = _computations(hlo)
    times: dict[str, float] = {}

    def visit(name: str, multiplicity: float) -> None:
        times[name] = times.get(name, 0.0) + multiplicity
        for line in computations.get(name, []):
            callees = [c.strip().lstrip("%") for c in _CALLEE.findall(line)]
            trips = 1.0
            if " while(" in line:
                condition = re.search(r"condition=%?([\w.\-]+)", line)
                trips = _trip_count(computations.get(condition.group(1), [])) if condition else 1.0
            for callee in callees:
                if callee in computations and callee != name:
                    visit(callee, multiplicity * trips)

    out = {kind: 0.0 for kind in COLLECTIVES}
    if entry is None:
        return out
    visit(entry, 1.0)
    for name, lines in computations.items():
        for line in lines:
            _, sep, rest = line.partition(" = ")
            match = _OP.search(rest) if sep else None
            if match:
                kind = match.group(1)
                size = _result_bytes(kind, bool(match.group(2)), rest[: match.start()])
                out[kind] += size * _WIRE[kind](_group_size(rest)) * times.get(name, 0.0)
    return out


# Bytes one chip sends per result byte, ring algorithms over a group of n chips.
_WIRE = {
    "all-reduce": lambda n: 2 * (n - 1) / n,  # reduce-scatter + all-gather
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: float(n - 1),  # the result is 1/n of the operand
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}


def _group_size(instruction: str) -> int:
    """Chips per replica group: `{{0,1},{2,3}}` -> 2, iota `[2,4]<=[8]` -> 4, mesh axes
    `mesh['axis_0'=2,'axis_1'=4] {'axis_1'}` -> 4."""
    axes = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", instruction)
    if axes:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", axes.group(1)))
        return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'(\w+)'", axes.group(2)))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", instruction)
    if listed:
        return max(len(listed.group(1).split(",")), 1)
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=", instruction)
    if iota:
        return int(iota.group(1).split(",")[-1])
    return 2  # source_target_pairs (permutes) or one group of unknown size


# ------------------------------------------------------------------------------------------------
# Building and compiling the experiment's train step.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Experiment:
    """What a gin experiment trains, read without touching its data or model dir."""

    model: models.SpectronModel
    optimizer: trainer_lib.OptimizerConfig
    batch_size: int
    lengths: dict[str, int]  # Model feature lengths (the converter's output).
    grad_accum_steps: int


def read_experiment(files: Sequence[str], bindings: Sequence[str], remat: str | None) -> Experiment:
    """Parses the gin files (REQUIRED macros may stay unset) and builds the model abstractly."""
    gin.clear_config()
    train.parse_gin(files, bindings, [".", "gin"], finalize=False)
    config = config_lib.spectron_config()
    if remat is not None:
        config = config_lib.with_stacks(config, remat=remat)
    # The default vocabulary: the shapes come from the config (a config's own tokenizer file
    # need not exist on the machine that compiles).
    tiny = vocabularies.vocabulary(path=vocabularies.TINY_SPM_PATH, light=True)
    model = models.SpectronModel(config, tiny)
    task_lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
    lengths = dict(model.feature_converter().get_model_feature_lengths(task_lengths))
    try:
        accum = int(gin.query_parameter("train.grad_accum_steps"))
    except ValueError:
        accum = 1
    return Experiment(
        model=model,
        optimizer=trainer_lib.OptimizerConfig(),
        batch_size=int(gin.query_parameter("%BATCH_SIZE")),
        lengths=lengths,
        grad_accum_steps=accum,
    )


def own_remat(experiment: Experiment) -> str | None:
    """The remat policy both stacks of the experiment run under (None where they differ)."""
    config = experiment.model.config
    decoder, encoder = config.decoder.remat, config.encoder.remat
    return stack.canonical_remat(decoder) if decoder == encoder else None


def abstract_batch(lengths: dict[str, int], batch_size: int, config: Any) -> dict[str, Any]:
    """ShapeDtypeStructs of one global model batch (CONTRACTS.md section 2)."""
    shapes = config_lib.example_input_shapes(
        config,
        batch_size,
        prompt_frames=lengths["encoder_features"],
        text_length=lengths["decoder_input_tokens"],
        num_frames=lengths["target_frames"],
    )
    return {k: jax.ShapeDtypeStruct(s, models.INPUT_TYPES[k]) for k, s in shapes.items()}


@dataclasses.dataclass
class Compiled:
    trainer: trainer_lib.Trainer
    compiled: Any
    batch_size: int


def setup_trainer(
    experiment: Experiment, mesh: Any, batch_size: int
) -> tuple[trainer_lib.Trainer, dict[str, Any]]:
    """The experiment's `Trainer` on `mesh` (a device or abstract mesh), set up for one global
    batch of `batch_size`: (trainer, the abstract batch)."""
    tr = trainer_lib.Trainer(
        experiment.model,
        mesh,
        experiment.optimizer,
        grad_accum_steps=experiment.grad_accum_steps,
    )
    batch = abstract_batch(experiment.lengths, batch_size, experiment.model.config)
    tr.setup(batch)
    return tr, batch


def compile_train_step(experiment: Experiment, devices: Sequence[Any], batch_size: int) -> Compiled:
    """The train step lowered and compiled for `devices` (the config's mesh over them)."""
    tr, batch = setup_trainer(experiment, partitioning.create_mesh(devices=devices), batch_size)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    return Compiled(tr, tr.compile_train_step(batch, rng), batch_size)


def out_of_memory(err: Exception) -> bool:
    """The TPU compiler refuses a program whose temporaries alone exceed HBM (where the total
    does, it compiles and `memory` says so)."""
    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


def try_compile_train_step(
    experiment: Experiment, devices: Sequence[Any], batch_size: int
) -> Compiled | None:
    """`compile_train_step`, or None where the compiler ran out of HBM."""
    try:
        return compile_train_step(experiment, devices, batch_size)
    except jax.errors.JaxRuntimeError as err:
        if not out_of_memory(err):
            raise
        return None


# ------------------------------------------------------------------------------------------------
# The report.
# ------------------------------------------------------------------------------------------------


def memory(compiled: Any) -> dict[str, float]:
    """Per-chip bytes: arguments, outputs, temporaries, code and their total (aliases once)."""
    stats = compiled.memory_analysis()
    out = {
        "arguments": float(stats.argument_size_in_bytes),
        "outputs": float(stats.output_size_in_bytes),
        "aliased": float(stats.alias_size_in_bytes),
        "temporaries": float(stats.temp_size_in_bytes),
        "code": float(stats.generated_code_size_in_bytes),
    }
    out["total"] = (
        out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    )
    return out


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return dict(cost or {})


def model_flops(experiment: Experiment, batch_size: int) -> float:
    """Model FLOPs of one global train step (spectron_jax/flops.py)."""
    c, lengths = experiment.model.config, experiment.lengths
    count = flops_lib.spectron_train_flops(
        c,
        batch_size,
        lengths["encoder_features"],
        lengths["decoder_input_tokens"],
        lengths["target_frames"],
    )
    return float(count.total)


def largest_arrays(tr: trainer_lib.Trainer, top: int = 8) -> list[dict[str, Any]]:
    """The biggest parameters and optimizer-state leaves, with their shardings."""
    rows = []
    flat = jax.tree_util.tree_leaves_with_path(tr.abstract_state)
    for path, leaf in flat:
        spec = leaf.sharding.spec
        size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        rows.append(
            {
                "path": jax.tree_util.keystr(path),
                "shape": list(leaf.shape),
                "spec": str(spec),
                "bytes": size,
                "bytes_per_chip": shard,
            }
        )
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:top]


def replicated_params(tr: trainer_lib.Trainer, min_bytes: int = 1 << 20) -> list[dict[str, Any]]:
    """Parameters over `min_bytes` held whole on every chip, and why."""
    logical = tr.param_specs
    out = []
    leaves = jax.tree_util.tree_leaves_with_path(tr.abstract_state.params)
    specs = jax.tree.leaves(logical, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    for (path, leaf), names in zip(leaves, specs, strict=True):
        size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if size < min_bytes or any(leaf.sharding.spec):
            continue
        why = []
        for name, dim in zip(tuple(names), leaf.shape, strict=False):
            axis = dict(tr.rules).get(name) if name else None
            if axis is None:
                continue
            axes = axis if isinstance(axis, tuple) else (axis,)
            ways = math.prod(tr.mesh.shape[a] for a in axes)
            if ways > 1 and dim % ways:
                why.append(f"{name}={dim} does not divide over {axes} ({ways})")
            elif ways == 1:
                why.append(f"{name} maps to {axes}, of size 1 on this mesh")
        reason = "; ".join(why) or f"no logical axis maps to a mesh axis ({tuple(names)})"
        out.append({"path": jax.tree_util.keystr(path), "bytes": size, "why": reason})
    return out


def unrolled(experiment: Experiment) -> Experiment:
    """The experiment with every layer stack unrolled: XLA's cost analysis counts a loop's body
    once, so FLOPs and bytes accessed are read from this program (the same math)."""
    config = config_lib.with_stacks(experiment.model.config, scan_layers=False)
    model = models.SpectronModel(config, experiment.model.vocabulary)
    return dataclasses.replace(experiment, model=model)


def report(
    experiment: Experiment,
    built: Compiled,
    counting: Compiled,
    topology: str,
    num_chips: int,
) -> dict[str, Any]:
    """Every figure of the printout, as a JSON-ready dict.

    Args:
      experiment: what was compiled.
      built: the step as configured (memory, collectives, shardings).
      counting: the same step with unrolled layers (FLOPs, bytes accessed); with
        `grad_accum_steps` k > 1 its figures are multiplied by k (the micro-batch loop).
      topology: the slice's name.
      num_chips: its chips.
    """
    chip = device_figures(topology, num_chips)
    mem = memory(built.compiled)
    cost = {k: v * experiment.grad_accum_steps for k, v in _cost(counting.compiled).items()}
    compiled_flops = float(cost.get("flops", float("nan")))  # per chip (one SPMD program)
    model = model_flops(experiment, built.batch_size) / num_chips
    collectives = collective_bytes(built.compiled.as_text())
    comm = sum(collectives.values())
    times = {
        "compute_s": compiled_flops / chip.peak_flops,
        "hbm_s": float(cost.get("bytes accessed", 0.0)) / chip.hbm_bandwidth,
        "collectives_s": comm / chip.ici_bandwidth,
    }
    step = max(times.values())
    return {
        "topology": topology,
        "chips": num_chips,
        "mesh": dict(built.trainer.mesh.shape),
        "global_batch": built.batch_size,
        "memory_per_chip": mem,
        "hbm_per_chip": chip.hbm_bytes,
        "fits": mem["total"] <= chip.hbm_bytes,
        "flops_per_chip": {
            "compiled": compiled_flops,
            "model": model,
            "ratio": compiled_flops / model,
        },
        "collective_bytes_per_chip": collectives,
        "roofline": {**times, "step_s": step, "mfu": model / (step * chip.peak_flops)},
        "chip": dataclasses.asdict(chip),
        "largest_arrays": largest_arrays(built.trainer),
        "replicated_params_over_1MiB": replicated_params(built.trainer),
    }


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def print_report(r: dict[str, Any]) -> None:
    mem = r["memory_per_chip"]
    print(f"{r['topology']}: {r['chips']} devices, mesh {r['mesh']}, batch {r['global_batch']}")
    print(
        "memory per chip: arguments {} + outputs {} - aliased {} + temporaries {} + code {} = {} "
        "of {} HBM ({})".format(
            *(_gib(mem[k]) for k in ("arguments", "outputs", "aliased", "temporaries", "code")),
            _gib(mem["total"]),
            _gib(r["hbm_per_chip"]),
            "fits" if r["fits"] else "DOES NOT FIT",
        )
    )
    f = r["flops_per_chip"]
    print(
        f"FLOPs per chip per step: compiled {f['compiled']:.4g}, model {f['model']:.4g}, "
        f"compiled/model {f['ratio']:.3f}"
    )
    coll = ", ".join(f"{k} {_gib(v)}" for k, v in r["collective_bytes_per_chip"].items() if v)
    print(f"collectives per chip per step: {coll or 'none'}")
    rf, chip = r["roofline"], r["chip"]
    print(
        f"roofline (peak {chip['peak_flops'] / 1e12:.0f} TFLOP/s bf16, HBM "
        f"{chip['hbm_bandwidth'] / 1e9:.0f} GB/s, ICI {chip['ici_bandwidth'] / 1e9:.0f} GB/s): "
        f"compute {rf['compute_s']:.3f} s, HBM {rf['hbm_s']:.3f} s, collectives "
        f"{rf['collectives_s']:.3f} s -> step {rf['step_s']:.3f} s, MFU {100 * rf['mfu']:.1f}%"
    )
    print("largest arrays:")
    for row in r["largest_arrays"]:
        print(f"  {row['path']:60} {row['shape']} {row['spec']} {_gib(row['bytes_per_chip'])}/chip")
    print(f"replicated parameters over 1 MiB: {len(r['replicated_params_over_1MiB'])}")
    for row in r["replicated_params_over_1MiB"]:
        print(f"  {row['path']:60} {row['bytes'] / 2**20:.1f} MiB: {row['why']}")


def find_max_batch(
    experiment: Experiment,
    devices: Sequence[Any],
    topology: str,
    built: Compiled | None = None,
    checks: int = 2,
    start: int | None = None,
) -> int:
    """The largest global batch (a multiple of data x fsdp x grad_accum_steps) whose step fits
    in HBM, from up to `checks` + 1 compiles; 0 if even one unit does not fit.

    The first compile (`built`, or one at `start` rounded down to a unit, or at one unit) gives
    the memory that does not grow with the batch (total - temporaries) and the temporaries per
    example; taking the temporaries as proportional to the batch over-estimates their growth,
    so the prediction errs low (`checks=0` returns it unchecked). A second compile checks it
    (stepping down by a tenth until one fits); with `checks=2` the line through the two
    measured sizes predicts again, and a third compile checks that.
    """
    mesh = partitioning.create_mesh(devices=devices)
    unit = math.prod(mesh.shape[a] for a in partitioning.BATCH_AXES)
    unit *= experiment.grad_accum_steps
    hbm = device_figures(topology, len(devices)).hbm_bytes

    known = {built.batch_size: memory(built.compiled)} if built else {}

    def fits(batch: int) -> bool:
        if batch not in known:
            compiled = try_compile_train_step(experiment, devices, batch)
            known[batch] = memory(compiled.compiled) if compiled else None
            size = _gib(known[batch]["total"]) if compiled else "refused by the compiler (HBM)"
            print(f"  batch {batch}: {size} per chip", flush=True)
        return known[batch] is not None and known[batch]["total"] <= hbm

    first = built.batch_size if built else max(unit, (start or unit) // unit * unit)
    fits(first)
    while known[first] is None:  # No memory figures to predict from: try half as many.
        if first == unit:
            return 0
        first = max(unit, first // 2 // unit * unit)
        fits(first)
    if first == unit and not fits(first):
        return 0
    mem = known[first]
    per_example = mem["temporaries"] / first
    guess = max(unit, int((hbm - (mem["total"] - mem["temporaries"])) / per_example) // unit * unit)
    if not checks:
        return guess
    while not fits(guess):
        if guess == unit:
            return 0
        guess = max(unit, int(guess * 0.9) // unit * unit)
    if checks > 1 and guess > first:  # Two sizes measured: the line through them, checked.
        slope = (known[guess]["total"] - known[first]["total"]) / (guess - first)
        intercept = known[first]["total"] - slope * first
        better = int((hbm - intercept) / slope) // unit * unit if slope > 0 else guess
        if better > guess and fits(better):
            guess = better
    return guess


def max_batch_per_remat(
    files: Sequence[str],
    bindings: Sequence[str],
    topology: str,
    remats: Sequence[str],
    checks: int = 2,
    known: dict[str | None, Compiled | None] | None = None,
) -> dict[str, int]:
    """`find_max_batch` under each remat policy in `remats` (set on both stacks): {policy: the
    largest global batch that fits}. Each search starts from a compile at the config's batch
    (or the one in `known[policy]`; None there: the compiler refused the config's batch, so
    from half of it) and checks its prediction with `checks` more compiles."""
    devices = tpu_devices(topology)
    known = known or {}
    found = {}
    for remat in remats:
        experiment = read_experiment(files, bindings, remat)
        refused = remat in known and known[remat] is None
        start = experiment.batch_size // 2 if refused else experiment.batch_size
        found[remat] = find_max_batch(
            experiment, devices, topology, known.get(remat), checks, start=start
        )
        print(f"  remat {remat}: largest global batch {found[remat]}", flush=True)
    return found


def compile_decode(
    experiment: Experiment, devices: Sequence[Any], batch_size: int, text_tokens: int, frames: int
) -> Any:
    """`decoding.generate`'s program (free text, then `frames` spectrogram frames) for
    `batch_size` prompts of the experiment's prompt length, compiled for `devices`."""
    mesh = partitioning.create_mesh(devices=devices)
    train_batch = abstract_batch(experiment.lengths, batch_size, experiment.model.config)
    inputs = {k: train_batch[k] for k in ("encoder_features", "encoder_mask")}
    options = decoding.DecodeConfig(max_text_tokens=text_tokens, max_frames=frames)
    return decoding.lower_generate(experiment.model, inputs, options, mesh).compile()


def decode_report(
    experiment: Experiment, compiled: Any, topology: str, num_chips: int, batch: int, frames: int
) -> dict[str, Any]:
    """Memory of the decode program, and a bandwidth roofline of one frame step.

    Autoregressive decoding is HBM-bound: each step reads every parameter and the KV cache once.
    The step time is estimated as (arguments + temporaries) / HBM bandwidth (the temporaries hold
    the cache, so this is an upper bound on the bytes one step reads); the real-time factor is
    that time over the audio one step adds (r frames at the spectrogram's frame rate).
    """
    chip = device_figures(topology, num_chips)
    mem = memory(compiled)
    step_s = (mem["arguments"] + mem["temporaries"]) / chip.hbm_bandwidth
    spec = experiment.model.config.spectrogram
    audio_per_step = experiment.model.config.reduction_factor * spec.hop_length / spec.sample_rate
    return {
        "batch": batch,
        "frames": frames,
        "memory_per_chip": mem,
        "fits": mem["total"] <= chip.hbm_bytes,
        "frame_step_s": step_s,
        "real_time_factor": step_s / audio_per_step,
    }


def print_decode_report(d: dict[str, Any], hbm: float) -> None:
    mem = d["memory_per_chip"]
    print(
        f"decode (batch {d['batch']}, {d['frames']} frames): arguments {_gib(mem['arguments'])} "
        f"+ temporaries {_gib(mem['temporaries'])} = {_gib(mem['total'])} of {_gib(hbm)} "
        f"({'fits' if d['fits'] else 'DOES NOT FIT'}); HBM-bound frame step "
        f"{1e3 * d['frame_step_s']:.2f} ms, real-time factor {d['real_time_factor']:.3f}"
    )


def search_max_batch(
    args: argparse.Namespace, known: dict[str | None, Compiled | None]
) -> dict[str, int]:
    """--find-max-batch: `max_batch_per_remat` over --search-remats, printed."""
    print("searching the largest global batch that fits, per remat policy:")
    remats = [r.strip() for r in args.search_remats.split(",") if r.strip()]
    found = max_batch_per_remat(
        args.gin_file, args.gin_bindings, args.topology, remats, args.max_batch_checks, known
    )
    listed = ", ".join(f"{remat} {batch}" for remat, batch in found.items())
    print(f"largest global batch that fits, per remat policy: {listed}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    argv = train.rewrite_gin_args(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", required=True)
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--topology", required=True, help='e.g. "v5e:2x4", "v5p:2x2x1"')
    parser.add_argument("--remat", default=None, help="override the config's remat policy")
    parser.add_argument(
        "--find-max-batch",
        action="store_true",
        help="search the largest global batch that fits, under each of --search-remats",
    )
    parser.add_argument(
        "--search-remats",
        default=",".join(REMAT_SEARCH),
        help="comma-separated remat policies for --find-max-batch (default: every policy)",
    )
    parser.add_argument(
        "--max-batch-checks", type=int, default=2, help="checking compiles per policy (0: none)"
    )
    parser.add_argument(
        "--decode-batch", type=int, default=0, help="also compile decoding for this many prompts"
    )
    parser.add_argument("--decode-frames", type=int, default=None, help="default: the config's")
    parser.add_argument("--decode-text-tokens", type=int, default=None, help="default: config's")
    parser.add_argument("--json", default=None, help="write the report here too")
    args = parser.parse_args(argv)
    devices = tpu_devices(args.topology)
    experiment = read_experiment(args.gin_file, args.gin_bindings, args.remat)
    started = time.perf_counter()
    built = try_compile_train_step(experiment, devices, experiment.batch_size)
    if built is None:  # Its temporaries alone exceed HBM: no report to make, only the search.
        print(
            f"the train step at global batch {experiment.batch_size} DOES NOT FIT on "
            f"{args.topology}: the compiler ran out of HBM for its temporaries"
        )
        if args.find_max_batch:
            search_max_batch(args, {own_remat(experiment): None})
        return 1
    print(f"compiled the train step in {time.perf_counter() - started:.0f} s", flush=True)
    scans = (
        experiment.model.config.decoder.scan_layers or experiment.model.config.encoder.scan_layers
    )
    started = time.perf_counter()
    counting = (
        compile_train_step(unrolled(experiment), devices, experiment.batch_size) if scans else built
    )
    if scans:
        print(f"compiled it unrolled (FLOPs) in {time.perf_counter() - started:.0f} s", flush=True)
    result = report(experiment, built, counting, args.topology, len(devices))
    if args.find_max_batch:
        result["max_batch"] = search_max_batch(args, {own_remat(experiment): built})
    if args.decode_batch:
        frames = args.decode_frames or experiment.lengths["target_frames"]
        text = args.decode_text_tokens or experiment.lengths["decoder_input_tokens"]
        decode = compile_decode(experiment, devices, args.decode_batch, text, frames)
        result["decode"] = decode_report(
            experiment, decode, args.topology, len(devices), args.decode_batch, frames
        )
    print_report(result)
    if "decode" in result:
        print_decode_report(result["decode"], result["hbm_per_chip"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=float)
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())

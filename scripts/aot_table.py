"""The AOT table of docs/TPU.md: the base and 1B experiments on five single-host TPU slices.

    PYTHONPATH=. python scripts/aot_table.py --ref base=docs/aot/base_v5p64.json \\
        --ref 1b=docs/aot/1b_v5p8.json --out docs/aot/table.json

Per row, one compile of the train step (`spectron_jax.aot`) under `full` remat, in one step
(no accumulation) of a per-device batch that fits (base 4, 1B 8), with the config's fsdp capped
at the slice's device count and the data axis taking the rest: memory per device, collective
bytes per step, and the largest batch predicted from that compile (`aot.find_max_batch` without
its checking compiles: temporaries taken as proportional to the batch, so it errs low). FLOPs
are read from each config's reference report (`--ref`, a full `python -m spectron_jax.aot
--json` run, which also compiles the unrolled step): the compiled / model ratio is a property
of the program, not of the slice, and the HBM bytes per device are scaled by the per-device
batch. The roofline then uses each slice's chip figures (`aot.CHIPS`).

With `--remats=minimal,save_attention_proj,...` each row is instead one compile per policy (set on
both stacks): memory per device at the row's batch and the largest batch predicted from it.
"""

from __future__ import annotations

import argparse
import json
import time

import gin

from spectron_jax import aot

CONFIGS = {"base": ("gin/spectron_base.gin", 4), "1b": ("gin/spectron_1b.gin", 8)}
TABLE_REMAT = "full"  # The main table's policy (both stacks); --remats rows try others.
TOPOLOGIES = ("v4:2x2x1", "v5e:2x4", "v5e:4x4", "v5p:2x2x1", "v6e:2x4")


def experiment_on(name: str, topology: str, extra: list[str], remat: str | None = None):
    """(experiment, devices): the config at its per-device batch over the slice's devices, its
    fsdp capped at the device count and the data axis taking the rest."""
    gin_file, per_device = CONFIGS[name]
    devices = aot.tpu_devices(topology)
    n = len(devices)
    # One step of the whole batch (no accumulation): the row's memory is that batch's.
    bindings = [f"BATCH_SIZE={per_device * n}", "create_mesh.data=-1", "train.grad_accum_steps=1"]
    bindings += extra
    aot.read_experiment([gin_file], bindings, remat)
    fsdp = min(int(gin.query_parameter("create_mesh.fsdp")), n)
    bindings.append(f"create_mesh.fsdp={fsdp}")
    return aot.read_experiment([gin_file], bindings, remat), devices


def remat_row(name: str, topology: str, remat: str, extra: list[str]) -> dict:
    """One compile under `remat` (both stacks): memory per device and the predicted largest
    batch."""
    experiment, devices = experiment_on(name, topology, extra, remat)
    started = time.perf_counter()
    built = aot.try_compile_train_step(experiment, devices, experiment.batch_size)
    row = {"config": name, "topology": topology, "remat": remat}
    row["global_batch"] = experiment.batch_size
    row["hbm_per_device"] = aot.device_figures(topology, len(devices)).hbm_bytes
    # Refused (its temporaries alone exceed HBM): the prediction starts from half the batch.
    row["memory_per_device"] = aot.memory(built.compiled) if built else None
    row["max_batch_predicted"] = aot.find_max_batch(
        experiment, devices, topology, built, checks=0, start=experiment.batch_size // 2
    )
    row["compile_s"] = time.perf_counter() - started
    return row


def row(name: str, topology: str, ref: dict, extra: list[str]) -> dict:
    experiment, devices = experiment_on(name, topology, extra, TABLE_REMAT)
    n = len(devices)
    per_device = CONFIGS[name][1]
    started = time.perf_counter()
    built = aot.compile_train_step(experiment, devices, experiment.batch_size)
    seconds = time.perf_counter() - started
    chip = aot.device_figures(topology, n)
    mem = aot.memory(built.compiled)
    collectives = aot.collective_bytes(built.compiled.as_text())
    model = aot.model_flops(experiment, built.batch_size) / n
    ratio = ref["flops_per_chip"]["ratio"]
    ref_per_device = ref["global_batch"] / ref["chips"]
    hbm_bytes = ref["roofline"]["hbm_s"] * ref["chip"]["hbm_bandwidth"]
    times = {
        "compute_s": ratio * model / chip.peak_flops,
        "hbm_s": hbm_bytes * (per_device / ref_per_device) / chip.hbm_bandwidth,
        "collectives_s": sum(collectives.values()) / chip.ici_bandwidth,
    }
    step = max(times.values())
    max_batch = aot.find_max_batch(experiment, devices, topology, built, checks=0)
    return {
        "config": name,
        "topology": topology,
        "devices": n,
        "mesh": dict(built.trainer.mesh.shape),
        "global_batch": built.batch_size,
        "memory_per_device": mem,
        "hbm_per_device": chip.hbm_bytes,
        "fits": mem["total"] <= chip.hbm_bytes,
        "max_batch_predicted": max_batch,
        "flops_ratio_from_reference": ratio,
        "collective_bytes_per_device": collectives,
        "roofline": {**times, "step_s": step, "mfu": model / (step * chip.peak_flops)},
        "replicated_params_over_1MiB": aot.replicated_params(built.trainer),
        "compile_s": seconds,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| config | slice | mesh | batch | memory / device | largest batch (predicted) | "
        "compiled / model FLOPs | all-reduce + all-gather / device | predicted step | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
        coll = r["collective_bytes_per_device"]
        lines.append(
            f"| {r['config']} | {r['topology']} | {mesh} | {r['global_batch']} | "
            f"{r['memory_per_device']['total'] / aot.GiB:.2f} of "
            f"{r['hbm_per_device'] / aot.GiB:.0f} GiB | {r['max_batch_predicted']} | "
            f"{r['flops_ratio_from_reference']:.3f} | "
            f"{(coll['all-reduce'] + coll['all-gather']) / aot.GiB:.2f} GiB | "
            f"{1e3 * r['roofline']['step_s']:.0f} ms | {100 * r['roofline']['mfu']:.1f}% |"
        )
    return "\n".join(lines)


def remat_markdown(rows: list[dict]) -> str:
    lines = [
        "| config | slice | remat | batch | memory / device | largest batch (predicted) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        hbm = f"{r['hbm_per_device'] / aot.GiB:.0f} GiB"
        mem = r["memory_per_device"]
        used = f"{mem['total'] / aot.GiB:.2f} of {hbm}" if mem else f"refused (> {hbm})"
        lines.append(
            f"| {r['config']} | {r['topology']} | {r['remat']} | {r['global_batch']} | "
            f"{used} | {r['max_batch_predicted']} |"
        )
    return "\n".join(lines)


def summary(r: dict) -> str:
    mem = r["memory_per_device"]
    used = f"{mem['total'] / aot.GiB:.2f} GiB" if mem else "refused by the compiler (HBM)"
    return (
        f"{used} at batch {r['global_batch']}, max batch {r['max_batch_predicted']} "
        f"(compiled in {r['compile_s']:.0f} s)"
    )


def write(rows: list[dict], out: str, table: str) -> None:
    with open(out, "w") as f:
        json.dump(rows, f, indent=1, default=float)
    with open(out.rsplit(".", 1)[0] + ".md", "w") as f:
        f.write(table + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", action="append", default=[], help="CONFIG=report.json")
    parser.add_argument(
        "--remats",
        default="",
        help="instead: per row, one compile under each of these remat policies (comma-separated)",
    )
    parser.add_argument("--out", required=True, help="the rows as JSON (and .md beside it)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--gin_binding", action="append", default=[], help="for every row")
    args = parser.parse_args()
    refs = {}
    for item in args.ref:
        key, path = item.split("=", 1)
        with open(path) as f:
            refs[key] = json.load(f)
    rows = []
    remats = [r for r in args.remats.split(",") if r]
    missing = set(args.configs.split(",")) - set(refs)
    if not remats and missing:
        parser.error(f"the table needs --ref CONFIG=report.json for {sorted(missing)}")
    for name in args.configs.split(","):
        for topology in args.topologies.split(","):
            if remats:
                for remat in remats:  # A compile libtpu refuses is a row (remat_row).
                    rows.append(remat_row(name, topology, remat, args.gin_binding))
                    print(f"{name} {topology} remat {remat}: {summary(rows[-1])}", flush=True)
                write(rows, args.out, remat_markdown(rows))
                continue
            rows.append(row(name, topology, refs[name], args.gin_binding))
            mfu = 100 * rows[-1]["roofline"]["mfu"]
            print(f"{name} {topology}: {summary(rows[-1])}, MFU {mfu:.1f}%", flush=True)
            write(rows, args.out, markdown(rows))


if __name__ == "__main__":
    main()

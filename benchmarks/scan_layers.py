"""Compile time and step time of the train step, scanned layers against unrolled, by depth.

    python benchmarks/scan_layers.py                         # depths 4, 8, 16, 26
    python benchmarks/scan_layers.py --depths 4,8 --steps 3
    python benchmarks/scan_layers.py --scanned_remat none     # both layouts keep everything

Each layout runs under its own remat policy (both stacks, decoder and encoder): by default the
scanned one saves matmul outputs only (`save_dots`) and the unrolled one keeps everything
(`none`), the fastest policy of each on XLA:CPU. A scan's backward pass reads what the forward
loop stacked per layer; under `none` that is every elementwise intermediate (written in the
loop, read back later), where the unrolled step lets XLA fuse them away, so `none` makes the
scanned step slower than `save_dots`, whose recomputed elementwise work fuses into the backward.

The model is `gin/models/tiny.gin` (its Gemma-3-style decoder: local and global layers mixed, so
the scanned stack feeds a per-layer flag) with `--depths` decoder layers, on the embedded
default's layout (64 prefix + 48 text + 160 frame slots), batch 4, through `trainer.Trainer`.
For each depth and layout it prints the seconds to lower and compile the train step and the
median step time of `--steps` steps; then, per layout, compile time at the deepest over the
shallowest depth, and per depth, scanned step time over unrolled.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402

from spectron_jax import config as config_lib  # noqa: E402
from spectron_jax.nn import stack  # noqa: E402

LAYOUT = (64, 48, 160)  # prefix, text and frame slots of the embedded default


def measure(depth: int, scan: bool, remat: str, steps: int, batch: int) -> tuple[float, float]:
    """(compile seconds, median step seconds) of the tiny config at `depth` decoder layers."""
    config = train_step.gin_spectron_config()
    config = config_lib.with_stacks(config, scan_layers=scan, remat=remat)
    config = dataclasses.replace(
        config, decoder=dataclasses.replace(config.decoder, num_layers=depth)
    )
    bench = train_step.spectron_bench(f"{depth}", config, batch, LAYOUT)
    return bench.compile_s, statistics.median(train_step.time_steps(bench, steps))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="4,8,16,26")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--scanned_remat", default="save_dots", choices=stack.REMAT_POLICIES)
    parser.add_argument("--unrolled_remat", default="none", choices=stack.REMAT_POLICIES)
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    remats = {True: args.scanned_remat, False: args.unrolled_remat}
    print(f"remat: scanned {remats[True]}, unrolled {remats[False]}")
    rows = {}
    print(f"{'layers':>6} {'layout':>9} {'compile s':>10} {'step s':>8}")
    for depth in depths:
        for scan in (True, False):
            rows[depth, scan] = measure(depth, scan, remats[scan], args.steps, args.batch)
            layout = "scanned" if scan else "unrolled"
            compile_s, step_s = rows[depth, scan]
            print(f"{depth:>6} {layout:>9} {compile_s:>10.2f} {step_s:>8.3f}", flush=True)
    lo, hi = depths[0], depths[-1]
    for scan, layout in ((True, "scanned"), (False, "unrolled")):
        ratio = rows[hi, scan][0] / rows[lo, scan][0]
        print(f"compile time {hi} / {lo} layers, {layout}: {ratio:.2f}x")
    for depth in depths:
        ratio = rows[depth, True][1] / rows[depth, False][1]
        print(f"step time scanned / unrolled at {depth} layers: {ratio:.2f}x")


if __name__ == "__main__":
    main()

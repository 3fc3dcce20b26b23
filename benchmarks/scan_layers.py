"""Compile time and step time of the train step, scanned layers against unrolled, by depth.

    python benchmarks/scan_layers.py                         # depths 4, 8, 16, 26
    python benchmarks/scan_layers.py --depths 4,8 --steps 3
    python benchmarks/scan_layers.py --scanned_remat none     # both layouts keep everything

Each layout runs under the fastest of its remat policies (both stacks, decoder and encoder; each
policy is measured and the best kept): by default the scanned one tries `save_dots` (matmul outputs
saved) and `full` (each block recomputed), the unrolled one `none` (everything kept). A scan's
backward pass reads what the forward loop stacked per layer; under `none` that is every elementwise
intermediate (written in the loop, read back later), where the unrolled step lets XLA fuse them
away, so `none` is the slowest scanned policy; on two CPU cores `full` won at every depth
(docs/TPU.md).

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


def best_of(depth: int, scan: bool, remats: list[str], steps: int, batch: int):
    """(compile s, step s, policy) of the policy in `remats` with the fastest step."""
    best = None
    for remat in remats:
        compile_s, step_s = measure(depth, scan, remat, steps, batch)
        if len(remats) > 1:
            layout = "scanned" if scan else "unrolled"
            print(f"{depth:>6} {layout:>9} {remat:>10} {compile_s:>10.2f} {step_s:>8.3f}")
        if best is None or step_s < best[1]:
            best = (compile_s, step_s, remat)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="4,8,16,26")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--scanned_remat", default="save_dots,full", help="comma-separated")
    parser.add_argument("--unrolled_remat", default="none", help="comma-separated")
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    remats = {True: args.scanned_remat.split(","), False: args.unrolled_remat.split(",")}
    for remat in remats[True] + remats[False]:
        stack.canonical_remat(remat)
    print(f"remat: scanned {'|'.join(remats[True])}, unrolled {'|'.join(remats[False])}")
    rows = {}
    print(f"{'layers':>6} {'layout':>9} {'remat':>10} {'compile s':>10} {'step s':>8}")
    for depth in depths:
        for scan in (True, False):
            rows[depth, scan] = best_of(depth, scan, remats[scan], args.steps, args.batch)
            layout = "scanned" if scan else "unrolled"
            compile_s, step_s, remat = rows[depth, scan]
            print(f"{depth:>6} {layout:>9} {remat:>10} {compile_s:>10.2f} {step_s:>8.3f} best")
            sys.stdout.flush()
    lo, hi = depths[0], depths[-1]
    for scan, layout in ((True, "scanned"), (False, "unrolled")):
        ratio = rows[hi, scan][0] / rows[lo, scan][0]
        print(f"compile time {hi} / {lo} layers, {layout}: {ratio:.2f}x")
    for depth in depths:
        ratio = rows[depth, True][1] / rows[depth, False][1]
        print(f"step time scanned / unrolled at {depth} layers (fastest policy each): {ratio:.2f}x")


if __name__ == "__main__":
    main()

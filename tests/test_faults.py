"""Fault injection on the real tiny pipeline: `python -m spectron_jax.train` on
gin/spectron_tiny.gin (the seqio counting task, the Spectron tiny model, async Orbax saves),
killed with SIGKILL at random moments (start-up, compile, steps, checkpoint writes) and started
again until it finishes. Every trial must end bit-identical to an unbroken run (parameters and
optimizer state) and must have trained every step on the batch the unbroken run trained it on.

Slow (about 2 minutes a trial on 2 cores): SPECTRON_FAULT_TRIALS sets the count (default 20);
SPECTRON_FAULT_SEED the kill times.
"""

from __future__ import annotations

import os
import pathlib
import random
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent
STEPS = 8
TRIALS = int(os.environ.get("SPECTRON_FAULT_TRIALS", "20"))
SEED = int(os.environ.get("SPECTRON_FAULT_SEED", "0"))


def _command(model_dir: pathlib.Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "spectron_jax.train",
        "--gin_file=gin/spectron_tiny.gin",
        f"--gin_file={HERE / 'fault_recorder.gin'}",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.TRAIN_STEPS={STEPS}",
        "--gin.BATCH_SIZE=8",
        "--gin.CHECKPOINT_EVERY_STEPS=2",
        "--gin.train.evaluators=[]",
        "--gin.train.log_every=1",
    ]


def _start(model_dir: pathlib.Path, attempt: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        SPECTRON_BATCH_LOG=str(model_dir.parent / f"{model_dir.name}.batches"),
        SPECTRON_ATTEMPT=str(attempt),
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
    )
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        _command(model_dir),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(model_dir.parent / f"{model_dir.name}.{attempt}.log", "w"),  # noqa: SIM115
    )


def _batches(model_dir: pathlib.Path) -> dict[int, dict[int, str]]:
    """attempt -> {step: digest} (a line cut by the kill is ignored)."""
    out: dict[int, dict[int, str]] = {}
    path = model_dir.parent / f"{model_dir.name}.batches"
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()
        if len(parts) == 3 and len(parts[2]) == 16:
            out.setdefault(int(parts[0]), {})[int(parts[1])] = parts[2]
    return out


def _final_state(model_dir: pathlib.Path) -> dict:
    return ocp.PyTreeCheckpointer().restore(model_dir / "checkpoints" / str(STEPS) / "state")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(seconds to the first trained step, final state, {step: digest}) of an unbroken run."""
    model_dir = tmp_path_factory.mktemp("faults") / "straight"
    began, first_step = time.monotonic(), None
    proc = _start(model_dir, 0)
    while proc.poll() is None:
        if first_step is None and _batches(model_dir).get(0):
            first_step = time.monotonic() - began
        time.sleep(0.05)
    assert proc.returncode == 0 and first_step is not None
    return first_step, _final_state(model_dir), _batches(model_dir)[0]


def _kill(proc, model_dir, rng, first_step: float, during_training: bool) -> str:
    """SIGKILLs `proc` at a random moment; returns when, in words.

    Even trials: uniform over start-up and compile (2 s to the unbroken run's first step), or
    the moment step STEPS - 1 is reached if this run is quicker, so every trial is killed. Odd
    trials: while training, a random 0-1.5 s after a random step 1..STEPS-1 was reached (so
    during a step or an async checkpoint write).
    """
    began = time.monotonic()
    if not during_training:
        delay = rng.uniform(2.0, max(2.0, first_step))
        while time.monotonic() - began < delay and STEPS - 1 not in _batches(model_dir).get(0, {}):
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        return f"at {time.monotonic() - began:.1f} s (drawn {delay:.1f} s of {first_step:.1f} s)"
    step, extra = rng.randint(1, STEPS - 1), rng.uniform(0.0, 1.5)
    while proc.poll() is None and step not in _batches(model_dir).get(0, {}):
        time.sleep(0.05)
    time.sleep(extra)
    if proc.poll() is not None:
        return f"planned {extra:.1f} s into step {step}: the run had finished"
    proc.kill()
    proc.wait()
    return f"{extra:.1f} s into step {step} ({time.monotonic() - began:.1f} s)"


@pytest.mark.slow
def test_random_kills_resume_bit_identically(straight, tmp_path):
    first_step, want_state, want_batches = straight
    assert sorted(want_batches) == list(range(1, STEPS + 1))
    rng = random.Random(SEED)
    report = []
    for trial in range(TRIALS):
        model_dir = tmp_path / f"trial_{trial}"
        proc = _start(model_dir, 0)
        when = _kill(proc, model_dir, rng, first_step, during_training=trial % 2 == 1)
        killed_at = _batches(model_dir).get(0, {})
        log = model_dir.parent / f"{model_dir.name}.1.log"
        assert _start(model_dir, 1).wait(timeout=900) == 0, log.read_text()[-3000:]
        batches = _batches(model_dir)
        got_state = _final_state(model_dir)
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(got_state), jax.tree.leaves(want_state), strict=True
        ):
            np.testing.assert_array_equal(a, b, err_msg=f"trial {trial}: {path}")
        for attempt, steps in batches.items():
            for step, digest in steps.items():
                assert digest == want_batches[step], (trial, attempt, step)
        # The restart trains on from a checkpoint step (every 2) the killed run had reached.
        resumed_from = min(batches.get(1, {STEPS + 1: ""})) - 1
        assert set(batches.get(1, {})) == set(range(resumed_from + 1, STEPS + 1))
        assert resumed_from % 2 == 0 and resumed_from <= len(killed_at), (trial, resumed_from)
        report.append(
            f"trial {trial}: SIGKILL {when}, after {len(killed_at)} steps; resumed from step "
            f"{resumed_from}; bit-identical"
        )
        print(report[-1], flush=True)
        if os.environ.get("SPECTRON_FAULT_REPORT"):
            pathlib.Path(os.environ["SPECTRON_FAULT_REPORT"]).write_text("\n".join(report) + "\n")

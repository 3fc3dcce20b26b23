"""Several local processes, one `jax.distributed` job: resharding restores and a lost process.

Each process runs the real `train.train` (tests/trainer/multi_process_worker.py) on its share of
8 CPU devices, one mesh (data 2 x fsdp 4) across them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spectron_jax import checkpoints, multihost

WORKER = Path(__file__).parent / "multi_process_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(num_processes, model_dir, num_steps, out, extra=()):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(num_processes), str(port), str(model_dir)]
            + [str(num_steps), str(out), *(extra[i] if extra else ())],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(num_processes)
    ]


def _run(num_processes, model_dir, num_steps, out):
    procs = _start(num_processes, model_dir, num_steps, out)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, outs, strict=True):
        assert p.returncode == 0, text[-3000:]
    results = [json.loads(Path(f"{out}.{i}.json").read_text()) for i in range(num_processes)]
    with np.load(f"{out}.npz", allow_pickle=False) as params:
        return results, {k: params[k] for k in params.files}


def _global_batches(results):
    """Step -> the example ids every process read at it, in process order."""
    steps = sorted({int(s) for r in results for s in r["seen"]})
    return {s: sum((r["seen"][str(s)] for r in results), []) for s in steps}


@pytest.mark.slow
def test_checkpoint_of_4_processes_restores_under_2_and_1_and_training_continues(tmp_path):
    run = tmp_path / "run"
    four, saved = _run(4, run, 2, tmp_path / "four")
    # Restored over 2 and over 1 process (num_steps reached: nothing trained): the same bits.
    for n in (2, 1):
        _, restored = _run(n, run, 2, tmp_path / f"restored{n}")
        assert restored.keys() == saved.keys()
        for k in saved:
            np.testing.assert_array_equal(restored[k], saved[k], err_msg=f"{n} processes: {k}")
    two, _ = _run(2, run, 4, tmp_path / "two")
    one, resumed = _run(1, run, 6, tmp_path / "one")
    straight_results, straight = _run(1, tmp_path / "straight", 6, tmp_path / "straight")
    # Disjoint shards of the configured global batch (8), in order, each step once.
    batches = {**_global_batches(four), **_global_batches(two), **_global_batches(one)}
    assert batches == _global_batches(straight_results)
    assert batches == {s: list(range(8 * (s - 1), 8 * s)) for s in range(1, 7)}
    assert [len(r["seen"]["1"]) for r in four] == [2, 2, 2, 2]
    # Across process layouts the CPU collectives sum in another order (last-bit differences);
    # within one layout a resumed run is bit-identical (the lost-process test below).
    for k in straight:
        np.testing.assert_allclose(resumed[k], straight[k], rtol=0, atol=1e-6, err_msg=k)
    assert checkpoints.Checkpointer(run / "checkpoints").steps()[-1] == 6


@pytest.mark.slow
def test_a_killed_process_ends_the_others_with_a_message_and_the_restart_resumes(tmp_path):
    run = tmp_path / "run"
    timeout = 15
    # Killed at step 5: the save of step 4 may still be in flight, but starting it waited for
    # step 2's (Orbax finishes one async save before the next), so 2 or 4 is complete.
    extra = [("--lost-timeout", str(timeout)), ("--die-at-step", "5")]
    procs = _start(2, run, 6, tmp_path / "killed", extra)
    killed_out = procs[1].communicate(timeout=600)[0]
    killed_at = time.monotonic()
    assert procs[1].returncode == -9, killed_out[-3000:]
    survivor_out = procs[0].communicate(timeout=120)[0]
    waited = time.monotonic() - killed_at
    assert procs[0].returncode == multihost.EXIT_LOST_PROCESS, survivor_out[-3000:]
    assert waited < 60
    message = [line for line in survivor_out.splitlines() if "stopped sending heartbeats" in line]
    assert message, survivor_out[-3000:]
    last = re.search(r"Last checkpoint: step (\d+) in (\S+);", message[0])
    assert "process 1 of 2" in message[0] and last, message[0]
    assert int(last.group(1)) in (2, 4) and last.group(2) == str(run / "checkpoints")
    assert "Traceback" not in survivor_out
    # The restart picks up at the last checkpoint and finishes as an unbroken run does.
    results, resumed = _run(2, run, 6, tmp_path / "restart")
    assert sorted(int(s) for s in results[0]["seen"]) == list(range(int(last.group(1)) + 1, 7))
    _, straight = _run(2, tmp_path / "straight", 6, tmp_path / "straight")
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("signalled", [0, 1])
def test_a_preemption_notice_to_any_one_process_stops_them_all_at_one_step(tmp_path, signalled):
    """SIGTERM to process 0 or to process 1 alone, during step 3: both stop after that step
    (within one step of the notice), with a checkpoint of it."""
    run = tmp_path / "run"
    flags = [(), ()]
    flags[signalled] = ("--sigterm-at-step", "3")
    procs = _start(2, run, 50, tmp_path / "term", flags)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, outs, strict=True):
        assert p.returncode == 0, text[-3000:]
    results = [json.loads((tmp_path / f"term.{i}.json").read_text()) for i in range(2)]
    stopped = {r["step"] for r in results}
    assert stopped == {3}, stopped  # Together, at the step the notice came in.
    assert checkpoints.Checkpointer(run / "checkpoints").steps()[-1] == 3


class _FakeStore:
    """The coordination service's key-value store, as the watchdog uses it."""

    def __init__(self):
        self.values, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect")
        self.values[key] = value

    def key_value_try_get(self, key):
        if self.down:
            raise RuntimeError("UNAVAILABLE: failed to connect")
        if key not in self.values:
            raise RuntimeError(f"NOT_FOUND: Config key {key} not found.")
        return self.values[key]


def _watchdog(store, now, index=0, count=3):
    return multihost.Watchdog(
        10.0,
        1.0,
        lambda: "Last checkpoint: step 7.",
        client=store,
        process_index=index,
        process_count=count,
        clock=lambda: now[0],
        exit_fn=lambda code: None,
    )


def test_watchdog_names_the_peer_whose_heartbeat_stops_and_ignores_finished_ones():
    store, now = _FakeStore(), [0.0]
    dog = _watchdog(store, now)
    peer1, peer2 = _watchdog(store, now, 1), _watchdog(store, now, 2)
    for t in range(1, 20):  # Peer 1 beats until t = 5; peer 2 finishes at t = 3.
        now[0] = float(t)
        if t <= 5:
            peer1.beat()
        if t <= 3:
            peer2.beat()
        elif t == 4:
            peer2.stop()
        lost = dog.check()
        if lost is not None:
            break
    assert (lost, now[0]) == (1, 16.0)  # Its counter stood still from t = 5 for > 10 s.
    # A peer that has not started yet is not lost until the timeout from our start.
    late = _watchdog(_FakeStore(), [5.0])
    assert late.check() is None


def test_watchdog_reports_a_store_that_stops_answering_and_exits_with_the_message(capsys):
    store, now = _FakeStore(), [0.0]
    codes = []
    dog = _watchdog(store, now, index=1, count=2)
    dog._exit = codes.append
    dog.check()
    store.down = True
    now[0] = 5.0
    assert dog.check() is None  # A short outage is not a loss.
    now[0] = 11.0
    assert dog.check() == -1
    dog._lost(-1)
    assert codes == [multihost.EXIT_LOST_PROCESS]
    err = capsys.readouterr().err
    assert "process 1: the coordinator (process 0) stopped answering" in err
    assert "Last checkpoint: step 7." in err
    with pytest.raises(ValueError, match="interval_s < timeout_s"):
        multihost.Watchdog(1.0, 2.0, client=store, process_index=0, process_count=2)

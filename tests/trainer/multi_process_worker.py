"""One process of the multi-process CPU training tests (tests/trainer/test_multi_process.py).

Usage: python multi_process_worker.py PROCESS_ID NUM_PROCESSES PORT MODEL_DIR NUM_STEPS OUT
         [--die-at-step N] [--sigterm-at-step N] [--lost-timeout S]

8 CPU devices in all, split evenly over the processes, one mesh data 2 x fsdp 4 across them
(the same global mesh whatever the process count). Writes OUT.json (the example ids this process
read per step, the loss, the step) and, on process 0, OUT.npz (the parameters, gathered).
With --die-at-step the process SIGKILLs itself when it reaches that step (after the
checkpoints before it); with --sigterm-at-step it sends itself SIGTERM there.
"""

import argparse
import os
import sys

ARGS = argparse.ArgumentParser()
for name in ("process_id", "num_processes", "port", "model_dir", "num_steps", "out"):
    ARGS.add_argument(name)
ARGS.add_argument("--die-at-step", type=int, default=None)
ARGS.add_argument("--sigterm-at-step", type=int, default=None)
ARGS.add_argument("--lost-timeout", type=float, default=30.0)
A = ARGS.parse_args()
NUM_PROCESSES = int(A.num_processes)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // NUM_PROCESSES}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # noqa: E402
import signal  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tiny_model as tm  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from spectron_jax import checkpoints, partitioning, train  # noqa: E402
from spectron_jax import trainer as trainer_lib  # noqa: E402


def main():
    process_id = int(A.process_id)
    if NUM_PROCESSES > 1:
        train.initialize_distributed(f"localhost:{A.port}", NUM_PROCESSES, process_id)
    assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 8, jax.devices()
    seen = {}

    def on_batch(step, batch):
        if A.die_at_step is not None and step + 1 == A.die_at_step:
            print(f"process {process_id}: SIGKILL at step {step + 1}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if A.sigterm_at_step is not None and step + 1 == A.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # A preemption notice to this process alone.
        seen[step + 1] = batch["example_id"].tolist()

    result = train.train(
        model=tm.TinyModel(),
        dataset_fn=tm.make_dataset_fn(global_batch=8),
        model_dir=A.model_dir,
        num_steps=int(A.num_steps),
        mesh=partitioning.create_mesh(data=2, fsdp=4),
        optimizer=trainer_lib.OptimizerConfig(warmup_steps=1, decay_steps=8),
        checkpoint_config=checkpoints.CheckpointConfig(every_steps=2, async_save=True),
        log_every=1,
        batch_callback=on_batch,
        lost_process_timeout_s=A.lost_timeout,
    )
    params = multihost_utils.process_allgather(result.state.params, tiled=True)
    if process_id == 0:
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        np.savez(A.out + ".npz", **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
    with open(f"{A.out}.{process_id}.json", "w") as f:
        json.dump({"step": result.step, "loss": result.last_metrics.get("loss"), "seen": seen}, f)
    if NUM_PROCESSES > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()

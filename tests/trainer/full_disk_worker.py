"""Trains the test model to step 6 with a checkpoint every 2 steps; from step 3 on the disk is
"full" or the checkpoint directory read-only, so the save of step 4 fails
(tests/trainer/test_trainer_checkpoints.py).

Usage: python full_disk_worker.py MODEL_DIR full|readonly

full: no file may grow past 1 byte any more (RLIMIT_FSIZE, with SIGXFSZ ignored: every write
fails with EFBIG, what a full disk does to a writer). readonly: the checkpoint directory loses
its write permission (root, whom permissions do not stop, makes it immutable with chattr +i).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import resource  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402

import tiny_model as tm  # noqa: E402

from spectron_jax import checkpoints, partitioning, train  # noqa: E402

MODEL_DIR, HOW = sys.argv[1], sys.argv[2]


def on_batch(step, batch):
    del batch
    if step + 1 != 3:
        return
    if HOW == "full":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
    elif os.geteuid() == 0:
        subprocess.run(["chattr", "+i", os.path.join(MODEL_DIR, "checkpoints")], check=True)
    else:
        os.chmod(os.path.join(MODEL_DIR, "checkpoints"), 0o555)


with train.explained_errors():
    train.train(
        model=tm.TinyModel(),
        dataset_fn=tm.make_dataset_fn(),
        model_dir=MODEL_DIR,
        num_steps=6,
        log_every=1000,
        mesh=partitioning.create_mesh(),
        # Saves finish before the next step (so step 2 is on disk before the disk fills up).
        checkpoint_config=checkpoints.CheckpointConfig(every_steps=2, async_save=False),
        batch_callback=on_batch,
    )

"""One process of the 2-process CPU training test (run by test_trainer_entrypoints.py).

Usage: python two_process_worker.py PROCESS_ID PORT MODEL_DIR
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # noqa: E402

import jax  # noqa: E402
import tiny_model as tm  # noqa: E402

from spectron_jax import checkpoints, partitioning, train  # noqa: E402
from spectron_jax import trainer as trainer_lib  # noqa: E402


def main():
    process_id, port, model_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    train.initialize_distributed(f"localhost:{port}", 2, process_id)
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    seen = []
    result = train.train(
        model=tm.TinyModel(),
        dataset_fn=tm.make_dataset_fn(global_batch=8),
        model_dir=model_dir,
        num_steps=3,
        mesh=partitioning.create_mesh(data=2, fsdp=2),
        optimizer=trainer_lib.OptimizerConfig(warmup_steps=1, decay_steps=3),
        checkpoint_config=checkpoints.CheckpointConfig(every_steps=100, async_save=True),
        log_every=1,
        batch_callback=lambda step, b: seen.append(b["example_id"].tolist()),
    )
    head = jax.experimental.multihost_utils.process_allgather(
        result.state.params["head"], tiled=True
    )
    print(
        "RESULT "
        + json.dumps(
            {
                "process": process_id,
                "step": result.step,
                "loss": result.last_metrics["loss"],
                "seen": seen,
                "head_sum": float(head.sum()),
            }
        ),
        flush=True,
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()

"""Writes the golden shardings: parameter, optimizer-state and input PartitionSpecs of the paper-
scale configs on named meshes, as JSON that tests/test_golden_shardings.py compares against.

    python scripts/golden_shardings.py          # rewrite tests/golden/shardings.*.json

Run it when a change to the model, the rules table or the optimizer is meant to move arrays;
the diff of the JSON is then the review of that move. No devices are needed (abstract meshes).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gin  # noqa: E402
import jax  # noqa: E402
from jax.sharding import AbstractMesh  # noqa: E402

from spectron_jax import aot, partitioning  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(ROOT, "tests", "golden")
# name -> gin files (and bindings) of the experiment.
CONFIGS = {
    "base": (["gin/spectron_base.gin"], []),
    "gemma3_1b": (["gin/spectron_base.gin", "gin/models/gemma3_1b.gin"], []),
}
# name -> (data, fsdp, tensor): the base config's 64-chip slice, and a tensor-parallel 16-chip one.
MESHES = {"data8_fsdp8": (8, 8, 1), "fsdp8_tensor2": (1, 8, 2)}


def _specs(abstract, shardings) -> dict[str, str]:
    """keystr(path) -> "shape spec", e.g. "[26, 1152, 4, 256] P(None, 'fsdp', 'tensor', None)"."""
    leaves = jax.tree_util.tree_leaves_with_path(shardings)
    shapes = jax.tree.leaves(abstract)
    return {
        jax.tree_util.keystr(path): f"{list(x.shape)} {s.spec}"
        for (path, s), x in zip(leaves, shapes, strict=True)
    }


def golden(config: str, mesh_name: str) -> dict:
    """The shardings of one config on one mesh, JSON-ready."""
    files, bindings = CONFIGS[config]
    try:
        experiment = aot.read_experiment(files, bindings, None)
        mesh = AbstractMesh(MESHES[mesh_name], partitioning.MESH_AXES)
        tr, batch = aot.setup_trainer(experiment, mesh, experiment.batch_size)
    finally:
        gin.clear_config()  # The experiment's bindings must not reach whoever runs next.
    spec = partitioning.batch_sharding(mesh).spec
    state, shardings = tr.abstract_state, tr.state_shardings
    return {
        "mesh": dict(mesh.shape),
        "global_batch": experiment.batch_size,
        "params": _specs(state.params, shardings.params),
        "opt_state": _specs(state.opt_state, shardings.opt_state),
        "inputs": {k: f"{list(batch[k].shape)} {spec}" for k in sorted(batch)},
    }


def path_of(config: str, mesh_name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"shardings.{config}.{mesh_name}.json")


def main() -> None:
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    for config in CONFIGS:
        for mesh_name in MESHES:
            with open(path_of(config, mesh_name), "w") as f:
                json.dump(golden(config, mesh_name), f, indent=1, sort_keys=True)
                f.write("\n")
            print("wrote", path_of(config, mesh_name), file=sys.stderr)


if __name__ == "__main__":
    main()

"""Every parameter, optimizer-state and input sharding of the paper-scale configs, on two named
meshes, equals the checked-in golden files (tests/golden/): a change that moves an array shows
up here, and `python scripts/golden_shardings.py` rewrites the files when it is meant."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import golden_shardings  # noqa: E402


@pytest.mark.parametrize("mesh", sorted(golden_shardings.MESHES))
@pytest.mark.parametrize("config", sorted(golden_shardings.CONFIGS))
def test_shardings_equal_the_golden_file(config, mesh):
    with open(golden_shardings.path_of(config, mesh)) as f:
        want = json.load(f)
    got = json.loads(json.dumps(golden_shardings.golden(config, mesh)))
    for part in ("mesh", "global_batch", "inputs", "params", "opt_state"):
        if got[part] != want[part]:
            if not isinstance(want[part], dict):
                pytest.fail(f"{part}: {got[part]} != golden {want[part]}")
            moved = sorted(
                k for k in set(got[part]) | set(want[part]) if got[part].get(k) != want[part].get(k)
            )
            lines = [f"  {k}: {want[part].get(k)} -> {got[part].get(k)}" for k in moved[:10]]
            pytest.fail(
                f"{config} on {mesh}: {len(moved)} {part} shardings moved "
                "(rewrite with `python scripts/golden_shardings.py` if meant):\n" + "\n".join(lines)
            )


def test_the_1b_decoder_is_split_over_both_parameter_axes():
    """What the golden files pin, said once in words: on fsdp x tensor the 1B's query kernel is
    split over fsdp (model width) and tensor (heads), the embedding over tensor (vocab) and fsdp."""
    with open(golden_shardings.path_of("gemma3_1b", "fsdp8_tensor2")) as f:
        params = json.load(f)["params"]
    q = params["['decoder']['layers']['attn']['q_proj']['kernel']"]
    assert q == "[26, 1152, 4, 256] P(None, 'fsdp', 'tensor', None)"
    assert params["['decoder']['embedder']['embedding']"] == "[262144, 1152] P('tensor', 'fsdp')"

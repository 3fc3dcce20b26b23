"""Read and write HF model folders (config.json + safetensors, single or sharded) with numpy only.

Never torch, never pickle: tensors go through the `safetensors` numpy API, which maps BF16 to
`ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

PathLike = str | os.PathLike


def read_config(folder: PathLike) -> dict:
    """The folder's config.json as a dict."""
    path = pathlib.Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}")
    return json.loads(path.read_text())


def safetensors_files(folder: PathLike) -> list[pathlib.Path]:
    """The weight files of a folder: the shards named by the index, else model.safetensors."""
    folder = pathlib.Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors in {folder}")
    return found


def read_tensors(folder: PathLike) -> dict[str, np.ndarray]:
    """Every tensor of the folder by HF name, in its stored dtype (BF16: ml_dtypes.bfloat16)."""
    tensors: dict[str, np.ndarray] = {}
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                if name in tensors:
                    raise ValueError(f"tensor {name!r} appears in more than one file of {folder}")
                tensors[name] = f.get_tensor(name)
    return tensors


def write_folder(
    folder: PathLike,
    config: Mapping,
    tensors: Mapping[str, np.ndarray],
    *,
    max_shard_bytes: int | None = None,
) -> list[pathlib.Path]:
    """Writes config.json and the tensors, sharded with an index when over `max_shard_bytes`.

    Args:
      folder: created if absent.
      config: written as config.json.
      tensors: name -> array (any numpy or ml_dtypes dtype safetensors knows).
      max_shard_bytes: largest shard; None writes one model.safetensors.

    Returns:
      The safetensors files written.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    # transformers refuses safetensors files without a known "format" in the metadata.
    metadata = {"format": "pt"}
    total = sum(a.nbytes for a in arrays.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        path = folder / SINGLE_FILE
        save_file(arrays, str(path), metadata=metadata)
        return [path]

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in arrays.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    paths, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update({k: name for k in shard})
        paths.append(folder / name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return paths

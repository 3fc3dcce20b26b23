"""Model features preprocessed once, read by index: resuming at any step costs the same.

The seqio `DatasetFn` resumes by skipping: `ds.skip(n)` runs the whole pipeline (decode, fbank,
log-mel, tokenise) for every skipped batch, so a restart at step 100,000 replays 100,000
batches of preprocessing. A feature cache stores the converter's output (fixed-shape arrays, one
`.npy` per feature, [N, ...]) and places batches by arithmetic:

    global batch g = positions [g B, (g + 1) B) of epoch 0, epoch 1, ... (each epoch a
    permutation of the N examples drawn from (seed, epoch)); process `shard` of `num_shards`
    takes rows [shard B / num_shards, (shard + 1) B / num_shards) of it.

Skipping k batches is one division: nothing is read or computed for them. The arrays are
memory-mapped (`np.load(mmap_mode="r")`, no pickle), so a host reads only its own rows.

    write(examples, "/data/cache/train")  # once: e.g. `converted_examples(...)` of a seqio task
    train.dataset_fn = @feature_cache.dataset_fn()  # gin
    feature_cache.dataset_fn.cache_dir = '/data/cache/train'
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import gin
import numpy as np

from spectron_jax.data import DatasetFn

META = "meta.json"


def write(examples: Iterable[Mapping[str, Any]], out_dir: str, num_examples: int) -> int:
    """Writes the first `num_examples` examples (dicts of fixed-shape arrays; strings and other
    non-numeric features are dropped) as one [N, ...] `.npy` per feature; returns how many.

    The arrays are written through a temporary name and `meta.json` last, so a cut-short write
    is never taken for a cache.

    Raises:
      ValueError: an example's feature shape differs from the first one's, or there are none.
    """
    os.makedirs(out_dir, exist_ok=True)
    arrays: dict[str, np.memmap] = {}
    count = 0
    for example in examples:
        if count == num_examples:
            break
        numeric = {k: np.asarray(v) for k, v in example.items()}
        numeric = {k: v for k, v in numeric.items() if v.dtype.kind in "biuf"}
        if not arrays:
            for k, v in numeric.items():
                path = os.path.join(out_dir, f"{k}.npy.tmp")
                arrays[k] = np.lib.format.open_memmap(
                    path, mode="w+", dtype=v.dtype, shape=(num_examples, *v.shape)
                )
        for k, out in arrays.items():
            if k not in numeric or numeric[k].shape != out.shape[1:]:
                got = numeric[k].shape if k in numeric else "missing"
                raise ValueError(f"example {count}: {k} is {got}, the cache holds {out.shape[1:]}")
            out[count] = numeric[k]
        count += 1
    if not count:
        raise ValueError(f"no examples to cache in {out_dir}")
    meta = {"num_examples": count, "features": {}}
    for k, out in arrays.items():
        out.flush()
        del out
        final = os.path.join(out_dir, f"{k}.npy")
        os.replace(final + ".tmp", final)
        if count < num_examples:  # Fewer than asked for: keep the first `count` rows only.
            np.save(final + ".tmp.npy", np.load(final, mmap_mode="r")[:count])
            os.replace(final + ".tmp.npy", final)
        meta["features"][k] = {"dtype": str(arrays[k].dtype), "shape": list(arrays[k].shape[1:])}
    with open(os.path.join(out_dir, META), "w") as f:
        json.dump(meta, f, indent=1)
    return count


def read(cache_dir: str) -> dict[str, np.ndarray]:
    """Feature name -> memory-mapped [N, ...] array.

    Raises:
      FileNotFoundError: no finished cache in `cache_dir` (no meta.json).
      ValueError: an array disagrees with meta.json (a damaged or mixed cache).
    """
    meta_path = os.path.join(cache_dir, META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"no feature cache in {cache_dir!r} ({META} missing: never written, or the write "
            "was cut short); write one with spectron_jax.feature_cache.write"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    out = {}
    for k, spec in meta["features"].items():
        array = np.load(os.path.join(cache_dir, f"{k}.npy"), mmap_mode="r", allow_pickle=False)
        want = (meta["num_examples"], *spec["shape"])
        if array.shape != want or str(array.dtype) != spec["dtype"]:
            raise ValueError(
                f"{cache_dir}/{k}.npy is {array.dtype}{list(array.shape)}, meta.json says "
                f"{spec['dtype']}{list(want)}: rewrite the cache"
            )
        out[k] = array
    return out


def batch_indices(
    batch: int, batch_size: int, num_examples: int, seed: int, shuffle: bool = True
) -> np.ndarray:
    """Example indices of global batch `batch`: positions [batch B, (batch + 1) B) of the
    endless run of epochs, each a permutation of range(N) from (seed, epoch)."""
    positions = np.arange(batch * batch_size, (batch + 1) * batch_size)
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        order = (
            np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
            if shuffle
            else np.arange(num_examples)
        )
        rows = epochs == epoch
        out[rows] = order[offsets[rows]]
    return out


def write_task(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    model: Any,
    out_dir: str,
    num_examples: int,
    split: str = "train",
) -> int:
    """Caches a seqio task's examples of `split` after the model's feature converter (file
    order, one pass); returns how many were written."""
    import seqio

    ds = seqio.get_dataset(
        mixture_or_task_name,
        task_feature_lengths=dict(task_feature_lengths),
        dataset_split=split,
        shuffle=False,
        num_epochs=1,
        feature_converter=model.feature_converter(),
    )
    return write(ds.as_numpy_iterator(), out_dir, num_examples)


@gin.configurable
def dataset_fn(cache_dir: str = gin.REQUIRED, batch_size: int = gin.REQUIRED, *, shuffle=True):
    """A `DatasetFn` over a feature cache (see the module docstring): resumes in O(1).

    Args:
      cache_dir: a directory `write` filled.
      batch_size: GLOBAL batch size; each process reads batch_size / num_shards rows.
      shuffle: a new permutation every epoch (from the seed); False: file order.
    """
    arrays = read(cache_dir)
    n = len(next(iter(arrays.values())))

    def make(shard: int, num_shards: int, seed: int, skip: int) -> Iterator[dict]:
        if batch_size % num_shards:
            raise ValueError(f"batch_size {batch_size} not divisible by {num_shards} processes")
        local = batch_size // num_shards
        g = skip
        while True:
            rows = batch_indices(g, batch_size, n, seed, shuffle)[
                shard * local : (shard + 1) * local
            ]
            order = np.argsort(rows)  # Sorted reads from the memory map, then the batch order.
            back = np.argsort(order)
            yield {k: np.asarray(a[rows[order]])[back] for k, a in arrays.items()}
            g += 1

    make_fn: DatasetFn = make
    return make_fn

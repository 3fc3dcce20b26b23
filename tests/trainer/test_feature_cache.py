"""The feature cache: index-placed batches (resume without replay), and training from it."""

from __future__ import annotations

import itertools
import os

import jax
import numpy as np
import pytest
import tiny_model as tm

from spectron_jax import feature_cache, partitioning, train
from spectron_jax import trainer as trainer_lib


def _examples(n):
    """n single examples of the tiny model's features (strings too: the cache drops them)."""
    batches = tm.make_dataset_fn(global_batch=8)(0, 1, 0, 0)
    for batch in itertools.islice(batches, (n + 7) // 8):
        for i in range(8):
            yield {k: v[i] for k, v in batch.items()}


@pytest.fixture
def cache(tmp_path):
    out = str(tmp_path / "cache")
    assert feature_cache.write(_examples(20), out, num_examples=20) == 20
    return out


def test_round_trip_and_what_is_stored(cache):
    arrays = feature_cache.read(cache)
    assert sorted(arrays) == ["example_id", "inputs", "poison", "targets", "weights"]
    assert arrays["inputs"].shape == (20, tm.LENGTH) and arrays["inputs"].dtype == np.int32
    np.testing.assert_array_equal(arrays["example_id"], np.arange(20))
    first = next(_examples(1))
    np.testing.assert_array_equal(arrays["targets"][0], first["targets"])


def test_each_epoch_is_a_permutation_and_the_seed_picks_it():
    seen = np.concatenate([feature_cache.batch_indices(g, 4, 10, seed=3) for g in range(5)])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert list(seen[:10]) != list(seen[10:20])  # A new order each epoch.
    other = feature_cache.batch_indices(0, 4, 10, seed=4)
    assert list(other) != list(seen[:4])
    np.testing.assert_array_equal(
        feature_cache.batch_indices(2, 4, 10, 0, shuffle=False), [8, 9, 0, 1]
    )


def test_skip_lands_on_the_same_batches_and_shards_are_disjoint(cache):
    make = feature_cache.dataset_fn(cache, batch_size=8)
    straight = list(itertools.islice(make(0, 1, 7, 0), 6))
    resumed = list(itertools.islice(make(0, 1, 7, 4), 2))
    for a, b in zip(straight[4:], resumed, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    halves = [next(iter(make(s, 2, 7, 3)))["example_id"] for s in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), straight[3]["example_id"])
    assert not set(halves[0]) & set(halves[1])
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        next(iter(make(0, 3, 7, 0)))


def test_unfinished_or_damaged_caches_are_errors_naming_the_problem(cache, tmp_path):
    os.remove(os.path.join(cache, "meta.json"))
    with pytest.raises(FileNotFoundError, match="meta.json missing"):
        feature_cache.read(cache)
    out = str(tmp_path / "short")
    feature_cache.write(_examples(8), out, num_examples=8)
    np.save(os.path.join(out, "inputs.npy"), np.zeros((3, tm.LENGTH), np.int32))
    with pytest.raises(ValueError, match=r"inputs.npy is int32\[3, .*meta.json says"):
        feature_cache.read(out)
    bad = ({"x": np.zeros(i + 1)} for i in range(2))
    with pytest.raises(ValueError, match=r"example 1: x is \(2,\), the cache holds \(1,\)"):
        feature_cache.write(bad, str(tmp_path / "bad"), num_examples=2)
    # Fewer examples than asked for: the cache holds what there was.
    assert feature_cache.write(_examples(8), str(tmp_path / "few"), num_examples=50) == 8
    assert len(feature_cache.read(str(tmp_path / "few"))["inputs"]) == 8


def test_training_from_the_cache_resumes_exactly(cache, tmp_path):
    def run(model_dir, steps):
        seen = []
        result = train.train(
            model=tm.TinyModel(),
            dataset_fn=feature_cache.dataset_fn(cache, batch_size=8),
            model_dir=str(model_dir),
            num_steps=steps,
            mesh=partitioning.create_mesh(devices=jax.devices()[:1]),
            optimizer=trainer_lib.OptimizerConfig(warmup_steps=1, decay_steps=6),
            log_every=1,
            batch_callback=lambda step, b: seen.append(b["example_id"].tolist()),
        )
        return result, seen

    run(tmp_path / "resumed", 2)
    resumed, seen_after = run(tmp_path / "resumed", 5)
    straight, seen = run(tmp_path / "straight", 5)
    assert seen_after == seen[2:]
    for a, b in zip(
        jax.tree.leaves(tm.params_to_numpy(resumed.state.params)),
        jax.tree.leaves(tm.params_to_numpy(straight.state.params)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)

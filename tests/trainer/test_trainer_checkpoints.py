"""Checkpoints: exact resume (params and examples), corrupt / unfinished saves, keep and time
policies, the model config inside checkpoints, and partial init."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_model as tm

from spectron_jax import checkpoints, partitioning, train
from spectron_jax import trainer as trainer_lib

CKPT = checkpoints.CheckpointConfig(every_steps=5, keep_last=3, async_save=True)


def _mesh():
    # fsdp x tensor so that resume restores onto really split arrays; 4 devices compile faster.
    return partitioning.create_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])


def _train(model_dir, num_steps, seen, sigterm_at=None, **kwargs):
    kwargs.setdefault("checkpoint_config", CKPT)

    def callback(step, batch):
        seen.append(batch["example_id"].tolist())
        if step == sigterm_at:  # preemption while this step is being trained
            os.kill(os.getpid(), signal.SIGTERM)

    return train.train(
        model=tm.TinyModel(),
        dataset_fn=tm.make_dataset_fn(),
        model_dir=str(model_dir),
        num_steps=num_steps,
        mesh=_mesh(),
        log_every=100,
        optimizer=trainer_lib.OptimizerConfig(warmup_steps=3, decay_steps=20),
        batch_callback=callback,
        **kwargs,
    )


def test_resume_gives_identical_params_and_examples(tmp_path):
    straight_seen, resumed_seen = [], []
    straight = _train(tmp_path / "a", 20, straight_seen)
    # Stopped by SIGTERM during step 10 (index 9): it finishes the step, saves, and returns.
    first = _train(tmp_path / "b", 20, resumed_seen, sigterm_at=9)
    assert first.init_source == "initialised from scratch" and first.step == 10
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
    second = _train(tmp_path / "b", 20, resumed_seen)
    assert second.init_source.endswith("checkpoints/10")
    assert resumed_seen == straight_seen
    assert len(straight_seen) == 20 and straight_seen[10][0] == 10 * 8  # batch 10 = ids 80..87
    for a, b in zip(
        jax.tree.leaves(tm.params_to_numpy(straight.state.params)),
        jax.tree.leaves(tm.params_to_numpy(second.state.params)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # The model config and the data position travel inside every checkpoint.
    ckpt = checkpoints.Checkpointer(tmp_path / "b" / "checkpoints")
    assert ckpt.steps() == [10, 15, 20]
    restored = ckpt.restore_latest(
        jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), second.state
        )
    )
    assert restored.config == dataclasses.asdict(tm.TinyConfig())
    assert restored.data == {"batches_consumed": 20, "seed": 0}
    assert (tmp_path / "b" / "config.gin").exists()
    assert list((tmp_path / "b" / "tensorboard").glob("events.out.tfevents*"))


def _small_state(value):
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    sharding = partitioning.replicated(mesh)
    return {
        "w": jax.device_put(jnp.full((4, 4), value, jnp.float32), sharding),
        "step": jax.device_put(jnp.int32(value), sharding),
    }


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _save_steps(directory, steps, config=None):
    ckpt = checkpoints.Checkpointer(
        directory,
        config or checkpoints.CheckpointConfig(every_steps=1, keep_last=10, async_save=False),
    )
    for step in steps:
        ckpt.save(step, _small_state(step), {"batches_consumed": step}, {"d": 1})
    ckpt.close()


def _truncate_arrays(step_dir):
    """Empties every array file of a step (a disk that filled up, a bad copy)."""
    truncated = 0
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and "ocdbt" in str(f) or (f.is_file() and f.parent.name == "d"):
            f.write_bytes(b"")
            truncated += 1
    assert truncated


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    _save_steps(tmp_path, [2, 4, 6])
    _truncate_arrays(tmp_path / "6")
    config = checkpoints.CheckpointConfig(every_steps=1, keep_last=3, async_save=False)
    ckpt = checkpoints.Checkpointer(tmp_path, config)
    with caplog.at_level(logging.WARNING):
        restored = ckpt.restore_latest(_abstract(_small_state(0)))
    assert restored.step == 4
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.full((4, 4), 4.0))
    assert restored.data["batches_consumed"] == 4
    assert any(
        "step 6" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records
    )
    # The unreadable step is kept aside, out of the step list: the run writes step 6 again, and
    # keep_last=3 then holds three readable checkpoints.
    assert (tmp_path / "unreadable" / "6" / "state").is_dir()
    assert ckpt.steps() == [2, 4]
    assert ckpt.save(6, _small_state(6), {"batches_consumed": 6}, {"d": 1})
    ckpt.close()
    reopened = checkpoints.Checkpointer(tmp_path)
    assert reopened.steps() == [2, 4, 6]
    restored = reopened.restore_latest(_abstract(_small_state(0)))
    assert restored.step == 6
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.full((4, 4), 6.0))
    reopened.close()


def test_every_checkpoint_unreadable_stops_unless_a_fresh_start_is_asked(tmp_path):
    _save_steps(tmp_path, [2, 4])
    for step in (2, 4):
        _truncate_arrays(tmp_path / str(step))
    ckpt = checkpoints.Checkpointer(tmp_path)
    with pytest.raises(checkpoints.UnreadableCheckpointsError) as err:
        ckpt.restore_latest(_abstract(_small_state(0)))
    message = str(err.value)
    assert "step 2: " in message and "step 4: " in message
    assert "fresh_start_if_unreadable=True" in message
    assert ckpt.steps() == [2, 4] and not (tmp_path / "unreadable").exists()  # nothing changed
    ckpt.close()

    config = checkpoints.CheckpointConfig(fresh_start_if_unreadable=True)
    ckpt = checkpoints.Checkpointer(tmp_path, config)
    assert ckpt.restore_latest(_abstract(_small_state(0))) is None
    assert ckpt.steps() == []
    assert sorted(p.name for p in (tmp_path / "unreadable").iterdir()) == ["2", "4"]
    ckpt.close()


def test_unfinished_save_tmp_dir_is_ignored(tmp_path):
    _save_steps(tmp_path, [2, 4])
    # What a kill -9 during Orbax's save of step 6 leaves: a tmp dir that was never renamed.
    tmp = tmp_path / "6.orbax-checkpoint-tmp-1764000000000000"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "_METADATA").write_text("{not json")
    ckpt = checkpoints.Checkpointer(tmp_path)
    assert ckpt.steps() == [2, 4]
    restored = ckpt.restore_latest(_abstract(_small_state(0)))
    assert restored.step == 4
    ckpt.save(6, _small_state(6), {"batches_consumed": 6}, force=True)
    ckpt.wait()
    assert ckpt.steps() == [2, 4, 6]


def test_keep_last_plus_keep_every(tmp_path):
    config = checkpoints.CheckpointConfig(
        every_steps=1, keep_last=2, keep_every=4, async_save=False
    )
    _save_steps(tmp_path, range(1, 10), config)
    assert checkpoints.Checkpointer(tmp_path).steps() == [4, 8, 9]


def test_time_based_save_with_injected_clock(tmp_path):
    now = [1000.0]
    ckpt = checkpoints.Checkpointer(
        tmp_path,
        checkpoints.CheckpointConfig(every_steps=0, every_minutes=1.0),
        clock=lambda: now[0],
    )
    now[0] += 30
    assert not ckpt.should_save(7)
    assert not ckpt.save(7, _small_state(7), {})
    now[0] += 31
    assert ckpt.should_save(8)
    assert ckpt.save(8, _small_state(8), {})
    assert not ckpt.should_save(9)  # the timer restarted at the save
    ckpt.close()
    assert ckpt.steps() == [8]


def test_partial_init_loads_only_the_given_subtrees(tmp_path):
    mesh = _mesh()
    trainer = trainer_lib.Trainer(tm.TinyModel(), mesh)
    batch = partitioning.host_local_batch_to_global(tm.first_batch(), mesh)
    trainer.setup(batch)
    source = trainer.init_state(jax.random.key(1))
    # "Converted weights": a plain Orbax PyTree directory of {"params": ...}.
    writer = ocp.StandardCheckpointer()
    writer.save(tmp_path / "converted", {"params": source.params})
    writer.wait_until_finished()
    fresh = trainer.init_state(jax.random.key(2))
    ckpt = checkpoints.Checkpointer(tmp_path / "run")
    state, data, how = checkpoints.resume_or_init(
        ckpt,
        trainer.abstract_state,
        lambda: fresh,
        {str(tmp_path / "converted"): {"enc_wi": "params/enc_wi", "enc_wo": "params/enc_wo"}},
    )
    assert "converted" in how and data == {"batches_consumed": 0}
    got, src, new = (tm.params_to_numpy(t.params) for t in (state, source, fresh))
    for name in got:
        expect = src[name] if name.startswith("enc_") else new[name]
        np.testing.assert_array_equal(got[name], expect)
        assert state.params[name].sharding == trainer.state_shardings.params[name]
    assert not np.array_equal(src["head"], new["head"])
    with pytest.raises(KeyError, match="nope"):
        checkpoints.load_subtrees(
            fresh.params, tmp_path / "converted", ["nope"], trainer.state_shardings.params
        )


def test_init_from_two_checkpoints_takes_each_subtree_from_its_own(tmp_path):
    """The recipe's stage 3: one subtree from one checkpoint, another from a second one."""
    mesh = _mesh()
    trainer = trainer_lib.Trainer(tm.TinyModel(), mesh)
    trainer.setup(partitioning.host_local_batch_to_global(tm.first_batch(), mesh))
    one, two, fresh = (trainer.init_state(jax.random.key(k)) for k in (1, 2, 3))
    writer = ocp.StandardCheckpointer()
    writer.save(tmp_path / "one", {"params": one.params})
    writer.save(tmp_path / "two", {"params": two.params})
    writer.wait_until_finished()
    sources = checkpoints.init_sources(
        str(tmp_path / "one"),
        {"enc_wi": "params/enc_wi"},
        {str(tmp_path / "two"): {"head": "params/head"}},
    )
    state, _, how = checkpoints.resume_or_init(
        checkpoints.Checkpointer(tmp_path / "run"), trainer.abstract_state, lambda: fresh, sources
    )
    assert "one" in how and "two" in how
    got = tm.params_to_numpy(state.params)
    want = {"enc_wi": one, "head": two}
    for name, value in got.items():
        np.testing.assert_array_equal(
            value, tm.params_to_numpy(want.get(name, fresh).params)[name], err_msg=name
        )
    with pytest.raises(ValueError, match="'head' of .*one overlaps 'head' of .*two"):
        checkpoints.init_sources(str(tmp_path / "one"), ["head"], {str(tmp_path / "two"): ["head"]})
    with pytest.raises(ValueError, match="'params' of .*one overlaps 'head'"):
        checkpoints.init_sources(str(tmp_path / "one"), None, {str(tmp_path / "two"): ["head"]})


def test_evaluate_checkpoint_scores_the_newest_step_and_writes_json(tmp_path):
    """`--mode=eval`: the newest checkpoint's eval metrics, the same as the trainer's own eval
    over those params; a model dir without checkpoints is a clear error."""
    _train(tmp_path / "run", 4, [])
    out = tmp_path / "eval.json"
    got = train.evaluate_checkpoint(
        model=tm.TinyModel(),
        dataset_fn=tm.make_dataset_fn(),
        model_dir=str(tmp_path / "run"),
        num_batches=2,
        mesh=_mesh(),
        output_json=str(out),
    )
    record = json.loads(out.read_text())
    assert record["step"] == 4 and record["metrics"] == pytest.approx(got)
    assert np.isfinite(got["loss"]) and got["loss"] > 0
    with pytest.raises(FileNotFoundError, match="no readable checkpoint"):
        train.evaluate_checkpoint(
            model=tm.TinyModel(),
            dataset_fn=tm.make_dataset_fn(),
            model_dir=str(tmp_path / "empty"),
            mesh=_mesh(),
        )


def _layer_trees(mesh):
    """The same 2-layer params, unrolled (`layers_{i}`) and scanned (`layers`, [2, ...])."""
    sharding = partitioning.replicated(mesh)
    rng = np.random.default_rng(0)
    unrolled = {
        "dec": {
            "emb": rng.normal(size=(3, 2)).astype(np.float32),
            **{f"layers_{i}": {"w": rng.normal(size=(2, 4)).astype(np.float32)} for i in (0, 1)},
        }
    }
    scanned = {
        "dec": {
            "emb": unrolled["dec"]["emb"],
            "layers": {
                "w": np.stack([unrolled["dec"]["layers_0"]["w"], unrolled["dec"]["layers_1"]["w"]])
            },
        }
    }
    put = lambda tree: jax.tree.map(lambda x: jax.device_put(x, sharding), tree)  # noqa: E731
    return put(unrolled), put(scanned)


@pytest.mark.parametrize("stored", ["unrolled", "scanned"])
def test_init_converts_layers_stored_in_the_other_layout(tmp_path, stored):
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    unrolled, scanned = _layer_trees(mesh)
    source, target = (unrolled, scanned) if stored == "unrolled" else (scanned, unrolled)
    writer = ocp.StandardCheckpointer()
    writer.save(tmp_path / "old", {"params": source})
    writer.wait_until_finished()
    fresh = jax.tree.map(jnp.zeros_like, target)
    shardings = jax.tree.map(lambda x: x.sharding, fresh)
    got = checkpoints.load_subtrees(fresh, tmp_path / "old", {"dec": "params/dec"}, shardings)
    assert jax.tree.structure(got) == jax.tree.structure(target)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(target), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding


def test_resume_in_the_other_layout_is_an_error_not_a_fallback(tmp_path):
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    unrolled, scanned = _layer_trees(mesh)
    ckpt = checkpoints.Checkpointer(
        tmp_path, checkpoints.CheckpointConfig(every_steps=1, keep_last=3, async_save=False)
    )
    ckpt.save(1, {"params": unrolled}, {"batches_consumed": 1}, {"d": 1})
    ckpt.close()
    ckpt = checkpoints.Checkpointer(tmp_path)
    with pytest.raises(checkpoints.LayerLayoutError, match="/dec: scanned here, unrolled"):
        ckpt.restore_latest(_abstract({"params": scanned}))
    restored = ckpt.restore_latest(_abstract({"params": unrolled}))
    np.testing.assert_array_equal(
        np.asarray(restored.state["params"]["dec"]["layers_1"]["w"]),
        np.asarray(unrolled["dec"]["layers_1"]["w"]),
    )


def test_a_sigterm_during_start_up_stops_after_the_first_step(tmp_path):
    """The notice comes while the data pipeline is being built (before compile): the run
    trains one step, saves it and returns instead of dying or training on."""
    dataset_fn = tm.make_dataset_fn()

    def signalled_while_starting(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return dataset_fn(*args)

    result = train.train(
        model=tm.TinyModel(),
        dataset_fn=signalled_while_starting,
        model_dir=str(tmp_path),
        num_steps=20,
        mesh=_mesh(),
        log_every=100,
        checkpoint_config=CKPT,
    )
    assert result.step == 1
    assert checkpoints.Checkpointer(tmp_path / "checkpoints").steps() == [1]


def _abstract_train_state():
    mesh = _mesh()
    trainer = trainer_lib.Trainer(tm.TinyModel(), mesh)
    trainer.setup(partitioning.host_local_batch_to_global(tm.first_batch(), mesh))
    return trainer.abstract_state


@pytest.mark.slow  # a training subprocess, ~20 s on 2 cores: kept out of the default suite
@pytest.mark.parametrize("how", ["full", "readonly"])
def test_a_failed_save_is_one_message_and_keeps_the_previous_checkpoint(tmp_path, how):
    """The save of step 4 fails (a full disk, a read-only directory): exit code 1, one message
    naming the step, the cause and the intact step 2, which restores as it was written."""
    import shutil
    import subprocess
    import sys

    if how == "readonly" and os.geteuid() == 0 and not shutil.which("chattr"):
        pytest.skip("root writes to read-only directories, and chattr is missing")

    worker = pathlib.Path(__file__).with_name("full_disk_worker.py")
    proc = subprocess.run(
        [sys.executable, str(worker), str(tmp_path), how],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if how == "readonly" and os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(tmp_path / "checkpoints")], check=True)
    (tmp_path / "checkpoints").chmod(0o755)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # The last word is ours (Orbax and asyncio log the failed writes above it).
    line = [e for e in proc.stderr.splitlines() if e.strip()][-1]
    assert line.startswith("error: "), proc.stderr[-3000:]
    assert f"saving checkpoint step 4 to {tmp_path / 'checkpoints'} failed" in line
    assert f"Newest complete checkpoint: step 2 in {tmp_path / 'checkpoints'}" in line
    ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.steps() == [2]
    restored = ckpt.restore(2, _abstract_train_state())
    assert int(restored.state.step) == 2 and restored.data["batches_consumed"] == 2
    ckpt.close()

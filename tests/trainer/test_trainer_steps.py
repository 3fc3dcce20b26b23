"""Train step, sharding, optimizer, frozen params and non-finite handling (tiny model)."""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest
import tiny_model as tm

from spectron_jax import checkpoints, config_check, partitioning, train
from spectron_jax import trainer as trainer_lib


def _put(batch, mesh):
    return partitioning.host_local_batch_to_global(
        {k: v for k, v in batch.items() if k != "text"}, mesh
    )


def _run(mesh, steps, model=None, config=None, accum=1, repeat_first=False):
    model = model or tm.TinyModel()
    config = config or trainer_lib.OptimizerConfig(warmup_steps=2, decay_steps=10)
    trainer = trainer_lib.Trainer(model, mesh, config, grad_accum_steps=accum)
    data = tm.make_dataset_fn()(0, 1, 0, 0)
    batches = [_put(next(data), mesh) for _ in range(steps)]
    if repeat_first:
        batches = [batches[0]] * steps
    state = trainer.init_state(jax.random.key(0), batches[0])
    init = tm.params_to_numpy(state.params)
    losses = []
    for batch in batches:
        state, metrics = trainer.train_step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return trainer, state, init, np.array(losses)


def test_mesh_sizes_and_rules():
    mesh = partitioning.create_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 12 devices"):
        partitioning.create_mesh(data=3, fsdp=2, tensor=2)
    # embed -> fsdp, mlp -> tensor; a dimension the axis does not divide is replicated.
    spec = partitioning.logical_to_mesh_spec(
        jax.sharding.PartitionSpec("embed", "mlp"), (16, 6), partitioning.create_mesh(2, 2, 2)
    )
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    spec = partitioning.logical_to_mesh_spec(
        jax.sharding.PartitionSpec("embed", "mlp"), (15, 6), partitioning.create_mesh(2, 2, 2)
    )
    assert spec == jax.sharding.PartitionSpec(None, "tensor")


def test_activation_constraints_take_effect_under_the_rules():
    # Flax drops `with_logical_constraint` silently where JAX has no mesh set; under
    # `axis_rules` the constraint must reach the program (a dropped one let XLA keep whole-batch
    # activations on every chip and all-reduce them).
    import flax.linen as nn

    def double(x):
        return nn.with_logical_constraint(2 * x, ("activation_batch", "activation_embed"))

    mesh = partitioning.create_mesh(data=2, fsdp=4, tensor=1)
    with partitioning.axis_rules(mesh):
        out = jax.jit(double)(np.ones((8, 3), np.float32))
    assert out.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert out.addressable_shards[0].data.shape == (1, 3)
    with partitioning.axis_rules(mesh.abstract_mesh):  # Abstract: traced, nothing placed.
        assert jax.eval_shape(double, np.ones((8, 3), np.float32)).shape == (8, 3)


def test_sharded_run_matches_single_device_and_grad_accumulation():
    sharded = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
    single = partitioning.create_mesh(devices=jax.devices()[:1])
    t8, s8, _, loss8 = _run(sharded, 5)
    _, s1, _, loss1 = _run(single, 5)
    # The parameters really are split: embed over fsdp, vocab over tensor.
    assert s8.params["head"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert s8.params["head"].addressable_shards[0].data.shape == (8, 16)
    # Adam moments follow their parameter's sharding.
    mu = t8.state_shardings.opt_state.inner_states["trainable"].inner_state[1][0].mu["head"]
    assert mu.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5, atol=1e-5)
    assert loss8[0] != loss8[-1]
    for a, b in zip(
        jax.tree.leaves(tm.params_to_numpy(s8.params)),
        jax.tree.leaves(tm.params_to_numpy(s1.params)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Two micro-batches with uniform weights: the mean of the two half-batch mean-loss
    # gradients is the full-batch gradient, so the trajectory is the same.
    _, s2, _, loss2 = _run(single, 5, accum=2)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        jax.tree.leaves(tm.params_to_numpy(s2.params)),
        jax.tree.leaves(tm.params_to_numpy(s1.params)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_adafactor_fits_a_repeated_batch():
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    config = trainer_lib.OptimizerConfig(
        name="adafactor", learning_rate=1e-1, warmup_steps=0, decay="constant"
    )
    _, _, _, losses = _run(mesh, 8, config=config, repeat_first=True)
    assert losses[-1] < 0.8 * losses[0], losses


def test_frozen_subtree_unchanged_and_without_optimizer_state():
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    _, state, init, _ = _run(mesh, 3, model=tm.TinyModel(frozen_prefix="enc_"))
    final = tm.params_to_numpy(state.params)
    for name in ("enc_wi", "enc_wo"):
        np.testing.assert_array_equal(final[name], init[name])
    for name in ("dec_wi", "head", "embedding"):
        assert np.abs(final[name] - init[name]).max() > 1e-4, name
    paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    ]
    assert any("'dec_wi'" in p for p in paths)
    assert not any("enc_" in p for p in paths), [p for p in paths if "enc_" in p]


def test_schedule_values():
    cfg = trainer_lib.OptimizerConfig(
        learning_rate=1.0, warmup_steps=10, decay_steps=110, end_lr_fraction=0.1
    )
    sched = trainer_lib.make_schedule(cfg)
    np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(
        float(sched(60)), 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-5
    )
    np.testing.assert_allclose(float(sched(110)), 0.1, rtol=1e-5)
    lin = trainer_lib.make_schedule(
        trainer_lib.OptimizerConfig(
            learning_rate=1.0, warmup_steps=10, decay_steps=110, decay="linear", end_lr_fraction=0.0
        )
    )
    np.testing.assert_allclose(float(lin(60)), 0.5, rtol=1e-5)
    rsqrt = trainer_lib.make_schedule(
        trainer_lib.OptimizerConfig(learning_rate=1.0, warmup_steps=10, decay="rsqrt")
    )
    np.testing.assert_allclose(float(rsqrt(50)), np.sqrt(10 / 50), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown decay"):
        trainer_lib.make_schedule(trainer_lib.OptimizerConfig(decay="exp"))


def test_schedule_clamped_to_a_short_run():
    """200 warm-up steps against a 4-step run: warm-up takes half, the decay ends at step 4."""
    cfg = trainer_lib.OptimizerConfig(learning_rate=1.0, warmup_steps=200, end_lr_fraction=0.1)
    short = trainer_lib.clamped_to_run(cfg, 4)
    assert (short.warmup_steps, short.decay_steps) == (2, 4)
    sched = trainer_lib.make_schedule(short)
    np.testing.assert_allclose([float(sched(s)) for s in (1, 2, 4)], [0.5, 1.0, 0.1], rtol=1e-5)
    # A run longer than the warm-up keeps it.
    assert trainer_lib.clamped_to_run(cfg, 1000).warmup_steps == 200
    with pytest.raises(ValueError, match="total_steps"):
        trainer_lib.clamped_to_run(cfg, 0)


def test_clipping_bounds_the_update():
    # The trainable branch must be exactly clip -> AdamW: compare one update against optax.
    params = {"a": np.ones(4, np.float32)}
    tx = trainer_lib.make_optimizer(
        trainer_lib.OptimizerConfig(clip_norm=0.5, warmup_steps=0, decay="constant"),
        {"a": True},
    )
    ref = optax.chain(
        optax.clip_by_global_norm(0.5),
        optax.adamw(1e-3, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.01),
    )
    grads = {"a": np.full(4, 10.0, np.float32)}
    ours, _ = tx.update(grads, tx.init(params), params)
    theirs, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(ours["a"], theirs["a"], rtol=1e-6)


def test_non_finite_loss_stops_naming_step_and_last_good_checkpoint(tmp_path, capsys):
    """The command line's wrapper prints the one message (exit code 1, no traceback)."""
    mesh = partitioning.create_mesh(data=2, fsdp=1, tensor=1, devices=jax.devices()[:2])
    with pytest.raises(SystemExit) as stopped, train.explained_errors():
        train.train(
            model=tm.TinyModel(),
            dataset_fn=tm.make_dataset_fn(poison_at=3),
            model_dir=str(tmp_path),
            num_steps=10,
            mesh=mesh,
            log_every=100,
            checkpoint_config=checkpoints.CheckpointConfig(every_steps=2, async_save=False),
        )
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"error: non-finite loss or gradient at step 4 .*Last good checkpoint: .*checkpoints/2\n",
        err,
    ), err
    ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.steps() == [2]  # step 3 was not a save step, and nothing after the NaN was saved


def test_explained_errors_drop_gin_context_and_keep_the_traceback_when_verbose():
    err = ValueError("bad thing\n  In call to configurable 'train' (<function train at 0x1>)")
    assert config_check.without_gin_context(err) == "bad thing"
    with pytest.raises(trainer_lib.NonFiniteLossError), train.explained_errors(verbose=True):
        raise trainer_lib.NonFiniteLossError("step 3")
    with pytest.raises(KeyError), train.explained_errors():  # not one of the explained errors
        raise KeyError("x")

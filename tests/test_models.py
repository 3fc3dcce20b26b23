"""SpectronModel (T5X BaseModel shape) and SpectronConfig: init, loss, score, frozen training."""

import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from spectron_testing import (
    init_params,
    jitted_loss,
    jitted_value_and_grad,
    random_batch,
    tiny_config,
)

from spectron_jax import config as config_lib
from spectron_jax.models import INPUT_TYPES, SpectronModel, example_input_shapes


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    batch = random_batch(config)
    return config, batch, init_params(config, batch)


def test_initial_variables_carry_logical_axes():
    config = tiny_config(stop_head=True)
    model = SpectronModel(config)
    shapes = example_input_shapes(config, batch_size=2)
    boxed = jax.eval_shape(lambda r: model.get_initial_variables(r, shapes), jax.random.PRNGKey(0))
    leaves = jax.tree.leaves(
        boxed["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == len(x.value.shape) for x in leaves)
    assert set(boxed["params"]) == {
        "encoder",
        "connector",
        "decoder",
        "pre_net",
        "post_net",
        "stop",
    }
    with pytest.raises(ValueError, match="frame_mask"):
        model.get_initial_variables(
            jax.random.PRNGKey(0), {k: v for k, v in shapes.items() if k != "frame_mask"}
        )
    assert set(shapes) == set(INPUT_TYPES)


def test_loss_fn_metrics_and_determinism(setup):
    config, batch, params = setup
    loss_fn = jitted_loss(config)
    loss, metrics = loss_fn(params, batch, None)
    loss2, _ = loss_fn(params, batch, None)
    assert float(loss) == float(loss2)  # No rng: deterministic (fixed pre-net dropout key).
    for key in (
        "ce",
        "spec",
        "freq_delta",
        "time_delta",
        "accuracy_prompt",
        "accuracy_continuation",
        "num_tokens",
        "num_frames",
        "loss",
    ):
        assert key in metrics and np.isfinite(float(metrics[key])), key
    assert float(metrics["num_tokens"]) == batch["decoder_loss_weights"].sum()
    assert float(metrics["num_frames"]) == batch["frame_mask"].sum()
    np.testing.assert_allclose(
        loss,
        metrics["ce"] + metrics["spec"] + metrics["freq_delta"] + metrics["time_delta"],
        rtol=1e-6,
    )
    (drop, _), _ = jitted_value_and_grad(config)(params, batch, jax.random.PRNGKey(5))
    assert float(drop) != float(loss)  # Training mode: dropout and SpecAugment act.


def test_score_batch_matches_per_example_cross_entropy(setup):
    config, batch, params = setup
    model = SpectronModel(config)
    scores = np.asarray(jax.jit(model.score_batch)(params, batch))
    assert scores.shape == (3,) and scores.dtype == np.float32
    loss_fn = jitted_loss(config)  # The program of test_loss_fn_metrics_and_determinism.
    for i in range(3):
        # Loss weights on example i only: the mean CE times its token count is -score_i.
        one = dict(batch)
        one["decoder_loss_weights"] = batch["decoder_loss_weights"] * (np.arange(3) == i)[:, None]
        _, metrics = loss_fn(params, one, None)
        np.testing.assert_allclose(
            scores[i], -metrics["ce"] * one["decoder_loss_weights"].sum(), rtol=1e-5
        )
    assert len(set(scores.tolist())) == 3


def test_predict_batch_with_aux_generates_text_then_frames(setup):
    config, batch, params = setup
    outputs, aux = SpectronModel(config).predict_batch_with_aux(
        params, batch, max_text_tokens=5, max_frames=6
    )
    b = batch["encoder_features"].shape[0]
    assert outputs["text_tokens"].shape == (b, 5)
    assert outputs["frames"].shape == (b, 6, config.n_mels)
    assert np.all(np.isfinite(np.asarray(outputs["frames"])))
    assert np.all((np.asarray(aux["text_lengths"]) >= 0) & (np.asarray(aux["text_lengths"]) <= 5))
    with pytest.raises(TypeError):
        SpectronModel(config).predict_batch_with_aux(params, batch, not_an_option=1)


def _train(config, batch, params, steps=8):
    mask = SpectronModel(config).trainable_mask(params)
    labels = jax.tree.map(lambda t: "trainable" if t else "frozen", mask)
    tx = optax.multi_transform(
        {"trainable": optax.adam(3e-3), "frozen": optax.set_to_zero()}, labels
    )
    opt_state = tx.init(params)

    grad_fn = jitted_value_and_grad(config)  # Shared with test_network (one compile).

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    losses = []
    new = params
    for i in range(steps):
        (loss, _), grads = grad_fn(new, batch, jax.random.PRNGKey(i))
        new, opt_state = update(new, opt_state, grads)
        losses.append(float(loss))
    return new, opt_state, losses


def _num_arrays(tree):
    return sum(1 for x in jax.tree.leaves(tree) if hasattr(x, "shape") and x.ndim > 0)


def test_frozen_encoder_zero_updates_and_no_optimizer_state(setup):
    config, batch, params = setup
    assert config.encoder_frozen
    new, opt_state, losses = _train(config, batch, params)
    enc_pairs = zip(
        jax.tree.leaves(params["encoder"]), jax.tree.leaves(new["encoder"]), strict=True
    )
    for a, b in enc_pairs:
        np.testing.assert_array_equal(a, b)
    dec_pairs = zip(
        jax.tree.leaves(params["decoder"]), jax.tree.leaves(new["decoder"]), strict=True
    )
    assert all(not np.array_equal(a, b) for a, b in dec_pairs)
    # Adam holds mu and nu for each trainable array, nothing for the encoder's.
    trainable = {k: v for k, v in params.items() if k != "encoder"}
    assert _num_arrays(opt_state) == 2 * _num_arrays(trainable)
    assert losses[-1] < losses[0]
    # With the flag off, the encoder gets optimizer state too (its gradients: test_network).
    unfrozen = SpectronModel(dataclasses.replace(config, encoder_frozen=False))
    labels = jax.tree.map(lambda t: "t" if t else "f", unfrozen.trainable_mask(params))
    tx = optax.multi_transform({"t": optax.adam(1e-3), "f": optax.set_to_zero()}, labels)
    assert _num_arrays(tx.init(params)) == 2 * _num_arrays(params)


def test_config_json_round_trip_and_validation():
    config = tiny_config(stop_head=True, connector_stack=2)
    again = config_lib.SpectronConfig.from_json(config.to_json())
    assert again == config
    with pytest.raises(ValueError, match="input_dim"):
        tiny_config(encoder_front_end="w2v_bert_fbank")
    with pytest.raises(ValueError, match="reduction_factor"):
        tiny_config(reduction_factor=0)


def test_gin_factories_and_dtype_override():
    gin.clear_config()
    gin.parse_config(
        """
        spectron.spectron_config.decoder = @spectron.decoder_config()
        spectron.spectron_config.encoder = @spectron.conformer_config()
        spectron.spectron_config.loss = @spectron.loss_config()
        spectron.spectron_config.dtype = "bfloat16"
        spectron.spectron_config.reduction_factor = 3
        spectron.decoder_config.vocab_size = 64
        spectron.decoder_config.num_layers = 1
        spectron.decoder_config.d_model = 16
        spectron.decoder_config.num_heads = 2
        spectron.decoder_config.num_kv_heads = 1
        spectron.decoder_config.head_dim = 8
        spectron.decoder_config.mlp_dim = 32
        spectron.conformer_config.input_dim = 80
        spectron.loss_config.time_delta_orders = 2
        """
    )
    try:
        config = config_lib.spectron_config()
    finally:
        gin.clear_config()
    assert config.dtype == config.decoder.dtype == config.encoder.dtype == "bfloat16"
    assert config.reduction_factor == 3 and config.loss.time_delta_orders == 2
    assert config.decoder.num_layers == 1 and config.encoder.num_layers == 24
    with pytest.raises(TypeError):
        config_lib.decoder_config(vocab_size=8, not_a_field=1)


def test_bf16_compute_traces(setup):
    """bf16 compute, f32 parameters: checked abstractly (tracing, no compile)."""
    config, batch, _ = setup
    bf16 = dataclasses.replace(
        config,
        dtype="bfloat16",
        decoder=dataclasses.replace(config.decoder, dtype="bfloat16"),
        encoder=dataclasses.replace(config.encoder, dtype="bfloat16"),
    )
    model = SpectronModel(bf16)
    shapes = {k: v.shape for k, v in batch.items()}
    params = jax.eval_shape(
        lambda r: nn.unbox(model.get_initial_variables(r, shapes)["params"]),
        jax.random.PRNGKey(0),
    )
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    loss, metrics = jax.eval_shape(model.loss_fn, params, batch, None)
    assert loss.shape == () and loss.dtype == jnp.float32
    logits, frames, _ = jax.eval_shape(
        lambda p: model.module.apply({"params": p}, batch, rngs={"dropout": jax.random.PRNGKey(0)}),
        params,
    )
    assert logits.dtype == jnp.float32 and frames.dtype == jnp.float32

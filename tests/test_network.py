"""The Spectron network: sequence layout, masks, padding invariance, causality, frozen encoder."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spectron_testing import (
    apply,
    init_params,
    jitted_value_and_grad,
    random_batch,
    tiny_config,
    variant_config,
)

from spectron_jax import losses
from spectron_jax.models import SpectronModel
from spectron_jax.network import Spectron, stack_frames
from spectron_jax.nn.attention import positions_from_valid, prefix_lm_mask
from spectron_jax.nn.spec_augment import SpecAugmentConfig, spec_augment


def init(config, batch, seed=0):
    return SpectronModel(config), init_params(config, batch, seed)


def reference_mask(prefix_valid, text_valid, frame_valid):
    """Loop reference of CONTRACTS.md section 2: bool[S, S] for one example."""
    valid = list(prefix_valid) + list(text_valid) + list(frame_valid)
    is_prefix = [True] * len(prefix_valid) + [False] * (len(text_valid) + len(frame_valid))
    s = len(valid)
    out = np.zeros((s, s), bool)
    for q in range(s):
        for k in range(s):
            if valid[q] and valid[k]:
                out[q, k] = k <= q or (is_prefix[q] and is_prefix[k])
    pos = np.maximum(np.cumsum(valid) - 1, 0)
    return out, pos


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config(prenet_dropout_at_inference=False)
    batch = random_batch(config)
    model, params = init(config, batch)
    return config, batch, params


def test_shapes_and_masks_exact(tiny):
    config, batch, params = tiny
    logits, frames, aux = apply(config, params, batch)
    b, n_text = batch["decoder_input_tokens"].shape
    t_f = batch["target_frames"].shape[1]
    assert logits.shape == (b, n_text, config.decoder.vocab_size)
    assert frames.shape == (b, t_f, config.n_mels) and frames.dtype == jnp.float32
    p = config.prefix_length(batch["encoder_features"].shape[1])
    assert aux["prefix_mask"].shape == (b, p)
    r = config.reduction_factor
    for i in range(b):
        # Encoder subsampling by 4 ("subsampling" stem): ceil(valid frames / 4) valid slots.
        n_prefix = -(-int(batch["encoder_mask"][i].sum()) // 4)
        prefix_valid = np.arange(p) < n_prefix
        np.testing.assert_array_equal(aux["prefix_mask"][i], prefix_valid)
        text_valid = batch["text_part"][i] > 0
        frame_valid = batch["frame_mask"][i].reshape(-1, r).any(-1)
        want, pos = reference_mask(prefix_valid, text_valid, frame_valid)
        np.testing.assert_array_equal(np.asarray(aux["attention_mask"][i, 0]), want)
        np.testing.assert_array_equal(np.asarray(aux["positions"][i]), pos)
    # The hand-made batch does have padding in every region of some example.
    assert not aux["prefix_mask"][-1].all()
    assert not (batch["text_part"][-1] > 0).all() and not batch["frame_mask"][-1].all()


def test_padding_never_changes_valid_outputs(tiny):
    config, batch, params = tiny
    logits, frames, _ = apply(config, params, batch)
    rng = np.random.default_rng(7)
    other = dict(batch)
    enc_pad = batch["encoder_mask"][..., None] == 0
    other["encoder_features"] = np.where(
        enc_pad, rng.normal(size=batch["encoder_features"].shape) * 50, batch["encoder_features"]
    ).astype(np.float32)
    text_pad = batch["text_part"] == 0
    other["decoder_input_tokens"] = np.where(text_pad, 5, batch["decoder_input_tokens"])
    frame_pad = batch["frame_mask"][..., None] == 0
    other["target_frames"] = np.where(
        frame_pad, rng.normal(size=batch["target_frames"].shape) * 50, batch["target_frames"]
    ).astype(np.float32)
    logits2, frames2, _ = apply(config, params, other)
    text_valid = batch["text_part"] > 0
    np.testing.assert_allclose(
        np.asarray(logits)[text_valid], np.asarray(logits2)[text_valid], atol=1e-5, rtol=1e-5
    )
    fv = batch["frame_mask"] > 0
    np.testing.assert_allclose(np.asarray(frames)[fv], np.asarray(frames2)[fv], atol=1e-5)
    # The perturbation is not a no-op somewhere: the padded frames' predictions may change.
    assert np.any(np.asarray(frames2)[~fv] != np.asarray(frames)[~fv]) or fv.all()


def test_causal_after_prefix_and_teacher_forcing_shift(tiny):
    config, batch, params = tiny
    logits, frames, _ = apply(config, params, batch)
    r = config.reduction_factor
    # Change target frame group 1 of example 0: predictions of groups 0..1 stay (slot j reads
    # group j-1), group 2 onwards change.
    other = dict(batch)
    tf = batch["target_frames"].copy()
    tf[0, r : 2 * r] += 3.0
    other["target_frames"] = tf
    logits2, frames2, _ = apply(config, params, other)
    np.testing.assert_allclose(frames2[0, : 2 * r], frames[0, : 2 * r], atol=1e-6)
    assert not np.allclose(frames2[0, 2 * r :], frames[0, 2 * r :], atol=1e-4)
    np.testing.assert_allclose(logits2, logits, atol=1e-6)  # Text slots precede frame slots.
    # Change the last text input token: earlier text logits stay, frames change.
    other = dict(batch)
    tokens = batch["decoder_input_tokens"].copy()
    tokens[0, -1] = (tokens[0, -1] + 1) % config.decoder.vocab_size
    other["decoder_input_tokens"] = tokens
    logits3, frames3, _ = apply(config, params, other)
    np.testing.assert_allclose(logits3[0, :-1], logits[0, :-1], atol=1e-6)
    assert not np.allclose(frames3[0], frames[0], atol=1e-4)


def test_prefix_is_bidirectional_behaviourally(tiny):
    """Through the decoder: slot 0 sees the last prefix slot under the prefix-LM mask only."""
    config, _, params = tiny
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 6, config.decoder.d_model)).astype(np.float32))
    valid = jnp.ones((1, 6), jnp.int32)
    prefix = jnp.asarray([[1, 1, 1, 0, 0, 0]], jnp.int32)
    changed = x.at[0, 2].add(1.0)

    @jax.jit
    def hidden(inputs, is_prefix):
        return Spectron(config).apply(
            {"params": params},
            inputs,
            positions_from_valid(valid),
            prefix_lm_mask(valid, is_prefix),
            method=lambda net, *a: net.decoder(*a),
        )[0]

    h, h2 = hidden(x, prefix), hidden(changed, prefix)
    assert not np.allclose(h[0], h2[0], atol=1e-5)  # Bidirectional inside the prefix.
    np.testing.assert_allclose(h[:2], h[:2])
    c, c2 = hidden(x, jnp.zeros_like(prefix)), hidden(changed, jnp.zeros_like(prefix))
    np.testing.assert_allclose(c[:2], c2[:2], atol=1e-6)  # Causal: slots 0-1 cannot see slot 2.


def test_frozen_encoder_gets_zero_gradient_and_is_masked():
    config = tiny_config()
    batch = random_batch(config)
    model, params = init(config, batch)
    _, grads = jitted_value_and_grad(config)(params, batch, jax.random.PRNGKey(1))
    enc = jax.tree.leaves(grads["encoder"])
    assert enc and all(np.all(np.asarray(g) == 0) for g in enc)
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads["decoder"]))
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads["connector"]))
    mask = model.trainable_mask(params)
    assert not any(jax.tree.leaves(mask["encoder"]))
    assert all(jax.tree.leaves({k: v for k, v in mask.items() if k != "encoder"}))

    # With the flag off, gradients reach the encoder (through the prefix: a smaller program
    # than the whole loss, which test_models trains end to end with the same mask).
    trainable = dataclasses.replace(config, encoder_frozen=False)
    assert all(jax.tree.leaves(SpectronModel(trainable).trainable_mask(params)))

    def prefix_grads(cfg):
        def f(p):
            prefix, _ = Spectron(cfg).apply(
                {"params": p},
                jnp.asarray(batch["encoder_features"]),
                jnp.asarray(batch["encoder_mask"]),
                method=Spectron.encode,
            )
            return jnp.sum(prefix**2)

        return jax.jit(jax.grad(f))(params)["encoder"]

    nonzero = [np.any(np.asarray(g) != 0) for g in jax.tree.leaves(prefix_grads(trainable))]
    assert sum(nonzero) > len(nonzero) // 2
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(prefix_grads(config)))


def test_stack_frames():
    x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    m = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.int32)
    y, ym = stack_frames(x, m, 2)
    assert y.shape == (2, 3, 6)
    np.testing.assert_array_equal(ym, [[1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(y[1, 1], np.concatenate([x[1, 2], np.zeros(3)]))
    np.testing.assert_array_equal(y[0, 2], np.concatenate([x[0, 4], np.zeros(3)]))


@pytest.fixture(scope="module")
def variant():
    config = variant_config()
    batch = random_batch(config)
    return config, batch, init_params(config, batch)


def test_connector_stacking_stop_head_and_prenet_dropout(variant):
    config, batch, params = variant
    logits, frames, aux = apply(config, params, batch, seed=1)
    # 16 prompt frames -> 4 after the encoder stem -> ceil(4 / 3) = 2 prefix slots.
    assert aux["prefix_mask"].shape[1] == config.prefix_length(16) == 2
    np.testing.assert_array_equal(aux["prefix_mask"][-1], [1, 0])  # 6 valid frames -> 2 -> 1.
    assert aux["stop_logits"].shape == (3, 4)
    _, metrics = losses.spectron_loss(
        logits=logits,
        target_tokens=batch["decoder_target_tokens"],
        loss_weights=batch["decoder_loss_weights"],
        text_part=batch["text_part"],
        pred_frames=frames,
        target_frames=batch["target_frames"],
        frame_mask=batch["frame_mask"],
        config=config.loss,
        stop_logits=aux["stop_logits"],
        reduction_factor=config.reduction_factor,
    )
    assert np.isfinite(float(metrics["stop"])) and float(metrics["stop"]) > 0
    # Pre-net dropout stays on at inference (deterministic=True) with this config: frames
    # depend on the rng; valid text logits do not (text slots precede every frame slot).
    logits2, frames2, _ = apply(config, params, batch, seed=2)
    assert not np.allclose(frames, frames2)
    valid = batch["text_part"] > 0
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(logits2)[valid], atol=1e-6)


def test_prenet_dropout_off_at_inference(tiny):
    config, batch, params = tiny
    _, f1, _ = apply(config, params, batch, seed=1)
    _, f2, _ = apply(config, params, batch, seed=2)
    np.testing.assert_array_equal(f1, f2)


def test_empty_continuation_spoken_qa(variant):
    """Spoken QA batches have no continuation frames (T_f = 0)."""
    config, _, params = variant
    qa = random_batch(config, num_groups=0)
    logits, frames, aux = apply(config, params, qa)
    assert frames.shape == (3, 0, config.n_mels) and aux["stop_logits"].shape == (3, 0)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_spec_augment_masks_only_valid_frames(tiny):
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(4, 200, 80)).astype(np.float32))
    mask = jnp.asarray(
        (np.arange(200)[None] < np.array([[200], [150], [80], [10]])).astype(np.int32)
    )
    cfg = SpecAugmentConfig(num_freq_masks=2, max_freq_width=10, max_time_fraction=0.1)
    out = np.asarray(spec_augment(jax.random.PRNGKey(3), feats, mask, cfg))
    changed = out != np.asarray(feats)
    assert changed.any()
    assert not changed[np.asarray(mask) == 0].any()  # Padding untouched.
    lengths = np.asarray(mask).sum(-1)
    for i, n in enumerate(lengths):
        hidden = changed[i, :n]
        full_cols = hidden.all(axis=0).sum()  # Channels hidden in every valid frame.
        full_rows = hidden.all(axis=1).sum()  # Frames hidden in every channel.
        assert full_cols <= 2 * 10 and full_rows <= 2 * int(0.1 * n)
        # Masked values are the example's mean over its valid frames.
        np.testing.assert_allclose(out[i, :n][hidden], np.asarray(feats)[i, :n].mean(), atol=1e-6)
    same = np.asarray(spec_augment(jax.random.PRNGKey(3), feats, mask, cfg))
    np.testing.assert_array_equal(out, same)
    off = spec_augment(jax.random.PRNGKey(3), feats, mask, SpecAugmentConfig(enabled=False))
    assert off is feats
    # Training mode applies it inside the network (the frozen encoder itself runs without
    # dropout, so only SpecAugment can differ); evaluation does not.
    config, batch, params = tiny
    net = Spectron(config)

    @functools.partial(jax.jit, static_argnums=0)
    def enc(det):
        return net.apply(
            {"params": params},
            jnp.asarray(batch["encoder_features"]),
            jnp.asarray(batch["encoder_mask"]),
            deterministic=det,
            method=Spectron.encode,
            rngs={"dropout": jax.random.PRNGKey(0)},
        )[0]

    np.testing.assert_array_equal(enc(True), enc(True))
    assert not np.allclose(enc(True), enc(False))

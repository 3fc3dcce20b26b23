"""Frame heads: their loss terms on cases with known answers, each head inside the model (loss,
gradients, logical axes), decoding (temperature 0 deterministic, cached equals uncached) and a
head mismatch between checkpoint and config."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import spectron_testing as st
from scipy import stats

from spectron_jax import checkpoints, decoding, losses, partitioning
from spectron_jax.decoding import DecodeConfig
from spectron_jax.nn.frame_heads import FrameHeadConfig, kind_of_params

STOCHASTIC = ("gaussian", "energy_distance")

# ------------------------------------------------------------------------------------------------
# Loss terms with known answers.
# ------------------------------------------------------------------------------------------------


def test_gaussian_kl_against_the_textbook_form_and_monte_carlo():
    rng = np.random.default_rng(0)
    mean, log_var, target = (rng.normal(size=(2, 3, 4)) for _ in range(3))
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    got = float(losses.gaussian_kl(mean, log_var, target, mask))
    sd = np.exp(0.5 * log_var)
    # KL(N(m, s^2) || N(y, 1)) = log(1 / s) + (s^2 + (m - y)^2) / 2 - 1/2.
    textbook = np.log(1.0 / sd) + (sd**2 + (mean - target) ** 2) / 2 - 0.5
    np.testing.assert_allclose(got, textbook[mask > 0].mean(), rtol=1e-5)
    # E_q[log q(z) - log p(z)] by sampling, with scipy's densities.
    z = mean + sd * rng.normal(size=(200_000, *mean.shape))
    mc = stats.norm.logpdf(z, mean, sd) - stats.norm.logpdf(z, target, 1.0)
    np.testing.assert_allclose(got, mc.mean(axis=0)[mask > 0].mean(), rtol=2e-2)
    assert float(losses.gaussian_kl(target, np.zeros_like(target), target, mask)) == 0.0


def test_spectrogram_flux_is_minus_the_mean_change_over_valid_pairs():
    target = np.array([[[0.0], [1.0], [5.0], [9.0]]])
    mean = np.array([[[7.0], [3.0], [2.0], [0.0]]])
    # Pairs (1, 0) and (2, 1) are valid; (3, 2) is not (frame 3 is padding).
    got = losses.spectrogram_flux(mean, target, np.array([[1, 1, 1, 0]]))
    np.testing.assert_allclose(float(got), -(abs(3 - 0) + abs(2 - 1)) / 2)
    assert float(losses.spectrogram_flux(mean, target, np.array([[1, 0, 0, 0]]))) == 0.0


def test_energy_distance_of_one_distribution_is_about_zero():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4))
    same = float(losses.energy_distance(x, y))
    shifted = float(losses.energy_distance(x, y + 0.5))
    assert abs(same) < 0.01 and shifted > 0.1


def test_energy_distance_of_shifted_normals_against_the_closed_form():
    # X ~ N(0, 1), Y ~ N(d, 1): X - Y ~ N(-d, 2), so E|X - Y| = s sqrt(2/pi) e^(-d^2/2s^2) +
    # d (1 - 2 Phi(-d/s)) with s = sqrt 2, and E|X - X'| = E|Y - Y'| = 2 / sqrt(pi).
    d, s = 1.5, math.sqrt(2.0)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-(d**2) / (2 * s**2)) + d * (
        1 - 2 * stats.norm.cdf(-d / s)
    )
    want = 2 * e_xy - 2 * (2 / math.sqrt(math.pi))
    # Quantiles rather than random draws: the empirical distributions then match exactly up
    # to O(1/n), where random means would shift d by ~1/sqrt(n).
    q = stats.norm.ppf((np.arange(3000) + 0.5) / 3000)[:, None]
    np.testing.assert_allclose(float(losses.energy_distance(q, d + q)), want, atol=5e-3)


def test_energy_score_of_a_point_and_its_minimum_at_the_true_spread():
    y = np.array([[[3.0, 4.0]]])  # [B=1, N=1, G=2]
    point = np.zeros((2, 1, 1, 2))  # Two identical draws: the score is the distance, 5.
    np.testing.assert_allclose(
        float(losses.energy_score(point, y, np.ones((1, 1)))), 5.0, rtol=1e-5
    )
    # Targets ~ N(0, 1) per value; samples ~ N(0, scale^2): the proper score is lowest at 1.
    rng = np.random.default_rng(3)
    targets = rng.normal(size=(1, 4000, 2))
    eps = rng.normal(size=(8, 1, 4000, 2))
    mask = np.ones((1, 4000))
    scores = {c: float(losses.energy_score(c * eps, targets, mask)) for c in (0.5, 1.0, 2.0)}
    assert scores[1.0] < scores[0.5] and scores[1.0] < scores[2.0], scores


def test_bad_head_configs_are_named():
    with pytest.raises(ValueError, match="kind='flow' not in"):
        FrameHeadConfig(kind="flow")
    with pytest.raises(ValueError, match="num_samples=1 must be >= 2"):
        FrameHeadConfig(num_samples=1)
    assert st.tiny_config(frame_head="gaussian").frame_head == FrameHeadConfig(kind="gaussian")


# ------------------------------------------------------------------------------------------------
# Each head inside the model.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=STOCHASTIC)
def head_model(request):
    config = st.tiny_config(frame_head=request.param, prenet_dropout_at_inference=False)
    batch = st.random_batch(config, batch_size=2)
    return config, st.tiny_model(config), st.init_params(config, batch), batch


def test_each_head_trains_its_own_terms(head_model):
    config, model, params, batch = head_model
    inputs = {k: jnp.asarray(v) for k, v in batch.items()}
    (loss, metrics), grads = st.jitted_value_and_grad(config)(params, inputs, jax.random.PRNGKey(0))
    head = config.frame_head
    text = metrics["ce"] + metrics["z_loss"]
    if head.kind == "gaussian":
        regression = metrics["spec"] + metrics["freq_delta"] + metrics["time_delta"]
        extra = (
            head.latent_weight * metrics["latent"]
            + head.kl_weight * metrics["kl"]
            + head.flux_weight * metrics["flux"]
        )
        np.testing.assert_allclose(loss, text + regression + extra, rtol=1e-5)
        assert metrics["flux"] < 0 and metrics["kl"] > 0
    else:  # Trained by the energy score alone; the regression terms are only reported.
        np.testing.assert_allclose(loss, text + head.energy_weight * metrics["energy"], rtol=1e-5)
    assert "post_net" not in grads and kind_of_params(grads) == head.kind
    head_grads = jax.tree.leaves(grads["frame_head"])
    assert all(np.isfinite(g).all() for g in head_grads)
    assert sum(float(jnp.abs(g).sum()) for g in head_grads) > 0


def test_head_parameters_carry_the_shared_logical_axes(head_model):
    config, model, _, batch = head_model
    shapes = {k: v.shape for k, v in batch.items()}
    boxed = jax.eval_shape(lambda r: model.get_initial_variables(r, shapes), jax.random.PRNGKey(0))
    names = set()
    for leaf in jax.tree.leaves(
        boxed["params"]["frame_head"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    ):
        assert isinstance(leaf, nn.LogicallyPartitioned)
        named = [n for n in leaf.names if n is not None]
        assert len(set(named)) == len(named), leaf.names  # A mesh rule places a name once.
        names.update(leaf.names)
    assert names <= {"embed", "mlp", "mel", None} and {"embed", "mlp", "mel"} <= names
    # The trainer's placement: every parameter gets a sharding from the one rules table.
    mesh = partitioning.create_mesh()
    shardings = decoding.param_shardings(model, mesh)
    assert all(s.mesh == mesh for s in jax.tree.leaves(shardings["frame_head"]))


def _decode(model, params, batch, seed, **kw):
    options = DecodeConfig(max_text_tokens=4, max_frames=8, text_mode="forced", **kw)
    return np.asarray(
        decoding.generate(model, params, batch, options, rng=jax.random.PRNGKey(seed))["frames"]
    )


def test_temperature_zero_is_deterministic_and_one_samples(head_model):
    _, model, params, batch = head_model
    cold = [_decode(model, params, batch, seed, frame_temperature=0.0) for seed in (0, 1)]
    np.testing.assert_array_equal(cold[0], cold[1])
    warm = [_decode(model, params, batch, seed) for seed in (0, 1)]
    assert np.abs(warm[0] - warm[1]).max() > 1e-3
    assert np.abs(warm[0] - cold[0]).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["regression", *STOCHASTIC])
def test_cached_decoding_equals_uncached_for_each_head(kind):
    """At temperature 1: group j draws its noise from its own key in both loops."""
    config = st.tiny_config(frame_head=kind, prenet_dropout_at_inference=False)
    batch = st.random_batch(config, batch_size=2)
    model, params = st.tiny_model(config), st.init_params(config, batch)
    cached = _decode(model, params, batch, 3)
    uncached = decoding.generate_frames_uncached(model, params, batch, 8, rng=jax.random.PRNGKey(3))
    np.testing.assert_allclose(np.asarray(uncached), cached, atol=1e-4, rtol=0)
    assert np.abs(cached).max() > 1e-2


# ------------------------------------------------------------------------------------------------
# Checkpoint vs config.
# ------------------------------------------------------------------------------------------------


def test_a_head_mismatch_names_both_heads_and_keeps_the_checkpoint(tmp_path):
    w = np.ones((2, 3), np.float32)
    written = {"params": {"decoder": {"w": w}, "post_net": {"out": {"kernel": w}}}}
    asked = {"params": {"decoder": {"w": w}, "frame_head": {"latent_out": {"kernel": w}}}}
    ckpt = checkpoints.Checkpointer(
        tmp_path, checkpoints.CheckpointConfig(every_steps=1, async_save=False)
    )
    ckpt.save(1, written, {"batches_consumed": 1}, {"d": 1})
    ckpt.close()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), asked
    )
    ckpt = checkpoints.Checkpointer(tmp_path)
    match = "frame_head='regression'; the config asks for frame_head='gaussian'"
    with pytest.raises(checkpoints.FrameHeadMismatchError, match=match):
        ckpt.restore_latest(abstract)
    assert ckpt.steps() == [1]  # Not set aside as unreadable.
    shardings = jax.tree.map(lambda x: x.sharding, abstract["params"])
    with pytest.raises(checkpoints.FrameHeadMismatchError, match=match):  # init / inference
        checkpoints.load_subtrees(
            {"p": abstract["params"]}, tmp_path / "1", {"p": "params"}, {"p": shardings}
        )
    assert ocp.PyTreeCheckpointer().metadata(tmp_path / "1" / "state") is not None

"""ConformerEncoder: padding invariance, subsampling lengths, axis names, knobs.

Parity with transformers' w2v-BERT lives in tests/convert/test_hf_w2v_bert.py.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectron_jax.nn.conformer import (
    ConformerConfig,
    ConformerEncoder,
    abstract_variables,
    count_params,
)

TINY = ConformerConfig(
    input_dim=12,
    hidden_dim=16,
    num_layers=2,
    num_heads=2,
    mlp_dim=32,
    conv_kernel_size=5,
    left_max_positions=4,
    right_max_positions=2,
    subsampling_channels=4,
)
# Every stem/position/conv-padding combination the config offers.
VARIANTS = {
    "w2v_bert": TINY,
    "subsampling_rotary_centred": dataclasses.replace(
        TINY, stem="subsampling", position="rotary", causal_conv=False, activation="relu"
    ),
    "subsampling_none_rms": dataclasses.replace(
        TINY, stem="subsampling", position="none", norm_type="rms_norm"
    ),
}
PARAM_NAMES = {
    "vocab",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "layers",
    "mel",
    "conv",
    "norm",
    "enc_features",
    None,
}


def _params(config, seed=1):
    """Random values for every parameter, from abstract shapes (no RNG compile, no init).

    Random norm scales/biases too: unit scales and zero biases would hide mistakes.
    """
    abstract = nn.unbox(abstract_variables(config))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        value = 0.3 * rng.normal(size=leaf.shape)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            value += 1.0
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_padding_never_changes_valid_outputs(name):
    """A padded batch gives each clip exactly what it gets alone, at its own length."""
    config = VARIANTS[name]
    model, variables = ConformerEncoder(config), _params(config)
    apply = jax.jit(model.apply)
    lengths = [21, 13]  # 13 is odd: the stem's last valid frame overlaps one padded frame.
    features = np.random.default_rng(0).normal(size=(2, 21, config.input_dim))
    features = features.astype(np.float32)
    mask = (np.arange(21)[None] < np.array(lengths)[:, None]).astype(np.int32)
    # Garbage in the padding must not leak anywhere.
    padded = np.where(mask[..., None] == 1, features, 1e3).astype(np.float32)
    hidden, out_mask = apply(variables, padded, mask)
    alone, _ = apply(variables, features[1:, :13], np.ones((1, 13), np.int32))
    for i, reference in enumerate([hidden[0], alone[0]]):
        valid = config.output_length(lengths[i])
        assert reference.shape[0] == valid
        np.testing.assert_array_equal(out_mask[i], np.arange(hidden.shape[1]) < valid)
        np.testing.assert_allclose(hidden[i, :valid], reference, atol=2e-5, rtol=0)
        assert np.all(np.asarray(hidden[i, valid:]) == 0)


@pytest.mark.parametrize("total", [20, 21])
def test_subsampling_length_and_mask(total):
    config = dataclasses.replace(VARIANTS["subsampling_none_rms"], num_layers=1)
    model, variables = ConformerEncoder(config), _params(config)
    lengths = np.array([1, 4, 5, 8, 9, 17, total])
    mask = (np.arange(total)[None] < lengths[:, None]).astype(np.int32)
    features = np.ones((len(lengths), total, config.input_dim), np.float32)
    hidden, out_mask = jax.jit(model.apply)(variables, features, mask)
    expected_frames = -(-total // 4)  # ceil(T / 4)
    assert hidden.shape == (len(lengths), expected_frames, config.hidden_dim)
    assert config.output_length(total) == expected_frames
    assert out_mask.dtype == jnp.int32
    expected_lengths = -(-lengths // 4)
    np.testing.assert_array_equal(out_mask, np.arange(expected_frames) < expected_lengths[:, None])


def test_every_param_has_logical_axis_names():
    for config in VARIANTS.values():
        boxed = jax.tree_util.tree_leaves(
            abstract_variables(config)["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )
        assert boxed and all(isinstance(x, nn.Partitioned) for x in boxed)
        for box in boxed:
            assert len(box.names) == box.value.ndim
            assert set(box.names) <= PARAM_NAMES, box.names


def test_shards_on_a_mesh_with_the_contract_rules():
    """Logical names resolve under the CONTRACTS.md section 6 default rules on 8 devices."""
    rules = (
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("activation_batch", ("data", "fsdp")),
    )
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor")
    )
    model = ConformerEncoder(TINY)
    specs = nn.get_partition_spec(abstract_variables(TINY))
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    variables = jax.device_put(_params(TINY), shardings)
    features, mask = jnp.ones((4, 8, TINY.input_dim)), jnp.ones((4, 8), jnp.int32)
    with mesh, nn.logical_axis_rules(rules):
        hidden, _ = jax.jit(model.apply)(variables, features, mask)
    reference, _ = jax.jit(model.apply)(_params(TINY), features, mask)
    kernel = variables["params"]["layers"]["ffn1"]["wi"]["kernel"]  # [L, D, mlp], scanned
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(hidden, reference, atol=1e-5)


def test_dropout_only_when_not_deterministic():
    """Dropout rates are inert when deterministic, active otherwise (also under remat)."""
    plain = dataclasses.replace(TINY, num_layers=1)
    config = dataclasses.replace(
        plain,
        hidden_dropout=0.3,
        attention_dropout=0.3,
        conv_dropout=0.3,
        activation_dropout=0.3,
        feat_proj_dropout=0.3,
        remat="full",
    )
    model, variables = ConformerEncoder(config), _params(config)
    features = np.random.default_rng(3).normal(size=(2, 10, config.input_dim))
    mask = jnp.ones((2, 10), jnp.int32)
    evaluated, _ = jax.jit(model.apply)(variables, features, mask)
    reference, _ = jax.jit(ConformerEncoder(plain).apply)(variables, features, mask)
    np.testing.assert_allclose(evaluated, reference, atol=1e-6)
    train, _ = jax.jit(functools.partial(model.apply, deterministic=False))(
        variables, features, mask, rngs={"dropout": jax.random.PRNGKey(4)}
    )
    assert np.abs(np.asarray(train - reference)).max() > 1e-2


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
    one_layer = dataclasses.replace(TINY, num_layers=1, position="rotary")
    features = np.random.default_rng(3).normal(size=(2, 6, TINY.input_dim))
    mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], jnp.int32)

    def loss(params, remat):
        m = ConformerEncoder(dataclasses.replace(one_layer, remat=remat))
        return jnp.sum(m.apply(params, features, mask)[0] ** 2)

    params = _params(one_layer)
    grads = [jax.jit(jax.grad(loss), static_argnums=1)(params, remat) for remat in (False, True)]
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *grads
    )


def test_bfloat16_compute_with_f32_params():
    config = dataclasses.replace(TINY, dtype="bfloat16")
    abstract = jax.tree_util.tree_leaves(nn.unbox(abstract_variables(config)))
    assert all(x.dtype == jnp.float32 for x in abstract)
    variables = _params(config)
    features = np.random.default_rng(5).normal(size=(2, 10, config.input_dim))
    mask = jnp.ones((2, 10), jnp.int32)
    hidden, _ = jax.jit(ConformerEncoder(config).apply)(variables, features, mask)
    reference, _ = jax.jit(ConformerEncoder(TINY).apply)(variables, features, mask)
    assert hidden.dtype == jnp.bfloat16
    scale = np.abs(np.asarray(reference)).max()
    np.testing.assert_allclose(np.asarray(hidden, np.float32), reference, atol=0.05 * scale)


def test_init_and_count_params():
    config = dataclasses.replace(TINY, num_layers=1)
    features, mask = jnp.zeros((1, 6, config.input_dim)), jnp.ones((1, 6), jnp.int32)
    variables = jax.jit(ConformerEncoder(config).init)(jax.random.PRNGKey(0), features, mask)
    leaves = jax.tree_util.tree_leaves(nn.unbox(variables))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert count_params(config) == sum(x.size for x in leaves)
    # Hand count of one w2v-BERT-style block + projection stem (D=16, F=12, M=32, K=5, hd=8).
    d, f, m, k, hd = 16, 12, 32, 5, 8
    block = 2 * (2 * d + d * m + m + m * d + d)  # ffn1, ffn2 with their norms
    block += 2 * d + 4 * (d * d + d) + 7 * hd  # attention norm, q/k/v/out, distances
    block += 2 * d + d * 2 * d + k * d + 2 * d + d * d + 2 * d  # conv module + final norm
    assert count_params(config) == 2 * f + f * d + d + block


def test_bad_config_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="stem='conv'.*conv_kernel_size=4"):
        ConformerConfig(stem="conv", conv_kernel_size=4)
    with pytest.raises(ValueError, match="divisible"):
        ConformerConfig(hidden_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="input_dim is 12"):
        ConformerEncoder(TINY).apply(
            _params(TINY), jnp.zeros((1, 4, 7)), jnp.ones((1, 4), jnp.int32)
        )


@pytest.mark.parametrize("causal", [True, False])
def test_depthwise_conv_equals_a_grouped_convolution(causal):
    """The shifted-products depthwise convolution against `nn.Conv` (one group per channel) with
    the same kernel, causal (left padding) and centred, outputs and gradients."""
    from spectron_jax.nn.conformer import _DepthwiseConv

    cfg = dataclasses.replace(TINY, conv_kernel_size=7, causal_conv=causal)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 19, 16))
    ours = _DepthwiseConv(cfg)
    params = ours.init(jax.random.PRNGKey(1), x)
    padding = [(6, 0)] if causal else [(3, 3)]
    conv = nn.Conv(16, (7,), padding=padding, feature_group_count=16, use_bias=False)
    reference = {"params": {"kernel": nn.unbox(params["params"]["kernel"])}}
    assert reference["params"]["kernel"].shape == (7, 1, 16)  # nn.Conv's own layout.

    def loss(module, variables, x):
        return jnp.sum(jnp.sin(module.apply(variables, x)))

    np.testing.assert_allclose(ours.apply(params, x), conv.apply(reference, x), atol=1e-5)
    g_ours = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(params, x)
    g_conv = jax.grad(functools.partial(loss, conv), argnums=(0, 1))(reference, x)
    np.testing.assert_allclose(
        nn.unbox(g_ours[0]["params"]["kernel"]), g_conv[0]["params"]["kernel"], atol=1e-5
    )
    np.testing.assert_allclose(g_ours[1], g_conv[1], atol=1e-5)
    if causal:  # Output t sees inputs up to t only.
        moved = x.at[:, 10:].set(0.0)
        np.testing.assert_allclose(ours.apply(params, moved)[:, :10], ours.apply(params, x)[:, :10])

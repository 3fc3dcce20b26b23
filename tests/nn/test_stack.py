"""Layer stacks: scanned and unrolled blocks compute the same; the layouts convert losslessly."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decoder import GEMMA_LIKE

from spectron_jax.nn import attention, stack
from spectron_jax.nn.conformer import ConformerConfig, ConformerEncoder, abstract_variables
from spectron_jax.nn.decoder import Decoder, init_cache

# test_decoder's Gemma-like config (GQA, QK-norm, sandwich norms, soft caps, two RoPE bases) with
# three layers in the pattern local, local, global: a scanned stack must feed per-layer flags.
DECODER = dataclasses.replace(GEMMA_LIKE, num_layers=3, sliding_window=2, sliding_window_pattern=3)
CONFORMER = ConformerConfig(
    input_dim=12, hidden_dim=16, num_layers=3, num_heads=2, mlp_dim=32, conv_kernel_size=5
)


def _random_tree(abstract, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.3, abstract)


def _decoder_params(config):
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    init = Decoder(config).init
    abstract = jax.eval_shape(
        lambda t: init(jax.random.PRNGKey(0), t, method=Decoder.forward_tokens), tokens
    )
    return _random_tree(nn.unbox(abstract["params"]))


def _inputs(config, seed=1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, 7, config.d_model)).astype(np.float32))
    valid = jnp.asarray(np.array([[1] * 7, [1, 1, 0, 1, 1, 1, 0]], bool))
    return x, attention.positions_from_valid(valid), attention.causal_mask(valid)


def test_scanned_decoder_equals_unrolled_forward_and_gradient():
    unrolled = dataclasses.replace(DECODER, scan_layers=False)
    params = _decoder_params(unrolled)
    scanned_params = stack.stack_layers(params, DECODER.num_layers)
    assert scanned_params["layers"]["attn"]["q_proj"]["kernel"].shape == (3, 32, 4, 8)
    x, positions, mask = _inputs(DECODER)

    def loss(config, p):
        return jnp.mean(Decoder(config).apply({"params": p}, x, positions, mask) ** 2)

    ref_loss, ref_grad = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(params)
    got_loss, got_grad = jax.jit(jax.value_and_grad(lambda p: loss(DECODER, p)))(scanned_params)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    got_grad = stack.unstack_layers(jax.device_get(got_grad), DECODER.num_layers)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_scanned_decoder_caches_with_a_layer_axis_and_decodes_like_unrolled():
    unrolled = dataclasses.replace(DECODER, scan_layers=False)
    params = _decoder_params(unrolled)
    layouts = {DECODER: stack.stack_layers(params, 3), unrolled: params}
    x, positions, mask = _inputs(DECODER)
    outputs = []
    for config, p in layouts.items():
        decoder = Decoder(config)
        cache = init_cache(decoder, batch_size=2, cache_length=7)

        @jax.jit
        def step(cache, x, positions, mask, decoder=decoder, p=p):
            out, updated = decoder.apply(
                {"params": p, "cache": cache}, x, positions, mask, decode=True, mutable=["cache"]
            )
            return out, updated["cache"]

        pieces = []
        for t in range(7):  # One slot at a time: the sliding window must hold in the cache.
            one = slice(t, t + 1)
            out, cache = step(cache, x[:, one], positions[:, one], mask[:, :, one])
            pieces.append(out)
        outputs.append(np.concatenate(pieces, axis=1))
        if config.scan_layers:
            assert cache["layers"]["attn"]["cached_key"].shape == (3, 2, 7, 2, 8)
        else:
            assert cache["layers_0"]["attn"]["cached_key"].shape == (2, 7, 2, 8)
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)


def test_scanned_parameters_carry_the_layer_axis_name():
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    abstract = jax.eval_shape(
        lambda t: Decoder(DECODER).init(jax.random.PRNGKey(0), t, method=Decoder.forward_tokens),
        tokens,
    )["params"]
    for leaf in jax.tree.leaves(
        abstract["layers"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    ):
        assert leaf.names[0] == stack.LAYER_AXIS and leaf.value.shape[0] == 3
    kernel = abstract["layers"]["mlp"]["gate"]["kernel"]
    assert kernel.names == ("layers", "embed", "mlp")
    enc = abstract_variables(CONFORMER)["params"]["layers"]["ffn1"]["wi"]["kernel"]
    assert enc.names == ("layers", "embed", "mlp")


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_conformer_equals_unrolled(remat):
    scanned = dataclasses.replace(CONFORMER, remat=remat)
    unrolled = dataclasses.replace(scanned, scan_layers=False)
    params = _random_tree(nn.unbox(abstract_variables(unrolled)["params"]))
    rng = np.random.default_rng(3)
    features = jnp.asarray(rng.normal(size=(2, 9, 12)).astype(np.float32))
    mask = jnp.asarray(np.array([[1] * 9, [1] * 6 + [0] * 3], np.int32))

    def loss(config, p):
        hidden, _ = ConformerEncoder(config).apply({"params": p}, features, mask)
        return jnp.mean(hidden**2)

    ref, ref_grad = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(params)
    stacked = stack.stack_layers(params, 3)
    got, got_grad = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(stacked)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    got_grad = stack.unstack_layers(jax.device_get(got_grad), 3)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_stack_and_unstack_round_trip_and_refuse_a_wrong_depth():
    tree = {
        "embedder": {"embedding": np.ones((4, 2))},
        "layers_0": {"w": np.full((2,), 0.0)},
        "layers_1": {"w": np.full((2,), 1.0)},
    }
    stacked = stack.stack_layers(tree, 2)
    assert sorted(stacked) == ["embedder", "layers"]
    np.testing.assert_array_equal(stacked["layers"]["w"], [[0.0, 0.0], [1.0, 1.0]])
    assert stack.layout_of(stacked) == "scanned" and stack.layout_of(tree) == "unrolled"
    back = stack.unstack_layers(stacked, 2)
    assert sorted(back) == sorted(tree)
    np.testing.assert_array_equal(back["layers_1"]["w"], tree["layers_1"]["w"])
    with pytest.raises(KeyError, match="layers_2"):
        stack.stack_layers(tree, 3)
    with pytest.raises(ValueError, match="beyond num_layers"):
        stack.stack_layers(tree, 1)
    with pytest.raises(ValueError, match=r"expected \[3, ...\]"):
        stack.unstack_layers(stacked, 3)


def test_remat_names_old_and_new():
    assert stack.canonical_remat("dots") == "minimal"
    assert stack.canonical_remat(True) == "full" and stack.canonical_remat(False) == "none"
    assert dataclasses.replace(CONFORMER, remat=True).remat == "full"
    with pytest.raises(ValueError, match="remat 'most'"):
        stack.canonical_remat("most")


def test_a_config_saved_before_scanning_reads_as_unrolled():
    from spectron_testing import tiny_config

    from spectron_jax.config import SpectronConfig

    saved = tiny_config().to_dict()
    assert saved["decoder"]["scan_layers"] and saved["encoder"]["scan_layers"]
    for name in ("decoder", "encoder"):
        del saved[name]["scan_layers"]  # What a checkpoint written before the knob holds.
    old = SpectronConfig.from_dict(saved)
    assert not old.decoder.scan_layers and not old.encoder.scan_layers
    assert SpectronConfig.from_dict(tiny_config().to_dict()) == tiny_config()

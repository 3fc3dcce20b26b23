"""Decoder LM: KV-cached decoding equals one pass, padding is invisible, remat, counts, axes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectron_jax.nn import attention
from spectron_jax.nn.decoder import Decoder, DecoderConfig, init_cache, num_params

GEMMA_LIKE = DecoderConfig(
    vocab_size=40,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
    activation="gelu_tanh",
    norm_variant="gemma",
    qk_norm=True,
    post_norms=True,
    rope_theta=1e4,
    rope_local_theta=100.0,
    sliding_window=3,
    sliding_window_pattern=2,  # layer 0 local, layer 1 global
    query_pre_attn_scalar=16,
    scale_embeddings=True,
    tie_embeddings=True,
    final_logit_softcap=5.0,
    attn_logit_softcap=8.0,
)
LLAMA_LIKE = DecoderConfig(
    vocab_size=40,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=1,
    head_dim=8,
    mlp_dim=48,
    qkv_bias=True,
    attn_out_bias=True,
    mlp_bias=True,
)
AXIS_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "norm"}


def _init(config, seed=0):
    tokens = jnp.zeros((1, 4), jnp.int32)
    init = jax.jit(lambda rng: Decoder(config).init(rng, tokens, method=Decoder.forward_tokens))
    return init(jax.random.PRNGKey(seed))["params"]


def _jit_apply(decoder, method=None):
    """decoder.apply, jitted: one compile is faster than op-by-op dispatch on a CPU."""
    return jax.jit(lambda params, *args: decoder.apply({"params": params}, *args, method=method))


def _perturbed(params, seed=1):
    """Random norm scales too, so Gemma's zero-initialised norms are exercised."""
    rng = np.random.default_rng(seed)  # numpy: no per-shape compiles of jax.random ops
    return jax.tree.map(
        lambda x: jnp.asarray(x + 0.2 * rng.standard_normal(x.shape), jnp.float32),
        nn.unbox(params),
    )


def _batch(config, seed=2):
    """Two rows of 10 slots: a 4-slot bidirectional prefix, padding inside both regions."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 10, config.d_model)).astype(np.float32)
    valid = np.ones((2, 10), bool)
    valid[1, [2, 6, 9]] = False
    prefix = np.zeros((2, 10), bool)
    prefix[:, :4] = True
    return jnp.asarray(x), jnp.asarray(valid), jnp.asarray(prefix)


@pytest.mark.parametrize(
    "config",
    # The Gemma-like config covers GQA, the window and the prefix; Llama only adds biases.
    [GEMMA_LIKE, pytest.param(LLAMA_LIKE, marks=pytest.mark.slow)],
    ids=["gemma", "llama"],
)
def test_cached_decoding_equals_one_pass(config):
    decoder = Decoder(config)
    params = _perturbed(_init(config))
    x, valid, prefix = _batch(config)
    positions = attention.positions_from_valid(valid)
    mask = attention.prefix_lm_mask(valid, prefix)
    full = jax.jit(decoder.apply)({"params": params}, x, positions, mask)

    @jax.jit
    def step(cache, x, positions, mask):
        out, updated = decoder.apply(
            {"params": params, "cache": cache}, x, positions, mask, decode=True, mutable=["cache"]
        )
        return out, updated["cache"]

    cache = init_cache(decoder, batch_size=2, cache_length=10)
    pieces = []
    # Prefill the prefix as one chunk, then a 2-slot chunk, then one slot at a time.
    for start, stop in [(0, 4), (4, 6)] + [(t, t + 1) for t in range(6, 10)]:
        out, cache = step(cache, x[:, start:stop], positions[:, start:stop], mask[:, :, start:stop])
        pieces.append(out)
    cached = jnp.concatenate(pieces, axis=1)
    # Scanned: every cache leaf has the layer axis in front, one index per layer.
    assert np.asarray(cache["layers"]["attn"]["cache_index"]).tolist() == [10] * config.num_layers
    np.testing.assert_allclose(
        np.asarray(cached)[np.asarray(valid)], np.asarray(full)[np.asarray(valid)], atol=1e-5
    )


def test_padding_slots_are_invisible():
    """Valid slots give the same hidden states with or without padding slots between them."""
    config = GEMMA_LIKE
    decoder = Decoder(config)
    params = _perturbed(_init(config))
    x, valid, prefix = _batch(config)
    keep = np.asarray(valid[1])

    apply = _jit_apply(decoder)

    def run(x, valid, prefix):
        pos = attention.positions_from_valid(valid)
        return apply(params, x, pos, attention.prefix_lm_mask(valid, prefix))

    padded = run(x[1:], valid[1:], prefix[1:])[0][keep]
    packed = run(x[1:, keep], valid[1:, keep], prefix[1:, keep])[0]
    np.testing.assert_allclose(padded, packed, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_remat_policies_give_same_values_and_gradients(scan_layers):
    # Two layers: one local, one global (a scanned stack feeds the flag per layer).
    config = dataclasses.replace(GEMMA_LIKE, scan_layers=scan_layers)
    x, valid, prefix = _batch(config)
    pos = attention.positions_from_valid(valid)
    mask = attention.prefix_lm_mask(valid, prefix)
    params = _perturbed(_init(config))

    def loss_and_grad(remat):
        decoder = Decoder(dataclasses.replace(config, remat=remat))

        def loss(p):
            return jnp.mean(decoder.apply({"params": p}, x, pos, mask) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grad = loss_and_grad("none")
    for remat in ("full", "minimal", "save_dots", "save_attention_proj", "offload"):
        got_loss, got_grad = loss_and_grad(remat)
        np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("config", [GEMMA_LIKE, LLAMA_LIKE], ids=["gemma", "llama"])
def test_num_params_and_logical_axes(config):
    shapes = jax.eval_shape(lambda: _init(config))
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert sum(int(np.prod(leaf.value.shape)) for leaf in leaves) == num_params(config)
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == len(leaf.value.shape)
        assert set(leaf.names) <= AXIS_NAMES


def test_embed_scale_tied_logits_and_softcap():
    config = GEMMA_LIKE
    decoder = Decoder(config)
    params = _perturbed(_init(config))
    table = np.asarray(params["embedder"]["embedding"])
    tokens = jnp.array([[3, 7, 1]])
    emb = decoder.apply({"params": params}, tokens, method=Decoder.embed)
    np.testing.assert_allclose(emb, table[[[3, 7, 1]]] * np.sqrt(config.d_model), rtol=1e-6)

    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, config.d_model)) * 10)
    logits = decoder.apply({"params": params}, hidden, method=Decoder.logits)
    raw = np.asarray(hidden) @ table.T
    np.testing.assert_allclose(logits, np.tanh(raw / 5.0) * 5.0, atol=1e-4)
    assert logits.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params():
    config = dataclasses.replace(LLAMA_LIKE, dtype="bfloat16")
    params = _init(config)
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(params))} == {jnp.dtype("float32")}
    decoder = Decoder(config)
    tokens = jnp.array([[1, 2, 3, 4]])
    hidden = jax.eval_shape(
        _jit_apply(decoder), params, decoder_input(config, tokens), *_full(tokens)
    )
    assert hidden.dtype == jnp.bfloat16
    logits = _jit_apply(decoder, Decoder.forward_tokens)(params, tokens)
    ref = _jit_apply(Decoder(LLAMA_LIKE), Decoder.forward_tokens)(params, tokens)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref, atol=0.1)


def decoder_input(config, tokens):
    return jnp.ones(tokens.shape + (config.d_model,), jnp.float32)


def _full(tokens):
    valid = jnp.ones(tokens.shape, bool)
    return attention.positions_from_valid(valid), attention.causal_mask(valid)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        dataclasses.replace(LLAMA_LIKE, num_kv_heads=3)
    with pytest.raises(ValueError, match="activation"):
        dataclasses.replace(LLAMA_LIKE, activation="relu")
    with pytest.raises(ValueError, match="remat"):
        dataclasses.replace(LLAMA_LIKE, remat="some")
    # Older checkpoints' configs spell "minimal" as "dots".
    assert dataclasses.replace(LLAMA_LIKE, remat="dots").remat == "minimal"
    assert [GEMMA_LIKE.is_local_layer(i) for i in range(4)] == [True, False] * 2
    gemma3 = dataclasses.replace(GEMMA_LIKE, num_layers=12, sliding_window_pattern=6)
    assert [gemma3.is_local_layer(i) for i in range(12)] == ([True] * 5 + [False]) * 2
    assert not any(LLAMA_LIKE.is_local_layer(i) for i in range(2))


def test_query_chunked_attention_gives_the_same_values_and_gradients():
    # T = 10 slots in chunks of 4 (the last one padded), local and global layers, prefix-LM mask.
    config = GEMMA_LIKE
    x, valid, prefix = _batch(config)
    pos = attention.positions_from_valid(valid)
    mask = attention.prefix_lm_mask(valid, prefix)
    params = _perturbed(_init(config))

    def loss_and_grad(chunk):
        decoder = Decoder(dataclasses.replace(config, attention_query_chunk=chunk, remat="full"))

        def loss(p):
            return jnp.mean(decoder.apply({"params": p}, x, pos, mask) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    assert x.shape[1] % 4
    ref_loss, ref_grad = loss_and_grad(0)
    got_loss, got_grad = loss_and_grad(4)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)

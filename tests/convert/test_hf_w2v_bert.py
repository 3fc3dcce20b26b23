"""w2v-BERT 2.0 import and export: our encoder vs transformers' Wav2Vec2BertModel (f32, 1e-4),
bit-exact round trips."""

import copy
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectron_jax.convert import hf_w2v_bert, safetensors_io
from spectron_jax.nn import conformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _tiny_hf_config(**overrides):
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        feature_projection_input_dim=24,
        conv_depthwise_kernel_size=5,
        position_embeddings_type="relative_key",
        left_max_position_embeddings=6,
        right_max_position_embeddings=3,
        hidden_act="swish",
        layerdrop=0.0,
    )
    kwargs.update(overrides)
    return transformers.Wav2Vec2BertConfig(**kwargs)


def _save_random_model(path, hf_config, seed=0, noise=0.1):
    torch.manual_seed(seed)
    model = transformers.Wav2Vec2BertModel(hf_config).eval()
    with torch.no_grad():
        # HF initialises LayerNorms to identity and some biases to zero; randomise everything
        # so that a swapped or transposed tensor cannot go unnoticed.
        for param in model.parameters():
            param.add_(noise * torch.randn_like(param))
    model.save_pretrained(path, safe_serialization=True)
    return model


def _hf_hidden(model, features, mask):
    with torch.no_grad():
        out = model(
            input_features=torch.from_numpy(features),
            attention_mask=torch.from_numpy(mask).long(),
        )
    return out.last_hidden_state.numpy()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    path = tmp_path_factory.mktemp("w2v_bert")
    model = _save_random_model(path, _tiny_hf_config())
    config, params = hf_w2v_bert.load_hf_w2v_bert(path)
    return model, config, params


def test_config_maps_hf_fields(converted):
    _, config, _ = converted
    assert (config.hidden_dim, config.num_layers, config.num_heads, config.mlp_dim) == (
        32,
        2,
        4,
        64,
    )
    assert (config.input_dim, config.conv_kernel_size) == (24, 5)
    assert (config.left_max_positions, config.right_max_positions) == (6, 3)
    assert config.position == "relative_key" and config.causal_conv and config.stem == "projection"


@pytest.mark.parametrize("lengths", [(20, 20), (20, 13)])
def test_matches_transformers(converted, lengths):
    """Full and padded batches (13 < 2 * left_max: distances get clipped both ways)."""
    model, config, params = converted
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 20, 24)).astype(np.float32)
    mask = (np.arange(20)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    expected = _hf_hidden(model, features, mask)
    hidden, out_mask = jax.jit(conformer.ConformerEncoder(config).apply)(
        {"params": params}, jnp.asarray(features), jnp.asarray(mask)
    )
    np.testing.assert_array_equal(out_mask, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], expected[valid], atol=TOL, rtol=0)
    assert np.all(np.asarray(hidden)[~valid] == 0)


def test_no_position_config_matches(tmp_path):
    model = _save_random_model(
        tmp_path, _tiny_hf_config(position_embeddings_type=None, hidden_act="gelu")
    )
    config, params = hf_w2v_bert.load_hf_w2v_bert(tmp_path)
    assert config.position == "none" and config.activation == "gelu"
    features = np.random.default_rng(2).normal(size=(1, 9, 24)).astype(np.float32)
    mask = np.ones((1, 9), np.int32)
    hidden, _ = conformer.ConformerEncoder(config).apply({"params": params}, features, mask)
    np.testing.assert_allclose(hidden, _hf_hidden(model, features, mask), atol=TOL, rtol=0)


def test_task_model_prefix_and_heads_are_handled(converted):
    model, config, params = converted
    tensors = {f"wav2vec2_bert.{k}": v.numpy() for k, v in model.state_dict().items()}
    tensors["lm_head.weight"] = np.zeros((5, 32), np.float32)  # a CTC head: skipped
    again = hf_w2v_bert.params_from_hf(tensors, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_missing_and_unused_tensors_fail_clearly(converted):
    model, config, _ = converted
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    missing = {k: v for k, v in tensors.items() if "layers.1.ffn2.output_dense.bias" not in k}
    with pytest.raises(KeyError, match="layers.1.ffn2.output_dense.bias"):
        hf_w2v_bert.params_from_hf(missing, config)
    fewer_layers = conformer.ConformerConfig(**{**config.__dict__, "num_layers": 1})
    with pytest.raises(ValueError, match="not used"):
        hf_w2v_bert.params_from_hf(tensors, fewer_layers)


def test_unsupported_configs_are_rejected(tmp_path):
    for bad, match in [
        (dict(add_adapter=True), "adapter"),
        (dict(position_embeddings_type="rotary"), "rotary"),
        (dict(position_embeddings_type="relative"), "relative"),
    ]:
        hf = _tiny_hf_config(**bad).to_dict()
        with pytest.raises(ValueError, match=match):
            hf_w2v_bert.config_from_hf(hf)
    (tmp_path / "config.json").write_text(json.dumps(_tiny_hf_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        hf_w2v_bert.load_hf_w2v_bert(tmp_path)


def test_bf16_checkpoint_loads_in_the_requested_param_dtype(tmp_path, converted):
    model, config, params = converted
    # A copy: casting the shared fixture's model back from bf16 would round its weights.
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    _, from_bf16 = hf_w2v_bert.load_hf_w2v_bert(tmp_path)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(from_bf16))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2), from_bf16, params
    )
    config, as_bf16 = hf_w2v_bert.load_hf_w2v_bert(tmp_path, param_dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(as_bf16))


def test_sharded_folder_loads(tmp_path, converted):
    model, _, params = converted
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, sharded = hf_w2v_bert.load_hf_w2v_bert(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, params)


def test_real_w2v_bert_config_size():
    """HF's default config (the 600M facebook/w2v-bert-2.0 shape), built abstractly; and our
    parameter count equals HF's on the tiny config (SpecAugment's masked_spec_embed aside)."""
    config = hf_w2v_bert.config_from_hf(transformers.Wav2Vec2BertConfig().to_dict())
    assert config == conformer.ConformerConfig(
        feat_proj_dropout=0.0,
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        conv_dropout=0.1,
    )
    count = conformer.count_params(config)
    hf_count = sum(
        p.numel()
        for n, p in transformers.Wav2Vec2BertModel(_tiny_hf_config()).named_parameters()
        if n != "masked_spec_embed"
    )
    assert hf_count == conformer.count_params(
        hf_w2v_bert.config_from_hf(_tiny_hf_config().to_dict())
    )
    assert 580e6 <= count <= 600e6, count


@pytest.mark.slow
def test_matches_transformers_at_real_width(tmp_path):
    """w2v-BERT 2.0's real widths (1024, 16 heads, FFN 4096, kernel 31, distances -64..8) on
    2 layers, 150 frames (clipping active), padded batch."""
    hf_config = transformers.Wav2Vec2BertConfig(num_hidden_layers=2, layerdrop=0.0)
    # Noise at HF's initializer_range: at this width 0.1 would blow activations up to ~1e3.
    model = _save_random_model(tmp_path, hf_config, noise=0.02)
    config, params = hf_w2v_bert.load_hf_w2v_bert(tmp_path)
    features = np.random.default_rng(4).normal(size=(2, 150, 160)).astype(np.float32)
    mask = (np.arange(150)[None] < np.array([150, 97])[:, None]).astype(np.int32)
    expected = _hf_hidden(model, features, mask)
    hidden, _ = jax.jit(conformer.ConformerEncoder(config).apply)(
        {"params": params}, features, mask
    )
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], expected[valid], atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------

# Tensors the import drops on purpose and the export therefore never writes.
DROPPED = {
    # SpecAugment's learned mask vector: our SpecAugment masks input features without one.
    "masked_spec_embed",
}


def _assert_same_tensors(before, after, dropped=frozenset()):
    """Names, dtypes, shapes and bits of two tensor dicts, `dropped` names aside."""
    assert dropped <= set(before) and not dropped & set(after)  # The exclusion is real.
    assert sorted(set(before) - dropped) == sorted(after)
    for name, value in after.items():
        assert value.dtype == before[name].dtype, name
        assert value.shape == before[name].shape, name
        assert np.array_equal(value.view(np.uint8), before[name].view(np.uint8)), name


def test_export_round_trip_is_bit_exact(converted, tmp_path):
    """HF -> ours -> HF: every tensor the import reads comes back bit for bit."""
    model, _, _ = converted
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    config, params = hf_w2v_bert.load_hf_w2v_bert(tmp_path / "hf")
    base = safetensors_io.read_config(tmp_path / "hf")
    hf_w2v_bert.save_hf_w2v_bert(tmp_path / "out", params, config, base_config=base)

    _assert_same_tensors(
        safetensors_io.read_tensors(tmp_path / "hf"),
        safetensors_io.read_tensors(tmp_path / "out"),
        dropped=DROPPED,
    )
    assert safetensors_io.read_config(tmp_path / "out") == {
        **base,
        "architectures": ["Wav2Vec2BertModel"],
    }

    # transformers loads the export (masked_spec_embed freshly initialised, unused in eval) and
    # computes what the original model computes.
    reloaded = transformers.Wav2Vec2BertModel.from_pretrained(tmp_path / "out").eval()
    rng = np.random.default_rng(3)
    features = rng.normal(size=(2, 20, 24)).astype(np.float32)
    mask = (np.arange(20)[None, :] < np.array([[20], [11]])).astype(np.int32)
    np.testing.assert_allclose(
        _hf_hidden(reloaded, features, mask), _hf_hidden(model, features, mask), atol=TOL, rtol=0
    )


@pytest.mark.parametrize("position", ["relative_key", "none"])
def test_our_params_export_and_load_back_exactly(tmp_path, position):
    """Ours -> HF -> ours is the identity, and transformers computes what our encoder does."""
    config = hf_w2v_bert.config_from_hf(_tiny_hf_config().to_dict(), position=position)
    features = np.random.default_rng(5).normal(size=(2, 20, 24)).astype(np.float32)
    mask = (np.arange(20)[None, :] < np.array([[20], [14]])).astype(np.int32)
    encoder = conformer.ConformerEncoder(config)
    # Boxed with logical axis names, as a training state holds them.
    params = encoder.init(jax.random.PRNGKey(0), features, mask)["params"]
    # Flax's init zeroes biases and the LayerNorm shifts: randomise so that none hides a swap.
    leaves, tree = jax.tree_util.tree_flatten(params)  # The boxes stay in `tree`.
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree,
        [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)],
    )
    hf_w2v_bert.save_hf_w2v_bert(tmp_path, params, config)

    again_config, again = hf_w2v_bert.load_hf_w2v_bert(tmp_path)
    assert again_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, nn.unbox(params))
    model = transformers.Wav2Vec2BertModel.from_pretrained(tmp_path).eval()
    ours, _ = jax.jit(encoder.apply)({"params": params}, features, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(ours)[valid], _hf_hidden(model, features, mask)[valid], atol=TOL, rtol=0
    )


def test_bf16_export_keeps_bits(tmp_path, converted):
    model, _, _ = converted
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    config, params = hf_w2v_bert.load_hf_w2v_bert(tmp_path / "hf", param_dtype="bfloat16")
    hf_w2v_bert.save_hf_w2v_bert(tmp_path / "out", params, config, max_shard_bytes=20_000)
    assert (tmp_path / "out" / safetensors_io.INDEX_FILE).is_file()
    _assert_same_tensors(
        safetensors_io.read_tensors(tmp_path / "hf"),
        safetensors_io.read_tensors(tmp_path / "out"),
        dropped=DROPPED,
    )
    assert safetensors_io.read_config(tmp_path / "out")["dtype"] == "bfloat16"


def test_export_rejects_what_hf_cannot_express(converted, tmp_path):
    _, config, params = converted
    for bad, match in [
        (dict(stem="subsampling"), "stem='subsampling'"),
        (dict(position="rotary"), "position='rotary'"),
        (dict(causal_conv=False, norm_type="rms_norm"), "causal_conv=False.*norm_type"),
    ]:
        with pytest.raises(ValueError, match=match):
            hf_w2v_bert.save_hf_w2v_bert(tmp_path, params, dataclasses.replace(config, **bad))
    assert not any(tmp_path.iterdir())  # Nothing written.
    with pytest.raises(ValueError, match="do not match the module"):
        hf_w2v_bert.params_to_hf(params, dataclasses.replace(config, mlp_dim=48))

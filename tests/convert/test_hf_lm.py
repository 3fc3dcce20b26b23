"""HF decoder LMs (Gemma 3 text, Llama, Qwen2) against our Decoder: logits and exact round trips.

Every model is a tiny random config built with transformers and saved with save_pretrained.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from spectron_jax.convert import hf_lm, safetensors_io  # noqa: E402
from spectron_jax.nn import attention  # noqa: E402
from spectron_jax.nn.decoder import Decoder  # noqa: E402

VOCAB, SEQ, BATCH = 64, 12, 2
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    attn_implementation="eager",
)


def gemma3_model():
    config = transformers.Gemma3TextConfig(
        **COMMON,
        num_hidden_layers=7,  # layers 0-4 and 6 local, 5 global
        sliding_window=4,
        query_pre_attn_scalar=16,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        final_logit_softcapping=3.0,
        attn_logit_softcapping=5.0,
    )
    return transformers.Gemma3ForCausalLM(config)


def llama_model():
    config = transformers.LlamaConfig(
        **COMMON, num_hidden_layers=2, attention_bias=True, mlp_bias=True, rope_theta=500.0
    )
    return transformers.LlamaForCausalLM(config)


def qwen2_model():
    config = transformers.Qwen2Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(config)


FAMILIES = {"gemma3_text": gemma3_model, "llama": llama_model, "qwen2": qwen2_model}


def _randomized(build, seed=0):
    """An HF model with every tensor random (HF zero-inits Gemma norms and all biases)."""
    torch.manual_seed(seed)
    model = build().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def _hf_logits(model, tokens, valid=None):
    kwargs = {}
    if valid is not None:
        kwargs = dict(
            attention_mask=torch.tensor(valid, dtype=torch.long),
            position_ids=torch.tensor(np.asarray(attention.positions_from_valid(valid))),
        )
    with torch.no_grad():
        return model(torch.tensor(tokens), **kwargs).logits.float().numpy()


def _our_logits(config, params, tokens, valid=None):
    # One jitted program compiles faster than op-by-op dispatch of the whole model.
    fn = jax.jit(
        lambda p, t, v: Decoder(config).apply({"params": p}, t, v, method=Decoder.forward_tokens)
    )
    if valid is None:
        valid = np.ones(tokens.shape, bool)
    return np.asarray(
        fn(jax.tree.map(jnp.asarray, params), jnp.asarray(tokens), jnp.asarray(valid))
    )


def _tokens(seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (BATCH, SEQ))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
    model = _randomized(FAMILIES[family])
    # Qwen2 goes through a sharded save to exercise model.safetensors.index.json.
    shard = "8KB" if family == "qwen2" else "5GB"
    model.save_pretrained(tmp_path, max_shard_size=shard)
    assert (tmp_path / safetensors_io.INDEX_FILE).is_file() == (family == "qwen2")

    config, params = hf_lm.load_hf_lm(tmp_path)
    if family == "gemma3_text":
        assert [config.is_local_layer(i) for i in range(7)] == [True] * 5 + [False, True]
        assert (config.rope_theta, config.rope_local_theta) == (10_000.0, 100.0)
    tokens = _tokens()
    np.testing.assert_allclose(
        _our_logits(config, params, tokens), _hf_logits(model, tokens), atol=1e-4, rtol=1e-4
    )


def test_gemma3_logits_with_left_padding(tmp_path):
    """Padding slots shift neither RoPE nor the sliding window (positions = cumsum(valid) - 1)."""
    model = _randomized(gemma3_model)
    model.save_pretrained(tmp_path)
    config, params = hf_lm.load_hf_lm(tmp_path)
    tokens = _tokens()
    valid = np.ones((BATCH, SEQ), bool)
    valid[1, :3] = False
    ours = _our_logits(config, params, tokens, valid)
    theirs = _hf_logits(model, tokens, valid)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_exact(family, tmp_path):
    model = _randomized(FAMILIES[family])
    model.save_pretrained(tmp_path / "hf", max_shard_size="8KB")
    config, params = hf_lm.load_hf_lm(tmp_path / "hf")
    hf_lm.save_hf_lm(tmp_path / "out", config, params, family, max_shard_bytes=8_000)

    before = safetensors_io.read_tensors(tmp_path / "hf")
    after = safetensors_io.read_tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        assert after[name].dtype == value.dtype, name
        assert np.array_equal(after[name], value), name

    # transformers reads our export and computes the same logits as the original.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    assert hf_lm.config_from_hf(reloaded.config.to_dict()) == config
    tokens = _tokens()
    np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(model, tokens))


def test_bfloat16_round_trip_keeps_bits(tmp_path):
    model = _randomized(gemma3_model).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    config, params = hf_lm.load_hf_lm(tmp_path / "hf")
    assert params["embedder"]["embedding"].dtype == ml_dtypes.bfloat16
    hf_lm.save_hf_lm(tmp_path / "out", config, params, "gemma3_text")
    before = safetensors_io.read_tensors(tmp_path / "hf")
    after = safetensors_io.read_tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        assert after[name].dtype == value.dtype
        assert np.array_equal(after[name].view(np.uint16), value.view(np.uint16)), name


def test_gemma3_bf16_compute_close_to_transformers(tmp_path):
    """bf16 weights and compute: the embedding normaliser is rounded to bf16 as HF does."""
    model = _randomized(gemma3_model).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    config, params = hf_lm.load_hf_lm(tmp_path, dtype="bfloat16")
    assert config.dtype == "bfloat16"
    tokens = _tokens()
    ours = _our_logits(config, params, tokens)
    theirs = _hf_logits(model, tokens)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() < 0.1 * scale


def test_config_errors(tmp_path):
    with pytest.raises(NotImplementedError, match="model_type"):
        hf_lm.config_from_hf({"model_type": "bert"})
    llama = json.loads(llama_model().config.to_json_string())
    llama["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}
    with pytest.raises(NotImplementedError, match="RoPE scaling"):
        hf_lm.config_from_hf(llama)
    config = hf_lm.config_from_hf(json.loads(gemma3_model().config.to_json_string()))
    with pytest.raises(ValueError, match="cannot be exported as llama"):
        hf_lm.config_to_hf(config, "llama")


def test_missing_and_unused_tensors_are_reported(tmp_path):
    model = _randomized(llama_model)
    model.save_pretrained(tmp_path)
    config, _ = hf_lm.load_hf_lm(tmp_path)
    tensors = safetensors_io.read_tensors(tmp_path)
    with pytest.raises(KeyError, match="lacks 1 tensors"):
        hf_lm.params_from_hf({k: v for k, v in tensors.items() if k != "model.norm.weight"}, config)
    with pytest.raises(ValueError, match="unused by the config"):
        hf_lm.params_from_hf(dict(tensors, extra=np.zeros(3, np.float32)), config)


def test_wrong_shapes_are_reported(tmp_path):
    model = _randomized(llama_model)
    model.save_pretrained(tmp_path)
    tensors = safetensors_io.read_tensors(tmp_path)
    config, _ = hf_lm.load_hf_lm(tmp_path)
    wider = dataclasses.replace(config, mlp_dim=config.mlp_dim + 8)
    with pytest.raises(ValueError, match="mlp.gate_proj.weight has shape"):
        hf_lm.params_from_hf(tensors, wider)


def test_multimodal_gemma3_checkpoint_loads_the_text_model(tmp_path):
    """Gemma 3 4B+ folders: model_type gemma3, text_config, LM under model.language_model."""
    model = _randomized(gemma3_model)
    model.save_pretrained(tmp_path / "text")
    text_config, params = hf_lm.load_hf_lm(tmp_path / "text")
    tensors = {
        k.replace("model.", "model.language_model.", 1): v
        for k, v in safetensors_io.read_tensors(tmp_path / "text").items()
    }
    tensors["model.vision_tower.patch.weight"] = np.ones((2, 2), np.float32)
    hf = {"model_type": "gemma3", "text_config": safetensors_io.read_config(tmp_path / "text")}
    safetensors_io.write_folder(tmp_path / "mm", hf, tensors)
    config, mm_params = hf_lm.load_hf_lm(tmp_path / "mm")
    assert config == text_config
    for a, b in zip(jax.tree.leaves(mm_params), jax.tree.leaves(params), strict=True):
        assert np.array_equal(a, b)

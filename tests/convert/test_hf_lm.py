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
    ids = hf_lm.special_ids_from_hf(tmp_path / "hf")
    hf_lm.save_hf_lm(tmp_path / "out", config, params, family, max_shard_bytes=8_000, **ids)

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
    # The contract survives too: positions and the ids of both config and generation config.
    for key in ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(reloaded.config, key) == getattr(model.config, key), key
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(reloaded.generation_config, key) == getattr(model.generation_config, key)
    tokens = _tokens()
    np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(model, tokens))


def test_bfloat16_round_trip_keeps_bits(tmp_path):
    model = _randomized(gemma3_model).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    config, params = hf_lm.load_hf_lm(tmp_path / "hf")
    assert params["embedder"]["embedding"].dtype == ml_dtypes.bfloat16
    hf_lm.save_hf_lm(tmp_path / "out", config, params, "gemma3_text", bos_id=2, eos_id=1, pad_id=0)
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
        hf_lm.config_to_hf(config, "llama", bos_id=2, eos_id=1, pad_id=0)


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


# ---------------------------------------------------------------------------------------------
# The exported contract: positions, special ids, generation config.
# ---------------------------------------------------------------------------------------------

# Prompt and chain tokens below avoid every special id of both cases.
SPECIAL_IDS = [dict(bos_id=2, eos_id=1, pad_id=0), dict(bos_id=5, eos_id=[7, 11], pad_id=3)]
PROMPTS = np.array([[4, 6, 8], [4, 6, 9]])
FILLER = 12  # The greedy successor of every token the chain below does not name.


def _successor_lm(tmp_path, positions=96):
    """A tiny Llama (vocab 16 <= width 32) loaded into our tree, trained for `positions`."""
    config = transformers.LlamaConfig(
        **dict(COMMON, vocab_size=16), num_hidden_layers=2, max_position_embeddings=positions
    )
    _randomized(lambda: transformers.LlamaForCausalLM(config)).save_pretrained(tmp_path)
    return hf_lm.load_hf_lm(tmp_path)


def _with_successors(config, params, successor):
    """Params whose greedy next token is `successor[last token]`, whatever came before.

    Attention and MLP outputs are zeroed, so the final hidden state is the RMS-normalised
    one-hot embedding of the last token, float32[B, T, D] = sqrt(D) * e_token; the head maps
    e_v to one logit sqrt(D) on successor[v] and 0 elsewhere.
    """
    v, d = config.vocab_size, config.d_model
    params = jax.tree.map(np.array, params)
    params["embedder"]["embedding"] = np.eye(v, d, dtype=np.float32)
    params["final_norm"]["scale"] = np.ones(d, np.float32)
    head = np.zeros((d, v), np.float32)
    head[np.arange(v), successor] = 1.0
    params["lm_head"]["kernel"] = head
    scanned = [params["layers"]] if config.scan_layers else []  # one [L, ...] stack
    for layer in scanned or [params[f"layers_{i}"] for i in range(config.num_layers)]:
        layer["attn"]["o_proj"]["kernel"][:] = 0.0
        layer["mlp"]["down"]["kernel"][:] = 0.0
    return params


@pytest.mark.parametrize("ids", SPECIAL_IDS, ids=["gemma_like", "eos_list"])
def test_export_states_positions_and_special_ids(ids, tmp_path):
    config, params = _successor_lm(tmp_path / "hf")
    assert config.max_position_embeddings == 96
    hf_lm.save_hf_lm(tmp_path / "out", config, params, "llama", **ids)
    generation = json.loads((tmp_path / "out" / hf_lm.GENERATION_CONFIG_FILE).read_text())
    assert generation == {
        "bos_token_id": ids["bos_id"],
        "eos_token_id": ids["eos_id"],
        "pad_token_id": ids["pad_id"],
    }

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    # 96, 2/1/0 and 5/[7, 11]/3 are none of LlamaConfig's defaults (2048; 1, 2, None).
    assert model.config.max_position_embeddings == 96
    for source in (model.config, model.generation_config):
        assert source.bos_token_id == ids["bos_id"]
        assert source.eos_token_id == ids["eos_id"]
        assert source.pad_token_id == ids["pad_id"]
    assert hf_lm.special_ids_from_hf(tmp_path / "out") == ids
    assert hf_lm.config_from_hf(model.config.to_dict()) == config


@pytest.mark.parametrize("ids", SPECIAL_IDS, ids=["gemma_like", "eos_list"])
def test_generate_stops_at_our_eos_and_pads_with_our_pad(ids, tmp_path):
    """`generate` without eos / pad arguments: row 0 ends after one token, row 1 after two."""
    config, params = _successor_lm(tmp_path / "hf")
    eos = ids["eos_id"] if isinstance(ids["eos_id"], list) else [ids["eos_id"]] * 2
    successor = np.full(config.vocab_size, FILLER)
    successor[8] = eos[0]  # Row 0: prompt ... 8 -> EOS.
    successor[9], successor[10] = 10, eos[-1]  # Row 1: prompt ... 9 -> 10 -> EOS.
    params = _with_successors(config, params, successor)
    hf_lm.save_hf_lm(tmp_path / "out", config, params, "llama", **ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()

    prompts = torch.tensor(PROMPTS)
    with torch.no_grad():
        out = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6, do_sample=False
        ).numpy()
    # Without our EOS, both rows would run to 6 new tokens (EOS -> FILLER -> FILLER ...).
    new = out[:, PROMPTS.shape[1] :]
    np.testing.assert_array_equal(new, [[eos[0], ids["pad_id"]], [10, eos[-1]]])


def test_export_refuses_an_unstated_contract(tmp_path):
    config, params = _successor_lm(tmp_path / "hf")
    ids = dict(bos_id=2, eos_id=1, pad_id=0)
    unknown = dataclasses.replace(config, max_position_embeddings=None)
    with pytest.raises(ValueError, match="max_position_embeddings is None"):
        hf_lm.save_hf_lm(tmp_path / "a", unknown, params, "llama", **ids)
    with pytest.raises(ValueError, match=r"eos_id=16 is not in the vocabulary \[0, 16\)"):
        hf_lm.save_hf_lm(tmp_path / "b", config, params, "llama", **dict(ids, eos_id=16))
    with pytest.raises(ValueError, match="pad_id must be one id"):
        hf_lm.save_hf_lm(tmp_path / "c", config, params, "llama", **dict(ids, pad_id=[0, 1]))
    with pytest.raises(TypeError, match="pad_id"):
        hf_lm.save_hf_lm(tmp_path / "d", config, params, "llama", bos_id=2, eos_id=1)
    assert not any((tmp_path / name).exists() for name in "abcd")  # Nothing half-written.
    # No ids at all is a statement too: null, not transformers' class defaults.
    hf_lm.save_hf_lm(tmp_path / "e", config, params, "llama", bos_id=None, eos_id=None, pad_id=None)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "e")
    assert (model.config.bos_token_id, model.config.eos_token_id) == (None, None)
    assert model.generation_config.eos_token_id is None


def test_special_ids_prefer_the_generation_config(tmp_path):
    """Gemma 3 lists EOS [1, 106] in generation_config.json but 1 in config.json."""
    config = {"model_type": "gemma3_text", "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    safetensors_io.write_folder(tmp_path / "text", config, {})
    (tmp_path / "text" / hf_lm.GENERATION_CONFIG_FILE).write_text(
        json.dumps({"eos_token_id": [1, 106]})
    )
    assert hf_lm.special_ids_from_hf(tmp_path / "text") == dict(bos_id=2, eos_id=[1, 106], pad_id=0)
    # Multimodal Gemma 3 without a generation config: the ids of text_config.
    safetensors_io.write_folder(
        tmp_path / "mm", {"model_type": "gemma3", "text_config": config}, {}
    )
    assert hf_lm.special_ids_from_hf(tmp_path / "mm") == dict(bos_id=2, eos_id=1, pad_id=0)

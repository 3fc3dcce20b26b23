"""HF folders -> Orbax init directories: the public stand-ins take the place of recipe stages 1-2.

A tiny random w2v-BERT (encoder) and a tiny random Llama (decoder), saved by transformers and
converted by `python -m spectron_jax.convert.to_orbax`, initialise a Spectron whose encoder and
decoder are then exactly the converted trees (the rest stays the fresh init).
"""

from __future__ import annotations

import json

import flax.struct
import jax
import numpy as np
import pytest
import spectron_testing as st

from spectron_jax import checkpoints
from spectron_jax.audio.spectrogram import SpectrogramConfig
from spectron_jax.config import SpectronConfig
from spectron_jax.convert import hf_lm, hf_w2v_bert, to_orbax

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _save_random(model, path, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(path, safe_serialization=True)


@flax.struct.dataclass
class _State:
    params: dict


def test_converted_encoder_and_decoder_initialise_spectron(tmp_path, capsys):
    w2v = transformers.Wav2Vec2BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        feature_projection_input_dim=160,  # The w2v-BERT fbank front end (80 x 2).
        conv_depthwise_kernel_size=3,
        layerdrop=0.0,
    )
    _save_random(transformers.Wav2Vec2BertModel(w2v), tmp_path / "hf_w2v", 0)
    llama = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_hidden_layers=2,
    )
    _save_random(transformers.LlamaForCausalLM(llama), tmp_path / "hf_lm", 1)

    assert (
        to_orbax.main(["--hf-w2v-bert", str(tmp_path / "hf_w2v"), "--out", str(tmp_path / "enc")])
        == 0
    )
    assert to_orbax.main(["--hf-lm", str(tmp_path / "hf_lm"), "--out", str(tmp_path / "dec")]) == 0
    printed = capsys.readouterr().out
    assert "{'encoder': 'encoder'}" in printed and "{'decoder': 'decoder'}" in printed
    described = json.loads((tmp_path / "dec" / "converted_config.json").read_text())
    assert described["subtree"] == "decoder" and described["config"]["num_layers"] == 2

    enc_config, enc_params = hf_w2v_bert.load_hf_w2v_bert(tmp_path / "hf_w2v")
    dec_config, dec_params = hf_lm.load_hf_lm(tmp_path / "hf_lm")
    config = SpectronConfig(
        decoder=dec_config,
        encoder=enc_config,
        spectrogram=SpectrogramConfig(n_mels=8),
        encoder_front_end="w2v_bert_fbank",
        reduction_factor=2,
        prenet_hidden_dim=16,
        postnet_hidden_dim=16,
    )
    batch = st.random_batch(config, batch_size=2)
    fresh = jax.device_put(st.init_params(config, batch))
    sources = checkpoints.init_sources(
        init_checkpoints={
            str(tmp_path / "enc"): {"encoder": "encoder"},
            str(tmp_path / "dec"): {"decoder": "decoder"},
        }
    )
    state, _, how = checkpoints.resume_or_init(
        checkpoints.Checkpointer(tmp_path / "run"), None, lambda: _State(fresh), sources
    )
    assert "enc" in how and "dec" in how
    got = jax.device_get(state.params)
    for name, want in (("encoder", enc_params), ("decoder", dec_params)):
        for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        got["post_net"]["out"]["kernel"], jax.device_get(fresh)["post_net"]["out"]["kernel"]
    )

    # Nothing is overwritten.
    code = to_orbax.main(["--hf-lm", str(tmp_path / "hf_lm"), "--out", str(tmp_path / "dec")])
    assert code == 2 and "not empty" in capsys.readouterr().err

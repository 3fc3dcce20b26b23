"""The acoustic prompt (`primer_frames`): the speech stream starts from the prompt's last frames.

The primer is what lets the generated voice follow the prompt's: without it, teacher forcing
hands every frame slot the true previous frame except the first, which reads zeros, so at
inference the voice has to come through the prefix alone (docs/results/).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import spectron_testing as st

from spectron_jax import decoding, network
from spectron_jax.decoding import DecodeConfig

MAX_TEXT, MAX_FRAMES, PRIMER = 6, 8, 8


def test_prompt_tail_takes_the_last_valid_frames_right_aligned():
    features = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1) + 1
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], np.int32)
    tail, valid = jax.device_get(network.prompt_tail(features, mask, 3))
    np.testing.assert_array_equal(tail[..., 0], [[3, 4, 5], [0, 7, 8]])
    np.testing.assert_array_equal(valid, [[1, 1, 1], [0, 1, 1]])


def test_primer_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="primer_frames=3 must be >= 0 and a multiple of"):
        st.tiny_config(primer_frames=3)
    with pytest.raises(ValueError, match="primer_frames=4 needs encoder_front_end='log_mel'"):
        from spectron_jax.config import ConformerConfig

        st.tiny_config(
            primer_frames=4,
            encoder_front_end="w2v_bert_fbank",
            encoder=ConformerConfig(
                input_dim=160, hidden_dim=16, num_layers=1, num_heads=2, mlp_dim=32
            ),
        )


@pytest.fixture(scope="module")
def primed():
    config = st.tiny_config(stop_head=True, prenet_dropout_at_inference=False, primer_frames=PRIMER)
    batch = st.random_batch(config, batch_size=3)  # Prompts of 16, 11 and 6 (< K) frames.
    params = st.init_params(config, batch)
    model = st.tiny_model(config)
    options = DecodeConfig(max_text_tokens=MAX_TEXT, max_frames=MAX_FRAMES, eos_id=-1)
    out = jax.device_get(decoding.generate(model, params, batch, options))
    return model, params, batch, out


def _teacher(out, batch, bos):
    b = out["text_tokens"].shape[0]
    inputs = np.zeros((b, MAX_TEXT + 1), np.int32)
    inputs[:, 0] = bos
    inputs[:, 1:] = out["text_tokens"]  # EOS -1 never comes: every row writes MAX_TEXT tokens.
    return {
        "encoder_features": batch["encoder_features"],
        "encoder_mask": batch["encoder_mask"],
        "decoder_input_tokens": inputs,
        "text_part": np.ones_like(inputs),
        "target_frames": np.asarray(out["frames"]),
        "frame_mask": np.ones(out["frames"].shape[:2], np.int32),
    }


def test_cached_decoding_with_a_primer_equals_the_teacher_forced_pass(primed):
    model, params, batch, out = primed
    assert (out["text_lengths"] == MAX_TEXT).all()
    teacher = _teacher(out, batch, model.bos_id)
    _, frames, aux = st.apply(model.config, params, teacher)
    np.testing.assert_allclose(out["frames"], np.asarray(frames), atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        out["stop_probs"], jax.nn.sigmoid(aux["stop_logits"]), atol=1e-4, rtol=0
    )
    uncached = decoding.generate_frames_uncached(model, params, teacher, MAX_FRAMES)
    np.testing.assert_allclose(np.asarray(uncached), out["frames"], atol=1e-4, rtol=0)


def test_the_primer_is_the_voice_the_stream_starts_from(primed):
    """The same parameters without the primer slots: the text is the same (it comes before the
    primer), the speech is not; a row whose prompt is shorter than K decodes as it does alone."""
    model, params, batch, out = primed
    options = DecodeConfig(max_text_tokens=MAX_TEXT, max_frames=MAX_FRAMES, eos_id=-1)
    plain = st.tiny_model(st.tiny_config(stop_head=True, prenet_dropout_at_inference=False))
    no_primer = jax.device_get(decoding.generate(plain, params, batch, options))
    np.testing.assert_array_equal(no_primer["text_tokens"], out["text_tokens"])
    assert np.abs(no_primer["frames"] - out["frames"]).max() > 1e-3
    alone = {k: v[2:3] for k, v in batch.items()}
    row = jax.device_get(decoding.generate(model, params, alone, options))
    np.testing.assert_allclose(row["frames"][0], out["frames"][2], atol=1e-4, rtol=0)

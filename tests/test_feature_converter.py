"""SpectronFeatureConverter: exact layout and masks of CONTRACTS.md §2 on hand-made examples."""

import numpy as np
import pytest
import tensorflow as tf

from spectron_jax.feature_converter import SpectronFeatureConverter

BOS, EOS = 3, 1
LENGTHS = {
    "prompt_features": 6,
    "prompt_transcript": 3,
    "continuation_transcript": 4,
    "continuation_frames": 7,
}


def _example(n_prompt_frames, prompt_ids, cont_ids, n_cont_frames, feat_dim=4, n_mels=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "prompt_features": rng.normal(size=(n_prompt_frames, feat_dim)).astype(np.float32),
        "prompt_length": np.int32(n_prompt_frames),
        "prompt_transcript": np.array(prompt_ids, np.int32),
        "continuation_transcript": np.array(cont_ids, np.int32),
        "continuation_frames": rng.normal(size=(n_cont_frames, n_mels)).astype(np.float32),
        "continuation_length": np.int32(n_cont_frames),
        "prompt_text": "p",
        "continuation_text": "c",
        "id": "x",
    }


def _dataset(examples):
    feat_dim = examples[0]["prompt_features"].shape[1]
    n_mels = examples[0]["continuation_frames"].shape[1]
    signature = {
        "prompt_features": tf.TensorSpec([None, feat_dim], tf.float32),
        "prompt_length": tf.TensorSpec([], tf.int32),
        "prompt_transcript": tf.TensorSpec([None], tf.int32),
        "continuation_transcript": tf.TensorSpec([None], tf.int32),
        "continuation_frames": tf.TensorSpec([None, n_mels], tf.float32),
        "continuation_length": tf.TensorSpec([], tf.int32),
        "prompt_text": tf.TensorSpec([], tf.string),
        "continuation_text": tf.TensorSpec([], tf.string),
        "id": tf.TensorSpec([], tf.string),
    }
    return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)


def _convert(examples, lengths=LENGTHS, **kwargs):
    converter = SpectronFeatureConverter(bos_id=BOS, eos_id=EOS, **kwargs)
    return list(converter(_dataset(examples), lengths).as_numpy_iterator())


def _reference(ex, lengths, reduction_factor):
    """The §2 layout written out with numpy, independently of the converter's TF code."""
    p, c = list(ex["prompt_transcript"]), list(ex["continuation_transcript"])
    text_len = lengths["prompt_transcript"] + lengths["continuation_transcript"] + 1
    t_f = int(np.ceil(lengths["continuation_frames"] / reduction_factor) * reduction_factor)

    def pad(seq, n):
        seq = np.asarray(seq)
        out = np.zeros((n,) + seq.shape[1:], seq.dtype)
        out[: len(seq)] = seq
        return out

    n_text = len(p) + len(c) + 1
    return {
        "encoder_features": pad(ex["prompt_features"], lengths["prompt_features"]),
        "encoder_mask": pad(
            np.ones(len(ex["prompt_features"]), np.int32), lengths["prompt_features"]
        ),
        "decoder_input_tokens": pad(np.array([BOS] + p + c, np.int32), text_len),
        "decoder_target_tokens": pad(np.array(p + c + [EOS], np.int32), text_len),
        "decoder_loss_weights": pad(np.ones(n_text, np.float32), text_len),
        "text_part": pad(np.array([1] * len(p) + [2] * (len(c) + 1), np.int32), text_len),
        "target_frames": pad(ex["continuation_frames"], t_f),
        "frame_mask": pad(np.ones(len(ex["continuation_frames"]), np.int32), t_f),
    }


@pytest.mark.parametrize("reduction_factor", [1, 2, 4])
def test_layout_matches_reference(reduction_factor):
    examples = [
        _example(5, [10, 11], [12, 13, 14], 7, seed=0),
        _example(6, [20, 21, 22], [23], 2, seed=1),  # Full prompt and text.
    ]
    outputs = _convert(examples, reduction_factor=reduction_factor)
    assert len(outputs) == 2
    for ex, out in zip(examples, outputs, strict=True):
        ref = _reference(ex, LENGTHS, reduction_factor)
        assert set(out) == set(ref)
        for k in ref:
            assert out[k].dtype == ref[k].dtype, k
            np.testing.assert_array_equal(out[k], ref[k], err_msg=k)
    assert outputs[0]["target_frames"].shape[0] % reduction_factor == 0


def test_first_target_is_first_prompt_token_and_input_is_shifted_target():
    (out,) = _convert([_example(5, [10, 11], [12, 13, 14], 7)])
    n = int(out["decoder_loss_weights"].sum())
    np.testing.assert_array_equal(
        out["decoder_input_tokens"][1:n], out["decoder_target_tokens"][: n - 1]
    )
    assert out["decoder_input_tokens"][0] == BOS
    assert out["decoder_target_tokens"][n - 1] == EOS


def test_spoken_qa_example_without_frames():
    (out,) = _convert([_example(4, [10, 11, 12], [13], 0)], reduction_factor=2)
    assert out["frame_mask"].sum() == 0
    assert out["target_frames"].shape == (8, 3)
    np.testing.assert_array_equal(out["target_frames"], 0.0)
    np.testing.assert_array_equal(out["text_part"], [1, 1, 1, 2, 2, 0, 0, 0])


def test_explicit_lengths_shorten_masks():
    ex = _example(5, [10], [11], 6)
    ex["prompt_length"] = np.int32(3)
    ex["continuation_length"] = np.int32(4)
    (out,) = _convert([ex])
    np.testing.assert_array_equal(out["encoder_mask"], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["frame_mask"], [1, 1, 1, 1, 0, 0, 0])


def test_too_long_example_is_rejected_or_trimmed():
    ex = _example(9, [10, 11], [12], 3)  # 9 prompt frames > 6.
    with pytest.raises(tf.errors.InvalidArgumentError, match="prompt_features"):
        _convert([ex])
    (out,) = _convert([ex], apply_length_check=False)
    np.testing.assert_array_equal(out["encoder_features"], ex["prompt_features"][:6])
    assert out["encoder_mask"].sum() == 6


def test_batching_gives_static_batch_shapes():
    examples = [_example(5, [10, 11], [12], 7, seed=s) for s in range(3)]
    converter = SpectronFeatureConverter(bos_id=BOS, eos_id=EOS, reduction_factor=2)
    batch = next(converter(_dataset(examples), LENGTHS).batch(2).as_numpy_iterator())
    assert batch["encoder_features"].shape == (2, 6, 4)
    assert batch["decoder_input_tokens"].shape == (2, 8)
    assert batch["target_frames"].shape == (2, 8, 3)
    assert batch["frame_mask"].shape == (2, 8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="pack"):
        SpectronFeatureConverter(bos_id=BOS, eos_id=EOS, pack=True)
    with pytest.raises(ValueError, match="reduction_factor"):
        SpectronFeatureConverter(bos_id=BOS, eos_id=EOS, reduction_factor=0)
    with pytest.raises(ValueError, match="task_feature_lengths"):
        SpectronFeatureConverter(bos_id=BOS, eos_id=EOS)(
            _dataset([_example(5, [1], [2], 3)]), {"prompt_features": 5}
        )

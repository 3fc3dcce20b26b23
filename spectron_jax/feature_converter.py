"""seqio FeatureConverter: Spectron task examples -> the model batch of CONTRACTS.md §2.

Decoder sequence (fixed slots, static shapes): `[P prefix][L text][N frame slots]`. This converter
builds the text and frame parts; the prefix is the encoder's output over `encoder_features`.

    decoder_input_tokens   [BOS] p_1 .. p_a c_1 .. c_b  pad ..
    decoder_target_tokens  p_1 .. p_a c_1 .. c_b [EOS]  pad ..
    text_part              1   .. 1   2   .. 2   2      0 ..
    decoder_loss_weights   1   .. 1   1   .. 1   1      0 ..

with L = len(prompt_transcript) + len(continuation_transcript) + 1 from the task feature lengths.
`target_frames` is the continuation log-mel padded to T_f, the task length rounded up to a
multiple of `reduction_factor` (the model predicts `reduction_factor` frames per slot).
No packing: one example per row; batch with `ds.batch(B)` (or seqio's `get_dataset`).
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from spectron_jax.nn.layers import ceil_div

FeatureSpec = seqio.FeatureConverter.FeatureSpec


def pad_or_trim(x: tf.Tensor, length: int) -> tf.Tensor:
    """Pads (zeros) or trims axis 0 of x to `length`, keeping the static shape known."""
    x = x[:length]
    paddings = [[0, length - tf.shape(x)[0]]] + [[0, 0]] * (len(x.shape) - 1)
    x = tf.pad(x, paddings)
    return tf.ensure_shape(x, [length] + list(x.shape[1:]))


def _valid_mask(num_valid: tf.Tensor, length: int) -> tf.Tensor:
    return tf.cast(tf.range(length) < tf.minimum(num_valid, length), tf.int32)


class SpectronFeatureConverter(seqio.FeatureConverter):
    """Task features (CONTRACTS.md §1) -> model features (§2), padded, never packed.

    `task_feature_lengths` keys: `prompt_features` (T_p), `prompt_transcript` (L_p),
    `continuation_transcript` (L_c), `continuation_frames` (T_c). Longer examples are trimmed
    where `apply_length_check=False` and rejected (seqio's length check) otherwise.
    """

    TASK_FEATURES = {
        "prompt_features": FeatureSpec(dtype=tf.float32, rank=2),
        "prompt_transcript": FeatureSpec(dtype=tf.int32),
        "continuation_transcript": FeatureSpec(dtype=tf.int32),
        "continuation_frames": FeatureSpec(dtype=tf.float32, rank=2),
    }
    MODEL_FEATURES = {
        "encoder_features": FeatureSpec(dtype=tf.float32, rank=2),
        "encoder_mask": FeatureSpec(dtype=tf.int32),
        "decoder_input_tokens": FeatureSpec(dtype=tf.int32),
        "decoder_target_tokens": FeatureSpec(dtype=tf.int32),
        "decoder_loss_weights": FeatureSpec(dtype=tf.float32),
        "text_part": FeatureSpec(dtype=tf.int32),
        "target_frames": FeatureSpec(dtype=tf.float32, rank=2),
        "frame_mask": FeatureSpec(dtype=tf.int32),
    }
    PACKING_FEATURE_DTYPES = {}

    def __init__(
        self,
        *,
        bos_id: int,
        eos_id: int,
        reduction_factor: int = 1,
        pack: bool = False,
        apply_length_check: bool = True,
        **kwargs,
    ):
        """Args:

        bos_id: id of the decoder's first input token (the model's: `SpectronModel.bos_id`).
        eos_id: id appended after the continuation transcript (`SpectronModel.eos_id`).
        reduction_factor: frames per frame slot; T_f is padded up to a multiple of it, so a task
          length that is not one is handled (the padding frames are masked out).

        Build it from the model (`SpectronModel.feature_converter()`), which owns these values.
        pack: must be False (examples are laid out in fixed slots).
        apply_length_check: seqio's check that task features fit their lengths.
        """
        if pack:
            raise ValueError("SpectronFeatureConverter does not pack (fixed-slot layout)")
        if reduction_factor < 1:
            raise ValueError(f"reduction_factor must be >= 1, got {reduction_factor}")
        self._eos_id = eos_id
        self._reduction_factor = reduction_factor
        super().__init__(pack=False, apply_length_check=apply_length_check, bos_id=bos_id, **kwargs)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def reduction_factor(self) -> int:
        return self._reduction_factor

    def _convert_example(self, ex: Mapping[str, tf.Tensor], lengths: Mapping[str, int]):
        t_p = lengths["encoder_features"]
        text_len = lengths["decoder_target_tokens"]
        t_f = lengths["target_frames"]

        prompt = ex["prompt_transcript"]
        cont = ex["continuation_transcript"]
        n_p, n_c = tf.size(prompt), tf.size(cont)
        targets = tf.concat([prompt, cont, [self._eos_id]], axis=0)
        inputs = tf.concat([[self.bos_id], prompt, cont], axis=0)
        n_text = tf.minimum(n_p + n_c + 1, text_len)
        positions = tf.range(text_len)
        text_part = tf.where(positions < n_p, 1, 2) * tf.cast(positions < n_text, tf.int32)

        # Task examples are unpadded, so the feature's own length is its valid length; an
        # explicit `*_length` (CONTRACTS §1) can only shorten it.
        n_enc = tf.shape(ex["prompt_features"])[0]
        n_enc = tf.minimum(n_enc, tf.cast(ex.get("prompt_length", n_enc), tf.int32))
        n_frames = tf.shape(ex["continuation_frames"])[0]
        n_frames = tf.minimum(n_frames, tf.cast(ex.get("continuation_length", n_frames), tf.int32))
        return {
            "encoder_features": pad_or_trim(ex["prompt_features"], t_p),
            "encoder_mask": _valid_mask(n_enc, t_p),
            "decoder_input_tokens": pad_or_trim(inputs, text_len),
            "decoder_target_tokens": pad_or_trim(targets, text_len),
            "decoder_loss_weights": tf.cast(positions < n_text, tf.float32),
            "text_part": text_part,
            "target_frames": pad_or_trim(ex["continuation_frames"], t_f),
            "frame_mask": _valid_mask(n_frames, t_f),
        }

    def _convert_features(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        lengths = self.get_model_feature_lengths(task_feature_lengths)
        return ds.map(
            lambda ex: self._convert_example(ex, lengths),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    def get_model_feature_lengths(
        self, task_feature_lengths: Mapping[str, int]
    ) -> Mapping[str, int]:
        t_p = task_feature_lengths["prompt_features"]
        text_len = (
            task_feature_lengths["prompt_transcript"]
            + task_feature_lengths["continuation_transcript"]
            + 1
        )
        r = self._reduction_factor
        t_f = ceil_div(task_feature_lengths["continuation_frames"], r) * r
        return {
            "encoder_features": t_p,
            "encoder_mask": t_p,
            "decoder_input_tokens": text_len,
            "decoder_target_tokens": text_len,
            "decoder_loss_weights": text_len,
            "text_part": text_len,
            "target_frames": t_f,
            "frame_mask": t_f,
        }

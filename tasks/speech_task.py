"""The shared shape of every Spectron seqio task: raw audio + text -> features of CONTRACTS.md §1.

A Spectron data source yields raw examples with these keys (any extra keys are dropped):

| key | type | meaning |
|---|---|---|
| `prompt_audio` | float32[T_a] | prompt waveform at the target config's sample rate |
| `continuation_audio` | float32[T_b] | continuation waveform (may be empty: spoken QA) |
| `prompt_text`, `continuation_text` | string | the words of each part |
| `speaker_id`, `id` | string | speaker ("" where unknown), stable example id |

`speech_preprocessors` turns them into the task examples: encoder features of the prompt from the
front end (any object with `sample_rate`, `feature_dim`, `features_tf`), the target log-mel of the
continuation, and SentencePiece ids of both texts (no EOS; the feature converter adds it).
`register_speech_task` registers such a task with any front end, target spectrogram or vocabulary,
which is how other modules (and users) add their own tasks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

import spectron_jax.evaluation.seqio_metrics as seqio_metrics
from spectron_jax.audio.spectrogram import SpectrogramConfig, log_mel_tf
from spectron_tasks import vocabulary as vocabulary_lib

# Features every raw example carries (see the module docstring).
RAW_AUDIO_KEYS = ("prompt_audio", "continuation_audio")
RAW_TEXT_KEYS = ("prompt_text", "continuation_text", "speaker_id", "id")


def raw_output_signature() -> dict[str, tf.TensorSpec]:
    """The tf.data signature of raw examples (for `tf.data.Dataset.from_generator`)."""
    signature = {k: tf.TensorSpec([None], tf.float32) for k in RAW_AUDIO_KEYS}
    signature.update({k: tf.TensorSpec([], tf.string) for k in RAW_TEXT_KEYS})
    return signature


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """The seqio output features of a Spectron task (CONTRACTS.md §1).

    Feature widths (F_enc, n_mels) are not part of seqio's Feature spec; they follow from the
    front end and target config of `make_featurize`.
    """
    return {
        "prompt_features": seqio.ContinuousFeature(dtype=tf.float32, rank=2),
        "prompt_transcript": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
        "continuation_transcript": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
        "continuation_frames": seqio.ContinuousFeature(dtype=tf.float32, rank=2),
    }


def _features_or_empty(waveform: tf.Tensor, fn: Callable, dim: int, n_fft: int) -> tf.Tensor:
    """float32[T] -> float32[T', dim]; a clip too short for reflect padding gives 0 frames.

    Reflect padding of `n_fft // 2` needs more samples than that; empty continuations (spoken QA)
    are the case that matters.
    """
    return tf.cond(
        tf.size(waveform) > n_fft // 2,
        lambda: tf.ensure_shape(fn(waveform), [None, dim]),
        lambda: tf.zeros([0, dim], tf.float32),
    )


# ------------------------------------------------------------------------------------------------
# Raw examples as TFRecord files: a source whose tf.data iterator can be checkpointed (T5X's
# `save_dataset=True` cannot save a generator-backed one).
# ------------------------------------------------------------------------------------------------


def _float_feature(x: np.ndarray) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(x, np.float32)))


def _bytes_feature(text: str) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode("utf-8")]))


def write_raw_tfrecords(paths: Sequence[str], examples: Iterable[Mapping[str, Any]]) -> None:
    """Writes raw examples round-robin into `paths` (example i into paths[i % len(paths)]).

    Each file is written as `<path>.tmp` and renamed when complete, so a killed writer never
    leaves a short file under the final name.
    """
    writers = [tf.io.TFRecordWriter(p + ".tmp") for p in paths]
    for i, ex in enumerate(examples):
        feature = {k: _float_feature(ex[k]) for k in RAW_AUDIO_KEYS}
        feature.update({k: _bytes_feature(ex[k]) for k in RAW_TEXT_KEYS})
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        writers[i % len(writers)].write(example.SerializeToString())
    for writer, path in zip(writers, paths, strict=True):
        writer.close()
        os.replace(path + ".tmp", path)


def raw_tfrecord_dataset(paths: Sequence[str]) -> tf.data.Dataset:
    """Raw examples of `write_raw_tfrecords` files, in file order, one file after another (graph
    ops only: the iterator is checkpointable)."""
    description = {
        k: tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True) for k in RAW_AUDIO_KEYS
    }
    description.update({k: tf.io.FixedLenFeature([], tf.string) for k in RAW_TEXT_KEYS})
    ds = tf.data.TFRecordDataset(list(paths))
    return ds.map(lambda r: tf.io.parse_single_example(r, description))


def make_featurize(front_end: Any, target_config: SpectrogramConfig) -> Callable:
    """A seqio preprocessor: raw audio -> prompt features and continuation frames (+ lengths)."""
    if front_end.sample_rate != target_config.sample_rate:
        raise ValueError(
            f"Front end rate {front_end.sample_rate} Hz differs from the target spectrogram rate "
            f"{target_config.sample_rate} Hz; task audio is produced once, at the target rate, "
            "so both must agree."
        )
    # Front ends without an n_fft (e.g. fbank) still need a minimum clip; 400 samples = 25 ms.
    front_end_n_fft = getattr(front_end, "n_fft", 400)

    @seqio.map_over_dataset
    def featurize(ex):
        prompt = _features_or_empty(
            ex["prompt_audio"], front_end.features_tf, front_end.feature_dim, front_end_n_fft
        )
        frames = _features_or_empty(
            ex["continuation_audio"],
            lambda w: log_mel_tf(w, target_config),
            target_config.n_mels,
            target_config.n_fft,
        )
        out = {k: v for k, v in ex.items() if k not in RAW_AUDIO_KEYS}
        out["prompt_features"] = prompt
        out["prompt_length"] = tf.shape(prompt)[0]
        out["continuation_frames"] = frames
        out["continuation_length"] = tf.shape(frames)[0]
        return out

    return featurize


def make_tokenize(vocabulary: seqio.Vocabulary) -> Callable:
    """A seqio preprocessor: prompt/continuation text -> int32 SentencePiece ids (no EOS)."""

    @seqio.map_over_dataset
    def tokenize(ex):
        out = dict(ex)
        for text_key, ids_key in (
            ("prompt_text", "prompt_transcript"),
            ("continuation_text", "continuation_transcript"),
        ):
            out[ids_key] = tf.cast(vocabulary.encode_tf(ex[text_key]), tf.int32)
        return out

    return tokenize


def speech_preprocessors(
    front_end: Any, target_config: SpectrogramConfig, vocabulary: seqio.Vocabulary
) -> list[Callable]:
    """Preprocessors that turn raw examples into CONTRACTS.md §1 task examples."""
    return [make_featurize(front_end, target_config), make_tokenize(vocabulary)]


def register_speech_task(
    name: str,
    source: seqio.DataSource,
    *,
    front_end: Any = None,
    target_config: SpectrogramConfig | None = None,
    vocabulary: seqio.Vocabulary | None = None,
    extra_preprocessors: Sequence[Callable] = (),
    metric_fns: Sequence[Callable] = (seqio_metrics.text_metrics, seqio_metrics.frame_metrics),
    overwrite: bool = True,
) -> seqio.Task:
    """Registers a Spectron task whose `source` yields raw examples (module docstring).

    Args:
      name: seqio task name.
      source: a seqio DataSource whose audio is at `target_config.sample_rate`.
      front_end: encoder front end (`SpectrogramConfig` or e.g. the w2v-BERT fbank); default: the
        target spectrogram itself.
      target_config: the continuation (target) spectrogram; default `SpectrogramConfig()`.
      vocabulary: default: the tiny SentencePiece model shipped in `spectron_jax/assets`.
      extra_preprocessors: applied to raw examples before featurisation (e.g. a length filter).
      metric_fns: seqio metric functions of {"transcript", "continuation"} targets and
        predictions (`seqio_metrics.postprocess` makes them): `text_metrics` and (on the
        frames of predict_with_aux) `frame_metrics` by default, `qa_metrics` for spoken QA.
      overwrite: replace an existing task of that name (re-registration with other configs).

    Returns:
      The registered seqio.Task.
    """
    target_config = target_config or SpectrogramConfig()
    front_end = front_end or target_config
    vocabulary = vocabulary or vocabulary_lib.default_vocabulary()
    if overwrite and name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            *extra_preprocessors,
            *speech_preprocessors(front_end, target_config, vocabulary),
        ],
        output_features=output_features(vocabulary),
        postprocess_fn=seqio_metrics.postprocess,
        metric_fns=list(metric_fns),
    )

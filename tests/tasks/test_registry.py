"""Task registration: the default tasks, and variants with another front end / target / vocab."""

import dataclasses

import numpy as np
import pytest
import seqio
import tensorflow as tf
from task_testing import TINY, check_contract

from spectron_jax.audio.spectrogram import SpectrogramConfig, log_mel_numpy
from spectron_tasks import speech_task, synthetic_counting

DEFAULT_TASKS = (
    "spectron_synthetic_counting",
    "spectron_fsdd_counting",
    "spectron_llama_questions",
    "spectron_librispeech",
)


def test_importing_the_package_registers_every_task():
    for name in DEFAULT_TASKS:
        task = seqio.get_mixture_or_task(name)
        assert set(task.output_features) == {
            "prompt_features",
            "prompt_transcript",
            "continuation_transcript",
            "continuation_frames",
        }
        assert isinstance(task.output_features["prompt_features"], seqio.ContinuousFeature)
        assert task.output_features["prompt_features"].rank == 2
        assert not task.output_features["prompt_transcript"].add_eos


@dataclasses.dataclass(frozen=True)
class StackedFrontEnd:
    """A stand-in for the fbank front end: 40-bin log-mel, two frames stacked (F = 80)."""

    sample_rate: int = 16_000
    feature_dim: int = 80
    base: SpectrogramConfig = SpectrogramConfig(
        n_mels=40, hop_length=160, win_length=400, n_fft=512
    )

    def features_numpy(self, waveform):
        x = log_mel_numpy(waveform, self.base)
        x = x[: x.shape[0] // 2 * 2]
        return x.reshape(x.shape[0] // 2, 80)

    def features_tf(self, waveform):
        x = self.base.features_tf(waveform)
        x = x[: tf.shape(x)[0] // 2 * 2]
        return tf.reshape(x, [-1, 80])


def test_variant_front_end_and_target(synthetic_cache):
    front_end = StackedFrontEnd()
    target = SpectrogramConfig(n_mels=64, fmax=8000.0)
    vocab = seqio.ByteVocabulary()
    task = synthetic_counting.register(
        "test_synthetic_variant",
        TINY,
        cache_dir=synthetic_cache,
        front_end=front_end,
        target_config=target,
        vocabulary=vocab,
    )
    data = synthetic_counting.load_split(TINY, "validation", synthetic_cache)
    examples = list(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
    assert len(examples) == TINY.num_validation
    for i, ex in enumerate(examples):
        check_contract(ex, n_features=80, n_mels=64)
        prompt, cont = data.waveforms(i)
        np.testing.assert_allclose(
            ex["prompt_features"], front_end.features_numpy(prompt), atol=1e-3
        )
        np.testing.assert_allclose(
            ex["continuation_frames"], log_mel_numpy(cont, target), atol=1e-3
        )
        assert ex["prompt_transcript"].tolist() == list(vocab.encode(ex["prompt_text"].decode()))


def test_front_end_rate_must_match_target():
    with pytest.raises(ValueError, match="8000 Hz"):
        speech_task.make_featurize(
            SpectrogramConfig(sample_rate=8000, fmax=4000.0), SpectrogramConfig()
        )


def test_w2v_bert_fbank_front_end(synthetic_cache):
    fbank = pytest.importorskip("spectron_jax.audio.fbank")
    front_end = fbank.W2vBertFbankConfig()
    task = synthetic_counting.register(
        "test_synthetic_fbank", TINY, cache_dir=synthetic_cache, front_end=front_end
    )
    ex = next(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
    check_contract(ex, n_features=front_end.feature_dim)
    prompt, _ = synthetic_counting.load_split(TINY, "validation", synthetic_cache).waveforms(0)
    np.testing.assert_allclose(ex["prompt_features"], front_end.features_numpy(prompt), atol=1e-3)

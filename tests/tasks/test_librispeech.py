"""spectron_librispeech on a fake TFDS `librispeech` made of real LJSpeech recordings (offline)."""

import csv

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf
import tensorflow_datasets as tfds
from task_testing import check_contract

from spectron_jax.audio.io import load_audio
from spectron_jax.audio.spectrogram import SpectrogramConfig, log_mel_numpy
from spectron_tasks import librispeech, vocabulary

CONFIG = SpectrogramConfig()
NUM_UTTERANCES = 6  # LJSpeech subset rows; some are shorter than 3 s + 1 s and get dropped.


@pytest.fixture(scope="module")
def fake_librispeech(shared_data):
    """A list of TFDS-librispeech-shaped examples (int16 speech at 16 kHz) and a mock context."""
    folder = shared_data / "ljspeech_subset"
    with open(folder / "metadata.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:NUM_UTTERANCES]
    examples = []
    for i, row in enumerate(rows):
        audio, _ = load_audio(folder / row["path"], 16_000)
        examples.append(
            {
                "speech": np.clip(np.round(audio * 32768), -32768, 32767).astype(np.int16),
                "text": row["text"].upper().encode(),
                "speaker_id": np.int64(100 + i),
                "chapter_id": np.int64(7),
                "id": f"{100 + i}-7-{i:04d}".encode(),
            }
        )

    def as_dataset(self, split, **kwargs):
        del self, kwargs
        assert split == "dev_clean"
        signature = {
            "speech": tf.TensorSpec([None], tf.int16),
            "text": tf.TensorSpec([], tf.string),
            "speaker_id": tf.TensorSpec([], tf.int64),
            "chapter_id": tf.TensorSpec([], tf.int64),
            "id": tf.TensorSpec([], tf.string),
        }
        return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)

    return examples, as_dataset


def test_prompt_is_first_three_seconds_and_short_ones_are_dropped(fake_librispeech, tmp_path):
    examples, as_dataset = fake_librispeech
    config = librispeech.LibriSpeechConfig(data_dir=str(tmp_path))
    minimum = config.min_samples(16_000)
    long_ones = [ex for ex in examples if ex["speech"].size >= minimum]
    assert 0 < len(long_ones) < len(examples)  # The fake set exercises both branches.
    task = librispeech.register("test_librispeech", config)
    sp = spm.SentencePieceProcessor(model_file=vocabulary.TINY_SPM_PATH)
    with tfds.testing.mock_data(as_dataset_fn=as_dataset, data_dir=str(tmp_path)):
        stats = librispeech.count_utterances("dev_clean", config)
        out = list(task.get_dataset(None, split="dev_clean", shuffle=False).as_numpy_iterator())
    assert stats["kept"] == len(long_ones)
    assert stats["dropped"] == len(examples) - len(long_ones)
    assert stats["kept_seconds"] == pytest.approx(sum(ex["speech"].size for ex in long_ones) / 16e3)
    assert len(out) == len(long_ones)
    for raw, ex in zip(long_ones, out, strict=True):
        check_contract(ex, n_features=CONFIG.n_mels)
        speech = raw["speech"].astype(np.float32) / 32768.0
        prompt, cont = speech[:48_000], speech[48_000:]
        assert ex["prompt_length"] == CONFIG.num_frames(48_000) == 188
        assert ex["continuation_length"] == CONFIG.num_frames(cont.size)
        np.testing.assert_allclose(ex["prompt_features"], log_mel_numpy(prompt, CONFIG), atol=1e-3)
        np.testing.assert_allclose(
            ex["continuation_frames"], log_mel_numpy(cont, CONFIG), atol=1e-3
        )
        # The whole transcript, lower-cased, is the prompt transcript; no continuation text.
        text = raw["text"].decode().lower()
        assert ex["prompt_text"].decode() == text
        assert ex["prompt_transcript"].tolist() == sp.encode(text)
        assert ex["continuation_text"] == b"" and ex["continuation_transcript"].size == 0
        assert ex["speaker_id"] == str(raw["speaker_id"]).encode()
        assert ex["id"] == raw["id"]


def test_other_rates_are_refused():
    with pytest.raises(ValueError, match="16 kHz"):
        librispeech.make_source(sample_rate=22_050)

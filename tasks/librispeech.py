"""`spectron_librispeech`: TFDS `librispeech` split in time, the paper's training set-up.

Each utterance (16 kHz) is cut at `prompt_seconds` (3 s, as in the paper): the first part is the
prompt audio (encoder input), the rest the continuation frames (spectrogram target). LibriSpeech
has no word alignment, so the whole transcript goes in `prompt_transcript` and
`continuation_transcript` is empty: the model is trained with one cross-entropy over the whole
transcript, teacher-forced, as the paper does (its ASR and text-continuation losses collapse into
that one term). Transcripts are lower-cased (LibriSpeech is upper case, the vocabularies are not).

Utterances shorter than `prompt_seconds + min_continuation_seconds` are dropped; `count_utterances`
reads how many a split keeps and drops. TFDS downloads and prepares the data at first use
(`data_dir` as in `tfds.load`); these machines have no network, so tests use `tfds.testing.
mock_data` with real recordings.
"""

from __future__ import annotations

import dataclasses

SPLITS = (
    "train_clean100",
    "train_clean360",
    "train_other500",
    "dev_clean",
    "dev_other",
    "test_clean",
    "test_other",
)


@dataclasses.dataclass(frozen=True)
class LibriSpeechConfig:
    """Attributes:

    prompt_seconds: length of the prompt (the paper: 3 s).
    min_continuation_seconds: shorter continuations drop the utterance.
    tfds_name: TFDS name (and version) to load.
    data_dir: TFDS data dir (None: TFDS's default).
    """

    prompt_seconds: float = 3.0
    min_continuation_seconds: float = 1.0
    tfds_name: str = "librispeech"
    data_dir: str | None = None

    def prompt_samples(self, sample_rate: int) -> int:
        return int(round(self.prompt_seconds * sample_rate))

    def min_samples(self, sample_rate: int) -> int:
        return self.prompt_samples(sample_rate) + int(
            round(self.min_continuation_seconds * sample_rate)
        )


def _load_tfds(config: LibriSpeechConfig, split: str, shuffle_files: bool = False):
    import tensorflow_datasets as tfds

    return tfds.load(
        config.tfds_name, split=split, data_dir=config.data_dir, shuffle_files=shuffle_files
    )


def _check_rate(sample_rate: int) -> None:
    if sample_rate != 16_000:
        raise ValueError(
            f"LibriSpeech is 16 kHz and the task does not resample; got sample_rate={sample_rate}"
        )


def split_utterance(ex: dict, config: LibriSpeechConfig, sample_rate: int = 16_000) -> dict:
    """A TFDS librispeech example -> a raw Spectron example (see `speech_task`). Graph-safe."""
    import tensorflow as tf

    speech = tf.cast(ex["speech"], tf.float32) / 32768.0
    cut = config.prompt_samples(sample_rate)
    return {
        "prompt_audio": speech[:cut],
        "continuation_audio": speech[cut:],
        "prompt_text": tf.strings.lower(ex["text"]),
        "continuation_text": tf.constant("", tf.string),
        "speaker_id": tf.strings.as_string(ex["speaker_id"]),
        "id": ex["id"],
    }


def long_enough(ex: dict, config: LibriSpeechConfig, sample_rate: int = 16_000):
    """tf.bool: whether a TFDS example has prompt + minimum continuation."""
    return _num_samples(ex) >= config.min_samples(sample_rate)


def _num_samples(ex):
    import tensorflow as tf

    return tf.shape(ex["speech"])[0]


def count_utterances(
    split: str, config: LibriSpeechConfig | None = None, sample_rate: int = 16_000
) -> dict[str, float]:
    """Reads a split once: {"kept", "dropped", "kept_seconds", "dropped_seconds"}."""
    config = config or LibriSpeechConfig()
    _check_rate(sample_rate)
    minimum = config.min_samples(sample_rate)
    stats = {"kept": 0, "dropped": 0, "kept_seconds": 0.0, "dropped_seconds": 0.0}
    lengths = _load_tfds(config, split).map(lambda ex: {"n": _num_samples(ex)})
    for row in lengths.as_numpy_iterator():
        key = "kept" if row["n"] >= minimum else "dropped"
        stats[key] += 1
        stats[f"{key}_seconds"] += float(row["n"]) / sample_rate
    return stats


def make_source(config: LibriSpeechConfig | None = None, sample_rate: int = 16_000):
    """A seqio DataSource of raw examples, utterances too short for the split already dropped."""
    import seqio

    config = config or LibriSpeechConfig()
    _check_rate(sample_rate)

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        del seed
        ds = _load_tfds(config, split, shuffle_files)
        ds = ds.filter(lambda ex: long_enough(ex, config, sample_rate))
        return ds.map(lambda ex: split_utterance(ex, config, sample_rate))

    return seqio.FunctionDataSource(dataset_fn, splits=SPLITS)


def register(
    name: str = "spectron_librispeech",
    config: LibriSpeechConfig | None = None,
    *,
    front_end=None,
    target_config=None,
    vocabulary=None,
):
    """Registers a LibriSpeech task; TFDS is touched only when a dataset is built."""
    from spectron_jax.audio.spectrogram import SpectrogramConfig
    from spectron_tasks import speech_task

    target_config = target_config or SpectrogramConfig()
    return speech_task.register_speech_task(
        name,
        make_source(config, target_config.sample_rate),
        front_end=front_end,
        target_config=target_config,
        vocabulary=vocabulary,
    )

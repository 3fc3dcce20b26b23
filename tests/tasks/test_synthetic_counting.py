"""spectron_synthetic_counting: contract, text, split point, voices, determinism, cache."""

import dataclasses
import os

import numpy as np
import pytest
import sentencepiece as spm
import seqio
from task_testing import TINY, check_contract

from spectron_jax.audio.spectrogram import SpectrogramConfig, log_mel_numpy
from spectron_jax.feature_converter import SpectronFeatureConverter
from spectron_jax.vocabularies import special_ids
from spectron_tasks import espeak, synthetic_counting, vocabulary

CONFIG = SpectrogramConfig()
WORDS = [synthetic_counting.number_words(n) for n in range(100)]


def _numbers(text: bytes) -> list[int]:
    """'twenty one twenty two' -> [21, 22] (greedy on the longest number name)."""
    tokens, out = text.decode().split(), []
    while tokens:
        if len(tokens) > 1 and f"{tokens[0]} {tokens[1]}" in WORDS:
            out.append(WORDS.index(f"{tokens[0]} {tokens[1]}"))
            tokens = tokens[2:]
        else:
            out.append(WORDS.index(tokens[0]))
            tokens = tokens[1:]
    return out


def _examples(task, split):
    return list(task.get_dataset(None, split=split, shuffle=False).as_numpy_iterator())


def test_number_words():
    assert synthetic_counting.number_words(0) == "zero"
    assert synthetic_counting.number_words(19) == "nineteen"
    assert synthetic_counting.number_words(40) == "forty"
    assert synthetic_counting.number_words(21) == "twenty one"
    with pytest.raises(ValueError, match="0..99"):
        synthetic_counting.number_words(100)


@pytest.mark.parametrize("split", synthetic_counting.SPLITS)
def test_examples_follow_the_contract(tiny_synthetic_task, split):
    examples = _examples(tiny_synthetic_task, split)
    assert len(examples) == TINY.num_examples(split)
    sp = spm.SentencePieceProcessor(model_file=vocabulary.TINY_SPM_PATH)
    for ex in examples:
        check_contract(ex, n_features=CONFIG.n_mels)
        prompt, cont = _numbers(ex["prompt_text"]), _numbers(ex["continuation_text"])
        assert len(prompt) == TINY.prompt_words
        assert TINY.min_continuation_words <= len(cont) <= TINY.max_continuation_words
        assert 0 <= prompt[0] <= TINY.max_start
        assert prompt + cont == list(range(prompt[0], prompt[0] + len(prompt) + len(cont)))
        # Transcripts are the SentencePiece ids of the texts, without EOS.
        assert ex["prompt_transcript"].tolist() == sp.encode(ex["prompt_text"].decode())
        assert ex["continuation_transcript"].tolist() == sp.encode(ex["continuation_text"].decode())
        assert (
            special_ids(vocabulary.default_vocabulary()).eos_id
            not in ex["continuation_transcript"].tolist()
        )
        assert ex["speaker_id"].decode() in TINY.voices(split)


def test_split_point_is_exact(synthetic_cache, tiny_synthetic_task):
    data = synthetic_counting.load_split(TINY, "train", synthetic_cache)
    for i, ex in enumerate(_examples(tiny_synthetic_task, "train")):
        prompt, cont = data.waveforms(i)
        joined = np.concatenate([prompt, cont])
        whole = log_mel_numpy(joined, CONFIG)
        # Frames of the parts add up to the frames of the joined audio (+1: one centred frame
        # more per part).
        total = ex["prompt_length"] + ex["continuation_length"]
        assert abs(int(total) - whole.shape[0]) <= 1
        # Task features equal the numpy log-mel of the parts ...
        np.testing.assert_allclose(ex["prompt_features"], log_mel_numpy(prompt, CONFIG), atol=1e-3)
        np.testing.assert_allclose(
            ex["continuation_frames"], log_mel_numpy(cont, CONFIG), atol=1e-3
        )
        # ... and the prompt is the start of the joined audio: frames away from the cut (reflect
        # padding touches the last n_fft / 2 / hop = 2) match the joined audio's frames.
        n = int(ex["prompt_length"]) - 3
        np.testing.assert_allclose(ex["prompt_features"][:n], whole[:n], atol=1e-3)


def test_voices_and_splits():
    assert len(synthetic_counting.TRAIN_VOICES) >= 8
    assert not set(synthetic_counting.TRAIN_VOICES) & set(synthetic_counting.UNSEEN_VOICES)
    big = dataclasses.replace(TINY, num_train=400, num_validation_unseen=100)
    train_voices = {ex["settings"]["voice"] for ex in synthetic_counting.plan_split(big, "train")}
    unseen = {
        ex["settings"]["voice"]
        for ex in synthetic_counting.plan_split(big, "validation_unseen_voices")
    }
    assert train_voices == set(synthetic_counting.TRAIN_VOICES)
    assert unseen == set(synthetic_counting.UNSEEN_VOICES)
    plan = synthetic_counting.plan_split(big, "train")
    for key in ("rate", "pitch", "pitch_range"):
        assert len({ex["settings"][key] for ex in plan}) > 10, key
    assert len({round(ex["gain_db"], 3) for ex in plan}) > 10
    with pytest.raises(ValueError, match="both training and unseen"):
        dataclasses.replace(TINY, unseen_voices=("en-us",))


def test_every_voice_exists_and_is_reproducible():
    voices = synthetic_counting.TRAIN_VOICES + synthetic_counting.UNSEEN_VOICES
    settings = [espeak.VoiceSettings(v) for v in voices] * 2
    texts = ["three four"] * len(settings)
    first, rate = espeak.synthesize_batch(texts, settings)
    second, _ = espeak.synthesize_batch(texts, settings)
    assert rate == 22_050
    for voice, a, b in zip(voices * 2, first, second, strict=True):
        assert a.dtype == np.int16 and a.size > rate // 4, voice
        np.testing.assert_array_equal(a, b, err_msg=voice)
    with pytest.raises(espeak.EspeakError, match="no voice"):
        espeak.synthesize_batch(["one"], [espeak.VoiceSettings("xx-no-such-voice")])


def test_deterministic_by_seed(synthetic_cache):
    config = dataclasses.replace(TINY, num_validation=3)
    cached = synthetic_counting.load_split(config, "validation", synthetic_cache)
    again = synthetic_counting.synthesize_split(config, "validation")
    np.testing.assert_array_equal(cached.prompt_audio, again.prompt_audio)
    np.testing.assert_array_equal(cached.continuation_audio, again.continuation_audio)
    assert cached.examples == again.examples
    other = synthetic_counting.synthesize_split(dataclasses.replace(config, seed=1), "validation")
    assert other.examples != cached.examples


def test_cache_is_reused_and_pickle_free(synthetic_cache, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("cache miss: synthesised again")

    monkeypatch.setattr(synthetic_counting, "synthesize_split", fail)
    synthetic_counting._load_cached.cache_clear()
    data = synthetic_counting.load_split(TINY, "train", synthetic_cache)
    assert len(data) == TINY.num_train
    folder = os.path.join(synthetic_cache, "synthetic_counting", TINY.cache_key())
    assert sorted(os.listdir(folder)) == sorted(
        f"{s}.{ext}" for s in synthetic_counting.SPLITS for ext in ("json", "npz")
    )
    with np.load(os.path.join(folder, "train.npz"), allow_pickle=False) as z:
        assert z["prompt_audio"].dtype == np.int16


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECTRON_CACHE_DIR", str(tmp_path))
    assert synthetic_counting.default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("SPECTRON_CACHE_DIR")
    assert synthetic_counting.default_cache_dir().endswith(os.path.join(".cache", "spectron_jax"))


def test_feature_converter_on_the_real_task(tiny_synthetic_task):
    lengths = {
        "prompt_features": 160,
        "prompt_transcript": 8,
        "continuation_transcript": 16,
        "continuation_frames": 299,
    }
    ids = special_ids(vocabulary.default_vocabulary())
    converter = SpectronFeatureConverter(bos_id=ids.bos_id, eos_id=ids.eos_id, reduction_factor=4)
    examples = _examples(tiny_synthetic_task, "train")
    ds = converter(tiny_synthetic_task.get_dataset(None, split="train", shuffle=False), lengths)
    batch = next(ds.batch(len(examples)).as_numpy_iterator())
    assert batch["target_frames"].shape == (len(examples), 300, CONFIG.n_mels)
    for b, ex in enumerate(examples):
        p, c = ex["prompt_transcript"].tolist(), ex["continuation_transcript"].tolist()
        n = len(p) + len(c) + 1
        assert batch["decoder_input_tokens"][b, :n].tolist() == [ids.bos_id] + p + c
        assert batch["decoder_target_tokens"][b, :n].tolist() == p + c + [ids.eos_id]
        assert batch["decoder_target_tokens"][b, n:].tolist() == [0] * (25 - n)
        assert batch["text_part"][b].tolist() == [1] * len(p) + [2] * (len(c) + 1) + [0] * (25 - n)
        np.testing.assert_array_equal(batch["decoder_loss_weights"][b], batch["text_part"][b] > 0)
        t_p, t_c = int(ex["prompt_length"]), int(ex["continuation_length"])
        assert batch["encoder_mask"][b].tolist() == [1] * t_p + [0] * (160 - t_p)
        assert batch["frame_mask"][b].tolist() == [1] * t_c + [0] * (300 - t_c)
        np.testing.assert_array_equal(batch["target_frames"][b, :t_c], ex["continuation_frames"])
        np.testing.assert_array_equal(batch["target_frames"][b, t_c:], 0.0)
        np.testing.assert_array_equal(batch["encoder_features"][b, :t_p], ex["prompt_features"])


def test_default_task_is_registered():
    task = seqio.get_mixture_or_task("spectron_synthetic_counting")
    assert set(task.splits) == set(synthetic_counting.SPLITS)
    assert task.source.num_input_examples("train") == 3000


def test_chunked_synthesis_is_deterministic_and_ordered(monkeypatch):
    monkeypatch.setattr(synthetic_counting, "SYNTHESIS_CHUNK", 2)
    config = dataclasses.replace(TINY, num_validation_unseen=5, seed=3)
    first = synthetic_counting.synthesize_split(config, "validation_unseen_voices")
    second = synthetic_counting.synthesize_split(config, "validation_unseen_voices")
    assert len(first) == 5 and first.prompt_offsets.shape == (6,)
    np.testing.assert_array_equal(first.prompt_audio, second.prompt_audio)
    np.testing.assert_array_equal(first.continuation_offsets, second.continuation_offsets)
    # Chunks come back in plan order: utterance lengths match one-chunk synthesis (eSpeak's
    # process state changes a waveform only slightly, ~20 ms at most).
    monkeypatch.setattr(synthetic_counting, "SYNTHESIS_CHUNK", 500)
    single = synthetic_counting.synthesize_split(config, "validation_unseen_voices")
    for offsets in ("prompt_offsets", "continuation_offsets"):
        lengths = np.diff(getattr(first, offsets))
        np.testing.assert_allclose(lengths, np.diff(getattr(single, offsets)), atol=0.03 * 16000)


def test_shuffled_source_is_a_seeded_permutation(tiny_synthetic_task):
    def ids(seed):
        ds = tiny_synthetic_task.source.get_dataset("train", shuffle=True, seed=seed)
        return [ex["id"] for ex in ds.as_numpy_iterator()]

    plain = [ex["id"] for ex in _examples(tiny_synthetic_task, "train")]
    assert sorted(ids(1)) == sorted(plain)
    assert ids(1) == ids(1)
    assert ids(1) != plain or ids(2) != plain


def test_file_backed_source_holds_the_same_examples_and_checkpoints_its_position(
    synthetic_cache, tiny_synthetic_task
):
    """The TFRecord-backed variant: the generator source's examples (bit-equal audio), a seeded
    shard order, and a tf.data iterator that a tf.train.Checkpoint saves and restores (the
    generator-backed one fails with "PyFunc is stateful")."""
    import tensorflow as tf

    files = synthetic_counting.register(
        "test_synthetic_counting_tiny_files", TINY, cache_dir=synthetic_cache, file_backed=True
    )
    by_id = {
        ex["id"]: ex for ex in tiny_synthetic_task.source.get_dataset("train").as_numpy_iterator()
    }
    got = list(files.source.get_dataset("train").as_numpy_iterator())
    assert sorted(ex["id"] for ex in got) == sorted(by_id)
    for ex in got:
        ref = by_id[ex["id"]]
        for key in ("prompt_audio", "continuation_audio"):
            np.testing.assert_array_equal(ex[key], ref[key])
        assert ex["prompt_text"] == ref["prompt_text"] and ex["speaker_id"] == ref["speaker_id"]

    def ids(seed):
        ds = files.source.get_dataset("train", shuffle=True, seed=seed)
        return [ex["id"] for ex in ds.as_numpy_iterator()]

    assert ids(3) == ids(3) and sorted(ids(3)) == sorted(by_id)

    ds = files.get_dataset(None, split="train", shuffle=True, seed=5)
    iterator = iter(ds)
    next(iterator)
    checkpoint = tf.train.Checkpoint(iterator=iterator)
    saved = checkpoint.save(os.path.join(synthetic_cache, "iterator", "ckpt"))
    expected = [next(iterator)["id"].numpy() for _ in range(3)]
    restored = iter(files.get_dataset(None, split="train", shuffle=True, seed=5))
    tf.train.Checkpoint(iterator=restored).restore(saved)
    assert [next(restored)["id"].numpy() for _ in range(3)] == expected
    with pytest.raises(Exception, match="[Ss]tateful"):
        stateful = iter(tiny_synthetic_task.get_dataset(None, split="train", shuffle=False))
        tf.train.Checkpoint(iterator=stateful).save(os.path.join(synthetic_cache, "gen", "c"))

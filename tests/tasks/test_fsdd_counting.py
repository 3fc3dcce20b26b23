"""spectron_fsdd_counting: same-speaker runs, FSDD's test takes, split point, missing folder."""

import os

import numpy as np
import pytest
from task_testing import check_contract

from spectron_jax.audio.spectrogram import SpectrogramConfig, log_mel_numpy
from spectron_tasks import fsdd_counting, synthetic_counting

CONFIG = SpectrogramConfig()
TINY = fsdd_counting.FsddCountingConfig(num_train=4, num_test=4)


def _take(path):
    return int(os.path.splitext(os.path.basename(path))[0].split("_")[2])


def test_missing_folder_names_the_expected_path(tmp_path):
    missing = tmp_path / "fsdd"
    with pytest.raises(FileNotFoundError, match=str(missing / "recordings")):
        fsdd_counting.plan_split(TINY, "test", str(missing))
    task = fsdd_counting.register("test_fsdd_missing", TINY, str(missing))
    with pytest.raises(FileNotFoundError, match="Free Spoken Digit Dataset not found"):
        next(task.get_dataset(None, split="test", shuffle=False).as_numpy_iterator())


def test_plan_uses_one_speaker_consecutive_digits_and_fsdd_splits(shared_data):
    config = fsdd_counting.FsddCountingConfig(num_train=200, num_test=200)
    folder = str(shared_data / "fsdd")
    for split in fsdd_counting.SPLITS:
        plan = fsdd_counting.plan_split(config, split, folder)
        assert len(plan) == 200
        assert len({ex["speaker_id"] for ex in plan}) == 6
        for ex in plan:
            digits = ex["digits"]
            assert digits == list(range(digits[0], digits[0] + len(digits)))
            assert 4 <= len(digits) <= 6
            for digit, path in zip(digits, ex["paths"], strict=True):
                name = os.path.basename(path)
                assert name.startswith(f"{digit}_{ex['speaker_id']}_")
                assert (_take(path) < 5) == (split == "test")
    assert fsdd_counting.plan_split(config, "test", folder) == fsdd_counting.plan_split(
        config, "test", folder
    )


def test_task_examples_and_split_point(shared_data):
    folder = str(shared_data / "fsdd")
    task = fsdd_counting.register("test_fsdd_counting", TINY, folder)
    plan = fsdd_counting.plan_split(TINY, "test", folder)
    examples = list(task.get_dataset(None, split="test", shuffle=False).as_numpy_iterator())
    assert len(examples) == TINY.num_test
    for planned, ex in zip(plan, examples, strict=True):
        check_contract(ex, n_features=CONFIG.n_mels)
        words = [synthetic_counting.number_words(d) for d in planned["digits"]]
        assert ex["prompt_text"].decode() == " ".join(words[: TINY.prompt_words])
        assert ex["continuation_text"].decode() == " ".join(words[TINY.prompt_words :])
        assert ex["speaker_id"].decode() == planned["speaker_id"]
        raw = fsdd_counting.build_example(planned, TINY, CONFIG.sample_rate)
        joined = np.concatenate([raw["prompt_audio"], raw["continuation_audio"]])
        total = int(ex["prompt_length"] + ex["continuation_length"])
        assert abs(total - CONFIG.num_frames(joined.size)) <= 1
        np.testing.assert_allclose(
            ex["continuation_frames"], log_mel_numpy(raw["continuation_audio"], CONFIG), atol=1e-3
        )

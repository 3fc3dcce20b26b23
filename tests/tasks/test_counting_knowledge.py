"""The knowledge-retention speech sets: counting the stage-3 speech corpus never says."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import seqio
from task_testing import TINY

from spectron_tasks import counting_knowledge, speech_task, synthetic_counting
from spectron_tasks.number_text import parse_numbers

TRAINING = synthetic_counting.SyntheticCountingConfig()


def _runs(config, split):
    plan = synthetic_counting.plan_split(config, split)
    return [
        (parse_numbers(ex["prompt_text"]), parse_numbers(ex["continuation_text"])) for ex in plan
    ]


def _training_runs() -> set[tuple[int, ...]]:
    return {tuple(p + c) for split in synthetic_counting.SPLITS for p, c in _runs(TRAINING, split)}


@pytest.mark.parametrize("split", ["validation", "validation_unseen_voices"])
def test_the_sets_ask_for_what_the_speech_corpus_never_says(split):
    heard = _training_runs()
    spoken = {n for run in heard for n in run}
    assert spoken == set(range(0, 23))  # The speech corpus says 0..22, counting up.
    down = _runs(counting_knowledge.CONFIGS[counting_knowledge.COUNTING_DOWN], split)
    past = _runs(counting_knowledge.CONFIGS[counting_knowledge.COUNTING_PAST_22], split)
    assert len(down) == 54 and len(past) == 48
    for prompt, cont in down:
        s = prompt[0]
        assert 3 <= s <= 29 and prompt + cont == [s, s - 1, s - 2, s - 3]
    for prompt, cont in past:
        s = prompt[0]
        assert 21 <= s <= 26 and prompt + cont == [s, s + 1, s + 2, s + 3]
        assert cont[0] >= 23  # The first answer is past the speech corpus.
    # No run of either set is a training run; starts are drawn, most of them appear.
    assert not heard & {tuple(p + c) for p, c in down + past}
    assert len({p[0] for p, _ in down}) >= 20 and {p[0] for p, _ in past} == set(range(21, 27))


def test_new_fields_keep_old_cache_keys_and_check_ranges():
    base = synthetic_counting.SyntheticCountingConfig()
    fields = {k: v for k, v in dataclasses.asdict(base).items()}
    del fields["min_start"], fields["count_step"]
    older = synthetic_counting.SyntheticCountingConfig(**fields)
    assert older.cache_key() == base.cache_key()
    assert dataclasses.replace(base, count_step=-1, min_start=5).cache_key() != base.cache_key()
    with pytest.raises(ValueError, match="inside 0..99"):
        synthetic_counting.SyntheticCountingConfig(min_start=2, max_start=10, count_step=-1)
    with pytest.raises(ValueError, match="count_step"):
        synthetic_counting.SyntheticCountingConfig(count_step=2)


def test_the_sets_are_registered():
    for name in counting_knowledge.CONFIGS:
        assert name in seqio.TaskRegistry.names()
        assert name + counting_knowledge.NO_TRANSCRIPT in seqio.TaskRegistry.names()
    assert "spectron_synthetic_counting_no_transcript" in seqio.TaskRegistry.names()


def test_the_transcript_free_variant_drops_the_prompt_text_only(synthetic_cache):
    """Same audio and continuation; the prompt transcript is empty (its ids too)."""
    name = "test_counting_no_transcript"
    speech_task.register_speech_task(
        name,
        synthetic_counting.make_source(TINY, synthetic_cache),
        extra_preprocessors=[counting_knowledge.drop_prompt_text],
    )
    plain = synthetic_counting.register(
        "test_counting_with_transcript", TINY, cache_dir=synthetic_cache
    )

    def rows(task):
        ds = task.get_dataset(sequence_length=None, split="validation", shuffle=False)
        return list(ds.as_numpy_iterator())

    dropped, kept = rows(seqio.get_mixture_or_task(name)), rows(plain)
    assert len(dropped) == len(kept) == TINY.num_validation
    for a, b in zip(dropped, kept, strict=True):
        assert a["prompt_text"] == b"" and a["prompt_transcript"].size == 0
        assert b["prompt_transcript"].size > 0
        assert a["continuation_text"] == b["continuation_text"]
        np.testing.assert_array_equal(a["continuation_transcript"], b["continuation_transcript"])
        np.testing.assert_array_equal(a["prompt_features"], b["prompt_features"])

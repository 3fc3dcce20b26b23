"""The knowledge-retention speech sets: counting the stage-3 speech corpus never says."""

from __future__ import annotations

import dataclasses

import pytest
import seqio

from spectron_tasks import counting_knowledge, synthetic_counting
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

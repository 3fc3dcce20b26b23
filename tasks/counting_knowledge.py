"""Spoken counting that the recipe's paired speech never holds: the knowledge-retention sets.

The stage-3 speech (`spectron_synthetic_counting`) only counts upwards from starts 0..19, so the
numbers spoken are 0..22. The stage-2 text LM (`spectron_number_text`) has read counting up and
down over 0..99. Two spoken sets, synthesised like the training corpus (its 10 training voices in
`validation`, its 4 unseen voices in `validation_unseen_voices`; no `train` examples), ask for
what only the text taught, in words the speech encoder has heard (docs/RECIPE.md, set E2):

| task | prompt -> continuation | the answer needs |
|---|---|---|
| `spectron_counting_down` | "s s-1" -> "s-2 s-3", s in 3..29 | counting down (text) |
| `spectron_counting_past_22` | "s s+1" -> "s+2 s+3", s in 21..26 | successors of 22..28 (text) |

A model whose decoder never read the text (direct initialisation) can only count up inside
0..22, so its exact continuation match on these sets is the baseline; the margin of a model that
started from the stage-2 LM is the retained knowledge.

The transcript-skipping variant (the paper's comparison for its "cross-modal chain of thought")
trains and tests on the same audio with the prompt transcript removed, so the decoder writes the
continuation right after the prefix: `<task>_no_transcript` for the training corpus and for both
sets (`prompt_text` emptied before tokenisation; the audio, the continuation and the ids are the
same).
"""

from __future__ import annotations

import seqio

from spectron_tasks import speech_task
from spectron_tasks.synthetic_counting import SyntheticCountingConfig, make_source, register

TRAINING_CORPUS = "spectron_synthetic_counting"
NO_TRANSCRIPT = "_no_transcript"

COUNTING_DOWN = "spectron_counting_down"
COUNTING_PAST_22 = "spectron_counting_past_22"

CONFIGS = {
    # Seeds differ from the training corpus's (0): other rates, pitches and gains.
    COUNTING_DOWN: SyntheticCountingConfig(
        seed=1,
        num_train=0,
        num_validation=54,
        num_validation_unseen=54,
        min_start=3,
        max_start=29,
        count_step=-1,
    ),
    COUNTING_PAST_22: SyntheticCountingConfig(
        seed=2, num_train=0, num_validation=48, num_validation_unseen=48, min_start=21, max_start=26
    ),
}


@seqio.map_over_dataset
def drop_prompt_text(ex):
    """A raw-example preprocessor: the prompt transcript becomes empty."""
    return {**ex, "prompt_text": ""}


def register_all() -> None:
    """Registers both sets and the transcript-less variants of them and of the training corpus
    (the default front end, target spectrogram and vocabulary)."""
    configs = {TRAINING_CORPUS: SyntheticCountingConfig(), **CONFIGS}
    for name, config in CONFIGS.items():
        register(name, config)
    for name, config in configs.items():
        speech_task.register_speech_task(
            name + NO_TRANSCRIPT, make_source(config), extra_preprocessors=[drop_prompt_text]
        )

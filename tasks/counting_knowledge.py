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
"""

from __future__ import annotations

from spectron_tasks.synthetic_counting import SyntheticCountingConfig, register

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


def register_all() -> None:
    """Registers both sets (the default front end, target spectrogram and vocabulary)."""
    for name, config in CONFIGS.items():
        register(name, config)

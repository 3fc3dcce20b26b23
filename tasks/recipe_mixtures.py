"""seqio mixtures of the training recipe's stages (gin files import this; the package does not).

`spectron_recipe_stage1_asr` (gin/recipe/stage1_encoder_ctc.gin): `spectron_synthetic_counting`
and `spectron_fsdd_counting`, rate 1 each.

Stage 1 reads the `train` split of both: 10 eSpeak NG training voices, and FSDD takes 5-44 of its
6 real speakers (takes 0-4 are `test`, held aside for the WER evaluation). Equal rates, so the
real speech is half of every batch although it has fewer utterances.
"""

from __future__ import annotations

import seqio

import spectron_tasks  # noqa: F401 - registers the tasks the mixtures name

STAGE1_ASR = "spectron_recipe_stage1_asr"


def register() -> None:
    """(Re-)registers the recipe mixtures."""
    if STAGE1_ASR in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(STAGE1_ASR)
    seqio.MixtureRegistry.add(
        STAGE1_ASR, [("spectron_synthetic_counting", 1.0), ("spectron_fsdd_counting", 1.0)]
    )


register()

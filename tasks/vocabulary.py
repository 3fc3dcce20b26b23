"""The default vocabulary: a tiny SentencePiece model shipped in `spectron_jax/assets`.

Built by `scripts/build_tiny_vocab.py` (rerunnable, deterministic for the same input text).
Special ids: pad = 0, eos = 1, unk = 2, bos = 3; byte fallback, so any UTF-8 text encodes.
"""

from __future__ import annotations

import functools
import os

import seqio

import spectron_jax

TINY_SPM_PATH = os.path.join(
    os.path.dirname(os.path.abspath(spectron_jax.__file__)), "assets", "tiny_spm.model"
)
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3


@functools.cache
def default_vocabulary() -> seqio.SentencePieceVocabulary:
    """The shipped tiny SentencePiece vocabulary.

    seqio reads the file at first use (so task registration works before the file exists, as in
    `scripts/build_tiny_vocab.py`); a missing file then fails naming `TINY_SPM_PATH`.
    """
    return seqio.SentencePieceVocabulary(TINY_SPM_PATH)

"""The tasks' default vocabulary: the tiny SentencePiece model shipped in `spectron_jax/assets`.

Built by `scripts/build_tiny_vocab.py` (rerunnable, deterministic for the same input text). The
vocabulary code and the special ids live in `spectron_jax.vocabularies`; a task registered with
another vocabulary must train a model built with the same one (`spectron_jax.data` checks).
"""

from spectron_jax.vocabularies import TINY_SPM_PATH, default_vocabulary

__all__ = ["TINY_SPM_PATH", "default_vocabulary"]

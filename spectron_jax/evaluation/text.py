"""Cutting the model's one text into (prompt transcript, continuation or answer).

The decoder writes the prompt transcript followed by the continuation (or the answer) with no
separator between them [paper: one cross-entropy over the whole transcript]. Where the prompt's
words are known (evaluation, `--transcript` in the CLI) `split_text` cuts the text at its word
alignment with them; otherwise at an estimate from the prompt's duration and a speaking rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spectron_jax.evaluation.metrics import normalize_text

# Typical read-speech rate (LibriSpeech: about 2.7 words/s): the fallback cut of `split_text`.
DEFAULT_WORDS_PER_SECOND = 2.5


def _edit_row(ref: Sequence[str], hyp: Sequence[str]) -> np.ndarray:
    """int[len(hyp) + 1]: word edit distance between `ref` and each prefix hyp[:k]."""
    prev = np.arange(len(hyp) + 1)
    for i, word in enumerate(ref, start=1):
        cur = np.empty_like(prev)
        cur[0] = i
        for k in range(1, len(hyp) + 1):
            cur[k] = min(prev[k] + 1, cur[k - 1] + 1, prev[k - 1] + (hyp[k - 1] != word))
        prev = cur
    return prev


def split_at_reference(words: Sequence[str], prompt: Sequence[str], rest: Sequence[str]) -> int:
    """The cut k of `words` at which words[:k] aligns with `prompt` and words[k:] with `rest`.

    min_k ED(prompt, words[:k]) + ED(rest, words[k:]) equals the edit distance of the whole text
    to prompt + rest, so this is the alignment of the whole text with the whole reference, cut at
    the reference's boundary. Ties go to the earliest cut, so that words the model adds after
    the prompt's (a verbose answer: "it is paris") count as its continuation.
    """
    head = _edit_row(prompt, words)  # ED(prompt, words[:k])
    tail = _edit_row(rest[::-1], words[::-1])[::-1]  # ED(rest, words[k:])
    return int(np.argmin(head + tail))  # argmin takes the first of equal minima


def split_text(
    text: str,
    *,
    prompt_text: str | None = None,
    reference_rest: str | None = None,
    prompt_seconds: float | None = None,
    words_per_second: float = DEFAULT_WORDS_PER_SECOND,
) -> tuple[str, str]:
    """Cuts the model's text into (prompt transcript, continuation or answer).

    With `prompt_text` (the prompt's words) the cut follows the word alignment (see
    `split_at_reference`; `reference_rest` is the reference continuation where known). Without
    it, the first round(prompt_seconds * words_per_second) words are called the transcript: an
    estimate, since the model writes no separator.
    """
    words = text.split()
    if prompt_text is not None:
        norm = [normalize_text(w) for w in words]
        k = split_at_reference(
            norm,
            normalize_text(prompt_text).split(),
            normalize_text(reference_rest or "").split(),
        )
    elif prompt_seconds is not None:
        k = min(len(words), int(round(prompt_seconds * words_per_second)))
    else:
        raise ValueError("split_text needs prompt_text or prompt_seconds")
    return " ".join(words[:k]), " ".join(words[k:])

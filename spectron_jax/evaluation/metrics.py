"""Evaluation metrics of the paper and of our own spectrogram targets (numpy; no model needed).

Text (`normalize_text` is applied to both sides of every text metric):
  - `word_error_rate`, `char_error_rate`: corpus-level WER/CER (jiwer) over normalised text.
  - `qa_match`, `qa_accuracy`: the paper's spoken-QA score: the normalised reference answer occurs
    in the normalised answer text.
  - `word_accuracy`: one hypothesis' 1 - WER, clipped at 0 (the judged ASR figures).
Embeddings:
  - `cosine_similarity`: speaker similarity of two batches of embeddings.
  - `speaker_gap`: how much closer generated speech is to its own prompt's speaker than to
    another speaker's prompt.
Spectrograms (log-mel of `SpectrogramConfig`, log10 units, float[B, T, n_mels] + mask[B, T]):
  - `spectrogram_l1`, `spectrogram_l2`: mean absolute / squared error over valid frames.
  - `mel_cepstral_distortion`: MCD in dB from the DCT of the log-mel, c0 excluded.
  - `dtw_l1`: L1 after dynamic-time-warping alignment of two spectrograms of different lengths.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Sequence

import numpy as np

# ------------------------------------------------------------------------------------------------
# Text.
# ------------------------------------------------------------------------------------------------

# Unicode punctuation (categories P*) and symbols (S*) become spaces, so "U.S." -> "u s" on both
# sides and "rock'n'roll" -> "rock n roll"; ASCII punctuation is listed for speed.
_ASCII_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_text(text: str) -> str:
    """The text normalisation of every metric here.

    Steps: Unicode NFKC (full-width and ligature forms to plain ones), lower-case (`casefold`,
    so "Straße" -> "strasse"), strip accents
    (NFKD, combining marks dropped: "São Paulo" -> "sao paulo", "Beyoncé" -> "beyonce"),
    punctuation and symbols to spaces, whitespace (CR, tabs, runs of spaces) collapsed to one
    space, ends stripped. Letters without a decomposition (e.g. "ø", "ł") are kept as they are.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = text.translate(_ASCII_PUNCT)
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(text.split())


def _normalised_pairs(
    references: Sequence[str], hypotheses: Sequence[str]
) -> tuple[list[str], list[str]]:
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError("pass lists of strings (one per example), not a single string")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    if not any(refs):
        raise ValueError("every reference is empty after normalisation: the rate is undefined")
    return refs, hyps


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: (substitutions + deletions + insertions) / reference words, all examples pooled.

    Both sides go through `normalize_text`. An example with an empty reference contributes its
    hypothesis words as insertions (jiwer's convention).
    """
    import jiwer

    refs, hyps = _normalised_pairs(references, hypotheses)
    out = jiwer.process_words(refs, hyps)
    errors = out.substitutions + out.deletions + out.insertions
    return errors / max(1, sum(len(r.split()) for r in refs))


def char_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER over normalised text (spaces count as characters, as in jiwer)."""
    import jiwer

    refs, hyps = _normalised_pairs(references, hypotheses)
    out = jiwer.process_characters(refs, hyps)
    errors = out.substitutions + out.deletions + out.insertions
    return errors / max(1, sum(len(r) for r in refs))


def qa_match(answer: str, reference: str, *, whole_words: bool = False) -> bool:
    """The paper's spoken-QA criterion: the normalised reference occurs in the normalised answer.

    A plain substring test by default, as in the paper ("paris" is found in "the capital is
    paris."); `whole_words=True` also requires word boundaries, so that "art" is not found in
    "party". An empty reference never matches.
    """
    ref, ans = normalize_text(reference), normalize_text(answer)
    if not ref:
        return False
    return f" {ref} " in f" {ans} " if whole_words else ref in ans


def qa_accuracy(
    answers: Sequence[str], references: Sequence[str], *, whole_words: bool = False
) -> float:
    """Fraction of examples whose answer `qa_match`es its reference."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    if not answers:
        raise ValueError("no examples")
    return float(
        np.mean(
            [
                qa_match(a, r, whole_words=whole_words)
                for a, r in zip(answers, references, strict=True)
            ]
        )
    )


def _words(text_or_words: str | Sequence[str]) -> list[str]:
    if isinstance(text_or_words, str):
        return normalize_text(text_or_words).split()
    return normalize_text(" ".join(text_or_words)).split()


def word_accuracy(
    reference_words: str | Sequence[str], hypothesis_words: str | Sequence[str]
) -> float:
    """1 - WER of one hypothesis, clipped at 0: max(0, 1 - (S + D + I) / N).

    S, D, I are the substitutions, deletions and insertions of the word-level edit distance
    (Levenshtein, unit costs) and N the reference's word count, after `normalize_text` of both
    sides (a string, or a sequence of words joined by spaces). 1 = every word right, 0 = at
    least as many errors as reference words (the clip keeps a babbling hypothesis from going
    negative, so means over examples stay in [0, 1]). An empty reference scores 1 against an
    empty hypothesis and 0 against any other.
    """
    ref, hyp = _words(reference_words), _words(hypothesis_words)
    if not ref:
        return 0.0 if hyp else 1.0
    # One row of the edit-distance table at a time: row[j] = distance(ref[:i], hyp[:j]).
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return max(0.0, 1.0 - row[-1] / len(ref))


# ------------------------------------------------------------------------------------------------
# Embeddings.
# ------------------------------------------------------------------------------------------------


def cosine_similarity(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """float[..., D], float[..., D] -> float32[...]: a.b / (|a| |b|); 0 where either is zero."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embedding sizes differ: {a.shape} vs {b.shape}")
    dot = np.sum(a * b, axis=-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (dot / np.maximum(norms, eps)).astype(np.float32)


def speaker_gap(sim_own: Sequence[float], sim_other: Sequence[float]) -> float:
    """mean(sim_own - sim_other) over the pairs where both are finite (NaN where none is).

    `sim_own[i]`: cosine similarity of example i's prompt speaker to its generated speech;
    `sim_other[i]`: of the same prompt to another speaker's generated speech. The gap is the
    part of the similarity owed to the speaker rather than to what all speech (and the vocoder's
    sound) shares: 0 = the generation keeps nothing of its prompt's voice, > 0 = it does.
    """
    own = np.asarray(sim_own, np.float64)
    other = np.asarray(sim_other, np.float64)
    if own.shape != other.shape or own.ndim != 1:
        raise ValueError(f"expected two float[N] of one length, got {own.shape}, {other.shape}")
    both = np.isfinite(own) & np.isfinite(other)
    return float(np.mean(own[both] - other[both])) if both.any() else float("nan")


# ------------------------------------------------------------------------------------------------
# Spectrograms.
# ------------------------------------------------------------------------------------------------


def _masked_mean(per_frame: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """float[B, T], mask[B, T] -> float32[B]: mean over valid frames (NaN where none is valid)."""
    if mask is None:
        mask = np.ones(per_frame.shape, np.float64)
    mask = np.asarray(mask, np.float64)
    if mask.shape != per_frame.shape:
        raise ValueError(f"mask shape {mask.shape} != frames shape {per_frame.shape}")
    count = mask.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((per_frame * mask).sum(-1) / count).astype(np.float32)


def _check_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, np.float64)
    target = np.asarray(target, np.float64)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"expected two float[B, T, n_mels] of one shape, got {pred.shape} and {target.shape}"
            " (use dtw_l1 for different lengths)"
        )
    return pred, target


def spectrogram_l1(pred, target, mask=None) -> np.ndarray:
    """Mean |pred - target| over mel bins and valid frames: float[B, T, M] x2, [B, T] -> [B]."""
    pred, target = _check_pair(pred, target)
    return _masked_mean(np.abs(pred - target).mean(-1), mask)


def spectrogram_l2(pred, target, mask=None) -> np.ndarray:
    """Mean squared error over mel bins and valid frames (as the L2 training term): -> [B]."""
    pred, target = _check_pair(pred, target)
    return _masked_mean(((pred - target) ** 2).mean(-1), mask)


def _dct_matrix(n: int) -> np.ndarray:
    """float64[n, n] orthonormal DCT-II: cepstrum = log_spectrum @ matrix."""
    k = np.arange(n)[None, :]
    m = np.arange(n)[:, None]
    matrix = np.cos(np.pi * k * (2 * m + 1) / (2 * n)) * np.sqrt(2.0 / n)
    matrix[:, 0] /= np.sqrt(2.0)
    return matrix


def mel_cepstrum(log_mel: np.ndarray, log_base: float = 10.0) -> np.ndarray:
    """float[..., n_mels] log-mel (base `log_base`) -> float64[..., n_mels] mel cepstrum.

    Orthonormal DCT-II of the natural-log mel spectrum (the MFCC recipe without liftering).
    """
    log_mel = np.asarray(log_mel, np.float64) * np.log(log_base)
    return log_mel @ _dct_matrix(log_mel.shape[-1])


def mel_cepstral_distortion(
    pred, target, mask=None, *, num_coefficients: int = 13, log_base: float = 10.0
) -> np.ndarray:
    """MCD in dB per example: float[B, T, M] x2, [B, T] -> float32[B].

    MCD = (10 / ln 10) * sqrt(2 * sum_{d=1..K} (c_d - c'_d)^2) per frame, averaged over valid
    frames, where c = `mel_cepstrum` of each log-mel and K = `num_coefficients`. c0 (the frame's
    overall log-energy) is excluded, as is usual, so a global gain change costs nothing. The
    frames are compared one to one (no alignment): use it where lengths match, e.g. teacher-forced
    or fixed-duration generations.
    """
    pred, target = _check_pair(pred, target)
    if not 1 <= num_coefficients < pred.shape[-1]:
        raise ValueError(f"num_coefficients={num_coefficients} must be in [1, {pred.shape[-1]})")
    diff = mel_cepstrum(pred, log_base) - mel_cepstrum(target, log_base)
    diff = diff[..., 1 : num_coefficients + 1]
    per_frame = (10.0 / np.log(10.0)) * np.sqrt(2.0 * np.sum(diff**2, axis=-1))
    return _masked_mean(per_frame, mask)


def dtw_l1(a: np.ndarray, b: np.ndarray) -> float:
    """L1 between float[T1, M] and float[T2, M] after dynamic time warping.

    Local cost: mean |a_i - b_j| over mel bins. Steps (1, 0), (0, 1), (1, 1), each costing the
    cost of the cell entered; the path runs from (0, 0) to (T1 - 1, T2 - 1). Returns the path's
    total cost divided by its length (cells visited), so it stays in log-mel units and equals
    `spectrogram_l1` for identical lengths when the diagonal is optimal. O(T1 * T2) time and memory.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(
            f"expected non-empty float[T1, M] and float[T2, M], got {a.shape}, {b.shape}"
        )
    cost = np.abs(a[:, None, :] - b[None, :, :]).mean(-1)  # [T1, T2]
    t1, t2 = cost.shape
    total = np.full((t1 + 1, t2 + 1), np.inf)
    steps = np.zeros((t1 + 1, t2 + 1), np.int64)  # Path length to each cell (tie-break: shorter).
    total[0, 0] = 0.0
    for i in range(1, t1 + 1):
        # Diagonal and vertical moves vectorised over j; horizontal moves need a running scan.
        diag, up = total[i - 1, :-1], total[i - 1, 1:]
        best = np.minimum(diag, up)
        from_diag = diag <= up
        prev_steps = np.where(from_diag, steps[i - 1, :-1], steps[i - 1, 1:])
        row, row_steps = total[i], steps[i]
        for j in range(1, t2 + 1):
            c, n = best[j - 1], prev_steps[j - 1]
            if row[j - 1] < c:
                c, n = row[j - 1], row_steps[j - 1]
            row[j] = c + cost[i - 1, j - 1]
            row_steps[j] = n + 1
    return float(total[t1, t2] / steps[t1, t2])

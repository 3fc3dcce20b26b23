"""Metrics on hand-made cases whose answers are worked out by hand in the comments."""

import csv

import numpy as np
import pytest

from spectron_jax.evaluation import metrics

# ------------------------------------------------------------------------------------------------
# Text.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("  Hello,   World!\r\n", "hello world"),
        ("São Paulo", "sao paulo"),
        ("Beyoncé", "beyonce"),
        ("Bill Skarsgård", "bill skarsgard"),
        ("Brasília ", "brasilia"),
        ("ＦＵＬＬ width ﬁne", "full width fine"),  # NFKC: full-width letters, the fi ligature.
        ("Straße", "strasse"),
        ("U.S.A. — “quoted”\t(text)", "u s a quoted text"),  # Unicode dash and quotes too.
        ("Destiny's Child", "destiny s child"),
        ("¿Qué?", "que"),
    ],
)
def test_normalize_text(raw, normalised):
    assert metrics.normalize_text(raw) == normalised


def test_word_error_rate_counts_by_hand():
    # "the cat sat on the mat" vs "the cat sit on mat": 1 substitution (sat/sit) + 1 deletion
    # (the) = 2 errors / 6 words. Second pair: "hello world" vs "hello big world": 1 insertion.
    refs = ["The cat sat on the mat.", "Hello, world"]
    hyps = ["the cat SIT on mat", "hello big world"]
    assert metrics.word_error_rate(refs, hyps) == pytest.approx(3 / 8)
    assert metrics.word_error_rate(refs[:1], hyps[:1]) == pytest.approx(2 / 6)
    # Normalisation makes case, punctuation and accents free.
    assert metrics.word_error_rate(["Café au lait!"], ["cafe AU lait"]) == 0.0
    # An empty hypothesis deletes every word.
    assert metrics.word_error_rate(["one two three"], [""]) == 1.0


def test_char_error_rate_counts_by_hand():
    # "abcd" -> "abxd": 1 substitution / 4; "ab cd" -> "abcd": 1 deletion (the space) / 5.
    assert metrics.char_error_rate(["abcd"], ["abxd"]) == pytest.approx(1 / 4)
    assert metrics.char_error_rate(["abcd", "ab cd"], ["abxd", "abcd"]) == pytest.approx(2 / 9)


def test_error_rate_input_errors():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        metrics.word_error_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        metrics.word_error_rate(["", "!!"], ["a", "b"])
    with pytest.raises(TypeError, match="lists"):
        metrics.word_error_rate("a b", "a b")


def test_qa_match_paper_substring_rule():
    assert metrics.qa_match("The capital of France is Paris.", "Paris")
    assert metrics.qa_match("I think it's SAO PAULO, Brazil", "São Paulo")
    assert metrics.qa_match("beyonce knowles was the lead singer", "Beyoncé")
    assert metrics.qa_match("It was George  Washington!", "George Washington ")
    assert not metrics.qa_match("It was Washington", "George Washington")
    assert not metrics.qa_match("anything", "  ")  # An empty reference never matches.
    # Plain substring (the paper) vs word boundaries.
    assert metrics.qa_match("let's party", "art")
    assert not metrics.qa_match("let's party", "art", whole_words=True)
    assert metrics.qa_match("modern art.", "Art", whole_words=True)


def test_qa_accuracy():
    answers = ["paris", "it is london", "no idea"]
    references = ["Paris", "London", "Berlin"]
    assert metrics.qa_accuracy(answers, references) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="3 answers but 2 references"):
        metrics.qa_accuracy(answers, references[:2])


@pytest.mark.needs_shared_data
def test_qa_match_on_llama_questions_answers(shared_data):
    """Every LLaMA-Questions answer (CRLF, trailing spaces, non-ASCII) matches a sentence that
    contains its ASCII-folded, lower-cased form, and not an unrelated answer."""
    path = shared_data / "llama_questions/llama_questions_300.tsv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    answers = [row["Answer"] for row in rows]
    assert len(answers) == 300
    non_ascii = [a for a in answers if not a.isascii()]
    assert "São Paulo" in non_ascii and "Beyoncé" in non_ascii
    for answer in answers:
        spoken = f"well, I believe the answer is {metrics.normalize_text(answer).upper()} indeed"
        assert metrics.qa_match(spoken, answer), answer
    assert not metrics.qa_match("the answer is Paris", "São Paulo")


# ------------------------------------------------------------------------------------------------
# Embeddings.
# ------------------------------------------------------------------------------------------------


def test_cosine_similarity_known_values():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [0.0, 0.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0], [-6.0, -8.0], [1.0, 0.0]])
    np.testing.assert_allclose(metrics.cosine_similarity(a, b), [0.0, 1.0, -1.0, 0.0], atol=1e-7)
    # 60 degrees apart -> 0.5; extra batch dimensions are kept.
    c = np.array([[[1.0, 0.0]], [[0.5, np.sqrt(3) / 2]]])
    assert metrics.cosine_similarity(c[0], c[1]) == pytest.approx([0.5])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 3, 16)), rng.normal(size=(4, 3, 16))
    expected = [
        [x[i, j] @ y[i, j] / np.linalg.norm(x[i, j]) / np.linalg.norm(y[i, j]) for j in range(3)]
        for i in range(4)
    ]
    np.testing.assert_allclose(metrics.cosine_similarity(x, y), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="sizes differ"):
        metrics.cosine_similarity(np.ones((2, 3)), np.ones((2, 4)))


# ------------------------------------------------------------------------------------------------
# Spectrograms.
# ------------------------------------------------------------------------------------------------


def test_spectrogram_l1_l2_over_valid_frames():
    pred = np.zeros((2, 3, 4))
    target = np.zeros((2, 3, 4))
    target[0, 0] = 1.0  # Frame 0 of example 0: |diff| 1 in every bin.
    target[0, 1, :2] = 2.0  # Frame 1: 2 in half the bins -> L1 1, L2 2.
    target[0, 2] = 100.0  # Padding: must not count.
    target[1] = -3.0
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    np.testing.assert_allclose(metrics.spectrogram_l1(pred, target, mask), [1.0, 3.0])
    np.testing.assert_allclose(metrics.spectrogram_l2(pred, target, mask), [1.5, 9.0])
    np.testing.assert_allclose(metrics.spectrogram_l1(pred, target)[1], 3.0)  # No mask: all.
    with pytest.raises(ValueError, match="dtw_l1"):
        metrics.spectrogram_l1(pred, target[:, :2])


def test_mel_cepstral_distortion_known_values():
    rng = np.random.default_rng(0)
    target = rng.normal(-2, 1, size=(1, 5, 20))
    mask = np.ones((1, 5))
    assert metrics.mel_cepstral_distortion(target, target, mask) == pytest.approx([0.0])
    # A gain (constant over mel bins) only moves c0, which MCD excludes.
    assert metrics.mel_cepstral_distortion(target + 0.7, target, mask) == pytest.approx(
        [0.0], abs=1e-6
    )
    # One cosine of the DCT basis: a log10 difference of a * cos(pi * d * (2m + 1) / 2M) has an
    # orthonormal-DCT coefficient a * ln(10) * sqrt(M / 2) at d and 0 elsewhere.
    m_bins, d, a = 20, 3, 0.1
    basis = np.cos(np.pi * d * (2 * np.arange(m_bins) + 1) / (2 * m_bins))
    c_d = a * np.log(10) * np.sqrt(m_bins / 2)
    expected = 10 / np.log(10) * np.sqrt(2) * c_d
    got = metrics.mel_cepstral_distortion(target + a * basis, target, mask)
    assert got == pytest.approx([expected], rel=1e-6)
    # Beyond the kept coefficients it is invisible.
    assert metrics.mel_cepstral_distortion(
        target + a * basis, target, mask, num_coefficients=2
    ) == pytest.approx([0.0], abs=1e-6)
    # Masked frames do not count.
    noisy = target.copy()
    noisy[0, 4] += rng.normal(size=20)
    mask[0, 4] = 0
    assert metrics.mel_cepstral_distortion(noisy, target, mask) == pytest.approx([0.0], abs=1e-6)


def test_mel_cepstrum_matches_scipy_dct():
    scipy_fft = pytest.importorskip("scipy.fft")
    x = np.random.default_rng(1).normal(size=(3, 16))
    np.testing.assert_allclose(
        metrics.mel_cepstrum(x, log_base=np.e),
        scipy_fft.dct(x, type=2, norm="ortho", axis=-1),
        atol=1e-12,
    )


def test_dtw_l1_known_alignments():
    a = np.array([[0.0], [1.0], [2.0]])
    # The same contour with frame 1 held twice: the warped distance is 0.
    assert metrics.dtw_l1(a, np.array([[0.0], [1.0], [1.0], [2.0]])) == 0.0
    # Equal lengths with the diagonal optimal: equals the plain L1.
    b = a + 0.5
    assert metrics.dtw_l1(a, b) == pytest.approx(float(metrics.spectrogram_l1(a[None], b[None])[0]))
    # By hand: a = [0, 1], b = [0, 5, 1]; cost rows [0, 5, 1] and [1, 4, 0]. Paths to (1, 2):
    # (0,0)(1,1)(1,2) = 0 + 4 + 0 = 4 over 3 cells; (0,0)(0,1)(1,2) = 5; (0,0)(1,0)(1,1)(1,2) = 5;
    # (0,0)(0,1)(0,2)(1,2) = 6. Best: 4 / 3.
    assert metrics.dtw_l1(np.array([[0.0], [1.0]]), np.array([[0.0], [5.0], [1.0]])) == (
        pytest.approx(4 / 3)
    )
    # Symmetric in its arguments, and bins are averaged (two bins of |1| and |3| -> 2).
    assert metrics.dtw_l1(np.array([[0.0, 0.0]]), np.array([[1.0, -3.0]])) == 2.0
    x, y = (
        np.random.default_rng(2).normal(size=(2, 7, 5)),
        np.random.default_rng(3).normal(size=(9, 5)),
    )
    assert metrics.dtw_l1(x[0], y) == pytest.approx(metrics.dtw_l1(y, x[0]))
    with pytest.raises(ValueError, match="non-empty"):
        metrics.dtw_l1(np.zeros((0, 5)), y)

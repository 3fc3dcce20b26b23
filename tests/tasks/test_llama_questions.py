"""spectron_llama_questions: TSV quirks (CRLF, trailing spaces, non-ASCII), contract, QA layout."""

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf
from task_testing import check_contract

from spectron_jax.audio.spectrogram import SpectrogramConfig, log_mel_numpy
from spectron_tasks import llama_questions, vocabulary

CONFIG = SpectrogramConfig()


def _write_fake(folder, rows):
    """A folder with the LLaMA-Questions layout; rows = [(question, answer, wav name)]."""
    rng = np.random.default_rng(0)
    lines = ["Questions\tAnswer\tWav Filename"]
    for q, a, wav in rows:
        sf.write(folder / wav, 0.1 * rng.standard_normal(8000).astype(np.float32), 16000)
        lines.append(f"{q}\t{a}\t{wav}")
    (folder / llama_questions.TSV_NAME).write_bytes(("\r\n".join(lines)).encode("utf-8"))


def test_parses_crlf_trailing_spaces_and_non_ascii(tmp_path):
    _write_fake(
        tmp_path,
        [("What is the capital of Brazil? ", "Brasília ", "1.wav"), ("Who? ", "Beyoncé", "2.wav")],
    )
    questions = llama_questions.read_questions(str(tmp_path))
    assert [(q.question, q.answer, q.id) for q in questions] == [
        ("What is the capital of Brazil?", "Brasília", "llama_questions-1"),
        ("Who?", "Beyoncé", "llama_questions-2"),
    ]


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        llama_questions.read_questions(str(missing))
    task = llama_questions.register("test_llama_questions_missing", str(missing))
    with pytest.raises(FileNotFoundError, match="llama_questions_300.tsv"):
        next(task.get_dataset(None, split="test", shuffle=False).as_numpy_iterator())


def test_real_set_reads_300_questions(shared_data):
    questions = llama_questions.read_questions(str(shared_data / "llama_questions"))
    assert len(questions) == 300
    assert len({q.id for q in questions}) == 300
    for q in questions:
        assert q.question and q.answer and "\r" not in q.answer + q.question
        assert q.answer == q.answer.strip() and q.question == q.question.strip()
    answers = {q.answer for q in questions}
    assert {"Brasília", "São Paulo", "Beyoncé"} <= answers
    # Non-ASCII answers survive the tiny vocabulary (byte fallback) unchanged.
    sp = spm.SentencePieceProcessor(model_file=vocabulary.TINY_SPM_PATH)
    for answer in ("Brasília", "São Paulo", "Bill Skarsgård"):
        assert sp.decode(sp.encode(answer)) == answer
        assert sp.unk_id() not in sp.encode(answer)


def test_task_examples(shared_data):
    folder = shared_data / "llama_questions"
    task = llama_questions.register("test_llama_questions", str(folder))
    questions = llama_questions.read_questions(str(folder))
    ds = task.get_dataset(None, split="test", shuffle=False).take(3)
    sp = spm.SentencePieceProcessor(model_file=vocabulary.TINY_SPM_PATH)
    for q, ex in zip(questions, ds.as_numpy_iterator(), strict=False):
        check_contract(ex, n_features=CONFIG.n_mels)
        assert ex["prompt_text"].decode() == q.question
        assert ex["continuation_text"].decode() == q.answer
        assert ex["prompt_transcript"].tolist() == sp.encode(q.question)
        assert ex["continuation_transcript"].tolist() == sp.encode(q.answer)
        assert ex["continuation_length"] == 0 and ex["continuation_frames"].shape == (0, 80)
        audio, rate = sf.read(q.wav_path, dtype="float32")
        assert rate == 16000
        np.testing.assert_allclose(ex["prompt_features"], log_mel_numpy(audio, CONFIG), atol=1e-3)

"""`spectron_llama_questions`: the 300 spoken questions of LLaMA-Questions (the paper's QA set).

Layout (`../shared/data/llama_questions` or any folder like it): `N.wav` (16 kHz mono) and
`llama_questions_300.tsv` (UTF-8, CRLF, header "Questions<TAB>Answer<TAB>Wav Filename", trailing
spaces in some fields, non-ASCII answers such as "Brasília"). Example: prompt = the whole question
audio, prompt_transcript = the question, continuation_transcript = the answer, no continuation
frames (T_c = 0). One split: `test`.
"""

from __future__ import annotations

import dataclasses
import os
import unicodedata

import numpy as np

TSV_NAME = "llama_questions_300.tsv"
DEFAULT_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "shared",
    "data",
    "llama_questions",
)


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    answer: str
    wav_path: str
    id: str


def _missing_error(data_dir: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"LLaMA-Questions not found: expected {what} in {data_dir!r} (the layout of "
        f"../shared/data/llama_questions: N.wav files and {TSV_NAME}); pass data_dir=..."
    )


def read_questions(data_dir: str = DEFAULT_DIR) -> list[Question]:
    """Parses the TSV in file order: CRLF and trailing spaces stripped, text NFC-normalised."""
    tsv = os.path.join(data_dir, TSV_NAME)
    if not os.path.isfile(tsv):
        raise _missing_error(data_dir, TSV_NAME)
    with open(tsv, encoding="utf-8-sig", newline="") as f:
        lines = f.read().splitlines()  # Handles \r\n, \n and a missing final newline.
    questions = []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [unicodedata.normalize("NFC", x.strip()) for x in line.split("\t")]
        if len(fields) != 3:
            raise ValueError(f"{tsv}:{line_no}: expected 3 tab-separated fields, got {fields}")
        question, answer, wav = fields
        wav_path = os.path.join(data_dir, wav)
        if not os.path.isfile(wav_path):
            raise _missing_error(data_dir, wav)
        questions.append(Question(question, answer, wav_path, f"llama_questions-{wav[:-4]}"))
    return questions


def make_source(data_dir: str = DEFAULT_DIR, sample_rate: int = 16_000):
    """A seqio DataSource of raw examples (see `speech_task`); split `test`."""
    import seqio
    import tensorflow as tf

    from spectron_jax.audio.io import load_audio
    from spectron_tasks import speech_task

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        del shuffle_files, seed
        if split != "test":
            raise ValueError(f"LLaMA-Questions has only a 'test' split, not {split!r}")
        questions = read_questions(data_dir)

        def generate():
            for q in questions:
                audio, _ = load_audio(q.wav_path, sample_rate)
                yield {
                    "prompt_audio": audio,
                    "continuation_audio": np.zeros(0, np.float32),
                    "prompt_text": q.question,
                    "continuation_text": q.answer,
                    "speaker_id": "",
                    "id": q.id,
                }

        return tf.data.Dataset.from_generator(
            generate, output_signature=speech_task.raw_output_signature()
        )

    return seqio.FunctionDataSource(dataset_fn, splits=("test",))


def register(
    name: str = "spectron_llama_questions",
    data_dir: str = DEFAULT_DIR,
    *,
    front_end=None,
    target_config=None,
    vocabulary=None,
):
    """Registers the spoken-QA task; the folder is read only when the dataset is built."""
    import spectron_jax.evaluation.seqio_metrics as seqio_metrics
    from spectron_jax.audio.spectrogram import SpectrogramConfig
    from spectron_tasks import speech_task

    target_config = target_config or SpectrogramConfig()
    return speech_task.register_speech_task(
        name,
        make_source(data_dir, target_config.sample_rate),
        front_end=front_end,
        target_config=target_config,
        vocabulary=vocabulary,
        metric_fns=(seqio_metrics.qa_metrics,),
    )

"""`spectron_fsdd_counting`: real human counting, joined from Free Spoken Digit Dataset recordings.

FSDD (`../shared/data/fsdd` or any folder with its layout) holds `recordings/{digit}_{speaker}_
{take}.wav` at 8 kHz: 6 speakers x 10 digits x 50 takes. An example is one speaker counting a run
of consecutive digits ("three four | five six seven"), each digit a different recording of that
speaker, joined with short pauses and resampled to the target rate. The prompt is the first
`prompt_words` digits, the continuation the rest, so the split point is exact.

Splits follow FSDD's own: takes 0-4 are `test`, takes 5-49 are `train`.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from spectron_tasks.synthetic_counting import number_words

SPLITS = ("train", "test")
TEST_TAKES = range(0, 5)
DEFAULT_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "shared",
    "data",
    "fsdd",
)


@dataclasses.dataclass(frozen=True)
class FsddCountingConfig:
    """Attributes:

    seed: every example is a function of (seed, split, index).
    num_train, num_test: examples per split.
    prompt_words: digits in the prompt.
    min_continuation_words, max_continuation_words: digits in the continuation.
    pause_s: range of the silence between digits.
    """

    seed: int = 0
    num_train: int = 2000
    num_test: int = 200
    prompt_words: int = 2
    min_continuation_words: int = 2
    max_continuation_words: int = 4
    pause_s: tuple[float, float] = (0.05, 0.2)

    def __post_init__(self):
        if self.prompt_words + self.max_continuation_words > 10:
            raise ValueError("A counting run of digits has at most 10 numbers (zero..nine)")

    def num_examples(self, split: str) -> int:
        return {"train": self.num_train, "test": self.num_test}[split]


def index_recordings(data_dir: str) -> dict[tuple[str, int], dict[str, list[str]]]:
    """{(speaker, digit): {split: [paths by take]}}; a clear error when the folder is absent."""
    rec_dir = os.path.join(data_dir, "recordings")
    if not os.path.isdir(rec_dir):
        raise FileNotFoundError(
            f"Free Spoken Digit Dataset not found: expected {rec_dir!r} holding "
            "{digit}_{speaker}_{take}.wav files (the layout of ../shared/data/fsdd); "
            "pass data_dir=... to spectron_tasks.fsdd_counting.register"
        )
    index: dict[tuple[str, int], dict[str, list[tuple[int, str]]]] = {}
    for name in os.listdir(rec_dir):
        stem, ext = os.path.splitext(name)
        parts = stem.split("_")
        if ext.lower() != ".wav" or len(parts) != 3 or not parts[0].isdigit():
            continue
        digit, speaker, take = int(parts[0]), parts[1], int(parts[2])
        split = "test" if take in TEST_TAKES else "train"
        entry = index.setdefault((speaker, digit), {s: [] for s in SPLITS})
        entry[split].append((take, os.path.join(rec_dir, name)))
    if not index:
        raise FileNotFoundError(f"No {{digit}}_{{speaker}}_{{take}}.wav files in {rec_dir!r}")
    return {k: {s: [p for _, p in sorted(v[s])] for s in SPLITS} for k, v in index.items()}


@functools.lru_cache(maxsize=4096)
def _load(path: str, sample_rate: int) -> np.ndarray:
    from spectron_jax.audio.io import load_audio

    return load_audio(path, sample_rate)[0]


def plan_split(config: FsddCountingConfig, split: str, data_dir: str) -> list[dict]:
    """Examples of a split: speaker, digits and the recording of each digit, before loading."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; FSDD counting has {SPLITS}")
    index = index_recordings(data_dir)
    speakers = sorted({s for s, _ in index})
    rng = np.random.default_rng([config.seed, SPLITS.index(split)])
    plan = []
    for i in range(config.num_examples(split)):
        speaker = speakers[int(rng.integers(len(speakers)))]
        n_cont = int(rng.integers(config.min_continuation_words, config.max_continuation_words + 1))
        length = config.prompt_words + n_cont
        start = int(rng.integers(0, 10 - length + 1))
        digits = list(range(start, start + length))
        paths = []
        for d in digits:
            takes = index.get((speaker, d), {}).get(split, [])
            if not takes:
                raise FileNotFoundError(f"No {split} recording of digit {d} by {speaker!r}")
            paths.append(takes[int(rng.integers(len(takes)))])
        plan.append(
            {
                "id": f"fsdd_counting-{split}-{i:06d}",
                "speaker_id": speaker,
                "digits": digits,
                "paths": paths,
                "pauses_s": rng.uniform(*config.pause_s, size=length).tolist(),
            }
        )
    return plan


def build_example(ex: dict, config: FsddCountingConfig, sample_rate: int) -> dict:
    """Loads and joins the recordings of one planned example into a raw example."""
    segments = []
    for path, pause in zip(ex["paths"], ex["pauses_s"], strict=True):
        silence = np.zeros(int(round(pause * sample_rate)), np.float32)
        segments.append(np.concatenate([_load(path, sample_rate), silence]))
    k = config.prompt_words
    return {
        "prompt_audio": np.concatenate(segments[:k]),
        "continuation_audio": np.concatenate(segments[k:]),
        "prompt_text": " ".join(number_words(d) for d in ex["digits"][:k]),
        "continuation_text": " ".join(number_words(d) for d in ex["digits"][k:]),
        "speaker_id": ex["speaker_id"],
        "id": ex["id"],
    }


def make_source(
    config: FsddCountingConfig | None = None,
    data_dir: str = DEFAULT_DIR,
    sample_rate: int = 16_000,
):
    """A seqio DataSource of raw examples (see `speech_task`); splits `train` and `test`."""
    import seqio
    import tensorflow as tf

    from spectron_tasks import speech_task

    config = config or FsddCountingConfig()

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        del shuffle_files, seed
        plan = plan_split(config, split, data_dir)  # Raises here when the folder is absent.

        def generate():
            for ex in plan:
                yield build_example(ex, config, sample_rate)

        return tf.data.Dataset.from_generator(
            generate, output_signature=speech_task.raw_output_signature()
        )

    return seqio.FunctionDataSource(
        dataset_fn, splits=SPLITS, num_input_examples={s: config.num_examples(s) for s in SPLITS}
    )


def register(
    name: str = "spectron_fsdd_counting",
    config: FsddCountingConfig | None = None,
    data_dir: str = DEFAULT_DIR,
    *,
    front_end=None,
    target_config=None,
    vocabulary=None,
):
    """Registers an FSDD counting task; the folder is read only when a dataset is built."""
    from spectron_jax.audio.spectrogram import SpectrogramConfig
    from spectron_tasks import speech_task

    target_config = target_config or SpectrogramConfig()
    return speech_task.register_speech_task(
        name,
        make_source(config, data_dir, target_config.sample_rate),
        front_end=front_end,
        target_config=target_config,
        vocabulary=vocabulary,
    )

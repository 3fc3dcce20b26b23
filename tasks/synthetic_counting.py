"""`spectron_synthetic_counting`: counting utterances synthesised offline with eSpeak NG.

The embedded default task: "four five | six seven", the prompt being the first `prompt_words`
numbers and the continuation the next `min_continuation_words`..`max_continuation_words` numbers
(2 by default: a fixed length, so the end of the continuation is predictable and a free-running
transcript can match exactly), in one of 10 training voices
(variants of eSpeak NG's English voices) with per-utterance rate, pitch, pitch range, gain and
pause. Prompt and continuation are synthesised as two segments and joined, so the split point is
exact with no aligner. The recognition target is the prompt's words; the continuation's words are
the text continuation the model must predict.

Splits: `train`, `validation` (training voices, other utterances) and `validation_unseen_voices`
(voices never used in training). Everything is a function of `SyntheticCountingConfig` (seed
included): the first use synthesises every split into the cache
(`$SPECTRON_CACHE_DIR`, default `~/.cache/spectron_jax`) as int16 npz + JSON, later uses read it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent import futures

import numpy as np

from spectron_jax.audio.io import resample
from spectron_tasks import espeak

CACHE_VERSION = 1
# Utterances per eSpeak process; part of the cache key, since eSpeak's output depends on it.
SYNTHESIS_CHUNK = 500
SPLITS = ("train", "validation", "validation_unseen_voices")

# Voices whose output is reproducible: eSpeak NG's "breath" variants (f2, f3, f5) are not (their
# noise source differs between processes), so they are left out.
TRAIN_VOICES = (
    "en-us",
    "en",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-us-nyc",
    "en+f1",
    "en-us+f4",
    "en-us+m3",
    "en+m7",
)
# Accents and variants absent from TRAIN_VOICES.
UNSEEN_VOICES = ("en-gb-x-gbclan", "en-gb-x-gbcwmd", "en+m5", "en-us+steph")

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0..99 -> English words ("twenty one")."""
    if not 0 <= n <= 99:
        raise ValueError(f"number_words supports 0..99, got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]} {_ONES[ones]}"


def default_cache_dir() -> str:
    return os.environ.get(
        "SPECTRON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "spectron_jax")
    )


@dataclasses.dataclass(frozen=True)
class SyntheticCountingConfig:
    """Everything that determines the synthetic corpus (and its cache key).

    Attributes:
      seed: corpus seed; every utterance is a function of (seed, split, index).
      num_train, num_validation, num_validation_unseen: utterances per split.
      min_start, max_start: the first number is drawn from min_start..max_start.
      count_step: +1 counts up ("four five six"), -1 counts down ("six five four").
      prompt_words: numbers in the prompt.
      min_continuation_words, max_continuation_words: numbers in the continuation.
      train_voices, unseen_voices: eSpeak NG voice names (disjoint).
      rate_wpm, pitch, pitch_range: inclusive ranges of eSpeak's rate (words/min), base pitch
        and pitch variation (0-100).
      gain_db: inclusive range of the utterance gain.
      pause_s: range of the silence added at the end of the prompt segment.
      sample_rate: output rate (the target spectrogram's rate).
    """

    seed: int = 0
    num_train: int = 3000
    num_validation: int = 200
    num_validation_unseen: int = 200
    max_start: int = 19
    min_start: int = 0
    count_step: int = 1
    prompt_words: int = 2
    min_continuation_words: int = 2
    max_continuation_words: int = 2
    train_voices: tuple[str, ...] = TRAIN_VOICES
    unseen_voices: tuple[str, ...] = UNSEEN_VOICES
    rate_wpm: tuple[int, int] = (140, 210)
    pitch: tuple[int, int] = (25, 75)
    pitch_range: tuple[int, int] = (20, 80)
    gain_db: tuple[float, float] = (-12.0, 0.0)
    pause_s: tuple[float, float] = (0.0, 0.12)
    sample_rate: int = 16_000

    def __post_init__(self):
        overlap = set(self.train_voices) & set(self.unseen_voices)
        if overlap:
            raise ValueError(f"Voices {sorted(overlap)} are both training and unseen voices")
        span = (self.prompt_words + self.max_continuation_words - 1) * self.count_step
        if self.count_step not in (1, -1) or not 0 <= self.min_start <= self.max_start:
            raise ValueError("Need count_step +1 or -1 and 0 <= min_start <= max_start")
        if not (0 <= self.min_start + min(span, 0) and self.max_start + max(span, 0) <= 99):
            raise ValueError("Counting runs must stay inside 0..99 (number_words covers 0..99)")
        if not 1 <= self.min_continuation_words <= self.max_continuation_words:
            raise ValueError("Need 1 <= min_continuation_words <= max_continuation_words")

    def num_examples(self, split: str) -> int:
        return {
            "train": self.num_train,
            "validation": self.num_validation,
            "validation_unseen_voices": self.num_validation_unseen,
        }[_check_split(split)]

    def voices(self, split: str) -> tuple[str, ...]:
        return self.unseen_voices if split == "validation_unseen_voices" else self.train_voices

    def cache_key(self) -> str:
        fields = dataclasses.asdict(self)
        # Fields added after the first corpora enter the key only when set, so caches made
        # before them stay valid.
        for name, default in (("min_start", 0), ("count_step", 1)):
            if fields[name] == default:
                del fields[name]
        blob = json.dumps(
            {"version": CACHE_VERSION, "chunk": SYNTHESIS_CHUNK, **fields}, sort_keys=True
        )
        return f"v{CACHE_VERSION}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; synthetic counting has {SPLITS}")
    return split


def plan_split(config: SyntheticCountingConfig, split: str) -> list[dict]:
    """The utterances of a split (texts, voice settings, gain, pause), before synthesis."""
    rng = np.random.default_rng([config.seed, SPLITS.index(_check_split(split))])
    voices = config.voices(split)
    plan = []
    for i in range(config.num_examples(split)):
        start = int(rng.integers(config.min_start, config.max_start + 1))
        n_cont = int(rng.integers(config.min_continuation_words, config.max_continuation_words + 1))
        numbers = [start + i * config.count_step for i in range(config.prompt_words + n_cont)]
        settings = espeak.VoiceSettings(
            voice=voices[int(rng.integers(len(voices)))],
            rate=int(rng.integers(config.rate_wpm[0], config.rate_wpm[1] + 1)),
            pitch=int(rng.integers(config.pitch[0], config.pitch[1] + 1)),
            pitch_range=int(rng.integers(config.pitch_range[0], config.pitch_range[1] + 1)),
        )
        plan.append(
            {
                "id": f"synthetic_counting-{split}-{i:06d}",
                "prompt_text": " ".join(number_words(n) for n in numbers[: config.prompt_words]),
                "continuation_text": " ".join(
                    number_words(n) for n in numbers[config.prompt_words :]
                ),
                "settings": dataclasses.asdict(settings),
                "gain_db": float(rng.uniform(*config.gain_db)),
                "pause_s": float(rng.uniform(*config.pause_s)),
            }
        )
    return plan


@dataclasses.dataclass(frozen=True)
class SyntheticSplit:
    """One synthesised split, held as flat int16 arrays at `sample_rate`.

    Example i's prompt is `prompt_audio[prompt_offsets[i]:prompt_offsets[i + 1]]` (same for the
    continuation); `examples[i]` holds its texts, voice and settings.
    """

    prompt_audio: np.ndarray  # int16[sum T_p]
    prompt_offsets: np.ndarray  # int64[N + 1]
    continuation_audio: np.ndarray  # int16[sum T_c]
    continuation_offsets: np.ndarray  # int64[N + 1]
    examples: list[dict]
    sample_rate: int

    def __len__(self) -> int:
        return len(self.examples)

    def waveforms(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt float32[T_p], continuation float32[T_c]) of example i, in [-1, 1)."""
        p = self.prompt_audio[self.prompt_offsets[i] : self.prompt_offsets[i + 1]]
        c = self.continuation_audio[self.continuation_offsets[i] : self.continuation_offsets[i + 1]]
        return p.astype(np.float32) / 32768.0, c.astype(np.float32) / 32768.0


def _offsets(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)


def _to_int16(waveform: np.ndarray) -> np.ndarray:
    return np.clip(np.round(waveform * 32768.0), -32768, 32767).astype(np.int16)


def _synthesize_chunk(plan: list[dict], sample_rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(prompt int16[T_p], continuation int16[T_c])] per planned utterance; one eSpeak process."""
    texts, settings = [], []
    for ex in plan:
        voice = espeak.VoiceSettings(**ex["settings"])
        texts += [ex["prompt_text"], ex["continuation_text"]]
        settings += [voice, voice]
    waves, source_rate = espeak.synthesize_batch(texts, settings)
    out = []
    for i, ex in enumerate(plan):
        gain = 10.0 ** (ex["gain_db"] / 20.0)
        # Each segment is resampled on its own, so the join point stays exact at the new rate.
        prompt, cont = (
            resample(waves[2 * i + j].astype(np.float32) / 32768.0, source_rate, sample_rate)
            for j in (0, 1)
        )
        pause = np.zeros(int(round(ex["pause_s"] * sample_rate)), np.float32)
        out.append((_to_int16(np.concatenate([prompt, pause]) * gain), _to_int16(cont * gain)))
    return out


def synthesize_split(config: SyntheticCountingConfig, split: str) -> SyntheticSplit:
    """Synthesises a split (no cache): eSpeak NG at 22.05 kHz -> gain, pause -> `sample_rate`.

    Utterances are synthesised in fixed chunks of `SYNTHESIS_CHUNK`, each in a fresh eSpeak
    process (see `espeak`), two chunks at a time; the output does not depend on the parallelism.
    """
    plan = plan_split(config, split)
    chunks = [plan[i : i + SYNTHESIS_CHUNK] for i in range(0, len(plan), SYNTHESIS_CHUNK)]
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        pairs = [
            pair
            for chunk in pool.map(lambda c: _synthesize_chunk(c, config.sample_rate), chunks)
            for pair in chunk
        ]
    for ex in plan:
        ex["speaker_id"] = ex["settings"]["voice"]
    prompts = [p for p, _ in pairs]
    continuations = [c for _, c in pairs]
    return SyntheticSplit(
        prompt_audio=np.concatenate([np.zeros(0, np.int16), *prompts]),
        prompt_offsets=_offsets(prompts),
        continuation_audio=np.concatenate([np.zeros(0, np.int16), *continuations]),
        continuation_offsets=_offsets(continuations),
        examples=plan,
        sample_rate=config.sample_rate,
    )


def _split_paths(cache_dir: str, config: SyntheticCountingConfig, split: str) -> tuple[str, str]:
    root = os.path.join(cache_dir, "synthetic_counting", config.cache_key())
    return os.path.join(root, f"{split}.npz"), os.path.join(root, f"{split}.json")


def _write_split(
    cache_dir: str,
    config: SyntheticCountingConfig,
    split: str,
    data: SyntheticSplit,
    seconds: float,
) -> None:
    npz_path, json_path = _split_paths(cache_dir, config, split)
    os.makedirs(os.path.dirname(npz_path), exist_ok=True)
    # Written to temporary names and renamed, JSON last: a crash never leaves a readable half.
    tmp = f"{npz_path}.{os.getpid()}.tmp.npz"
    np.savez(
        tmp,
        prompt_audio=data.prompt_audio,
        prompt_offsets=data.prompt_offsets,
        continuation_audio=data.continuation_audio,
        continuation_offsets=data.continuation_offsets,
    )
    os.replace(tmp, npz_path)
    meta = {
        "config": dataclasses.asdict(config),
        "split": split,
        "sample_rate": data.sample_rate,
        "synthesis_seconds": seconds,
        "examples": data.examples,
    }
    with open(f"{json_path}.{os.getpid()}.tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    os.replace(f"{json_path}.{os.getpid()}.tmp", json_path)


def _read_split(npz_path: str, json_path: str) -> SyntheticSplit:
    with open(json_path, encoding="utf-8") as f:
        meta = json.load(f)
    with np.load(npz_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return SyntheticSplit(examples=meta["examples"], sample_rate=meta["sample_rate"], **arrays)


def ensure_cached(
    config: SyntheticCountingConfig,
    splits: Sequence[str] = SPLITS,
    cache_dir: str | None = None,
) -> dict[str, float]:
    """Synthesises the missing splits into the cache; returns seconds per split."""
    cache_dir = cache_dir or default_cache_dir()
    missing = [
        s for s in splits if not all(map(os.path.exists, _split_paths(cache_dir, config, s)))
    ]

    def build(split: str) -> float:
        start = time.perf_counter()
        data = synthesize_split(config, split)
        seconds = time.perf_counter() - start
        _write_split(cache_dir, config, split, data, seconds)
        logging.info("Synthesised %d %s utterances in %.1f s", len(data), split, seconds)
        return seconds

    return {split: build(split) for split in missing}


@functools.lru_cache(maxsize=8)
def _load_cached(npz_path: str, json_path: str) -> SyntheticSplit:
    return _read_split(npz_path, json_path)


def load_split(
    config: SyntheticCountingConfig, split: str, cache_dir: str | None = None
) -> SyntheticSplit:
    """The split from the cache, synthesising every missing split of the config first."""
    cache_dir = cache_dir or default_cache_dir()
    paths = _split_paths(cache_dir, config, _check_split(split))
    if not all(map(os.path.exists, paths)):
        ensure_cached(config, SPLITS, cache_dir)
    return _load_cached(*paths)


def make_source(config: SyntheticCountingConfig, cache_dir: str | None = None):
    """A seqio DataSource of raw examples (see `speech_task`) for the three splits."""
    import seqio
    import tensorflow as tf

    from spectron_tasks import speech_task

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        data = load_split(config, split, cache_dir)
        # A whole-split permutation on top of seqio's shuffle buffer (smaller than the split).
        order = np.arange(len(data))
        if shuffle_files:
            np.random.default_rng(seed).shuffle(order)

        def generate():
            for i in order:
                ex = data.examples[i]
                prompt, cont = data.waveforms(i)
                yield {
                    "prompt_audio": prompt,
                    "continuation_audio": cont,
                    "prompt_text": ex["prompt_text"],
                    "continuation_text": ex["continuation_text"],
                    "speaker_id": ex["speaker_id"],
                    "id": ex["id"],
                }

        return tf.data.Dataset.from_generator(
            generate, output_signature=speech_task.raw_output_signature()
        )

    return seqio.FunctionDataSource(
        dataset_fn,
        splits=SPLITS,
        num_input_examples={s: config.num_examples(s) for s in SPLITS},
    )


# Shards of the file-backed source: files are shuffled as a whole, so more shards mix more.
RECORD_SHARDS = 16


def _record_paths(cache_dir: str, config: SyntheticCountingConfig, split: str) -> list[str]:
    root = os.path.dirname(_split_paths(cache_dir, config, split)[0])
    return [
        os.path.join(root, f"{split}.tfrecord-{i:05d}-of-{RECORD_SHARDS:05d}")
        for i in range(RECORD_SHARDS)
    ]


def ensure_records(config: SyntheticCountingConfig, split: str, cache_dir: str) -> list[str]:
    """The split's TFRecord shards (raw examples), written from the cached split if missing."""
    from spectron_tasks import speech_task

    paths = _record_paths(cache_dir, config, split)
    if not all(map(os.path.exists, paths)):
        data = load_split(config, split, cache_dir)

        def examples():
            for i, ex in enumerate(data.examples):
                prompt, cont = data.waveforms(i)
                yield {**ex, "prompt_audio": prompt, "continuation_audio": cont}

        speech_task.write_raw_tfrecords(paths, examples())
    return paths


def make_file_source(config: SyntheticCountingConfig, cache_dir: str | None = None):
    """Like `make_source`, read from TFRecord shards beside the cache (written on first use):
    graph ops only, so a checkpoint can hold the data iterator's position (T5X's
    `save_dataset=True`). `shuffle_files` permutes the shards with `seed`; the task's shuffle
    buffer mixes within them."""
    import seqio

    from spectron_tasks import speech_task

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        paths = ensure_records(config, _check_split(split), cache_dir or default_cache_dir())
        if shuffle_files:
            paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
        return speech_task.raw_tfrecord_dataset(paths)

    return seqio.FunctionDataSource(
        dataset_fn,
        splits=SPLITS,
        num_input_examples={s: config.num_examples(s) for s in SPLITS},
    )


def register(
    name: str = "spectron_synthetic_counting",
    config: SyntheticCountingConfig | None = None,
    *,
    file_backed: bool = False,
    cache_dir: str | None = None,
    front_end=None,
    target_config=None,
    vocabulary=None,
):
    """Registers a synthetic counting task; see `speech_task.register_speech_task` for the rest.

    The corpus is synthesised at `target_config.sample_rate` (default 16 kHz). `file_backed`
    reads it from TFRecord shards (`make_file_source`) instead of a generator.
    """
    from spectron_jax.audio.spectrogram import SpectrogramConfig
    from spectron_tasks import speech_task

    target_config = target_config or SpectrogramConfig()
    config = config or SyntheticCountingConfig()
    if config.sample_rate != target_config.sample_rate:
        config = dataclasses.replace(config, sample_rate=target_config.sample_rate)
    return speech_task.register_speech_task(
        name,
        (make_file_source if file_backed else make_source)(config, cache_dir),
        front_end=front_end,
        target_config=target_config,
        vocabulary=vocabulary,
    )

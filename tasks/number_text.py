"""`spectron_number_text`: text-only number language for the stage-2 LM (no audio at all).

The words are those of the counting speech corpora (`synthetic_counting.number_words`: "zero" ..
"ninety nine", compounds as two words), over a WIDER range than the speech data says aloud, plus
question-answer lines that no speech corpus has:

    counting run   "forty one forty two forty three"           2..8 consecutive numbers in 0..99
    counting down  "forty one forty thirty nine"               the same runs, downwards
    after          "what comes after forty one forty two"      question, then the answer
    before         "what comes before forty one forty"

The speech corpora hold 0..22 (`speech_numbers`: `spectron_synthetic_counting` counts runs of 4
upwards from starts 0..19; `spectron_fsdd_counting` holds digits 0..9 upwards) and no questions,
so a Spectron model that continues a spoken "forty one forty two" or "nine eight", or answers a
spoken "what comes after ...", can only know how from this text (docs/RECIPE.md). The downward
runs are the predecessor facts that "what comes before" needs in the form the model already
uses for the successor: continuing a run.

Splits (deterministic functions of `NumberTextConfig`, generated in Python, nothing cached):
  `train`       every counting run (up and down) except those starting at a held-out start, and
                every question except those about a held-out number (questions repeated
                `question_repeats` times: there are far fewer of them than runs).
  `validation`  exactly the held-out runs and questions: runs (up or down) starting at s with
                s % 10 == 5 (5, 15, .., 95), questions about N with N % 10 == 7 (7, 17, .., 97).
Every successor and predecessor pair still occurs in training (the up run from s - 1 holds s,
s + 1; the down run from s + 1 holds s + 1, s), so the held-out lines test new contexts of known
facts: a run that starts where no training run does, and a question about a number never asked
about.

`heldout_prompts` cuts the validation lines into prompts and next-number answers for
`spectron_jax.pretraining.text_lm.NextNumberEvaluator`; `next_number_matches` is its matcher.
One output feature, `targets` (ids, no EOS; the text LM's converter adds BOS / EOS).
Not imported by `spectron_tasks/__init__.py`; gin files and tests import it, which registers it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import gin
import numpy as np

from spectron_tasks.synthetic_counting import SyntheticCountingConfig, number_words

TASK_NAME = "spectron_number_text"
SPLITS = ("train", "validation")
# The question templates: kind -> (words before the number, answer = number + offset).
QUESTIONS = {"after": ("what comes after", 1), "before": ("what comes before", -1)}
_ONES = {number_words(n): n for n in range(20)}
_TENS = {number_words(n): n for n in range(20, 100, 10)}


def speech_numbers(config: SyntheticCountingConfig | None = None) -> range:
    """The numbers the counting speech corpora say: 0 .. the synthetic corpus's largest.

    The synthetic corpus counts `prompt_words + max_continuation_words` numbers from a start in
    0..max_start (defaults: 0..22); FSDD's digits 0..9 lie inside.
    """
    c = config or SyntheticCountingConfig()
    return range(0, c.max_start + c.prompt_words + c.max_continuation_words)


@dataclasses.dataclass(frozen=True)
class NumberTextConfig:
    """Everything that determines the text corpus.

    Attributes:
      max_number: largest number said (number_words covers 0..99).
      min_run, max_run: numbers per counting run.
      heldout_start_mod: (m, r): runs starting at s with s % m == r are validation only.
      heldout_question_mod: (m, r): questions about N with N % m == r are validation only.
      question_repeats: copies of each training question (~90 per kind, ~600 runs per direction:
        3 copies make questions a third of the lines).
    """

    max_number: int = 99
    min_run: int = 2
    max_run: int = 8
    heldout_start_mod: tuple[int, int] = (10, 5)
    heldout_question_mod: tuple[int, int] = (10, 7)
    question_repeats: int = 3

    def __post_init__(self):
        if not 0 < self.max_number <= 99:
            raise ValueError(f"max_number {self.max_number} must be in 1..99 (number_words)")
        if not 1 <= self.min_run <= self.max_run:
            raise ValueError("need 1 <= min_run <= max_run")

    def heldout_start(self, s: int) -> bool:
        m, r = self.heldout_start_mod
        return s % m == r

    def heldout_question(self, n: int) -> bool:
        m, r = self.heldout_question_mod
        return n % m == r


def say(numbers: Sequence[int]) -> str:
    """[41, 42] -> "forty one forty two"."""
    return " ".join(number_words(n) for n in numbers)


# Run kinds and their step.
RUNS = {"count": 1, "count_down": -1}


def _runs(config: NumberTextConfig) -> list[tuple[str, list[int]]]:
    """(kind, numbers) of every counting run, up and down, within 0..max_number."""
    return [
        (kind, [s + step * i for i in range(n)])
        for kind, step in RUNS.items()
        for s in range(config.max_number + 1)
        for n in range(config.min_run, config.max_run + 1)
        if 0 <= s + step * (n - 1) <= config.max_number
    ]


def _questions(config: NumberTextConfig) -> list[tuple[str, int]]:
    """(kind, N) of every question whose answer is within 0..max_number."""
    return [
        (kind, n)
        for kind, (_, offset) in QUESTIONS.items()
        for n in range(config.max_number + 1)
        if 0 <= n + offset <= config.max_number
    ]


def question_text(kind: str, n: int) -> str:
    """("after", 41) -> "what comes after forty one" (the prompt, without its answer)."""
    return f"{QUESTIONS[kind][0]} {number_words(n)}"


def plan_split(config: NumberTextConfig, split: str) -> list[dict]:
    """The lines of a split: dicts with `id`, `text`, `kind` ("count", "count_down", "after",
    "before") and `numbers` (the run, or [N, answer])."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; {TASK_NAME} has {SPLITS}")
    held = split == "validation"
    lines = []
    for kind, numbers in _runs(config):
        if config.heldout_start(numbers[0]) == held:
            lines.append({"kind": kind, "numbers": numbers, "text": say(numbers)})
    repeats = 1 if held else config.question_repeats
    for kind, n in _questions(config):
        if config.heldout_question(n) == held:
            answer = n + QUESTIONS[kind][1]
            text = f"{question_text(kind, n)} {number_words(answer)}"
            lines += [{"kind": kind, "numbers": [n, answer], "text": text}] * repeats
    return [{"id": f"number_text-{split}-{i:05d}", **line} for i, line in enumerate(lines)]


@gin.configurable(module="number_text")
def heldout_prompts(
    config: NumberTextConfig | None = None, prompt_numbers: Sequence[int] = (2, 3)
) -> list[dict[str, str]]:
    """Prompts cut from the validation lines, with the next number as the answer.

    Args:
      config: the corpus config.
      prompt_numbers: counting prompts are the first k numbers of each held-out run, for each k.

    Returns:
      [{"prompt", "answer", "group"}]: groups `count_speech_range` (an upward prompt and answer
      inside `speech_numbers()`), `count_text_only` (upward, the answer outside it),
      `count_down` (downward: no speech counts down), `question_after`, `question_before` (the
      question; the answer is the number it asks for).
    """
    config = config or NumberTextConfig()
    speech = speech_numbers()
    out, seen = [], set()
    for line in plan_split(config, "validation"):
        numbers = line["numbers"]
        if line["kind"] not in RUNS:
            prompt = question_text(line["kind"], numbers[0])
            out.append(
                {"prompt": prompt, "answer": say(numbers[1:]), "group": f"question_{line['kind']}"}
            )
            continue
        for k in prompt_numbers:
            key = tuple(numbers[: k + 1])
            if len(numbers) <= k or key in seen:
                continue
            seen.add(key)
            if line["kind"] == "count_down":
                group = "count_down"
            elif numbers[k] in speech:
                group = "count_speech_range"
            else:
                group = "count_text_only"
            out.append(
                {"prompt": say(numbers[:k]), "answer": number_words(numbers[k]), "group": group}
            )
    return out


def parse_numbers(text: str) -> list[int]:
    """Number words -> numbers, a tens word and a following "one".."nine" read as one number
    ("forty forty one" -> [40, 41]); parsing stops at the first word that is no number word.

    The language is ambiguous ("forty one" could be [40, 1]); in counting and in answers the
    compound reading is the one that occurs.
    """
    words, out, i = text.split(), [], 0
    while i < len(words):
        w = words[i]
        if w in _TENS:
            n = _TENS[w]
            if i + 1 < len(words) and 1 <= _ONES.get(words[i + 1], 0) <= 9:
                n, i = n + _ONES[words[i + 1]], i + 1
        elif w in _ONES:
            n = _ONES[w]
        else:
            break
        out.append(n)
        i += 1
    return out


@gin.configurable(module="number_text")
def next_number_matches(output: str, answer: str) -> bool:
    """Whether the first number of a generated continuation is the answer's number."""
    got, want = parse_numbers(output), parse_numbers(answer)
    return bool(got) and bool(want) and got[0] == want[0]


def all_words(config: NumberTextConfig | None = None) -> list[str]:
    """Every distinct word of the corpus (for the vocabulary check), sorted."""
    config = config or NumberTextConfig()
    words = {
        w for split in SPLITS for line in plan_split(config, split) for w in line["text"].split()
    }
    return sorted(words)


def make_source(config: NumberTextConfig):
    """A seqio DataSource yielding {"text", "id"} per line of each split."""
    import seqio
    import tensorflow as tf

    plans = {s: plan_split(config, s) for s in SPLITS}

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        lines = plans[split]
        # The whole split permuted by the seed: seqio's shuffle buffer alone is smaller.
        order = np.arange(len(lines))
        if shuffle_files:
            np.random.default_rng(seed).shuffle(order)
        return tf.data.Dataset.from_tensor_slices(
            {
                "text": [lines[i]["text"] for i in order],
                "id": [lines[i]["id"] for i in order],
            }
        )

    return seqio.FunctionDataSource(
        dataset_fn, splits=SPLITS, num_input_examples={s: len(p) for s, p in plans.items()}
    )


def register(name: str = TASK_NAME, config: NumberTextConfig | None = None, *, vocabulary=None):
    """Registers the text task (replacing one of that name): `text` -> `targets` ids (no EOS).

    Args:
      name: seqio task name.
      config: the corpus config.
      vocabulary: default the shipped tiny SentencePiece model (the speech tasks' vocabulary).
    """
    import seqio
    import tensorflow as tf

    from spectron_tasks import vocabulary as vocabulary_lib

    vocabulary = vocabulary or vocabulary_lib.default_vocabulary()

    @seqio.map_over_dataset
    def tokenize(ex):
        return {**ex, "targets": tf.cast(vocabulary.encode_tf(ex["text"]), tf.int32)}

    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=make_source(config or NumberTextConfig()),
        preprocessors=[tokenize],
        output_features={
            "targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
        },
    )


register()

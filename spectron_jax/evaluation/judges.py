"""Judges: pretrained models that no one here trained listen to the audio of an evaluation.

Both ship their weights inside their PyPI wheels, so they run offline and nothing is downloaded
at run time; both are optional (`pip install -e ".[judges]"`) and imported only when built.

- `PocketSphinxAsr`: CMU PocketSphinx 5 with the US-English acoustic model, dictionary and
  language model of its wheel. Given `words`, it decodes with a JSGF grammar that accepts any
  sequence of those words (e.g. `NUMBER_WORDS`, the counting corpora's vocabulary). Even so it
  is a weak recogniser (word accuracy measured here: ~0.7 on eSpeak number words, ~0.45 on
  FSDD's 8 kHz recordings, ~0.3 on their Griffin-Lim resynthesis), hence the ceilings below:
  read the generated figures against them, not against 1.
- `ResemblyzerSpeakerEncoder`: Resemblyzer's speaker encoder (GE2E loss, 3-layer LSTM,
  256-dim L2-normalised d-vectors).

`Judges.judge` scores one example from its audio (`JudgedAudio`); `judge_other_speakers` adds the
baseline that pairs each example with another speaker's; `summarize` gives the split's figures:

| figure | the judge hears | scored against |
|---|---|---|
| `judge_word_accuracy_generated_vs_text` | generated continuation | the model's own text |
| `judge_word_accuracy_generated_vs_reference` | generated continuation | the reference words |
| `judge_word_accuracy_reference_audio` | reference recording | the reference words |
| `judge_word_accuracy_reference_vocoded` | vocoded reference log-mel | the reference words |
| `judge_speaker_sim_generated` | prompt, generated continuation | (cosine of d-vectors) |
| `judge_speaker_sim_reference` | prompt, reference recording | (ceiling) |
| `judge_speaker_sim_reference_vocoded` | prompt, vocoded reference log-mel | (ceiling, vocoder) |
| `judge_speaker_sim_other_speaker` | prompt, another speaker's generation | (baseline) |
| `judge_speaker_gap` | | `sim_generated - sim_other_speaker` |

The two reference ASR figures separate what the model loses from what the vocoder loses: the
recording is the ceiling, the vocoded reference the ceiling through the run's vocoder, and the
generated speech goes through that same vocoder.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spectron_jax.evaluation import metrics

INSTALL_HINT = 'pip install -e ".[judges]"'
JUDGE_RATE = 16_000  # Both judges read 16 kHz audio.

# The words of the numbers 0..99 ("zero" .. "ninety nine"), the counting corpora's vocabulary.
NUMBER_WORDS = tuple(
    (
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
        "eighty ninety"
    ).split()
)


def import_judge(module: str) -> Any:
    """Imports an optional judge package; the ImportError says how to install it."""
    try:
        with warnings.catch_warnings():
            # webrtcvad (Resemblyzer's VAD) imports the deprecated pkg_resources, and Resemblyzer
            # a deprecated scipy namespace: warnings about their code, not ours.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            return importlib.import_module(module)
    except ImportError as err:
        hint = ""
        if "pkg_resources" in str(err):
            hint = " (webrtcvad 2.0.10 needs pkg_resources, which setuptools >= 82 dropped)"
        raise ImportError(
            f"the {module} judge is not installed ({err}){hint}: {INSTALL_HINT}"
        ) from err


def check_installed() -> None:
    """Raises the ImportError of `import_judge` when either judge package is missing."""
    for module in ("pocketsphinx", "resemblyzer"):
        import_judge(module)


def to_judge_rate(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    """float[S] at `sample_rate` -> finite float32[S'] at 16 kHz."""
    from spectron_jax.audio.io import resample

    x = np.nan_to_num(np.asarray(waveform, np.float32).reshape(-1))
    return resample(x, int(sample_rate), JUDGE_RATE) if x.size else x


# ------------------------------------------------------------------------------------------------
# The judges.
# ------------------------------------------------------------------------------------------------


def word_list(words: Sequence[str]) -> list[str]:
    """Sorted distinct normalised words of `words` (each entry may hold several words)."""
    return sorted(set(metrics.normalize_text(" ".join(words)).split()))


def jsgf_word_grammar(words: Sequence[str]) -> str:
    """A JSGF grammar accepting any sequence (the empty one included) of `words`."""
    vocabulary = word_list(words)
    if not vocabulary:
        raise ValueError("an ASR vocabulary needs at least one word")
    return f"#JSGF V1.0;\ngrammar words;\npublic <utterance> = ( {' | '.join(vocabulary)} )* ;\n"


class PocketSphinxAsr:
    """PocketSphinx 5 (US English): float32[S] waveform -> lower-case words.

    Args:
      words: None = the wheel's general-English language model; else the decoder only outputs
        sequences of these words (normalised, split on spaces; each must be in the wheel's
        pronunciation dictionary).
    """

    sample_rate = JUDGE_RATE

    def __init__(self, words: Sequence[str] | None = None):
        pocketsphinx = import_judge("pocketsphinx")
        self.words = tuple(word_list(words)) if words is not None else None
        options = {"samprate": JUDGE_RATE, "loglevel": "FATAL"}
        if self.words is not None:
            # Silence between words 20 times likelier than the default (0.005): counting speech
            # pauses between words, and a grammar with no garbage word otherwise reads pauses
            # and vocoder noise as words (measured on FSDD recordings, their Griffin-Lim
            # resynthesis and eSpeak: word accuracy up by 0.01 to 0.1 on each).
            options["silprob"] = 0.1
        self._decoder = pocketsphinx.Decoder(**options)
        if self.words is not None:
            unknown = [w for w in self.words if self._decoder.lookup_word(w) is None]
            if unknown:
                raise ValueError(
                    f"words not in PocketSphinx's US-English dictionary: {', '.join(unknown)}"
                )
            self._decoder.add_jsgf_string("words", jsgf_word_grammar(self.words))
            self._decoder.activate_search("words")

    def transcribe(self, waveform: np.ndarray, sample_rate: int) -> str:
        """The words heard in mono float32[S] audio at `sample_rate` ("" for silence).

        One utterance per call, decoded as a whole (the cepstral mean is the utterance's own),
        so a result does not depend on what was transcribed before.
        """
        x = to_judge_rate(waveform, sample_rate)
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if peak < 1e-6:
            return ""
        # Peak-normalised before int16: a quiet vocoder output would otherwise lose its low bits.
        pcm = np.round(x * (0.9 * 32767 / peak)).astype(np.int16)
        self._decoder.start_utt()
        self._decoder.process_raw(pcm.tobytes(), full_utt=True)
        self._decoder.end_utt()
        hypothesis = self._decoder.hyp()
        return hypothesis.hypstr.strip().lower() if hypothesis is not None else ""


# Shorter than this after Resemblyzer's voice-activity trim, the untrimmed audio is embedded:
# the VAD finds nothing in noise-like vocoder output, and an empty clip has no embedding.
_MIN_VOICED_SECONDS = 0.3


class ResemblyzerSpeakerEncoder:
    """Resemblyzer's speaker encoder: float32[S] waveform -> float32[256] (L2-normalised).

    Args:
      device: torch device ("cpu" by default: the rest of the evaluation keeps the accelerator).
    """

    sample_rate = JUDGE_RATE
    dim = 256

    def __init__(self, device: str = "cpu"):
        resemblyzer = import_judge("resemblyzer")
        self._resemblyzer = resemblyzer
        self._encoder = resemblyzer.VoiceEncoder(device=device, verbose=False)

    def embed_waveform(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono float[S] at `sample_rate` -> float32[256], unit L2 norm.

        Resemblyzer's preprocessing: volume raised to -30 dBFS (clipped at full scale), silences
        longer than ~0.2 s trimmed by WebRTC VAD (the whole clip where less than 0.3 s is left);
        then the mean of the d-vectors of 1.6 s windows.

        Raises:
          ValueError: empty or silent audio (no speaker to embed).
        """
        x = to_judge_rate(waveform, sample_rate)
        if x.size < JUDGE_RATE // 100 or float(np.max(np.abs(x))) < 1e-6:
            raise ValueError(f"no speaker to embed: {x.size} samples, silent or empty")
        # `resemblyzer.preprocess_wav` without its resampling, plus a clip: raising the volume
        # of a quiet clip with loud clicks pushes peaks past full scale, and its VAD reads int16.
        loud = self._resemblyzer.normalize_volume(x, -30, increase_only=True)
        loud = np.clip(loud, -1.0, 1.0)
        trimmed = self._resemblyzer.trim_long_silences(loud)
        if trimmed.size < _MIN_VOICED_SECONDS * JUDGE_RATE:
            trimmed = loud
        embedding = np.asarray(self._encoder.embed_utterance(trimmed.astype(np.float32)))
        norm = float(np.linalg.norm(embedding))
        if not math.isfinite(norm) or norm == 0.0:
            raise ValueError("the speaker encoder gave no embedding (all-zero or non-finite)")
        return (embedding / norm).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Scoring examples.
# ------------------------------------------------------------------------------------------------


def resolve_asr_words(spec: str | None, texts: Sequence[str] = ()) -> tuple[str, ...] | None:
    """The vocabulary an `--asr-words` value names.

    Args:
      spec: None or "" = no constraint (general English); "numbers" = `NUMBER_WORDS`;
        "references" = the words of `texts` (the evaluated prompts and continuations); the path
        of a text file = its words; else a comma- or space-separated list of words.
      texts: the split's reference texts, for "references".
    """
    if not spec:
        return None
    if spec == "numbers":
        return NUMBER_WORDS
    if spec == "references":
        return tuple(word_list(texts))
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return tuple(word_list([f.read()]))
    return tuple(word_list(re.split(r"[,\s]+", spec)))


@dataclasses.dataclass(frozen=True)
class JudgedAudio:
    """The audio of one example the judges hear: float32[S] at `sample_rate`, None where absent.

    Attributes:
      prompt: the prompt recording, or the vocoded prompt log-mel (see `prompt_source`).
      prompt_source: "recording" or "vocoded" (None when there is no prompt audio).
      generated: the generated continuation, vocoded.
      reference: the reference continuation recording.
      reference_vocoded: the reference continuation log-mel through the run's vocoder.
    """

    sample_rate: int
    prompt: np.ndarray | None = None
    prompt_source: str | None = None
    generated: np.ndarray | None = None
    reference: np.ndarray | None = None
    reference_vocoded: np.ndarray | None = None


def _present(waveform: np.ndarray | None) -> bool:
    return waveform is not None and np.size(waveform) > 0


class Judges:
    """The panel: one ASR and one speaker encoder, built once per evaluation run."""

    def __init__(self, asr: Any, speaker_encoder: Any):
        self.asr, self.speaker_encoder = asr, speaker_encoder

    @classmethod
    def create(cls, words: Sequence[str] | None = None) -> Judges:
        return cls(PocketSphinxAsr(words), ResemblyzerSpeakerEncoder())

    def _embed(self, waveform: np.ndarray | None, sample_rate: int) -> np.ndarray | None:
        if not _present(waveform):
            return None
        try:
            return self.speaker_encoder.embed_waveform(waveform, sample_rate)
        except ValueError:  # Silent audio: no similarity for this example.
            return None

    def judge(
        self, record: dict, audio: JudgedAudio
    ) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, np.ndarray | None]]:
        """Adds one example's judged figures to its `runner` record (in place).

        The reference figures are for continuation examples only: a spoken answer's reference
        is the answer's gist, not a transcript of what should be heard.

        Returns:
          (prompt, generated, {"reference", "reference_vocoded": continuation}) speaker
          embeddings, float32[256] or None, for `judge_other_speakers`.
        """
        sr, is_continuation = audio.sample_rate, record["kind"] == "continuation"
        reference_text = record["continuation_text"]
        if _present(audio.generated):
            heard = self.asr.transcribe(audio.generated, sr)
            record["judge_asr_generated"] = heard
            record["judge_word_accuracy_generated_vs_text"] = metrics.word_accuracy(
                record["hyp_continuation"], heard
            )
            if is_continuation:
                record["judge_word_accuracy_generated_vs_reference"] = metrics.word_accuracy(
                    reference_text, heard
                )
        for name, waveform in (
            ("reference_audio", audio.reference),
            ("reference_vocoded", audio.reference_vocoded),
        ):
            if is_continuation and _present(waveform):
                heard = self.asr.transcribe(waveform, sr)
                record[f"judge_asr_{name}"] = heard
                record[f"judge_word_accuracy_{name}"] = metrics.word_accuracy(reference_text, heard)
        prompt = self._embed(audio.prompt, sr)
        if prompt is None:
            return None, None, {}
        record["judge_prompt_audio"] = audio.prompt_source
        generated = self._embed(audio.generated, sr)
        embedded = {}
        for name, waveform in (
            ("reference", audio.reference if is_continuation else None),
            ("reference_vocoded", audio.reference_vocoded if is_continuation else None),
        ):
            embedded[name] = self._embed(waveform, sr)
            if embedded[name] is not None:
                record[f"judge_speaker_sim_{name}"] = float(prompt @ embedded[name])
        if generated is not None:
            record["judge_speaker_sim_generated"] = float(prompt @ generated)
        return prompt, generated, embedded


def other_speaker_pairs(
    speaker_ids: Sequence[str], usable: Sequence[bool] | None = None
) -> list[int | None]:
    """For each example i, the first usable example after it (cyclically) of another speaker.

    Deterministic (order of the split only). Examples with an unknown speaker ("") are neither
    paired nor partners: nothing says that their speakers differ. None where no partner exists.
    """
    n = len(speaker_ids)
    usable = [True] * n if usable is None else list(usable)
    pairs: list[int | None] = []
    for i, speaker in enumerate(speaker_ids):
        partner = None
        if speaker:
            for step in range(1, n):
                j = (i + step) % n
                if usable[j] and speaker_ids[j] and speaker_ids[j] != speaker:
                    partner = j
                    break
        pairs.append(partner)
    return pairs


def judge_other_speakers(
    records: Sequence[dict],
    embeddings: Sequence[tuple[np.ndarray | None, np.ndarray | None, Mapping[str, Any]]],
) -> None:
    """Adds `judge_speaker_sim_other_speaker` (prompt i vs the generation of its
    `other_speaker_pairs` partner j), `judge_speaker_sim_reference_other_speaker` and
    `judge_speaker_sim_reference_vocoded_other_speaker` (prompt i vs j's reference continuation,
    as recorded and through the vocoder: the same baseline for real speech) and
    `judge_other_example` (j's id) to the records."""
    generated = [g for _, g, _ in embeddings]
    pairs = other_speaker_pairs(
        [r["speaker_id"] for r in records], [g is not None for g in generated]
    )
    for record, (prompt, _, _), j in zip(records, embeddings, pairs, strict=True):
        if prompt is not None and j is not None:
            record["judge_speaker_sim_other_speaker"] = float(prompt @ generated[j])
            record["judge_other_example"] = records[j]["id"]
            for name, reference in embeddings[j][2].items():
                if reference is not None:
                    record[f"judge_speaker_sim_{name}_other_speaker"] = float(prompt @ reference)


# Per-example figures whose means `summarize` reports, in the report's order.
MEAN_KEYS = (
    "judge_word_accuracy_generated_vs_text",
    "judge_word_accuracy_generated_vs_reference",
    "judge_word_accuracy_reference_audio",
    "judge_word_accuracy_reference_vocoded",
    "judge_speaker_sim_generated",
    "judge_speaker_sim_reference",
    "judge_speaker_sim_reference_vocoded",
    "judge_speaker_sim_other_speaker",
    "judge_speaker_sim_reference_other_speaker",
    "judge_speaker_sim_reference_vocoded_other_speaker",
)


def summarize(records: Sequence[dict]) -> dict[str, float]:
    """The split's judged figures: means over the examples that have each figure,
    `judge_speaker_gap` (`metrics.speaker_gap`) over those with both similarities, the same
    gap of the reference continuations (`judge_speaker_gap_reference`, the real voices' own
    gap; `judge_speaker_gap_reference_vocoded` through the run's vocoder, the ceiling of a
    perfect log-mel) and `judge_speaker_gap_ratio` = generated / real gap (1 = as
    speaker-specific as real speech)."""
    out: dict[str, float] = {}
    for key in MEAN_KEYS:
        values = [float(r[key]) for r in records if key in r and math.isfinite(float(r[key]))]
        if values:
            out[key] = float(np.mean(values))
    paired = [r for r in records if "judge_speaker_sim_other_speaker" in r]
    paired = [r for r in paired if "judge_speaker_sim_generated" in r]
    if paired:
        out["judge_speaker_gap"] = metrics.speaker_gap(
            [r["judge_speaker_sim_generated"] for r in paired],
            [r["judge_speaker_sim_other_speaker"] for r in paired],
        )
    for name in ("reference", "reference_vocoded"):
        own, other = f"judge_speaker_sim_{name}", f"judge_speaker_sim_{name}_other_speaker"
        real = [r for r in records if own in r and other in r]
        if real:
            out[f"judge_speaker_gap_{name}"] = metrics.speaker_gap(
                [r[own] for r in real], [r[other] for r in real]
            )
    if "judge_speaker_gap" in out and out.get("judge_speaker_gap_reference", 0.0) > 0:
        out["judge_speaker_gap_ratio"] = (
            out["judge_speaker_gap"] / out["judge_speaker_gap_reference"]
        )
    return out


def notes(records: Sequence[dict], words: Sequence[str] | None, vocoder: str) -> list[str]:
    """Lines for the report: what each judge heard in this run."""
    sources = sorted({r["judge_prompt_audio"] for r in records if "judge_prompt_audio" in r})
    vocabulary = f"constrained to {len(words)} words" if words is not None else "general English"
    lines = [
        f"judges: PocketSphinx ASR ({vocabulary}) and the Resemblyzer speaker encoder, on "
        f"16 kHz audio; generated speech and vocoded references through the {vocoder} vocoder",
        "judged prompt audio: " + (", ".join(sources) if sources else "none (skipped)"),
    ]
    if not any("judge_word_accuracy_reference_audio" in r for r in records):
        lines.append("judges: no reference continuation recordings in the examples")
    if not any("judge_speaker_sim_other_speaker" in r for r in records):
        lines.append("judges: other-speaker baseline skipped (fewer than two known speakers)")
    return lines


def _reading(key: str) -> str:
    if key.endswith("other_speaker"):
        return "baseline"
    reference = ("judge_word_accuracy_reference", "judge_speaker_sim_reference")
    if key.startswith(reference) or key.startswith("judge_speaker_gap_reference"):
        return "ceiling"
    return "higher"


def markdown(figures: dict[str, Any], lines: Sequence[str]) -> str:
    """The report's section of judged figures."""
    gaps = ("judge_speaker_gap", "judge_speaker_gap_reference", "judge_speaker_gap_ratio")
    gaps += ("judge_speaker_gap_reference_vocoded",)
    rows = [key for key in (*MEAN_KEYS, *gaps) if key in figures]
    if not rows:
        return ""
    out = ["", "## Judged by pretrained models", ""] + [f"- {line}" for line in lines]
    out += ["", "| metric | value | better |", "|---|---|---|"]
    for key in rows:
        out.append(f"| `{key}` | {figures[key]:.4f} | {_reading(key)} |")
    return "\n".join(out) + "\n"

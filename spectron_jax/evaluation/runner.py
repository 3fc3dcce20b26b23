"""`spectron eval`: a checkpoint on a seqio task split, measured as in the paper (section 5).

Per example (task examples of docs/CONTRACTS.md section 1), the model decodes its text (prompt
transcript + continuation, no separator) and speech; the text is cut at its word alignment with
the reference prompt transcript (`evaluation.text.split_text`). Then:

- `transcript_wer`, `transcript_cer` (all examples): corpus WER/CER of the model's own
  transcript of the prompt.
- `continuation_text_accuracy`, `continuation_wer` (continuation examples): normalised exact match
  and WER of the text continuation.
- `qa_accuracy` (QA examples, i.e. no reference frames): `qa_match` of the reference answer in the
  text answer; `qa_accuracy_asr` the same on the ASR transcript of the spoken answer (`asr_dir`).
- `spectrogram_l1`, `spectrogram_l2`, `mcd_db` (continuation): against the reference
  continuation over the common length; `dtw_l1` after DTW alignment of the whole spectrograms.
- `speaker_similarity` (all): cosine of speaker embeddings, prompt vs generated speech.
- `log_perplexity`, `perplexity` (continuation, with `asr_dir` and `lm_dir`): NLL per token of the
  ASR transcript of the generated speech under GPT-2, given the prompt transcript as context.
- `judge_*` (with `options.judges`): figures of pretrained judges, PocketSphinx ASR and the
  Resemblyzer speaker encoder (`evaluation/judges.py` lists them). They hear: the generated
  continuation through the run's vocoder; the prompt and reference continuation recordings of
  the task's source (read by example id; `load_examples(with_audio=True)`); the reference
  log-mel through the vocoder; and, where the source has no prompt recording, the prompt's
  log-mel through the vocoder when the front end is the log-mel (else the prompt is skipped).
- `length_error_frames_mae`, `length_error_frames_mean` (continuation): generated minus reference
  length in frames (> 0 = too long); `hit_max_fraction` (all): examples that ran to the maximum
  without the stop logit ending them (1 when decoding a fixed duration).

A model with a stop head ends its speech by itself unless `options.fixed_duration`; the decoded
length is then at most `options.seconds` (default: `max_length_factor` times the longest
reference, so that speaking too long shows in the length error instead of being cut).

Speaker embeddings come from `options.speaker_encoder` (a `MelStatsSpeakerEncoder` `.npz`), or by
default from `MelStatsSpeakerEncoder` normalised on the evaluated prompts (see
`evaluation/speaker.py`, which also documents a public encoder that plugs in). The prompt's
log-mel is its encoder features when the front end is the target log-mel; with another front end
the reference continuation (same speaker) stands in for it.

Outputs in `out_dir`: `metrics.json` (every figure and per-example record), `report.md` (table and
worst cases), `samples/<id>.{png,wav}` for the first `num_samples` examples, and TensorBoard
summaries in `tensorboard/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import gin
import numpy as np

from spectron_jax import inference
from spectron_jax.evaluation import judges, metrics, plots, report
from spectron_jax.evaluation.speaker import MelStatsSpeakerEncoder, load_speaker_encoder
from spectron_jax.evaluation.text import split_text
from spectron_jax.interfaces import EvalContext
from spectron_jax.nn.layers import ceil_div

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What to run and write.

    Attributes:
      seconds: speech to generate per example; None = the longest reference continuation of the
        evaluated examples (`qa_seconds` for QA examples, which have none).
      qa_seconds: spoken-answer length when `seconds` is None.
      max_examples: evaluate the first N examples of the split (None = all).
      num_samples: examples saved as PNG + WAV and written to TensorBoard.
      batch_size: prompts per decoding call.
      max_text_tokens: text decoding limit.
      vocoder, vocoder_dir: see `inference.make_vocoder`.
      speaker_encoder: `.npz` of a `MelStatsSpeakerEncoder`; None = cohort-normalised default.
      asr_dir, lm_dir: local transformers folders (ASR model, GPT-2) for the log-perplexity.
      judges: also score the audio with the pretrained judges of `evaluation/judges.py`
        (needs `pip install -e ".[judges]"`).
      asr_words: the judge ASR's vocabulary (`judges.resolve_asr_words`: "numbers",
        "references", a word-list file or comma-separated words); None = general English.
      seed: decoding seed (pre-net dropout, sampling).
      worst_cases: examples listed per metric in the report.
      fixed_duration: ignore the stop head: generate the whole duration.
      stop_threshold: stop probability that ends the speech (models with a stop head).
      max_length_factor: with the stop logit and `seconds` None, the maximum is this times the
        longest reference continuation.
    """

    seconds: float | None = None
    qa_seconds: float = 4.0
    max_examples: int | None = None
    num_samples: int = 4
    batch_size: int = 8
    max_text_tokens: int = 64
    vocoder: str = "griffin_lim"
    vocoder_dir: str | None = None
    speaker_encoder: str | None = None
    asr_dir: str | None = None
    lm_dir: str | None = None
    judges: bool = False
    asr_words: str | None = None
    seed: int = 0
    worst_cases: int = 5
    fixed_duration: bool = False
    stop_threshold: float = 0.5
    max_length_factor: float = 1.5


@dataclasses.dataclass
class EvalResult:
    """Aggregate `metrics`, per-example `examples` records, and where the outputs went."""

    metrics: dict[str, Any]
    examples: list[dict[str, Any]]
    out_dir: str
    json_path: str
    report_path: str

    @property
    def num_examples(self) -> int:
        return len(self.examples)


# ------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def load_examples(
    task: str, split: str, max_examples: int | None = None, *, with_audio: bool = False
) -> list[dict]:
    """The first `max_examples` task examples of a split as numpy dicts (strings decoded).

    With `with_audio`, each example also gets the recordings of its task's source (by id),
    `prompt_audio` and `continuation_audio` (float32[S] at the target spectrogram's rate),
    where the source has them (`attach_source_audio`).
    """
    import seqio

    import spectron_tasks  # noqa: F401 - registers the tasks

    try:
        provider = seqio.get_mixture_or_task(task)
    except ValueError as err:
        raise ValueError(f"unknown seqio task {task!r} ({err})") from err
    ds = provider.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1)
    if max_examples is not None:
        ds = ds.take(max_examples)
    examples = []
    for ex in ds.as_numpy_iterator():
        ex = dict(ex)
        for key in ("prompt_text", "continuation_text", "speaker_id", "id"):
            ex[key] = _text(ex.get(key, b""))
        examples.append(ex)
    if not examples:
        raise ValueError(f"task {task!r} split {split!r} gave no examples")
    if with_audio:
        attach_source_audio(provider, split, examples)
    return examples


def attach_source_audio(provider: Any, split: str, examples: list[dict]) -> int:
    """Adds `prompt_audio` / `continuation_audio` of the task's raw source to the examples whose
    (non-empty, unique) id the source yields; returns how many got them.

    The task's preprocessors replace the recordings by features, so the judges read them from
    the source, in the same order, until every id is found. A mixture (no single source) or a
    source without those keys leaves the examples as they are.
    """
    wanted = {ex["id"]: ex for ex in examples if ex["id"]}
    source = getattr(provider, "source", None)
    if source is None or len(wanted) != sum(1 for ex in examples if ex["id"]):
        return 0
    found = 0
    for raw in source.get_dataset(split=split, shuffle=False).as_numpy_iterator():
        ex = wanted.pop(_text(raw.get("id", b"")), None)
        if ex is not None and "prompt_audio" in raw and "continuation_audio" in raw:
            ex["prompt_audio"] = np.asarray(raw["prompt_audio"], np.float32)
            ex["continuation_audio"] = np.asarray(raw["continuation_audio"], np.float32)
            found += 1
        if not wanted:
            break
    return found


def _check_dims(config: Any, ex: dict) -> None:
    f_enc, f_mel = ex["prompt_features"].shape[-1], ex["continuation_frames"].shape[-1]
    if f_enc != config.encoder_feature_dim or f_mel != config.n_mels:
        raise ValueError(
            f"task features do not fit the model: prompt_features has {f_enc} features (model "
            f"encoder_feature_dim {config.encoder_feature_dim}), continuation_frames {f_mel} mel "
            f"bins (model n_mels {config.n_mels}); register the task with the model's front end "
            f"and target SpectrogramConfig ({config.spectrogram})"
        )


# ------------------------------------------------------------------------------------------------
# Scoring.
# ------------------------------------------------------------------------------------------------


def _rate(fn, ref: str, hyp: str) -> float:
    try:
        return float(fn([ref], [hyp]))
    except ValueError:  # Reference empty after normalisation: undefined.
        return math.nan


def score_text(record: dict, is_qa: bool) -> None:
    """Adds the text metrics of one example to its record (in place)."""
    record["transcript_wer"] = _rate(
        metrics.word_error_rate, record["prompt_text"], record["hyp_transcript"]
    )
    if is_qa:
        record["qa_correct"] = metrics.qa_match(
            record["hyp_continuation"], record["continuation_text"]
        )
    else:
        ref = metrics.normalize_text(record["continuation_text"])
        record["continuation_exact"] = ref == metrics.normalize_text(record["hyp_continuation"])
        record["continuation_wer"] = _rate(
            metrics.word_error_rate, record["continuation_text"], record["hyp_continuation"]
        )


def score_frames(record: dict, generated: np.ndarray, reference: np.ndarray) -> None:
    """Spectrogram distances of generated float32[T_g, M] vs reference float32[T_r, M]."""
    n = min(len(generated), len(reference))
    if n == 0:
        return
    pred, ref = generated[None, :n], reference[None, :n]
    record["spectrogram_l1"] = float(metrics.spectrogram_l1(pred, ref)[0])
    record["spectrogram_l2"] = float(metrics.spectrogram_l2(pred, ref)[0])
    record["mcd_db"] = float(metrics.mel_cepstral_distortion(pred, ref)[0])
    record["dtw_l1"] = metrics.dtw_l1(generated, reference)


def _mean(records: Sequence[dict], key: str) -> float | None:
    values = [float(r[key]) for r in records if key in r and r[key] is not None]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else None


def aggregate(records: Sequence[dict]) -> dict[str, Any]:
    """Dataset figures from per-example records (None where no example has the metric)."""
    out: dict[str, Any] = {"num_examples": len(records)}
    refs = [r["prompt_text"] for r in records]
    if any(metrics.normalize_text(x) for x in refs):
        hyps = [r["hyp_transcript"] for r in records]
        out["transcript_wer"] = metrics.word_error_rate(refs, hyps)
        out["transcript_cer"] = metrics.char_error_rate(refs, hyps)
    cont = [r for r in records if "continuation_exact" in r]
    qa = [r for r in records if "qa_correct" in r]
    out["num_continuation_examples"] = len(cont)
    out["num_qa_examples"] = len(qa)
    if cont:
        out["continuation_text_accuracy"] = float(np.mean([r["continuation_exact"] for r in cont]))
        refs = [r["continuation_text"] for r in cont]
        if any(metrics.normalize_text(x) for x in refs):
            out["continuation_wer"] = metrics.word_error_rate(
                refs, [r["hyp_continuation"] for r in cont]
            )
    if qa:
        out["qa_accuracy"] = float(np.mean([r["qa_correct"] for r in qa]))
        if any("qa_correct_asr" in r for r in qa):
            out["qa_accuracy_asr"] = float(np.mean([r.get("qa_correct_asr", False) for r in qa]))
    for key in (
        "spectrogram_l1",
        "spectrogram_l2",
        "mcd_db",
        "dtw_l1",
        "speaker_similarity",
        "log_perplexity",
        "generated_seconds",
    ):
        value = _mean(records, key)
        if value is not None:
            out[key] = value
    if "log_perplexity" in out:
        out["perplexity"] = float(math.exp(out["log_perplexity"]))
    timed = [r for r in records if "generated_frames" in r]
    out.update(
        length_figures(
            [r["generated_frames"] for r in timed],
            [r.get("reference_frames") for r in timed],
            [r["stopped"] for r in timed],
        )
    )
    out.update(judges.summarize(records))
    return out


def length_figures(
    generated: Sequence[int], reference: Sequence[int | None], stopped: Sequence[bool]
) -> dict[str, float]:
    """Generated against reference speech length, in frames.

    Args:
      generated: frames generated per example.
      reference: the reference continuation's frames per example; None where there is none
        (a spoken answer): those examples count only in `hit_max_fraction`.
      stopped: per example, whether the stop logit ended it (False: it ran to the maximum).

    Returns:
      `length_error_frames_mae` (mean |generated - reference|) and `length_error_frames_mean`
      (mean generated - reference, > 0 = too long) over the examples with a reference, and
      `hit_max_fraction` over all; {} for no examples.
    """
    if not len(generated) == len(reference) == len(stopped):
        raise ValueError(f"{len(generated)}, {len(reference)}, {len(stopped)} lengths given")
    out = {}
    if len(stopped):
        out["hit_max_fraction"] = float(np.mean([not s for s in stopped]))
    errors = [g - r for g, r in zip(generated, reference, strict=True) if r is not None]
    if errors:
        out["length_error_frames_mae"] = float(np.mean(np.abs(errors)))
        out["length_error_frames_mean"] = float(np.mean(errors))
    return out


# ------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------


def _prompt_log_mel(config: Any, ex: dict) -> np.ndarray | None:
    if config.encoder_front_end != "log_mel":
        return None
    return ex["prompt_features"][: int(ex["prompt_length"])]


def _reference(ex: dict) -> np.ndarray:
    return ex["continuation_frames"][: int(ex["continuation_length"])]


def evaluate_examples(
    loaded: inference.LoadedModel,
    examples: Sequence[dict],
    out_dir: str | os.PathLike,
    options: EvalOptions = EvalOptions(),
    *,
    task: str = "",
    split: str = "",
    checkpoint: str = "",
) -> EvalResult:
    """Decodes, scores and reports task examples (the body of `evaluate`).

    Args:
      loaded: the model.
      examples: task examples (CONTRACTS.md section 1) as numpy dicts with decoded strings.
      out_dir: output folder (created).
      options: see `EvalOptions`.
      task, split, checkpoint: recorded in the outputs.

    Returns:
      The figures and per-example records (also written to `out_dir`).
    """
    for ex in examples:
        _check_dims(loaded.config, ex)
    if options.judges:
        judges.check_installed()  # Before decoding: a missing extra should not cost a decode.
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    decode_config, generations = decode_examples(loaded, examples, options)
    records, waveforms = score_examples(loaded.config, examples, generations, options)
    sample_audio = write_sample_files(out, loaded.config, examples, generations, records, waveforms)
    header = {
        "task": task,
        "split": split,
        "checkpoint": checkpoint,
        "step": loaded.step,
        "decode": dataclasses.asdict(decode_config),
        "options": dataclasses.asdict(options),
    }
    return write_results(out, header, records, sample_audio, options, loaded.config)


# -- decode ---------------------------------------------------------------------------------------


def decode_config_for(
    loaded: inference.LoadedModel, examples: Sequence[dict], options: EvalOptions
) -> Any:
    """The one `DecodeConfig` of a run: one frame count for every example (one compile).

    `options.seconds`, else the longest reference continuation (`qa_seconds` for QA examples;
    times `max_length_factor` when the stop logit ends the speech), rounded up to whole frame
    groups. The stop logit is on for a model with a stop head unless `fixed_duration`.
    """
    from spectron_jax import decoding

    config = loaded.config
    use_stop = config.stop_head and not options.fixed_duration
    if options.seconds is not None:
        max_frames = inference.num_frames_for(config, options.seconds)
    else:
        qa_frames = inference.num_frames_for(config, options.qa_seconds)
        max_frames = max(int(ex["continuation_length"]) or qa_frames for ex in examples)
        if use_stop:
            max_frames = math.ceil(max_frames * options.max_length_factor)
        max_frames = ceil_div(max_frames, config.reduction_factor) * config.reduction_factor
    return decoding.DecodeConfig.for_model(
        loaded.model,
        fixed_duration=options.fixed_duration,
        max_text_tokens=options.max_text_tokens,
        max_frames=max_frames,
        stop_threshold=options.stop_threshold,
        seed=options.seed,
    )


def decode_examples(
    loaded: inference.LoadedModel, examples: Sequence[dict], options: EvalOptions
) -> tuple[Any, list[inference.Generation]]:
    """(decode config, one `Generation` per example), decoded `options.batch_size` at a time.

    Every batch has the same shape (prompts padded to the run's longest, the last batch padded
    with copies), so the decode program compiles once.
    """
    decode_config = decode_config_for(loaded, examples, options)
    bucket = inference.PROMPT_BUCKET_FRAMES
    prompt_frames = ceil_div(max(int(ex["prompt_length"]) for ex in examples), bucket) * bucket
    generations: list[inference.Generation] = []
    for start in range(0, len(examples), options.batch_size):
        chunk = examples[start : start + options.batch_size]
        feats = [ex["prompt_features"][: int(ex["prompt_length"])] for ex in chunk]
        # Pad the last batch with copies so that its shape (and compiled program) is the same.
        feats += [feats[-1]] * (options.batch_size - len(feats))
        gens = inference.generate(loaded, feats, decode_config, prompt_frames=prompt_frames)
        generations.extend(gens[: len(chunk)])
        logger.info("eval: decoded %d / %d", len(generations), len(examples))
    return decode_config, generations


# -- score ----------------------------------------------------------------------------------------


class _Vocoder:
    """The run's vocoder, built at the first waveform (HiFi-GAN loading is not free)."""

    def __init__(self, options: EvalOptions, spectrogram_config: Any):
        self._args = (options.vocoder, spectrogram_config, options.vocoder_dir)
        self._vocoder = None

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """float32[T, n_mels] -> float32[T * hop]."""
        if self._vocoder is None:
            self._vocoder = inference.make_vocoder(*self._args)
        return inference.vocode(self._vocoder, frames)

    def bucketed(self, frames: np.ndarray, bucket: int = 64) -> np.ndarray:
        """As `__call__`, for log-mels of many lengths (prompts, references): padded with silent
        frames to a multiple of `bucket` so that the vocoder compiles once per bucket, not once
        per length; the audio of the padding is cut off."""
        spectrogram_config = self._args[1]
        n = len(frames)
        silence = np.full((-n % bucket, frames.shape[1]), spectrogram_config.log_silence)
        padded = np.concatenate([frames, silence.astype(np.float32)])
        return self(padded)[: n * spectrogram_config.hop_length]


def score_examples(
    config: Any,
    examples: Sequence[dict],
    generations: Sequence[inference.Generation],
    options: EvalOptions,
) -> tuple[list[dict], list[np.ndarray | None]]:
    """Per-example records (text, spectrogram, speaker and ASR figures).

    Returns:
      (records, waveforms): the generated float32[S] audio of the first `options.num_samples`
      examples (None where nothing was generated), for the sample files.
    """
    speaker_encoder = _speaker_encoder(options, config, examples)
    asr, lm = _external_models(options)
    panel = _judges(options, examples)
    vocoder = _Vocoder(options, config.spectrogram)
    fps, sr = config.spectrogram.frames_per_second, config.spectrogram.sample_rate
    records, waveforms, embeddings = [], [], []
    for i, (ex, gen) in enumerate(zip(examples, generations, strict=True)):
        record = text_record(i, ex, gen, fps)
        if record["kind"] == "continuation":
            score_frames(record, gen.frames, _reference(ex))
        score_length(record, gen, _reference(ex))
        prompt_mel = _prompt_log_mel(config, ex)
        anchor = prompt_mel if prompt_mel is not None else _reference(ex)
        if len(gen.frames) and len(anchor):
            record["speaker_similarity"] = float(
                metrics.cosine_similarity(
                    speaker_encoder.embed(anchor), speaker_encoder.embed(gen.frames)
                )
            )
        needs_audio = asr is not None or panel is not None or i < options.num_samples
        waveform = vocoder(gen.frames) if needs_audio and len(gen.frames) else None
        if asr is not None and waveform is not None:
            score_speech(record, asr.transcribe(waveform, sr), lm)
        if panel is not None:
            embeddings.append(panel.judge(record, judged_audio(config, ex, waveform, vocoder)))
        records.append(record)
        if i < options.num_samples:
            waveforms.append(waveform)
    if panel is not None:
        judges.judge_other_speakers(records, embeddings)
    return records, waveforms


def judged_audio(
    config: Any, ex: dict, generated: np.ndarray | None, vocoder: _Vocoder
) -> judges.JudgedAudio:
    """What the judges hear of one example (`judges.JudgedAudio`): the recordings where the
    example carries them, else the vocoded log-mel where there is one."""
    prompt, source = ex.get("prompt_audio"), "recording"
    if prompt is None or not len(prompt):
        prompt_mel = _prompt_log_mel(config, ex)
        has_mel = prompt_mel is not None and len(prompt_mel)
        prompt, source = (vocoder.bucketed(prompt_mel), "vocoded") if has_mel else (None, None)
    reference = _reference(ex)
    return judges.JudgedAudio(
        sample_rate=config.spectrogram.sample_rate,
        prompt=prompt,
        prompt_source=source,
        generated=generated,
        reference=ex.get("continuation_audio"),
        reference_vocoded=vocoder.bucketed(reference) if len(reference) else None,
    )


def text_record(i: int, ex: dict, gen: inference.Generation, fps: float) -> dict:
    """An example's record: its texts, the model's text cut at the reference's alignment, and
    the text figures (`score_text`)."""
    is_qa = int(ex["continuation_length"]) == 0
    transcript, rest = split_text(
        gen.text, prompt_text=ex["prompt_text"], reference_rest=ex["continuation_text"]
    )
    record = {
        "id": ex["id"] or f"example-{i}",
        "kind": "qa" if is_qa else "continuation",
        "speaker_id": ex["speaker_id"],
        "prompt_text": ex["prompt_text"],
        "continuation_text": ex["continuation_text"],
        "hyp_text": gen.text,
        "hyp_transcript": transcript,
        "hyp_continuation": rest,
        "generated_seconds": len(gen.frames) / fps,
    }
    score_text(record, is_qa)
    return record


def score_length(record: dict, gen: inference.Generation, reference: np.ndarray) -> None:
    """The generated length in frames, whether the stop logit ended it and, for a continuation,
    its error against the reference float32[T_r, M] (in place)."""
    record["generated_frames"] = len(gen.frames)
    record["stopped"] = bool(gen.stopped)
    if record["kind"] == "continuation":
        record["reference_frames"] = len(reference)
        record["length_error_frames"] = len(gen.frames) - len(reference)


def score_speech(record: dict, asr_text: str, lm: Any) -> None:
    """Figures of the ASR transcript of the generated speech (in place): the QA match of a
    spoken answer, or the LM's log-perplexity of a spoken continuation (given an LM)."""
    record["asr_text"] = asr_text
    if record["kind"] == "qa":
        record["qa_correct_asr"] = metrics.qa_match(asr_text, record["continuation_text"])
    elif lm is not None:
        record["log_perplexity"] = lm.log_perplexity(asr_text, context=record["prompt_text"])


# -- write ----------------------------------------------------------------------------------------


def write_sample_files(
    out: pathlib.Path,
    config: Any,
    examples: Sequence[dict],
    generations: Sequence[inference.Generation],
    records: Sequence[dict],
    waveforms: Sequence[np.ndarray | None],
) -> dict[str, np.ndarray]:
    """`samples/<id>.png` (and `.wav`) of the first `len(waveforms)` examples; their file names
    go into the records (in place).

    Returns:
      {example id: float32[S] generated audio} for TensorBoard.
    """
    from spectron_jax.audio.io import write_wav

    sr = config.spectrogram.sample_rate
    sample_audio = {}
    for ex, gen, record, waveform in zip(examples, generations, records, waveforms, strict=False):
        name = report.safe_name(record["id"])
        png = out / "samples" / f"{name}.png"
        prompt_mel = _prompt_log_mel(config, ex)
        reference = _reference(ex)
        plots.save_spectrogram_png(
            png,
            prompt_mel if prompt_mel is not None else np.zeros((0, config.n_mels)),
            gen.frames,
            title=record["id"],
            reference=reference if len(reference) else None,
        )
        record["png"] = str(png.relative_to(out))
        if waveform is not None:
            wav = out / "samples" / f"{name}.wav"
            write_wav(wav, waveform, sr)
            sample_audio[record["id"]] = waveform
            record["wav"] = str(wav.relative_to(out))
    return sample_audio


def write_results(
    out: pathlib.Path,
    header: dict[str, Any],
    records: list[dict],
    sample_audio: dict[str, np.ndarray],
    options: EvalOptions,
    config: Any,
) -> EvalResult:
    """Aggregates the records; writes `metrics.json`, `report.md` and TensorBoard summaries."""
    figures = aggregate(records)
    notes = []
    if not (options.asr_dir and options.lm_dir):
        notes.append(
            "log-perplexity skipped: it needs both --asr-dir (a local ASR model) and --lm-dir "
            "(a local GPT-2); nothing is downloaded"
        )
    if options.judges:
        notes += judges.notes(records, _asr_words(options, records), options.vocoder)
    header = {**header, "notes": notes}
    json_path = out / "metrics.json"
    json_path.write_text(
        json.dumps(
            report.jsonable({**header, "metrics": figures, "examples": records}),
            indent=2,
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    report_path = out / "report.md"
    report_path.write_text(
        report.markdown(header, figures, records, options.worst_cases)
        + judges.markdown(figures, [n for n in notes if n.startswith("judge")]),
        encoding="utf-8",
    )
    report.write_tensorboard(
        out / "tensorboard",
        header["step"],
        figures,
        records,
        header["task"],
        sample_audio,
        config.spectrogram.sample_rate,
    )
    return EvalResult(
        metrics=figures,
        examples=records,
        out_dir=str(out),
        json_path=str(json_path),
        report_path=str(report_path),
    )


def _speaker_encoder(options: EvalOptions, config: Any, examples: Sequence[dict]):
    if options.speaker_encoder:
        return load_speaker_encoder(options.speaker_encoder)
    anchors = [
        m
        for m in (
            _prompt_log_mel(config, ex) if config.encoder_front_end == "log_mel" else _reference(ex)
            for ex in examples
        )
        if m is not None and len(m)
    ]
    encoder = MelStatsSpeakerEncoder(num_coefficients=min(20, config.n_mels - 1))
    return encoder.with_cohort(anchors) if len(anchors) >= 2 else encoder


def _asr_words(options: EvalOptions, examples: Sequence[dict]) -> tuple[str, ...] | None:
    texts = [t for ex in examples for t in (ex["prompt_text"], ex["continuation_text"])]
    return judges.resolve_asr_words(options.asr_words, texts)


def _judges(options: EvalOptions, examples: Sequence[dict]) -> judges.Judges | None:
    """The pretrained judges when `options.judges` (ImportError naming the extra if absent)."""
    return judges.Judges.create(_asr_words(options, examples)) if options.judges else None


def _external_models(options: EvalOptions):
    """(ASR, LM) from local folders; each None when its folder is not given."""
    from spectron_jax.evaluation.perplexity import LocalAsr, LocalLm

    if options.lm_dir and not options.asr_dir:
        raise ValueError(
            "--lm-dir scores an ASR transcript of the generated speech: also pass "
            "--asr-dir (a local transformers ASR model folder)"
        )
    asr = LocalAsr(options.asr_dir) if options.asr_dir else None
    lm = LocalLm(options.lm_dir) if options.lm_dir else None
    return asr, lm


@gin.configurable
class TaskEvaluator:
    """`spectron eval` as an `interfaces.Evaluator`: a task split decoded, scored and reported.

    The same object evaluates a checkpoint (`evaluate`, the CLI) and the parameters of a run in
    training (`train.evaluators`, every `every` steps and after the last one).

    Attributes:
      task, split: the seqio task and split to evaluate.
      options: see `EvalOptions`.
      out_dir: where the outputs go; None = `<model_dir>/eval/<task>-<split>/step_<step>`.
      every: steps between evaluations in training; 0 = after the last step only.
      name: TensorBoard prefix of the figures.
      last_result: the `EvalResult` of the last run (figures, records, where they went).
    """

    def __init__(
        self,
        task: str = gin.REQUIRED,
        split: str = "validation",
        options: EvalOptions = EvalOptions(),
        out_dir: str | os.PathLike | None = None,
        every: int = 0,
        name: str = "task_eval",
    ):
        self.task, self.split, self.options = task, split, options
        self.out_dir, self.every, self.name = out_dir, every, name
        self.last_result: EvalResult | None = None

    def run(self, context: EvalContext) -> dict[str, float]:
        """Evaluates `context.params`; returns the numeric figures (the rest is in files)."""
        model = context.model
        loaded = inference.LoadedModel(model, context.params, model.vocabulary, context.step)
        out = self.out_dir or os.path.join(
            context.model_dir, "eval", f"{self.task}-{self.split}", f"step_{context.step}"
        )
        examples = load_examples(
            self.task, self.split, self.options.max_examples, with_audio=self.options.judges
        )
        self.last_result = evaluate_examples(
            loaded,
            examples,
            out,
            self.options,
            task=self.task,
            split=self.split,
            checkpoint=str(context.model_dir),
        )
        return {
            k: float(v)
            for k, v in self.last_result.metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }


def evaluate(
    checkpoint: str | os.PathLike,
    task: str,
    split: str,
    out_dir: str | os.PathLike,
    options: EvalOptions = EvalOptions(),
    *,
    vocabulary_path: str | None = None,
) -> EvalResult:
    """`TaskEvaluator` on the newest step of a checkpoint (what `spectron eval` runs).

    `vocabulary_path` overrides the vocabulary the checkpoint stores (needed for checkpoints
    written before they stored one).
    """
    loaded = inference.load_model_for_inference(checkpoint, vocabulary_path)
    evaluator = TaskEvaluator(task, split, options, out_dir=out_dir)
    context = EvalContext(
        model=loaded.model, params=loaded.params, step=loaded.step, model_dir=str(checkpoint)
    )
    evaluator.run(context)
    return evaluator.last_result

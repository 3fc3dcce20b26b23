"""Evaluation outputs: JSON-safe values, the Markdown report, and TensorBoard summaries."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# (record key, title, worst = highest?) of the per-example worst-case tables.
WORST_CASE_KEYS = (
    ("transcript_wer", "prompt transcript WER", True),
    ("continuation_wer", "continuation WER", True),
    ("spectrogram_l1", "spectrogram L1", True),
    ("mcd_db", "mel-cepstral distortion (dB)", True),
    ("speaker_similarity", "speaker similarity", False),
    ("log_perplexity", "log-perplexity", True),
)
# Figures in the table, in order, with how to read them.
FIGURES = (
    ("transcript_wer", "prompt transcript WER (model's own text)", "lower"),
    ("transcript_cer", "prompt transcript CER", "lower"),
    ("continuation_text_accuracy", "continuation text exact match", "higher"),
    ("continuation_wer", "continuation text WER", "lower"),
    ("qa_accuracy", "spoken QA accuracy (text answer)", "higher"),
    ("qa_accuracy_asr", "spoken QA accuracy (ASR of spoken answer)", "higher"),
    ("spectrogram_l1", "log-mel L1 vs reference (common length)", "lower"),
    ("spectrogram_l2", "log-mel L2 vs reference (common length)", "lower"),
    ("mcd_db", "mel-cepstral distortion, dB", "lower"),
    ("dtw_l1", "log-mel L1 after DTW", "lower"),
    ("speaker_similarity", "speaker similarity (cosine)", "higher"),
    ("log_perplexity", "log-perplexity (GPT-2 on ASR transcript)", "lower"),
    ("perplexity", "perplexity", "lower"),
    ("generated_seconds", "generated speech per example, s", ""),
)


def safe_name(text: str) -> str:
    """A file-name-safe form of an example id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "example"


def jsonable(value: Any) -> Any:
    """Nested data with numpy scalars as Python numbers and NaN/inf as None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _cell(text: str, limit: int = 80) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown(
    header: Mapping[str, Any],
    figures: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    worst_cases: int = 5,
) -> str:
    """The report: run description, the table of figures, worst cases per metric, samples."""
    lines = [
        f"# Spectron evaluation: {header.get('task', '')} / {header.get('split', '')}",
        "",
        f"- checkpoint: `{header.get('checkpoint', '')}` (step {header.get('step', '')})",
        f"- examples: {figures.get('num_examples', len(records))} "
        f"({figures.get('num_continuation_examples', 0)} continuation, "
        f"{figures.get('num_qa_examples', 0)} spoken QA)",
    ]
    decode = header.get("decode") or {}
    if decode:
        lines.append(
            f"- decoding: max_frames={decode.get('max_frames')}, "
            f"max_text_tokens={decode.get('max_text_tokens')}, "
            f"temperature={decode.get('temperature')}, seed={decode.get('seed')}"
        )
    for note in header.get("notes", ()):
        lines.append(f"- note: {note}")
    lines += ["", "| metric | value | better |", "|---|---|---|"]
    for key, title, better in FIGURES:
        if key in figures:
            lines.append(f"| {title} (`{key}`) | {_fmt(figures[key])} | {better} |")

    for key, title, highest_worst in WORST_CASE_KEYS:
        scored = [
            r
            for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))
        ]
        if not scored:
            continue
        scored.sort(key=lambda r: float(r[key]), reverse=highest_worst)
        lines += [
            "",
            f"## Worst {min(worst_cases, len(scored))} by {title}",
            "",
            f"| id | {key} | reference | model text |",
            "|---|---|---|---|",
        ]
        for r in scored[:worst_cases]:
            ref = f"{r.get('prompt_text', '')} / {r.get('continuation_text', '')}"
            lines.append(
                f"| {_cell(r['id'], 40)} | {_fmt(float(r[key]))} | {_cell(ref)} | "
                f"{_cell(r.get('hyp_transcript', ''))} / "
                f"{_cell(r.get('hyp_continuation', ''))} |"
            )

    failed_qa = [r for r in records if r.get("qa_correct") is False]
    if failed_qa:
        lines += [
            "",
            f"## Spoken QA misses ({len(failed_qa)})",
            "",
            "| id | question | reference answer | model answer |",
            "|---|---|---|---|",
        ]
        for r in failed_qa[:worst_cases]:
            lines.append(
                f"| {_cell(r['id'], 40)} | {_cell(r['prompt_text'])} | "
                f"{_cell(r['continuation_text'])} | {_cell(r['hyp_continuation'])} |"
            )

    samples = [r for r in records if "png" in r]
    if samples:
        lines += ["", "## Samples", ""]
        for r in samples:
            audio = f" ([audio]({r['wav']}))" if "wav" in r else ""
            lines += [
                f"### {r['id']}{audio}",
                "",
                f"- reference: {r['prompt_text']} / {r['continuation_text']}",
                f"- model: {r['hyp_transcript']} / {r['hyp_continuation']}",
                "",
                f"![{r['id']}]({r['png']})",
                "",
            ]
    return "\n".join(lines) + "\n"


def write_tensorboard(
    logdir: str | os.PathLike,
    step: int,
    figures: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    task: str,
    audios: Mapping[str, np.ndarray] | None = None,
    sample_rate: int = 16_000,
) -> None:
    """Scalars `eval/<task>/<metric>`, sample texts and sample audio (clu metric writers).

    Args:
      logdir: TensorBoard folder.
      step: the checkpoint step.
      figures: aggregate figures (non-finite and non-numeric ones are left out).
      records: per-example records; those with a `png` are the samples.
      task: prefix of the tags.
      audios: example id -> float32[S] generated waveform.
      sample_rate: of `audios`.
    """
    from clu import metric_writers

    writer = metric_writers.create_default_writer(os.fspath(logdir), asynchronous=False)
    prefix = f"eval/{task}" if task else "eval"
    scalars = {
        f"{prefix}/{k}": float(v)
        for k, v in figures.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    writer.write_scalars(step, scalars)
    texts = {
        f"{prefix}/sample/{safe_name(r['id'])}": (
            f"reference: {r['prompt_text']} / {r['continuation_text']}  \n"
            f"model: {r['hyp_transcript']} / {r['hyp_continuation']}"
        )
        for r in records
        if "png" in r
    }
    if texts:
        writer.write_texts(step, texts)
    for name, wav in (audios or {}).items():
        if len(wav):
            clip = np.clip(np.asarray(wav, np.float32), -1.0, 1.0)[None, :, None]  # [N=1, S, C=1]
            writer.write_audios(
                step, {f"{prefix}/audio/{safe_name(name)}": clip}, sample_rate=sample_rate
            )
    writer.flush()
    writer.close()

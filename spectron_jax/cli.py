"""The `spectron` command: speech continuation, spoken QA and evaluation of a checkpoint.

    spectron continue --checkpoint DIR --audio prompt.wav --seconds 3 --out out.wav [--png s.png]
    spectron ask      --checkpoint DIR --audio question.wav --out answer.wav
    spectron eval     --checkpoint DIR --task spectron_fsdd_counting --split test --out DIR
    spectron demo     --checkpoint DIR [--port 7860]     # a local web page (spectron_jax/demo.py)

A model with a stop head ends its speech by itself: `--seconds` is then the longest it may
speak, `--stop-threshold` the stop probability that ends it, and `--fixed-duration` generates
exactly `--seconds` instead (what a model without a stop head always does).

`continue` and `ask` print the model's transcript of the prompt and its text continuation (or
answer), and write the generated speech. `--audio` may also be a folder (every file of a format
the audio reader knows: .wav, .flac, .ogg/.opus, .mp3, .aiff, ...; the others are named and left
out) or a .txt list of paths (one a line, relative to the list; `#` comments); `--out` (and
`--png`) are then folders. What loading changed (resampling, downmixing) and what looks wrong (a
WAV shorter than its header says, clipping) is printed under each file. A silent prompt is
refused (the model would invent a transcript for it) unless `--allow-silent`. Unreadable files
are reported and skipped; the summary names them and the exit status is non-zero when every file
failed, or when any did with `--strict`.

A checkpoint carries its vocabulary (`vocabulary/` in each step), so `--checkpoint` is all the
commands need; `--vocab FILE` overrides it, and names the tokenizer of a checkpoint written
before checkpoints stored one (without it such a checkpoint is a one-line error naming the flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
from collections.abc import Sequence

# ------------------------------------------------------------------------------------------------
# Inputs.
# ------------------------------------------------------------------------------------------------


def expand_inputs(audio: str) -> tuple[list[pathlib.Path], bool]:
    """The files an `--audio` argument names, and whether it is a batch (folder or list).

    A path that does not exist is returned as a one-file "batch" of itself, so that it is
    reported like any other unreadable file.
    """
    from spectron_jax.audio.io import readable_suffixes

    path = pathlib.Path(audio)
    if path.is_dir():
        suffixes = readable_suffixes()
        entries = sorted(p for p in path.iterdir() if p.is_file())
        files = [p for p in entries if p.suffix.lower() in suffixes]
        others = [p.name for p in entries if p.suffix.lower() not in suffixes]
        if not files:
            raise SystemExit(f"spectron: no audio files ({' '.join(suffixes)}) in {path}")
        if others:
            more = f" and {len(others) - 5} more" if len(others) > 5 else ""
            shown = ", ".join(others[:5]) + more
            print(f"spectron: left out {len(others)} file(s) that are not audio: {shown}")
        return files, True
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise SystemExit(f"spectron: list file {path} does not exist")
        files = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entry = pathlib.Path(line)
                files.append(entry if entry.is_absolute() else path.parent / entry)
        if not files:
            raise SystemExit(f"spectron: list file {path} names no files")
        return files, True
    return [path], False


def _output_names(files: Sequence[pathlib.Path]) -> list[str]:
    """Unique output stems: the file stem, with a counter where two inputs share one."""
    seen: dict[str, int] = {}
    names = []
    for f in files:
        n = seen.get(f.stem, 0)
        seen[f.stem] = n + 1
        names.append(f.stem if n == 0 else f"{f.stem}_{n}")
    return names


# ------------------------------------------------------------------------------------------------
# continue / ask.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """One input file's result (`error` set when it failed)."""

    path: str
    transcript: str = ""
    continuation: str = ""
    wav: str = ""
    error: str = ""


def _decode_config(args: argparse.Namespace, loaded, seconds: float):
    """The decode options of `continue` / `ask`; BOS / EOS are the checkpoint model's, and a
    stop head ends the speech unless `--fixed-duration`."""
    from spectron_jax import inference

    return inference.decode_config(
        loaded,
        seconds,
        fixed_duration=args.fixed_duration,
        max_text_tokens=args.max_text_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        frame_temperature=args.frame_temperature,
        stop_threshold=args.stop_threshold,
        seed=args.seed,
    )


def run_speech(args: argparse.Namespace, mode: str) -> int:
    """`continue` (mode "continue") or `ask` (mode "ask") over one file or a batch."""
    from tqdm import tqdm

    from spectron_jax import inference
    from spectron_jax.audio.io import AudioError, load_audio, write_wav
    from spectron_jax.evaluation.plots import save_spectrogram_png
    from spectron_jax.evaluation.text import split_text

    files, is_batch = expand_inputs(args.audio)
    out = pathlib.Path(args.out)
    png = pathlib.Path(args.png) if args.png else None
    if is_batch and (out.suffix.lower() == ".wav" or str(out) == "-"):
        raise SystemExit(f"spectron: --audio {args.audio} is a batch; --out must be a folder")
    if str(out) == "-" and not args.stream:
        raise SystemExit("spectron: --out - (PCM to stdout) needs --stream")
    # With --out - the audio owns stdout; every report goes to stderr.
    report = sys.stderr if str(out) == "-" else sys.stdout
    loaded = inference.load_model_for_inference(args.checkpoint, args.vocab)
    if is_batch:  # Only once the checkpoint loaded: a bad one leaves nothing behind.
        out.mkdir(parents=True, exist_ok=True)
    config = loaded.config
    vocoder = inference.make_vocoder(args.vocoder, config.spectrogram, args.vocoder_dir)
    decode_config = _decode_config(args, loaded, args.seconds)
    rate = config.spectrogram.sample_rate
    label = "answer" if mode == "ask" else "continuation"

    outcomes = []
    names = _output_names(files)
    bar = tqdm(list(zip(files, names, strict=True)), desc=mode, unit="file", disable=not is_batch)
    for path, name in bar:
        outcome = Outcome(path=str(path))
        outcomes.append(outcome)
        try:
            waveform, info = load_audio(path, rate)
            _refuse_silence(info, args.allow_silent)
            features = inference.prompt_features(config, waveform, str(path))
        except AudioError as err:
            outcome.error = str(err)
            tqdm.write(f"skipped: {err}", file=sys.stderr)  # The error names the file.
            continue
        if args.stream:
            gen = _stream_one(args, loaded, features, decode_config, vocoder)
        else:
            gen = inference.generate(loaded, [features], decode_config)[0]
            gen = dataclasses.replace(gen, audio=inference.vocode(vocoder, gen.frames))
        outcome.transcript, outcome.continuation = split_text(
            gen.text,
            prompt_text=args.transcript,
            prompt_seconds=waveform.size / rate,
            words_per_second=args.words_per_second,
        )
        wav_path = out / f"{name}.wav" if is_batch else out
        if str(out) != "-":
            write_wav(wav_path, gen.audio, rate)
        outcome.wav = str(wav_path)
        if png is not None:
            png_path = png / f"{name}.png" if is_batch else png
            prompt_mel = config.spectrogram.features_numpy(waveform)
            save_spectrogram_png(png_path, prompt_mel, gen.frames, title=str(path))
        ended = ""
        if decode_config.use_stop_logit:
            ended = ", ended by the model" if gen.stopped else ", the maximum: no stop"
        tqdm.write(
            f"{path}\n  transcript:   {outcome.transcript}\n  {label + ':':<13} "
            f"{outcome.continuation}\n  audio:        {wav_path} "
            f"({len(gen.frames) / config.spectrogram.frames_per_second:.2f} s{ended})",
            file=report,
        )
        for note in [*info.changes, *(w.removeprefix(f"{path}: ") for w in info.warnings)]:
            tqdm.write(f"  note:         {note}", file=report)
    return _summarise(outcomes, mode, args.strict, report)


def _stream_one(args: argparse.Namespace, loaded, features, decode_config, vocoder):
    """`continue --stream` / `ask --stream` of one prompt: the audio is vocoded chunk by chunk
    while frames are made; with `--out -` each chunk goes to stdout as 16-bit PCM as soon as it
    is ready (`... | aplay -f S16_LE -r 16000 -c 1`). Prints when the first audio was ready and
    whether the stream ever stalled (a chunk later than the end of the audio before it)."""
    import numpy as np

    from spectron_jax import inference

    rate = loaded.config.spectrogram.sample_rate
    parts = inference.stream_speech(
        loaded, features, decode_config, vocoder, chunk_groups=args.chunk_groups
    )
    text = next(parts)
    audio, frames, first, stalls, stopped = [], [], None, 0, False
    for chunk in parts:
        frames.append(chunk.frames)
        stopped = chunk.stopped
        if not chunk.audio.size:
            continue
        if first is None:
            first = chunk.ready_seconds
        elif chunk.ready_seconds - first > sum(a.size for a in audio) / rate:
            stalls += 1
        audio.append(chunk.audio)
        if str(args.out) == "-":
            pcm = (np.clip(np.nan_to_num(chunk.audio), -1, 1) * 32767).astype("<i2")
            sys.stdout.buffer.write(pcm.tobytes())
            sys.stdout.buffer.flush()
    seconds = sum(a.size for a in audio) / rate
    print(
        f"  stream:       first audio after {first or 0.0:.2f} s, {seconds:.2f} s of audio, "
        f"{stalls} stall(s)",
        file=sys.stderr,
    )
    return inference.Generation(
        text=text,
        frames=np.concatenate(frames),
        stopped=stopped,
        audio=np.concatenate(audio) if audio else np.zeros(0, np.float32),
    )


def _refuse_silence(info, allowed: bool) -> None:
    """A silent prompt is an error unless `--allow-silent`: the model would invent a transcript
    for it and nothing would say so."""
    from spectron_jax.audio.io import AudioError

    silent = [w for w in info.warnings if "audio is silent" in w]
    if silent and not allowed:
        raise AudioError(
            f"{silent[0]}: the model would invent a transcript; pass --allow-silent to "
            "continue it anyway"
        )


def _summarise(outcomes: Sequence[Outcome], mode: str, strict: bool = False, report=None) -> int:
    failed = [o for o in outcomes if o.error]
    done = len(outcomes) - len(failed)
    report = report or sys.stdout
    print(
        f"spectron {mode}: {done} of {len(outcomes)} file(s) done, {len(failed)} failed",
        file=report,
    )
    for o in failed:
        reason = o.error.removeprefix(f"{o.path}: ")
        print(f"  FAILED {o.path}: {reason}", file=report)
    return 1 if (outcomes and done == 0) or (strict and failed) else 0


# ------------------------------------------------------------------------------------------------
# eval.
# ------------------------------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> int:
    from spectron_jax.evaluation import judges, runner

    if args.judges:
        try:  # Before any decoding: a missing extra is a one-line error, not a lost run.
            judges.check_installed()
        except ImportError as err:
            print(f"spectron eval: error: {err}", file=sys.stderr)
            return 2
    options = runner.EvalOptions(
        seconds=args.seconds,
        max_examples=args.max_examples,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        max_text_tokens=args.max_text_tokens,
        vocoder=args.vocoder,
        vocoder_dir=args.vocoder_dir,
        speaker_encoder=args.speaker_encoder,
        asr_dir=args.asr_dir,
        lm_dir=args.lm_dir,
        judges=args.judges,
        asr_words=args.asr_words,
        seed=args.seed,
        fixed_duration=args.fixed_duration,
        stop_threshold=args.stop_threshold,
    )
    result = runner.evaluate(
        args.checkpoint, args.task, args.split, args.out, options, vocabulary_path=args.vocab
    )
    print(f"spectron eval: {result.num_examples} examples of {args.task}:{args.split}")
    for key, value in sorted(result.metrics.items()):
        print(f"  {key:<32} {value:.4f}" if isinstance(value, float) else f"  {key:<32} {value}")
    print(f"report: {result.report_path}")
    return 0


# ------------------------------------------------------------------------------------------------
# Arguments.
# ------------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="model dir, its checkpoints/ dir, or one step dir"
    )
    p.add_argument(
        "--vocab",
        default=None,
        help="SentencePiece .model or tokenizer.json; default: the one the checkpoint "
        "stores (pass it for checkpoints written before they stored one)",
    )
    p.add_argument("--vocoder", choices=("griffin_lim", "hifigan"), default="griffin_lim")
    p.add_argument("--vocoder-dir", default=None, help="local HF SpeechT5HifiGan folder")
    p.add_argument("--max-text-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fixed-duration",
        action="store_true",
        help="generate exactly --seconds of speech even when the model has a stop head",
    )
    p.add_argument(
        "--stop-threshold",
        type=float,
        default=0.5,
        help="stop probability that ends the speech (models with a stop head)",
    )


def _inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audio", required=True, help="a speech file, a folder, or a .txt list")
    p.add_argument("--out", required=True, help="output .wav (a folder for a batch)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any file failed")
    p.add_argument(
        "--allow-silent", action="store_true", help="continue silent prompts instead of refusing"
    )


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--frame-temperature",
        type=float,
        default=1.0,
        help="noise scale of a stochastic frame head (0 = its mean); no effect on regression",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="vocode while frames are made; with --out - write 16-bit PCM to stdout as it comes",
    )
    p.add_argument("--chunk-groups", type=int, default=4, help="frame groups per streamed chunk")
    # The stop logit is the default now; `--stop` still parses (a no-op) so that older command
    # lines do not fail or, abbreviated, turn into `--stop-threshold`.
    p.add_argument("--stop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--transcript",
        default=None,
        help="the prompt's words, if known: the text is cut at their alignment",
    )
    p.add_argument(
        "--words-per-second",
        type=float,
        default=2.5,
        help="speaking rate that places the transcript/continuation cut otherwise",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectron", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    cont = sub.add_parser("continue", help="continue a spoken prompt (text and speech)")
    _common(cont)
    _sampling(cont)
    _inputs(cont)
    cont.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="speech to generate (the most, when the model has a stop head)",
    )
    cont.add_argument(
        "--png",
        default=None,
        help="PNG of prompt and continuation spectrograms (a folder for a batch)",
    )

    ask = sub.add_parser("ask", help="answer a spoken question (text and speech)")
    _common(ask)
    _sampling(ask)
    _inputs(ask)
    ask.add_argument("--seconds", type=float, default=4.0, help="longest spoken answer")
    ask.add_argument("--png", default=None, help="PNG of question and answer spectrograms")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a seqio task split")
    _common(ev)
    ev.add_argument("--task", required=True, help="seqio task, e.g. spectron_llama_questions")
    ev.add_argument("--split", required=True)
    ev.add_argument("--out", required=True, help="folder for the JSON, report, PNGs and WAVs")
    ev.add_argument("--max-examples", type=int, default=None)
    ev.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="speech to generate, the most with a stop head (default: the longest reference "
        "continuation, 1.5 times it with a stop head)",
    )
    ev.add_argument("--num-samples", type=int, default=4, help="examples saved as PNG + WAV")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument(
        "--speaker-encoder",
        default=None,
        help="speaker encoder file (.npz of MelStatsSpeakerEncoder; default: none)",
    )
    ev.add_argument("--asr-dir", default=None, help="local HF ASR model (log-perplexity)")
    ev.add_argument("--lm-dir", default=None, help="local HF GPT-2 model (log-perplexity)")
    ev.add_argument(
        "--judges",
        action="store_true",
        help="also score the audio with pretrained judges (PocketSphinx ASR, Resemblyzer "
        'speaker encoder; pip install -e ".[judges]")',
    )
    ev.add_argument(
        "--asr-words",
        default=None,
        help="vocabulary of the judge ASR: 'numbers' (zero..ninety nine), 'references' (the "
        "split's words), a word-list file, or comma-separated words (default: any English)",
    )
    demo = sub.add_parser("demo", help="a local web page: upload or record, hear the answer")
    _common(demo)
    _sampling(demo)
    demo.add_argument("--seconds", type=float, default=4.0, help="longest continuation")
    demo.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    demo.add_argument("--port", type=int, default=7860)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Loads the checkpoint once, then serves the demo page until interrupted."""
    from spectron_jax import demo, inference

    loaded = inference.load_model_for_inference(args.checkpoint, args.vocab)
    vocoder = inference.make_vocoder(args.vocoder, loaded.config.spectrogram, args.vocoder_dir)
    page = demo.Demo(loaded, vocoder, _decode_config(args, loaded, args.seconds), args.chunk_groups)
    server = demo.make_server(page, args.host, args.port, checkpoint=str(args.checkpoint))
    print(f"spectron demo: http://{args.host}:{server.server_port}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `spectron` console command; returns the exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("continue", "ask"):
            return run_speech(args, args.command)
        if args.command == "demo":
            return run_demo(args)
        return run_eval(args)
    except (FileNotFoundError, ValueError) as err:
        # A wrong checkpoint, vocabulary, vocoder or task, or a checkpoint that stores no
        # vocabulary given no --vocab (`checkpoints.MissingVocabularyError`, a
        # FileNotFoundError): one clear line, no traceback.
        print(f"spectron {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

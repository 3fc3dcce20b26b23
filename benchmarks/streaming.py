"""Streaming speech out: time to the first audio chunk and whether the stream keeps up.

For each config (random weights, as benchmarks/decode.py) and a prompt of `--prompt-s` seconds,
it streams `--frames` frames after `--text-tokens` greedy text tokens (free text mode: what
`spectron continue --stream` runs), `--chunk-groups` frame groups per compiled call, vocoded by
the streaming Griffin-Lim (16 frames of context, 4 of look-ahead) of `inference.stream_speech`,
and reports:

  first audio   seconds from the call (the prompt's features ready: "the end of the prompt")
                to the first non-empty audio chunk; it includes the prefill, the text phase,
                the first frame chunk and its vocoding;
  RTF           compute seconds of the whole stream per second of audio;
  stalls        chunks that were ready after the audio before them had finished playing,
                playback starting at the first chunk (0 = the stream never stalls);
  slack         the smallest margin (seconds) by which a chunk beat its playback deadline.

Each config runs once to compile (programs, vocoder windows), then `--repeats` timed runs; the
best run is reported. Targets (2-core CPU): tiny first audio <= 0.5 s, 0 stalls, RTF <= 0.5.

    python benchmarks/streaming.py                        # tiny and small, 250 frames (4 s)
    python benchmarks/streaming.py --configs tiny --chunk-groups 8
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

# The configs and random parameters of the decode benchmark (this script's folder is on sys.path).
from decode import CONFIGS, make_batch, model_config, random_params  # noqa: E402

from spectron_jax import decoding, inference  # noqa: E402
from spectron_jax.audio.griffin_lim import GriffinLimVocoder  # noqa: E402
from spectron_jax.models import SpectronModel  # noqa: E402


def one_stream(loaded, features, options, vocoder, chunk_groups: int) -> dict[str, float]:
    """Runs one stream; its first-audio time, RTF, stalls and slack."""
    rate = loaded.config.spectrogram.sample_rate
    began = time.perf_counter()
    parts = inference.stream_speech(loaded, features, options, vocoder, chunk_groups=chunk_groups)
    next(parts)  # The text.
    first, played, stalls, slack, chunks = None, 0.0, 0, math.inf, 0
    for chunk in parts:
        if not chunk.audio.size:
            continue
        chunks += 1
        if first is None:
            first = chunk.ready_seconds
        else:
            margin = (first + played) - chunk.ready_seconds  # Deadline: the audio before it ends.
            slack = min(slack, margin)
            stalls += margin < 0
        played += chunk.audio.size / rate
    total = time.perf_counter() - began
    return {
        "first": first,
        "rtf": total / played,
        "stalls": stalls,
        "slack": slack,
        "audio": played,
        "chunks": chunks,
    }


def bench(name: str, args) -> dict[str, float]:
    config = model_config(CONFIGS[name])
    model = SpectronModel(config)
    params = random_params(config)
    loaded = inference.LoadedModel(model, params, vocabulary=model.vocabulary, step=0)
    fps = config.spectrogram.frames_per_second
    batch = make_batch(model, 1, round(args.prompt_s * fps), args.text_tokens)
    features = batch["encoder_features"][0]
    options = decoding.DecodeConfig.for_model(
        model, fixed_duration=True, max_text_tokens=args.text_tokens, max_frames=args.frames
    )
    vocoder = GriffinLimVocoder(spectrogram_config=config.spectrogram)
    one_stream(loaded, features, options, vocoder, args.chunk_groups)  # Compiles everything.
    runs = [
        one_stream(loaded, features, options, vocoder, args.chunk_groups)
        for _ in range(args.repeats)
    ]
    best = min(runs, key=lambda r: r["first"])
    chunk_s = args.chunk_groups * config.reduction_factor / fps
    print(
        f"\n[{name}] decoder {config.decoder.num_layers} x {config.decoder.d_model}, "
        f"r = {config.reduction_factor}, prompt {args.prompt_s:.1f} s, {args.text_tokens} text "
        f"tokens, {args.frames} frames ({args.frames / fps:.2f} s), chunks of "
        f"{args.chunk_groups} groups ({chunk_s * 1000:.0f} ms of audio)"
    )
    for label, run in (("best", best), ("worst", max(runs, key=lambda r: r["first"]))):
        print(
            f"  {label:5s} first audio {run['first']:.3f} s  RTF {run['rtf']:.3f}  "
            f"stalls {run['stalls']}  slack {run['slack']:.3f} s  ({run['chunks']} chunks, "
            f"{run['audio']:.2f} s of audio)"
        )
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small", help="comma-separated: tiny, small")
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--prompt-s", type=float, default=3.0, help="prompt seconds")
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--chunk-groups", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs")
    summary = {name: bench(name.strip(), args) for name in args.configs.split(",")}
    if "tiny" in summary:
        t = summary["tiny"]
        ok = t["first"] <= 0.5 and t["stalls"] == 0 and t["rtf"] <= 0.5
        print(
            f"\ntiny: first audio {t['first']:.3f} s (target <= 0.5), {t['stalls']} stalls "
            f"(target 0), RTF {t['rtf']:.3f} (target <= 0.5): {'met' if ok else 'NOT met'}"
        )


if __name__ == "__main__":
    main()

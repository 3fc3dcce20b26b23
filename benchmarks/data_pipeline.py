"""Data-pipeline throughput: the synthetic task, and each log-mel implementation vs librosa.

    python benchmarks/data_pipeline.py [--num_examples 600] [--batch 16] [--repeats 5]

Prints (all measured in this one run, on this machine):
1. `spectron_synthetic_counting` train examples/s and spectrogram frames/s (prompt + continuation
   frames), with the cache already warm (the first-time synthesis time is printed separately),
   bare and through `SpectronFeatureConverter` + batching;
2. frames/s of `log_mel_tf`, `log_mel_jax` (jitted) and `log_mel_numpy` on one batch
   float32[B, T] of synthetic utterances, and of `librosa.feature.melspectrogram` (+ log) on the
   same batch, with each one's speed as a ratio to librosa's (> 1 = faster than librosa).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def _best_seconds(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call (compilation, caches)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def pipeline_throughput(num_examples: int, batch: int) -> None:
    import spectron_tasks
    from spectron_jax.feature_converter import SpectronFeatureConverter
    from spectron_tasks import synthetic_counting

    del spectron_tasks  # Imported to register the tasks.
    config = synthetic_counting.SyntheticCountingConfig()
    start = time.perf_counter()
    built = synthetic_counting.ensure_cached(config)
    if built:
        n = sum(config.num_examples(s) for s in built)
        print(
            f"first-time synthesis: {n} utterances in {time.perf_counter() - start:.1f} s "
            f"(per split: { {k: round(v, 1) for k, v in built.items()} })"
        )
    else:
        print("cache warm (no synthesis needed)")
    import seqio

    task = seqio.get_mixture_or_task("spectron_synthetic_counting")

    def run(ds, count):
        """(examples, frames, seconds), timed from the first element on (graph set-up excluded)."""
        iterator = ds.as_numpy_iterator()
        next(iterator)
        start = time.perf_counter()
        n_ex = n_frames = 0
        for ex in iterator:
            examples, frames = count(ex)
            n_ex, n_frames = n_ex + examples, n_frames + frames
        return n_ex, n_frames, time.perf_counter() - start

    ds = task.get_dataset(None, split="train", shuffle=False).take(num_examples)
    n_ex, n_frames, seconds = run(
        ds, lambda ex: (1, int(ex["prompt_length"] + ex["continuation_length"]))
    )
    print(
        f"task pipeline:        {n_ex / seconds:8.1f} examples/s  "
        f"{n_frames / seconds:10.0f} frames/s  ({n_ex} examples, {seconds:.1f} s)"
    )
    lengths = {
        "prompt_features": 256,
        "prompt_transcript": 16,
        "continuation_transcript": 32,
        "continuation_frames": 320,
    }
    converter = SpectronFeatureConverter(reduction_factor=2, apply_length_check=False)
    ds = converter(task.get_dataset(None, split="train", shuffle=False), lengths)
    ds = ds.take(num_examples).batch(batch).prefetch(2)
    n_ex, n_frames, seconds = run(
        ds,
        lambda b: (
            b["frame_mask"].shape[0],
            int(b["encoder_mask"].sum() + b["frame_mask"].sum()),
        ),
    )
    print(
        f"+ converter, batch {batch}: {n_ex / seconds:8.1f} examples/s  "
        f"{n_frames / seconds:10.0f} frames/s"
    )


def log_mel_comparison(batch: int, repeats: int) -> None:
    import jax
    import librosa
    import tensorflow as tf

    from spectron_jax.audio.spectrogram import (
        SpectrogramConfig,
        log_mel_jax,
        log_mel_numpy,
        log_mel_tf,
    )
    from spectron_tasks import synthetic_counting

    config = SpectrogramConfig()
    data = synthetic_counting.load_split(synthetic_counting.SyntheticCountingConfig(), "train")
    waves = [np.concatenate(data.waveforms(i)) for i in range(batch)]
    length = max(w.size for w in waves)
    audio = np.stack([np.pad(w, (0, length - w.size)) for w in waves])  # [B, T]
    frames = batch * config.num_frames(length)
    print(f"log-mel on one batch float32{list(audio.shape)} ({length / 16e3:.2f} s each):")

    def run_librosa():
        mel = librosa.feature.melspectrogram(
            y=audio,
            sr=config.sample_rate,
            n_fft=config.n_fft,
            hop_length=config.hop_length,
            win_length=config.win_length,
            window="hann",
            center=True,
            pad_mode="reflect",
            power=config.power,
            n_mels=config.n_mels,
            fmin=config.fmin,
            fmax=config.fmax,
        )
        return np.log10(np.maximum(mel, config.log_floor))

    jitted = jax.jit(lambda x: log_mel_jax(x, config))
    tf_fn = tf.function(lambda x: log_mel_tf(x, config))
    audio_tf = tf.constant(audio)
    audio_jax = jax.device_put(audio)
    impls = {
        "librosa": run_librosa,
        "log_mel_numpy": lambda: log_mel_numpy(audio, config),
        "log_mel_jax (jit)": lambda: jitted(audio_jax).block_until_ready(),
        "log_mel_tf (tf.function)": lambda: tf_fn(audio_tf).numpy(),
    }
    reference = run_librosa().transpose(0, 2, 1)  # [B, n_mels, frames] -> [B, frames, n_mels]
    seconds = {}
    for name, fn in impls.items():
        seconds[name] = _best_seconds(fn, repeats)
        diff = float(np.max(np.abs(np.asarray(fn()).reshape(reference.shape) - reference)))
        if name == "librosa":
            diff = 0.0
        print(
            f"  {name:26s} {frames / seconds[name]:10.0f} frames/s  "
            f"x{seconds['librosa'] / seconds[name]:5.2f} librosa  (max |diff| {diff:.1e})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_examples", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pipeline_throughput(args.num_examples, args.batch)
    log_mel_comparison(args.batch, args.repeats)


if __name__ == "__main__":
    main()

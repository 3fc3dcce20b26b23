"""Data-pipeline throughput: the synthetic task, and each log-mel implementation vs librosa.

    python benchmarks/data_pipeline.py [--num_examples 600] [--batch 16] [--repeats 5]

Prints (all measured in this one run, on this machine):
1. `spectron_synthetic_counting` train examples/s and spectrogram frames/s (prompt + continuation
   frames), with the cache already warm (the first-time synthesis time is printed separately),
   bare and through `SpectronFeatureConverter` + batching;
2. frames/s of `log_mel_tf`, `log_mel_jax` (jitted) and `log_mel_numpy` on one batch
   float32[B, T] of synthetic utterances, and of `librosa.feature.melspectrogram` (+ log) on the
   same batch, with each one's speed as a ratio to librosa's (> 1 = faster than librosa);
3. the base experiment's preprocessing at its feature lengths (w2v-BERT fbank of a 3 s prompt,
   target log-mel of 2048 frames, tokenisation; LJSpeech utterances tiled to 35 s) on one core,
   the cores a host needs for the predicted step (`--step_s`, `--examples_per_host`), the same
   examples read from a feature cache, and the time to the first batch after a deep resume from
   each (`--base_only` runs this part alone).
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


LJSPEECH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"
)


def base_task_throughput(num_examples: int, step_s: float, examples_per_host: int) -> None:
    """The base experiment's preprocessing at its feature lengths, on one CPU core: 3 s of
    w2v-BERT fbank (the prompt), the target log-mel of 32 s (2000 of 2048 frames) and the
    tokenised transcript, through the base model's feature converter; then the same examples
    read back from a feature cache, and resuming deep into each."""
    import csv

    import gin
    import seqio
    import tensorflow as tf

    import spectron_tasks  # noqa: F401 - registers the tasks
    from spectron_jax import aot
    from spectron_jax.audio import io as audio_io
    from spectron_jax.audio.fbank import W2vBertFbankConfig
    from spectron_tasks import speech_task

    folder = os.path.join(LJSPEECH, "ljspeech_subset")
    if not os.path.isdir(folder):
        print(f"base task: skipped ({folder} not found)")
        return
    with open(os.path.join(folder, "metadata.csv"), newline="") as f:
        rows = list(csv.DictReader(f))[:8]
    rate, prompt_s, total_s = 16_000, 3.0, 35.0
    raw = []
    for row in rows:  # Each utterance tiled to 35 s: LibriSpeech's longest, the base lengths.
        wave, _ = audio_io.load_audio(os.path.join(folder, row["path"]), rate)
        wave = np.resize(wave, int(total_s * rate)).astype(np.float32)
        raw.append((wave[: int(prompt_s * rate)], wave[int(prompt_s * rate) :], row["text"]))

    def source_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        ds = tf.data.Dataset.from_tensor_slices(
            {
                "prompt_audio": np.stack([r[0] for r in raw]),
                "continuation_audio": np.stack([r[1] for r in raw]),
                "prompt_text": [r[2] for r in raw],
                "continuation_text": [""] * len(raw),
                "speaker_id": ["LJ"] * len(raw),
                "id": [f"lj{i}" for i in range(len(raw))],
            }
        )
        return ds.repeat()

    name = "benchmark_base_lengths"
    speech_task.register_speech_task(
        name,
        seqio.FunctionDataSource(source_fn, splits=["train"]),
        front_end=W2vBertFbankConfig(),
    )
    experiment = aot.read_experiment(["gin/spectron_base.gin"], [], None)
    lengths = dict(gin.query_parameter("%TASK_FEATURE_LENGTHS"))
    ds = seqio.get_dataset(
        name,
        task_feature_lengths=lengths,
        dataset_split="train",
        shuffle=False,
        num_epochs=None,
        feature_converter=experiment.model.feature_converter(),
    )
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1  # One core: the per-core rate.
    options.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(options)
    iterator = ds.as_numpy_iterator()
    first = next(iterator)
    start = time.perf_counter()
    examples = [next(iterator) for _ in range(num_examples)]
    per_core = num_examples / (time.perf_counter() - start)
    shapes = {k: list(v.shape) for k, v in first.items() if v.dtype.kind in "biuf"}
    print(f"base task preprocessing, one core: {per_core:.1f} examples/s; example {shapes}")
    need = examples_per_host / step_s
    print(
        f"  a host feeding {examples_per_host} examples every {step_s * 1e3:.0f} ms needs "
        f"{need:.0f} examples/s = {need / per_core:.1f} cores of this machine"
    )
    cache_and_resume(ds, [first, *examples], per_core)


def cache_and_resume(ds, examples: list, per_core: float) -> None:
    """The examples read back from a feature cache, and the first batch after deep resumes from
    the cache and from the seqio dataset `ds`."""
    import tempfile

    from spectron_jax import feature_cache

    with tempfile.TemporaryDirectory() as cache_dir:
        feature_cache.write(iter(examples), cache_dir, len(examples))
        make = feature_cache.dataset_fn(cache_dir, batch_size=8)
        batches = make(0, 1, 0, 0)
        next(batches)
        start = time.perf_counter()
        count = 0
        while count < 4 * len(examples):
            count += len(next(batches)["target_frames"])
        cached = count / (time.perf_counter() - start)
        print(
            f"  from a feature cache, one core: {cached:.0f} examples/s ({cached / per_core:.0f}x)"
        )
        for skip in (0, 1000, 100_000):
            start = time.perf_counter()
            next(iter(make(0, 1, 0, skip)))
            print(
                f"  cache: first batch after skipping {skip} batches in "
                f"{1e3 * (time.perf_counter() - start):.1f} ms"
            )
    for skip in (0, 10, 40):  # The seqio path replays each skipped batch's preprocessing.
        start = time.perf_counter()
        next(ds.batch(8).skip(skip).as_numpy_iterator())
        print(
            f"  seqio: first batch after skipping {skip} batches in "
            f"{time.perf_counter() - start:.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_examples", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base_only", action="store_true", help="only the base-lengths part")
    parser.add_argument("--base_examples", type=int, default=40)
    parser.add_argument("--step_s", type=float, default=0.135, help="predicted base step")
    parser.add_argument("--examples_per_host", type=int, default=16, help="base: 256 / 16")
    args = parser.parse_args()
    if not args.base_only:
        pipeline_throughput(args.num_examples, args.batch)
        log_mel_comparison(args.batch, args.repeats)
    base_task_throughput(args.base_examples, args.step_s, args.examples_per_host)


if __name__ == "__main__":
    main()

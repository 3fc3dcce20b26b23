"""Decoding speed: KV-cached generation vs uncached recomputation, frames/s and real-time factor.

For each config (random weights, which cost what trained ones cost) on a prompt of `--prompt-s`
seconds and a `--text-tokens` transcript, it times:

  cached     `decoding.generate(text_mode="forced")`: encode, prefill, then `--frames` frames with
             the KV cache in one compiled `lax.while_loop` (one decoder position per step);
  uncached   `decoding.generate_frames_uncached`: the whole network (encoder included) re-run over
             the full fixed-slot sequence for every new frame group;
  free       `decoding.generate(text_mode="free")`: `--text-tokens` greedy text steps, then the
             same frames (end to end; a random model never emits EOS, so text runs to the limit).

Each is timed as the best of `--repeats` calls after a warm-up call that compiles. The real-time
factor (RTF) is compute seconds per second of audio at the `SpectrogramConfig` frame rate
(16 kHz / hop 256 = 62.5 frames/s: 500 frames = 8 s), before the vocoder (benchmarks/vocoders.py).

    python benchmarks/decode.py                          # tiny and small, 500 frames, batch 1
    python benchmarks/decode.py --configs tiny --frames 200 --batch 4

Configs: `tiny` = gin/models/tiny.gin (4 x 256 Gemma-3-style decoder, r = 2); `small` = tiny.gin
with the wider bindings of benchmarks/train_step.py (8 x 512 decoder, 4 x 256 Conformer).
Targets (2-core CPU): cached >= 10x faster than uncached at 500 frames; tiny RTF <= 0.1.
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# The same "small" config as the train-step benchmark (this script's folder is on sys.path).
from train_step import SMALL_BINDINGS  # noqa: E402

from spectron_jax import config as config_lib  # noqa: E402
from spectron_jax import decoding  # noqa: E402
from spectron_jax.models import SpectronModel, example_input_shapes  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"tiny": (), "small": SMALL_BINDINGS}


def model_config(bindings: tuple[str, ...]) -> config_lib.SpectronConfig:
    config_lib.config_from_gin_file(os.path.join(REPO, "gin/models/tiny.gin"), (REPO,))
    gin.parse_config(bindings)
    return config_lib.spectron_config()


def random_params(config: config_lib.SpectronConfig, seed: int = 0):
    """Parameters of the model's exact tree (abstract init, numpy fill: no init compile)."""
    model = SpectronModel(config)
    abstract = jax.eval_shape(
        lambda r: nn.unbox(model.get_initial_variables(r, example_input_shapes(config))["params"]),
        jax.random.PRNGKey(seed),
    )
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if len(leaf.shape) >= 2:
            return jnp.asarray(rng.normal(size=leaf.shape) / math.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray(1.0 + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree.map(fill, abstract)


def make_batch(model, batch: int, prompt_frames: int, text_tokens: int, seed: int = 0):
    config = model.config
    rng = np.random.default_rng(seed)
    vocab = config.decoder.vocab_size
    tokens = rng.integers(4, vocab, size=(batch, text_tokens + 1)).astype(np.int32)
    tokens[:, 0] = model.bos_id
    return {
        "encoder_features": rng.normal(
            size=(batch, prompt_frames, config.encoder_feature_dim)
        ).astype(np.float32),
        "encoder_mask": np.ones((batch, prompt_frames), np.int32),
        "decoder_input_tokens": tokens,
        "text_part": np.ones_like(tokens),
    }


def best_time(fn, repeats: int) -> tuple[float, float, float]:
    """(warm-up seconds including compile, best wall seconds, process CPU seconds of that call).

    The CPU time (all threads) is the figure to trust on a shared machine: wall time there
    includes waiting for cores that other jobs hold.
    """
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    best, cpu = math.inf, math.inf
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        wall = time.perf_counter() - start
        if wall < best:
            best, cpu = wall, time.process_time() - cpu_start
    return first, best, cpu


def bench(name: str, args) -> dict[str, float]:
    config = model_config(CONFIGS[name])
    model = SpectronModel(config)
    params = random_params(config)
    fps = config.spectrogram.frames_per_second
    prompt_frames = round(args.prompt_s * fps)
    batch = make_batch(model, args.batch, prompt_frames, args.text_tokens)
    audio_s = args.frames / fps
    common = dict(max_text_tokens=args.text_tokens, max_frames=args.frames)
    forced = decoding.DecodeConfig(text_mode="forced", **common)
    free = decoding.DecodeConfig(text_mode="free", **common)

    results = {}
    runs = [
        ("cached", lambda: decoding.generate(model, params, batch, forced)["frames"]),
        ("free", lambda: decoding.generate(model, params, batch, free)["frames"]),
    ]
    if not args.skip_uncached:
        runs.append(
            (
                "uncached",
                lambda: decoding.generate_frames_uncached(model, params, batch, args.frames),
            )
        )
    p = config.prefix_length(prompt_frames)
    print(
        f"\n[{name}] decoder {config.decoder.num_layers} x {config.decoder.d_model}, "
        f"r = {config.reduction_factor}, batch {args.batch}, prompt {prompt_frames} frames "
        f"-> {p} prefix slots, {args.text_tokens} text tokens, {args.frames} frames "
        f"({audio_s:.2f} s of audio)"
    )
    for label, fn in runs:
        first, best, cpu = best_time(fn, args.repeats if label != "uncached" else 1)
        results[label] = best
        rtf = results[f"rtf_{label}"] = best / audio_s
        print(
            f"  {label:9s} {best:8.3f} s  {args.batch * args.frames / best:9.1f} frames/s  "
            f"RTF {rtf:7.4f}  (CPU {cpu:.3f} s, RTF {cpu / audio_s:.4f} by CPU time; "
            f"first call incl. compile {first:.1f} s)"
        )
    if "uncached" in results:
        print(
            f"  uncached / cached = {results['uncached'] / results['cached']:.1f}x (target >= 10)"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small", help="comma-separated: tiny, small")
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-s", type=float, default=3.0, help="prompt seconds")
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-uncached", action="store_true")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    summary = {}
    for name in args.configs.split(","):
        summary[name] = bench(name.strip(), args)
    if "tiny" in summary:
        rtf = summary["tiny"]["rtf_cached"]
        print(f"\ntiny cached RTF {rtf:.4f} (target <= 0.1, before the vocoder)")


if __name__ == "__main__":
    main()

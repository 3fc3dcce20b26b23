"""Speed of the vocoders: seconds of audio made per second of compute (higher is faster).

Griffin-Lim (jitted, `--iters` fast-GL iterations) and the HiFi-GAN generator at the size of
`microsoft/speecht5_hifigan` (80 mels, upsample [4, 4, 4, 4] with kernels [8, 8, 8, 8], 512
initial channels, resblock kernels [3, 7, 11], dilations [[1, 3, 5]] * 3; random weights, which
cost the same as trained ones), each on `--seconds` of frames, timed after a warm-up call that
compiles. The real-time factor is the inverse: compute seconds per audio second.

    python benchmarks/vocoders.py                       # 5 s of frames, batch 1
    python benchmarks/vocoders.py --batch 4 --iters 64
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np

from spectron_jax.audio import griffin_lim, hifigan
from spectron_jax.audio.spectrogram import SpectrogramConfig


def _time(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls, after one warm-up (compile) call."""
    jax.block_until_ready(fn())
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="audio per example")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=32, help="Griffin-Lim iterations")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = SpectrogramConfig()
    frames = math.ceil(args.seconds * config.frames_per_second)
    audio_seconds = args.batch * config.num_samples(frames) / config.sample_rate
    rng = np.random.default_rng(0)
    # A plausible log-mel range (speech sits between about -4 and 0 in log10 magnitude).
    log_mel = rng.uniform(-4.0, -0.5, (args.batch, frames, config.n_mels)).astype(np.float32)
    print(
        f"device: {jax.devices()[0].device_kind}; batch {args.batch} x {frames} frames "
        f"({audio_seconds:.2f} s of audio at {config.sample_rate} Hz)"
    )

    gl = griffin_lim.GriffinLimVocoder(config, num_iters=args.iters)
    gl_seconds = _time(lambda: gl(log_mel), args.repeats)

    hifi_config = hifigan.HifiGanConfig()
    params = hifigan.init_params(hifi_config, jax.random.PRNGKey(0))
    vocoder = hifigan.HifiGanVocoder(hifi_config, params, config)
    hifi_seconds = _time(lambda: vocoder(log_mel), args.repeats)

    for name, seconds in (
        (f"griffin-lim ({args.iters} iters)", gl_seconds),
        ("hifi-gan (speecht5 size)", hifi_seconds),
    ):
        print(
            f"{name:28s} {seconds:7.3f} s compute  {audio_seconds / seconds:8.2f} s audio/s  "
            f"RTF {seconds / audio_seconds:.3f}"
        )


if __name__ == "__main__":
    main()

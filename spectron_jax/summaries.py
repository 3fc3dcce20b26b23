"""Training metrics: TensorBoard event files (clu writers), console progress, throughput and MFU.

MFU = model FLOPs per step / (step time x peak FLOP/s of all devices). The peak is a table per
device kind (dense bf16 for accelerators); on CPU it is measured with a large f32 matmul, the
same yardstick the speed targets in docs/PERFORMANCE.md use. Only process 0 writes.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers

logger = logging.getLogger(__name__)

# Dense peak FLOP/s per chip (bf16 where the device has it), from the vendors' data sheets.
PEAK_FLOPS_BY_KIND: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


@functools.cache
def measured_cpu_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an `n x n` f32 matmul on the default CPU device."""
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops_per_device(device: jax.Device | None = None) -> float:
    """Peak FLOP/s of one device: the table by `device_kind`, else (CPU) a measured matmul.

    On CPU, fake host devices (`--xla_force_host_platform_device_count`) share the same cores,
    so the measured value is the whole host's and is divided by the local device count.
    """
    device = device or jax.devices()[0]
    kind = device.device_kind
    for name, peak in PEAK_FLOPS_BY_KIND.items():
        if kind.startswith(name):
            return peak
    if device.platform == "cpu":
        return measured_cpu_peak_flops() / jax.local_device_count()
    logger.warning("no peak FLOP/s known for device kind %r; MFU will not be reported", kind)
    return float("nan")


def compiled_flops(compiled: Any) -> float:
    """FLOPs of a compiled computation by XLA's cost analysis (NaN where unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - cost analysis is optional on some backends
        return float("nan")
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def batch_throughput_counts(batch: Mapping[str, Any]) -> dict[str, float]:
    """Text tokens and spectrogram frames in a batch, from its masks (CONTRACTS.md section 2)."""
    out: dict[str, float] = {}
    if "decoder_loss_weights" in batch:
        out["text_tokens"] = float(np.sum(np.asarray(batch["decoder_loss_weights"]) > 0))
    if "frame_mask" in batch:
        out["frames"] = float(np.sum(np.asarray(batch["frame_mask"])))
    return out


class MetricsLogger:
    """Writes scalars to TensorBoard and prints progress (step, loss, steps/s, ETA, MFU)."""

    def __init__(
        self,
        logdir: str,
        num_steps: int,
        flops_per_step: float = float("nan"),
        peak_flops: float | None = None,
        clock: Any = time.perf_counter,
    ):
        """Creates the writers.

        Args:
          logdir: TensorBoard directory (events of process 0 only).
          num_steps: the step the run ends at (for the ETA).
          flops_per_step: model FLOPs of one train step (all devices together).
          peak_flops: peak FLOP/s of all devices together; default the table / CPU benchmark.
          clock: seconds, injectable for tests.
        """
        self.is_writer = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(
            logdir, just_logging=not self.is_writer, asynchronous=True
        )
        self.num_steps = num_steps
        self.flops_per_step = flops_per_step
        if peak_flops is None:
            peak_flops = peak_flops_per_device() * jax.device_count()
        self.peak_flops = peak_flops
        self.clock = clock
        self._last_time: float | None = None
        self._last_step: int | None = None
        self._counts: dict[str, float] = {}

    def count_batch(self, batch: Mapping[str, Any]) -> None:
        """Accumulates tokens / frames of a host batch (call once per step)."""
        for k, v in batch_throughput_counts(batch).items():
            self._counts[k] = self._counts.get(k, 0.0) + v * jax.process_count()

    def start(self, step: int) -> None:
        """Marks the timing origin (after compilation, so the first rate is honest)."""
        self._last_time, self._last_step, self._counts = self.clock(), step, {}

    def log_train(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
        """Writes train scalars plus rates since the last call; prints a progress line.

        Args:
          step: the step just completed.
          metrics: host floats (loss, grad_norm, learning_rate, model metrics).

        Returns:
          Everything written (incl. steps_per_sec, text_tokens_per_sec, frames_per_sec, mfu).
        """
        now = self.clock()
        scalars = {f"train/{k}": float(v) for k, v in metrics.items() if k != "finite"}
        if self._last_time is not None and step > self._last_step and now > self._last_time:
            dt, ds = now - self._last_time, step - self._last_step
            scalars["perf/steps_per_sec"] = ds / dt
            scalars["perf/step_time_sec"] = dt / ds
            for k, v in self._counts.items():
                scalars[f"perf/{k}_per_sec"] = v / dt
            if np.isfinite(self.flops_per_step) and np.isfinite(self.peak_flops):
                scalars["perf/mfu"] = self.flops_per_step * ds / dt / self.peak_flops
        self.writer.write_scalars(step, scalars)
        rate = scalars.get("perf/steps_per_sec")
        eta = (self.num_steps - step) / rate if rate else float("nan")
        mfu = scalars.get("perf/mfu")
        logger.info(
            "step %d/%d loss %.4f | %s steps/s | ETA %s%s",
            step,
            self.num_steps,
            metrics.get("loss", float("nan")),
            f"{rate:.3g}" if rate else "-",
            _fmt_time(eta),
            f" | MFU {100 * mfu:.1f}%" if mfu is not None else "",
        )
        self._last_time, self._last_step, self._counts = now, step, {}
        return scalars

    def log_eval(self, step: int, metrics: Mapping[str, float], prefix: str = "eval") -> None:
        """Writes evaluation scalars under `prefix/`."""
        self.writer.write_scalars(step, {f"{prefix}/{k}": float(v) for k, v in metrics.items()})
        logger.info(
            "%s @ %d: %s",
            prefix,
            step,
            ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())),
        )

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self.writer.write_hparams(dict(hparams))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _fmt_time(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

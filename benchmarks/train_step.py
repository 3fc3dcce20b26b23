"""Train-step speed: our decoder and Spectron through `Trainer`, against a hand-written baseline.

    python benchmarks/train_step.py                              # every config, full size
    python benchmarks/train_step.py --configs decoder,hand --steps 3 --batch 2 --seq 128

Configs (`--configs`, comma-separated; default all):
  decoder     the reference text-only LM (d_model 512, 8 layers, 8 heads of 64, SwiGLU
              2048, vocab 8192 untied, seq 512, batch 8, f32, AdamW) as `nn.decoder.Decoder`
              trained by `trainer.Trainer` (its default step: clipping, finite check);
  hand        the same math as a minimal flax + optax step written below (the "hand baseline");
  spectron    Spectron with that LM, a frozen 4 x 512 Conformer and r = 2 heads, laid out as
              64 prefix + 64 text + 384 frame slots = 512 LM positions (768 target frames);
  tiny, small `gin/models/tiny.gin` and a wider variant of it, on the embedded default's layout
              (256 prompt frames -> 64 prefix slots, 48 text slots, 320 target frames -> 160 slots);
  tiny_text, small_text  their decoders alone, text-only over the same number of LM positions.

For each config it prints the median step time of `--steps` steps after one warm-up step, text
tokens/s and target frames/s, the model FLOPs of `spectron_jax/flops.py`, XLA's compiled FLOPs
(`jit(...).lower(...).compile().cost_analysis()`) and their ratio, and MFU against the peak of a
2048 x 2048 f32 matmul measured at the start of the same run; then the ratios of the speed
targets. `--seq` sets the LM positions (layouts scale with it), `--batch` the batch size.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spectron_jax import config as config_lib  # noqa: E402
from spectron_jax import flops as flops_lib  # noqa: E402
from spectron_jax import losses, models, partitioning, trainer  # noqa: E402
from spectron_jax.nn.conformer import ConformerConfig  # noqa: E402
from spectron_jax.nn.decoder import Decoder, DecoderConfig  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_CONFIGS = ("decoder", "hand", "spectron", "tiny", "tiny_text", "small", "small_text")

REFERENCE_DECODER = DecoderConfig(
    vocab_size=8192,
    num_layers=8,
    d_model=512,
    num_heads=8,
    num_kv_heads=8,
    head_dim=64,
    mlp_dim=2048,
    activation="silu",
    norm_variant="llama",
    # Unrolled, as the hand baseline's Python loop of layers; and XLA's cost analysis counts a
    # scanned body once, which would hide L - 1 layers' FLOPs from the compiled / model ratio.
    scan_layers=False,
)
# Same AdamW hyper-parameters for our trainer and the hand baseline.
OPTIMIZER = trainer.OptimizerConfig(
    name="adamw", learning_rate=1e-4, warmup_steps=10, decay="constant", clip_norm=1.0
)
# Binding for the "small" config on top of gin/models/tiny.gin.
SMALL_BINDINGS = (
    "spectron.decoder_config.d_model = 512",
    "spectron.decoder_config.num_layers = 8",
    "spectron.decoder_config.num_heads = 8",
    "spectron.decoder_config.num_kv_heads = 4",
    "spectron.decoder_config.mlp_dim = 1536",
    "spectron.conformer_config.hidden_dim = 256",
    "spectron.conformer_config.num_layers = 4",
    "spectron.conformer_config.mlp_dim = 1024",
)


# ------------------------------------------------------------------------------------------------
# Peak and timing.
# ------------------------------------------------------------------------------------------------


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` jitted float32[n, n] @ float32[n, n] (2 n^3 FLOPs)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _cost_flops(compiled: jax.stages.Compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older jax: one dict per module.
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


@dataclasses.dataclass
class Bench:
    """A compiled train step ready to time.

    Attributes:
      name: config name.
      step: (state) -> state, one train step on a fixed batch (the state is donated).
      state: initial state.
      compiled_flops: XLA cost-analysis FLOPs of the step.
      model: model FLOPs (spectron_jax/flops.py).
      batch: B.
      positions: LM positions per example.
      text_tokens: text tokens per example (text slots with a loss).
      frames: target spectrogram frames per example.
      hlo: optimized HLO text of the step.
      compile_s: lowering + compilation seconds.
    """

    name: str
    step: Callable[[Any], Any]
    state: Any
    compiled_flops: float
    model: flops_lib.FlopCount
    batch: int
    positions: int
    text_tokens: int
    frames: int
    hlo: str
    compile_s: float


def time_steps(bench: Bench, steps: int) -> list[float]:
    """Seconds of each of `steps` steps after one warm-up step."""
    state = jax.block_until_ready(bench.step(bench.state))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state = jax.block_until_ready(bench.step(state))
        times.append(time.perf_counter() - start)
    bench.state = None  # Donated; free the last state with the bench.
    return times


# ------------------------------------------------------------------------------------------------
# Ours: Decoder / Spectron through trainer.Trainer.
# ------------------------------------------------------------------------------------------------


class TextLM:
    """Text-only causal LM on `nn.decoder.Decoder` with the BaseModel methods `Trainer` needs."""

    def __init__(self, config: DecoderConfig):
        self.module = Decoder(config)

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        tokens = jnp.zeros(input_shapes["decoder_input_tokens"], jnp.int32)
        return self.module.init(rng, tokens, method=Decoder.forward_tokens)

    def loss_fn(self, params, batch, dropout_rng):
        logits = self.module.apply(
            {"params": params}, batch["decoder_input_tokens"], method=Decoder.forward_tokens
        )
        weights = batch["decoder_loss_weights"]
        ce, _, _ = losses.cross_entropy(logits, batch["decoder_target_tokens"], weights)
        loss = jnp.sum(ce) / jnp.maximum(jnp.sum(weights), 1.0)
        return loss, {"ce": loss}


def _text_batch(batch: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab, (batch, length + 1), dtype=np.int32)
    return {
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": np.ones((batch, length), np.float32),
    }


def _spectron_batch(
    config: config_lib.SpectronConfig, batch: int, prompt_frames: int, text: int, frames: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, config.decoder.vocab_size, (batch, text + 1), dtype=np.int32)
    part = np.ones((batch, text), np.int32)
    part[:, text // 3 :] = 2
    return {
        "encoder_features": rng.normal(
            size=(batch, prompt_frames, config.encoder_feature_dim)
        ).astype(np.float32),
        "encoder_mask": np.ones((batch, prompt_frames), np.int32),
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": np.ones((batch, text), np.float32),
        "text_part": part,
        "target_frames": rng.normal(size=(batch, frames, config.n_mels)).astype(np.float32),
        "frame_mask": np.ones((batch, frames), np.int32),
    }


def trainer_bench(name: str, network: Any, data: dict[str, np.ndarray], **counts) -> Bench:
    """Compiles `Trainer`'s train step for the BaseModel-shaped `network` on one device."""
    mesh = partitioning.create_mesh(data=1, devices=jax.devices()[:1])
    tr = trainer.Trainer(network, mesh, optimizer=OPTIMIZER)
    rng = jax.random.key(0)
    tr.setup(data)
    state = tr.init_state(rng)
    sharded = partitioning.host_local_batch_to_global(data, mesh)
    start = time.perf_counter()
    compiled = tr.compile_train_step(sharded, rng)
    compile_s = time.perf_counter() - start

    def step(s):
        return tr.train_step(s, sharded, rng)[0]

    return Bench(
        name,
        step,
        state,
        _cost_flops(compiled),
        hlo=compiled.as_text(),
        compile_s=compile_s,
        **counts,
    )


def decoder_bench(name: str, config: DecoderConfig, batch: int, length: int) -> Bench:
    return trainer_bench(
        name,
        TextLM(config),
        _text_batch(batch, length, config.vocab_size),
        model=flops_lib.decoder_train_flops(config, batch, length),
        batch=batch,
        positions=length,
        text_tokens=length,
        frames=0,
    )


def spectron_bench(
    name: str, config: config_lib.SpectronConfig, batch: int, layout: tuple[int, int, int]
) -> Bench:
    """Spectron with (prefix slots, text slots, frame slots) = `layout`."""
    prefix, text, slots = layout
    # Inverse of the stem's subsampling and the connector's stacking: prompt frames for P slots.
    subsampling = 4 if config.encoder.stem == "subsampling" else 1
    prompt_frames = prefix * subsampling * config.connector_stack
    if config.prefix_length(prompt_frames) != prefix:
        raise ValueError(f"{prompt_frames} prompt frames do not give {prefix} prefix slots")
    frames = slots * config.reduction_factor
    return trainer_bench(
        name,
        models.SpectronModel(config),
        _spectron_batch(config, batch, prompt_frames, text, frames),
        model=flops_lib.spectron_train_flops(config, batch, prompt_frames, text, frames),
        batch=batch,
        positions=prefix + text + slots,
        text_tokens=text,
        frames=frames,
    )


def reference_spectron_config() -> config_lib.SpectronConfig:
    encoder = ConformerConfig(
        input_dim=80,
        stem="subsampling",
        subsampling_channels=64,
        hidden_dim=512,
        num_layers=4,
        num_heads=8,
        mlp_dim=2048,
        conv_kernel_size=15,
        causal_conv=False,
        position="rotary",
        scan_layers=False,  # As the decoder (REFERENCE_DECODER).
    )
    return config_lib.SpectronConfig(
        decoder=REFERENCE_DECODER,
        encoder=encoder,
        encoder_frozen=True,
        reduction_factor=2,
        prenet_hidden_dim=256,
        postnet_hidden_dim=512,
    )


def gin_spectron_config(bindings: tuple[str, ...] = ()) -> config_lib.SpectronConfig:
    import gin

    config_lib.config_from_gin_file(os.path.join(REPO, "gin/models/tiny.gin"), (REPO,))
    gin.parse_config(bindings)
    return config_lib.spectron_config()


# ------------------------------------------------------------------------------------------------
# The hand baseline: a minimal flax + optax Llama-style step, same math as `decoder`.
# ------------------------------------------------------------------------------------------------


def _rms(x, w):
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6) * w


def _rope(x, theta=10_000.0):  # x: [B, T, H, Dh], positions 0..T-1
    dh = x.shape[-1]
    inv = 1.0 / theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
    ang = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv
    ang = jnp.concatenate([ang, ang], -1)[None, :, None, :]
    x1, x2 = jnp.split(x, 2, -1)
    return x * jnp.cos(ang) + jnp.concatenate([-x2, x1], -1) * jnp.sin(ang)


class HandBlock(nn.Module):
    d: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        dh = self.d // self.heads
        h = _rms(x, self.param("ln1", nn.initializers.ones, (self.d,)))
        q, k, v = (nn.DenseGeneral((self.heads, dh), use_bias=False, name=n)(h) for n in "qkv")
        q, k = _rope(q), _rope(k)
        s = jnp.einsum("bthd,bshd->bhts", q, k) * dh**-0.5
        causal = jnp.tril(jnp.ones((t, t), bool))
        p = jax.nn.softmax(jnp.where(causal, s, jnp.finfo(jnp.float32).min), -1)
        o = jnp.einsum("bhts,bshd->bthd", p, v)
        x = x + nn.DenseGeneral(self.d, axis=(-2, -1), use_bias=False, name="o")(o)
        h = _rms(x, self.param("ln2", nn.initializers.ones, (self.d,)))
        g = nn.Dense(self.mlp, use_bias=False, name="gate")(h)
        u = nn.Dense(self.mlp, use_bias=False, name="up")(h)
        return x + nn.Dense(self.d, use_bias=False, name="down")(jax.nn.silu(g) * u)


class HandLM(nn.Module):
    vocab: int
    d: int
    layers: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d)(tokens)
        for _ in range(self.layers):
            x = HandBlock(self.d, self.heads, self.mlp)(x)
        x = _rms(x, self.param("ln_f", nn.initializers.ones, (self.d,)))
        return nn.Dense(self.vocab, use_bias=False, name="head")(x)


def hand_bench(name: str, config: DecoderConfig, batch: int, length: int) -> Bench:
    c = config
    if c.num_kv_heads != c.num_heads or c.head_dim * c.num_heads != c.d_model:
        raise ValueError("the hand baseline is plain multi-head attention with Dh = D / H")
    net = HandLM(c.vocab_size, c.d_model, c.num_layers, c.num_heads, c.mlp_dim)
    data = {k: jnp.asarray(v) for k, v in _text_batch(batch, length, c.vocab_size).items()}
    params = net.init(jax.random.key(0), data["decoder_input_tokens"])["params"]
    tx = optax.chain(
        optax.clip_by_global_norm(OPTIMIZER.clip_norm),
        optax.adamw(
            OPTIMIZER.learning_rate,
            b1=OPTIMIZER.b1,
            b2=OPTIMIZER.b2,
            eps=OPTIMIZER.eps,
            weight_decay=OPTIMIZER.weight_decay,
        ),
    )

    def loss_fn(p):
        logits = net.apply({"params": p}, data["decoder_input_tokens"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, data["decoder_target_tokens"])
        return jnp.mean(ce)

    def step(state):
        p, opt = state
        grads = jax.grad(loss_fn)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt

    state = (params, tx.init(params))
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state).compile()
    compile_s = time.perf_counter() - start
    return Bench(
        name,
        compiled,
        state,
        _cost_flops(compiled),
        model=flops_lib.decoder_train_flops(c, batch, length),
        batch=batch,
        positions=length,
        text_tokens=length,
        frames=0,
        hlo=compiled.as_text(),
        compile_s=compile_s,
    )


# ------------------------------------------------------------------------------------------------
# Config table and report.
# ------------------------------------------------------------------------------------------------


def _scaled(layout: tuple[int, int, int], seq: int | None) -> tuple[int, int, int]:
    """Scales (prefix, text, frame) slots to `seq` LM positions in the same proportions."""
    if seq is None:
        return layout
    total = sum(layout)
    p, t = max(1, layout[0] * seq // total), max(1, layout[1] * seq // total)
    return p, t, max(1, seq - p - t)


def build(name: str, batch: int | None, seq: int | None) -> Bench:
    tiny_layout = (64, 48, 160)
    if name in ("decoder", "hand"):
        fn = decoder_bench if name == "decoder" else hand_bench
        return fn(name, REFERENCE_DECODER, batch or 8, seq or 512)
    if name == "spectron":
        return spectron_bench(
            name, reference_spectron_config(), batch or 8, _scaled((64, 64, 384), seq)
        )
    if name in ("tiny", "tiny_text", "small", "small_text"):
        config = gin_spectron_config(SMALL_BINDINGS if name.startswith("small") else ())
        layout = _scaled(tiny_layout, seq)
        b = batch or (32 if name.startswith("tiny") else 16)
        if name.endswith("_text"):
            return decoder_bench(name, config.decoder, b, sum(layout))
        return spectron_bench(name, config, b, layout)
    raise ValueError(f"unknown config {name!r}; choose from {ALL_CONFIGS}")


@dataclasses.dataclass
class Result:
    name: str
    seconds: float
    per_position: float
    model_flops: float
    compiled_flops: float


def report(bench: Bench, times: list[float], peak: float) -> Result:
    t = statistics.median(times)
    model = bench.model.total
    print(
        f"[{bench.name}] B={bench.batch} positions={bench.positions} "
        f"(compile {bench.compile_s:.1f} s)\n"
        f"  step {t:.3f} s (median of {len(times)}; min {min(times):.3f}, max {max(times):.3f})"
        f"  text tokens/s {bench.batch * bench.text_tokens / t:,.0f}"
        f"  frames/s {bench.batch * bench.frames / t:,.0f}\n"
        f"  model FLOPs {bench.model.describe()}\n"
        f"  compiled FLOPs {bench.compiled_flops / 1e9:,.1f} G = "
        f"{bench.compiled_flops / model:.3f} x model\n"
        f"  achieved {model / t / 1e9:,.1f} GFLOP/s  MFU {model / t / peak:.1%}",
        flush=True,
    )
    return Result(bench.name, t, t / (bench.batch * bench.positions), model, bench.compiled_flops)


def summary(results: dict[str, Result]) -> None:
    print("\nratios (against their targets):")
    if "decoder" in results and "hand" in results:
        r = results["decoder"].seconds / results["hand"].seconds
        print(f"  ours / hand baseline step time: {r:.3f} (target <= 1.25)")
    if "spectron" in results and "decoder" in results:
        r = results["spectron"].per_position / results["decoder"].per_position
        print(f"  spectron / text-only decoder, time per LM position: {r:.3f} (target <= 1.3)")
    for speech, text in (("tiny", "tiny_text"), ("small", "small_text")):
        if speech in results and text in results:
            r = results[speech].per_position / results[text].per_position
            print(f"  {speech} / {text}, time per LM position: {r:.3f}")
    for res in results.values():
        print(
            f"  {res.name}: compiled / model FLOPs {res.compiled_flops / res.model_flops:.3f}"
            " (target <= 1.15)"
        )


def main(argv: list[str] | None = None) -> dict[str, Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(ALL_CONFIGS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default per config)")
    parser.add_argument("--seq", type=int, default=None, help="LM positions (default per config)")
    parser.add_argument("--dump_hlo", default=None, help="write each optimized HLO to this dir")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    for n in names:
        if n not in ALL_CONFIGS:
            parser.error(f"unknown config {n!r}; choose from {ALL_CONFIGS}")

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    peak = matmul_peak()
    print(f"peak: 2048x2048 f32 matmul {peak / 1e9:,.1f} GFLOP/s", flush=True)
    results = {}
    for n in names:
        bench = build(n, args.batch, args.seq)
        if args.dump_hlo:
            os.makedirs(args.dump_hlo, exist_ok=True)
            with open(os.path.join(args.dump_hlo, f"{n}.hlo.txt"), "w") as f:
                f.write(bench.hlo)
        results[n] = report(bench, time_steps(bench, args.steps), peak)
    summary(results)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return results


if __name__ == "__main__":
    main()

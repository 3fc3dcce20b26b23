"""The model-FLOPs formula (spectron_jax/flops.py) and the train-step benchmark's plumbing.

The formula is checked against the reference shape's published figure and against XLA's own
count (cost analysis of the compiled gradient), which counts every dot and convolution it runs.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import train_step  # noqa: E402

from spectron_jax import config as config_lib  # noqa: E402
from spectron_jax import (
    flops,  # noqa: E402
    models,  # noqa: E402
)
from spectron_jax.nn.conformer import ConformerConfig  # noqa: E402
from spectron_jax.nn.decoder import Decoder, DecoderConfig  # noqa: E402

SMALL = DecoderConfig(
    vocab_size=256,
    num_layers=1,
    d_model=128,
    num_heads=2,
    num_kv_heads=2,
    head_dim=64,
    mlp_dim=512,
)


def _compiled_flops(fn, *args) -> float:
    return train_step._cost_flops(jax.jit(fn).lower(*args).compile())


def test_reference_shape_gives_the_issue_figure():
    # 1,031 GFLOP per step with full attention for this shape (docs/PERFORMANCE.md).
    count = flops.decoder_train_flops(train_step.REFERENCE_DECODER, batch=8, length=512)
    block = 4 * 512 * 512 + 3 * 512 * 2048
    tokens = 8 * 512
    assert flops.decoder_block_params(train_step.REFERENCE_DECODER) == block
    assert count.terms["decoder_matmuls"] == 6 * 8 * block * tokens
    assert count.terms["lm_head"] == 6 * 512 * 8192 * tokens
    assert count.terms["decoder_attention"] == 3 * 8 * 4 * 8 * 512 * 512 * 512
    assert round(count.total / 1e9) == 1031


def test_decoder_formula_matches_xla_count_of_the_gradient():
    batch, length = 2, 64
    module = Decoder(SMALL)
    tokens = jnp.zeros((batch, length), jnp.int32)
    params = module.init(jax.random.key(0), tokens, method=Decoder.forward_tokens)["params"]

    def loss(p):
        return jnp.mean(module.apply({"params": p}, tokens, method=Decoder.forward_tokens) ** 2)

    model = flops.decoder_train_flops(SMALL, batch, length).total
    compiled = _compiled_flops(jax.grad(loss), params)
    # XLA also counts elementwise ops (norms, softmax), so it is a little above the formula.
    assert 1.0 <= compiled / model < 1.15, (compiled, model)
    # GQA shrinks k/v projections only; the formula follows.
    gqa = dataclasses.replace(SMALL, num_heads=4, num_kv_heads=1, head_dim=32)
    assert flops.decoder_block_params(gqa) == 128 * (4 + 2) * 32 + 4 * 32 * 128 + 3 * 128 * 512


def _spectron(frozen: bool) -> config_lib.SpectronConfig:
    encoder = ConformerConfig(
        input_dim=80,
        stem="subsampling",
        subsampling_channels=16,
        hidden_dim=128,
        num_layers=1,
        num_heads=2,
        mlp_dim=512,
        conv_kernel_size=7,
        causal_conv=False,
        position="rotary",
    )
    return config_lib.SpectronConfig(
        decoder=SMALL,
        encoder=encoder,
        encoder_frozen=frozen,
        reduction_factor=2,
        prenet_hidden_dim=64,
        postnet_hidden_dim=64,
        prenet_dropout=0.0,
    )


@pytest.mark.slow  # Compiling the Spectron gradient takes minutes on 2 cores.
@pytest.mark.parametrize("frozen", [True, False])
def test_spectron_formula_matches_xla_count_frozen_and_trained(frozen):
    config = _spectron(frozen)
    batch, prompt, text, frames = 2, 64, 16, 32
    data = train_step._spectron_batch(config, batch, prompt, text, frames)
    model = models.SpectronModel(config)
    shapes = {k: v.shape for k, v in data.items()}
    params = model.get_initial_variables(jax.random.key(0), shapes)["params"]
    params = jax.tree.map(
        lambda x: x.unbox() if hasattr(x, "unbox") else x,
        params,
        is_leaf=lambda x: hasattr(x, "unbox"),
    )

    def loss(p):
        return model.loss_fn(p, data, jax.random.key(1))[0]

    count = flops.spectron_train_flops(config, batch, prompt, text, frames)
    compiled = _compiled_flops(jax.grad(loss), params)
    assert 1.0 <= compiled / count.total < 1.15, (frozen, compiled, count.describe())
    # The encoder is a large share here, so a frozen/trained mix-up would miss the band.
    other = flops.spectron_train_flops(_spectron(not frozen), batch, prompt, text, frames)
    assert abs(other.total / count.total - 1) > 0.2


def test_benchmarks_of_our_step_and_the_hand_baseline_run():
    batch, length = 2, 32
    peak = train_step.matmul_peak(n=256, repeats=2)
    assert peak > 0
    results = []
    for build in (train_step.decoder_bench, train_step.hand_bench):
        bench = build("x", SMALL, batch, length)
        assert bench.model.total == flops.decoder_train_flops(SMALL, batch, length).total
        assert 1.0 <= bench.compiled_flops / bench.model.total < 1.3
        results.append(train_step.report(bench, train_step.time_steps(bench, 2), peak))
    ours, hand = results
    assert ours.seconds > 0 and hand.seconds > 0
    assert ours.per_position == pytest.approx(ours.seconds / (batch * length))


def test_hand_baseline_rejects_gqa():
    with pytest.raises(ValueError, match="plain multi-head"):
        train_step.hand_bench("x", dataclasses.replace(SMALL, num_kv_heads=1), 1, 8)


def test_layout_scaling_keeps_total():
    assert train_step._scaled((64, 64, 384), None) == (64, 64, 384)
    p, t, n = train_step._scaled((64, 64, 384), 128)
    assert (p, t, n) == (16, 16, 96)
    assert sum(train_step._scaled((64, 48, 160), 50)) == 50


@pytest.mark.slow
def test_main_runs_every_config_small():
    # 64 positions: at fewer, the optimizer's elementwise work per parameter (which XLA counts
    # and the 6 N tokens formula does not) is no longer small against the matmuls (16: 1.2-1.4x).
    results = train_step.main(["--steps", "1", "--batch", "1", "--seq", "64"])
    assert set(results) == set(train_step.ALL_CONFIGS)
    for r in results.values():
        assert np.isfinite(r.seconds) and 0.9 < r.compiled_flops / r.model_flops < 1.3

"""The TPU ahead-of-time tool: HLO collective accounting on known text, the memory sum, and a real
compile of the tiny experiment for a v5e slice where libtpu is installed (the `tpu` extra)."""

# ruff: noqa: E501 (HLO lines cannot be wrapped)
from __future__ import annotations

import importlib.util
import json
import types

import gin
import jax
import pytest

from spectron_jax import aot

# A loop of 3 trips whose body all-reduces f32[256] (1 KiB) over groups of 4 chips, an async
# all-gather to bf16[8,128] (2 KiB) over 2 chips in the entry, and a plain add (no collective).
HLO = """HloModule test

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]) parameter(0)
  %x = f32[256]{0:T(256)} get-tuple-element(%p), index=1
  %all-reduce.1 = f32[256]{0:T(256)} all-reduce(%x), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  ROOT %t = (s32[], f32[256]) tuple(%i, %all-reduce.1)
}

%cond (p: (s32[], f32[256])) -> pred[] {
  %p = (s32[], f32[256]) parameter(0)
  %constant.9 = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[] compare(%i, %constant.9), direction=LT
}

ENTRY %main (x: f32[256], y: bf16[4,128]) -> f32[256] {
  %x = f32[256] parameter(0)
  %y = bf16[4,128] parameter(1)
  %w = (s32[], f32[256]) while(%init), condition=%cond, body=%body
  %ag = (bf16[4,128], bf16[8,128]{1,0}) all-gather-start(%y), replica_groups=[4,2]<=[8], dimensions={0}
  %agd = bf16[8,128] all-gather-done(%ag)
  ROOT %r = f32[256] add(%x, %x)
}
"""


def test_collectives_count_loop_trips_group_sizes_and_async_pairs_once():
    got = aot.collective_bytes(HLO)
    # 3 trips x 1024 bytes x 2 (4 - 1) / 4 sent per byte of an all-reduce over 4 chips.
    assert got["all-reduce"] == pytest.approx(3 * 1024 * 1.5)
    # The -start's tuple holds the operand (1 KiB) and the result (2 KiB): (2 - 1) / 2 of 2 KiB.
    assert got["all-gather"] == pytest.approx(2048 * 0.5)
    assert got["reduce-scatter"] == got["all-to-all"] == got["collective-permute"] == 0.0


def test_group_size_formats():
    assert aot._group_size("x, replica_groups={{0,1,2},{3,4,5}}, y") == 3
    assert aot._group_size("x, replica_groups=[2,4]<=[8], y") == 4
    mesh = "replica_groups=mesh['axis_0'=2,'axis_1'=4,'axis_2'=1] {'axis_1','axis_2'}, to"
    assert aot._group_size(mesh) == 4


def test_memory_total_counts_aliased_buffers_once():
    stats = types.SimpleNamespace(
        argument_size_in_bytes=100,
        output_size_in_bytes=60,
        alias_size_in_bytes=50,
        temp_size_in_bytes=30,
        generated_code_size_in_bytes=5,
    )
    compiled = types.SimpleNamespace(memory_analysis=lambda: stats)
    assert aot.memory(compiled)["total"] == 100 + 60 - 50 + 30 + 5


def test_unknown_generation_is_an_error_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"v9x:2x2.*'v4', 'v5e', 'v5p', 'v6e'"):
        aot.chip_of("v9x:2x2")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the tpu extra")
def test_tiny_experiment_compiles_for_a_v5e_slice_and_fits(capsys, tmp_path):
    out = tmp_path / "aot.json"
    scanned = [f"--gin.spectron.{c}_config.scan_layers=True" for c in ("decoder", "conformer")]
    args = ["--gin_file=gin/spectron_tiny.gin", "--topology=v5e:2x4", f"--json={out}"]
    args += ["--decode-batch=8", "--decode-frames=64"]
    # The search under two policies: the run's own ("none", its compile reused) and "full".
    args += ["--find-max-batch", "--search-remats=none,full", "--max-batch-checks=0"]
    try:
        code = aot.main(args + scanned)
    finally:
        gin.clear_config()  # The experiment's bindings (its mesh, its vocabulary) stay here.
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "v5e:2x4: 8 devices, mesh {'data': 8, 'fsdp': 1, 'tensor': 1}, batch 32" in printed
    r = json.loads(out.read_text())
    assert r["fits"] and r["memory_per_chip"]["total"] < 1 << 30
    # The formula and XLA agree on the matmul work (elementwise ops add a few percent).
    assert 0.95 < r["flops_per_chip"]["ratio"] < 1.15
    # Data parallelism over 8 chips all-reduces the gradients: at least every float32 parameter
    # (4.58M, gin/models/tiny.gin) once, times 2 (8 - 1) / 8 sent per byte.
    assert r["collective_bytes_per_chip"]["all-reduce"] >= 4 * 4.5e6 * 1.75
    assert r["largest_arrays"][0]["path"].startswith(".params['decoder']['layers']")
    # Recomputing every block leaves fewer temporaries per example: a larger batch fits.
    assert r["max_batch"]["full"] > r["max_batch"]["none"] >= 32
    assert "per remat policy: none " in printed
    # Decoding compiled for the slice: every (replicated, float32) parameter is an argument.
    decode = r["decode"]
    assert decode["fits"] and decode["frames"] == 64
    assert decode["memory_per_chip"]["arguments"] >= 4 * 4.5e6
    assert 0 < decode["frame_step_s"] < 1e-3


def test_v4_devices_share_their_chip():
    """libtpu describes v4:2x2x1 as 8 devices on 4 chips (one per TensorCore)."""
    per_device = aot.device_figures("v4:2x2x1", 8)
    assert per_device.hbm_bytes == aot.CHIPS["v4"].hbm_bytes / 2
    assert aot.device_figures("v5e:2x4", 8) == aot.CHIPS["v5e"]


def test_find_max_batch_predicts_from_one_compile_and_checks_with_another(monkeypatch):
    """Memory 2 GiB fixed + 0.25 GiB per example (+ 1 GiB of temporaries that do not grow) on a
    16 GiB v5e chip: 52 examples fit (2 + 1 + 13); a prediction errs low, never high."""
    compiled_at = []

    def fake_compile(experiment, devices, batch):
        compiled_at.append(batch)
        stats = types.SimpleNamespace(
            argument_size_in_bytes=2 * aot.GiB,
            output_size_in_bytes=0,
            alias_size_in_bytes=0,
            temp_size_in_bytes=(1 + 0.25 * batch) * aot.GiB,
            generated_code_size_in_bytes=0,
        )
        return aot.Compiled(None, types.SimpleNamespace(memory_analysis=lambda: stats), batch)

    monkeypatch.setattr(aot, "compile_train_step", fake_compile)
    experiment = types.SimpleNamespace(grad_accum_steps=1)
    devices = jax.devices()[:4]  # The default mesh: data 4, so batches are multiples of 4.
    assert aot.find_max_batch(experiment, devices, "v5e:2x2", checks=1) == 28
    assert compiled_at == [4, 28]  # One prediction from the first compile, checked.
    compiled_at.clear()
    assert aot.find_max_batch(experiment, devices, "v5e:2x2", checks=0) == 28
    assert compiled_at == [4]
    compiled_at.clear()
    assert aot.find_max_batch(experiment, devices, "v5e:2x2") == 52
    assert compiled_at == [4, 28, 52]  # The line through two sizes is exact here.
    built = fake_compile(experiment, devices, 400)  # Far too big: the search steps down.
    assert 0 < aot.find_max_batch(experiment, devices, "v5e:2x2", built) <= 52


def test_the_search_per_remat_sets_each_policy_on_both_stacks(monkeypatch):
    """Memory 2 GiB fixed + per example 0.5 GiB under "none", 0.125 under "full", on a 16 GiB
    v5e chip: 28 and 112 examples fit. Each search starts at the config's batch (32)."""
    compiled_at = []

    def fake_compile(experiment, devices, batch):
        config = experiment.model.config
        assert config.decoder.remat == config.encoder.remat
        compiled_at.append((config.decoder.remat, batch))
        per_example = {"none": 0.5, "full": 0.125}[config.decoder.remat]
        stats = types.SimpleNamespace(
            argument_size_in_bytes=2 * aot.GiB,
            output_size_in_bytes=0,
            alias_size_in_bytes=0,
            temp_size_in_bytes=per_example * batch * aot.GiB,
            generated_code_size_in_bytes=0,
        )
        return aot.Compiled(None, types.SimpleNamespace(memory_analysis=lambda: stats), batch)

    monkeypatch.setattr(aot, "compile_train_step", fake_compile)
    monkeypatch.setattr(aot, "tpu_devices", lambda topology: jax.devices()[:4])
    tiny = ["gin/spectron_tiny.gin"]
    try:
        found = aot.max_batch_per_remat(tiny, [], "v5e:2x2", ["none", "full"], checks=1)
        assert found == {"none": 28, "full": 112}
        # 32 does not fit under "none" (18 GiB): the prediction from it, checked, fits.
        assert compiled_at == [("none", 32), ("none", 28), ("full", 32), ("full", 112)]
        compiled_at.clear()
        known = {"full": fake_compile(aot.read_experiment(tiny, [], "full"), None, 64)}
        compiled_at.clear()
        found = aot.max_batch_per_remat(tiny, [], "v5e:2x2", ["full"], checks=1, known=known)
        assert found == {"full": 112} and compiled_at == [("full", 112)]
    finally:
        gin.clear_config()


def refusing_compile(compiled_at, refuse_above):
    """A fake compile: 2 GiB fixed + 0.5 GiB per example, refused (as libtpu refuses) when the
    temporaries alone exceed a 16 GiB chip's HBM, i.e. above 32 examples."""

    def compile_train_step(experiment, devices, batch):
        compiled_at.append(batch)
        if batch > refuse_above:
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                "temporaries exceeds available HBM"
            )
        stats = types.SimpleNamespace(
            argument_size_in_bytes=2 * aot.GiB,
            output_size_in_bytes=0,
            alias_size_in_bytes=0,
            temp_size_in_bytes=0.5 * batch * aot.GiB,
            generated_code_size_in_bytes=0,
        )
        return aot.Compiled(None, types.SimpleNamespace(memory_analysis=lambda: stats), batch)

    return compile_train_step


def test_a_step_the_compiler_refuses_does_not_fit_and_the_search_goes_on(monkeypatch, capsys):
    compiled_at = []
    monkeypatch.setattr(aot, "compile_train_step", refusing_compile(compiled_at, 32))
    monkeypatch.setattr(aot, "tpu_devices", lambda topology: jax.devices()[:4])
    experiment = types.SimpleNamespace(grad_accum_steps=1)
    devices = jax.devices()[:4]
    # From 64 (refused): 32 compiles, and the prediction from it (28) is checked.
    assert aot.find_max_batch(experiment, devices, "v5e:2x2", checks=1, start=64) == 28
    assert compiled_at == [64, 32, 28]
    compiled_at.clear()
    args = ["--gin_file=gin/spectron_tiny.gin", "--topology=v5e:2x2", "--gin.BATCH_SIZE=64"]
    args += ["--remat=full", "--find-max-batch", "--search-remats=full", "--max-batch-checks=1"]
    try:
        assert aot.main(args) == 1
    finally:
        gin.clear_config()
    printed = capsys.readouterr().out
    assert "at global batch 64 DOES NOT FIT on v5e:2x2" in printed
    assert "batch 64: refused by the compiler (HBM) per chip" in printed
    assert "per remat policy: full 28" in printed
    # The search under the run's own policy does not compile the refused batch again.
    assert compiled_at == [64, 32, 28]

    # A compile error that is not about memory is not taken for "does not fit".
    def broken_compile(experiment, devices, batch):
        raise jax.errors.JaxRuntimeError("INTERNAL: a compiler bug")

    monkeypatch.setattr(aot, "compile_train_step", broken_compile)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        aot.find_max_batch(experiment, devices, "v5e:2x2", start=8)


def test_the_1b_experiment_reads_with_its_slice_and_the_public_model_sizes():
    try:
        experiment = aot.read_experiment(["gin/spectron_1b.gin"], [], None)
        fsdp = gin.query_parameter("create_mesh.fsdp")
        sources = gin.query_parameter("train.init_checkpoints")
    finally:
        gin.clear_config()
    config = experiment.model.config
    assert experiment.batch_size == 256 and fsdp == 4  # v5p-8: 4 chips, all on fsdp.
    assert config.encoder_frozen and config.decoder.remat == "minimal"
    assert experiment.grad_accum_steps == 4  # 256 in micro-batches of 64 (16 per chip).
    assert (config.decoder.num_layers, config.decoder.d_model) == (26, 1152)  # Gemma 3 1B.
    assert experiment.lengths["target_frames"] == 2048
    assert len(sources) == 2  # The encoder and the decoder, each from its own checkpoint.

"""The end-of-run counting figures (tasks/counting_evaluation.py) on hand-made predictions with
known answers, the pipeline on a random tiny model, and train() running it once at the end."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import pytest
import soundfile as sf
import spectron_testing as st

import spectron_tasks.counting_evaluation as counting
from spectron_jax import data
from spectron_jax.evaluation import runner
from spectron_jax.evaluation import samples as samples_lib
from spectron_jax.evaluation.metrics import dtw_l1
from spectron_jax.interfaces import EvalContext

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "trainer"))


# -- (a), (b): text figures ---------------------------------------------------------------------


def test_first_word_and_exact_match_on_known_answers():
    refs = ["four five six seven", "twelve thirteen fourteen", "zero one two", "nine ten eleven"]
    hyps = [
        "Four, five six seven.",  # normalisation: case and punctuation do not count
        "twelve thirteen fifteen",  # right first word, wrong continuation
        "one one two",  # wrong first word
        "",  # nothing decoded
    ]
    assert counting.first_word_accuracy(hyps, refs) == pytest.approx(0.5)
    assert counting.exact_match_accuracy(hyps, refs) == pytest.approx(0.25)
    assert counting.first_word("  Twenty-one twenty two") == "twenty"
    assert counting.first_word("") == ""
    # An empty reference never counts as recognised, even against an empty hypothesis.
    assert counting.first_word_accuracy([""], [""]) == 0.0
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        counting.exact_match_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        counting.first_word_accuracy([], [])


def test_reference_texts_come_back_from_the_target_ids():
    words = {5: "four", 6: "five", 7: "six", 8: "seven", 1: "</s>"}
    tokens = np.array([[5, 6, 7, 8, 1, 0], [6, 7, 8, 1, 0, 0]])
    part = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 2, 2, 0, 0]])
    prompts, conts = samples_lib.reference_texts(
        tokens, part, lambda ids: " ".join(words[i] for i in ids)
    )
    assert prompts == ["four five", "five"]
    assert conts == ["six seven", "six seven"]  # EOS, the last part-2 target, left out


# -- (c): teacher-forced L1 and its baselines -----------------------------------------------------


def _ramp_batch():
    """Frames whose every bin equals the frame index t (t = 0..5, then padding of 99)."""
    b, t, m = 2, 8, 3
    target = np.broadcast_to(np.arange(t, dtype=np.float64)[None, :, None], (b, t, m)).copy()
    mask = np.zeros((b, t), np.int32)
    mask[0, :6] = 1
    mask[1, :4] = 1
    target[mask == 0] = 99.0  # Padding must not enter any figure.
    return target, mask


def test_mean_frame_and_pooled_l1_ignore_padding():
    target, mask = _ramp_batch()
    # Valid values: 0..5 and 0..3 -> mean 21 / 10.
    np.testing.assert_allclose(counting.mean_frame(target, mask), [2.1] * 3)
    assert counting.pooled_l1(target + 0.25, target, mask) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no valid frames"):
        counting.pooled_l1(target, target, np.zeros_like(mask))


def test_copy_previous_group_shifts_by_the_reduction_factor():
    target, _ = _ramp_batch()
    out = counting.copy_previous_group(target, 2, fill=np.full(3, -1.0))
    np.testing.assert_array_equal(out[:, :2], -1.0)
    np.testing.assert_array_equal(out[:, 2:], target[:, :-2])


def test_teacher_forced_figures_on_a_known_prediction():
    target, mask = _ramp_batch()
    mean = counting.mean_frame(target, mask)  # 2.1 in every bin
    pred = target + np.where(np.arange(3) == 0, 0.3, -0.3)  # |error| 0.3 everywhere
    figs = counting.teacher_forced_figures(pred, target, mask, mean, reduction_factor=2)
    values = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3], np.float64)  # valid frames
    mean_l1 = np.abs(values - 2.1).mean()
    # Copy-previous: frames t >= 2 are off by exactly 2; the first group gets the mean frame.
    copy_errors = [2.1, 1.1, 2, 2, 2, 2, 2.1, 1.1, 2, 2]
    assert figs["tf_l1"] == pytest.approx(0.3)
    assert figs["tf_l1_mean_frame"] == pytest.approx(mean_l1)
    assert figs["tf_l1_copy_previous"] == pytest.approx(np.mean(copy_errors))
    assert figs["tf_l1_ratio_mean"] == pytest.approx(0.3 / mean_l1)
    assert figs["tf_l1_ratio_copy"] == pytest.approx(0.3 / np.mean(copy_errors))


# -- (d): free-running DTW-L1 ----------------------------------------------------------------------


def test_dtw_figures_forgive_timing_but_not_content():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(12, 4))
    slow = np.repeat(ref, 2, axis=0)  # The same content spoken at half speed.
    figs = counting.dtw_figures([slow], [ref], mean=np.zeros(4))
    assert figs["dtw_l1"] == pytest.approx(0.0, abs=1e-12)
    # A constant reference: every cell of the cost matrix is |mean - value|.
    flat = np.full((6, 4), 2.0)
    figs = counting.dtw_figures([flat + 0.5], [flat], mean=np.full(4, 0.5))
    assert figs["dtw_l1"] == pytest.approx(0.5)
    assert figs["dtw_l1_mean_frame"] == pytest.approx(1.5)
    assert figs["dtw_l1_ratio_mean"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="1 generated vs 2 references"):
        counting.dtw_figures([flat], [flat, flat], mean=np.zeros(4))


# -- (e): the self-stopped length ------------------------------------------------------------------


def test_length_figures_on_known_lengths():
    figs = runner.length_figures(
        generated=[10, 20, 30, 8],
        reference=[12, 20, 25, None],  # The last one is a spoken answer: no reference length.
        stopped=[True, True, False, True],
    )
    # Errors -2, 0, +5 frames.
    assert figs["length_error_frames_mae"] == pytest.approx(7 / 3)
    assert figs["length_error_frames_mean"] == pytest.approx(1.0)
    assert figs["hit_max_fraction"] == pytest.approx(1 / 4)
    assert runner.length_figures([], [], []) == {}
    assert runner.length_figures([4], [None], [False]) == {"hit_max_fraction": 1.0}
    with pytest.raises(ValueError, match="lengths given"):
        runner.length_figures([1, 2], [1], [True])


def _rigged_stop(params, bias):
    """A stop head whose logit is `bias` on every group (zero kernel)."""
    dense = params["stop"]["dense"]
    rigged = {"kernel": np.zeros_like(dense["kernel"]), "bias": np.full_like(dense["bias"], bias)}
    return {**params, "stop": {"dense": rigged}}


@pytest.fixture(scope="module")
def tiny_stop():
    config = st.tiny_config(stop_head=True)
    batch = st.random_batch(config, batch_size=3, num_groups=4)  # 8, 5 and 2 valid frames.
    return st.tiny_model(config), st.init_params(config, batch), batch


def test_self_stopped_figures_beside_the_cut_ones(tiny_stop):
    model, params, batch = tiny_stop
    r, refs = model.config.reduction_factor, [8, 5, 2]
    assert batch["frame_mask"].sum(-1).tolist() == refs
    mean = np.full(model.config.n_mels, 0.1)
    # A head that always says "last group": one group each, errors 2 - 8, 2 - 5, 2 - 2.
    figs, samples = counting.evaluate_split(
        model,
        _rigged_stop(params, 50.0),
        [batch],
        lambda ids: " ".join(f"w{i}" for i in ids),
        mean,
        max_examples=3,
        num_dtw_examples=3,
        num_samples=1,
    )
    assert figs["length_error_frames_mae"] == pytest.approx(3.0)
    assert figs["length_error_frames_mean"] == pytest.approx(-3.0)
    assert figs["hit_max_fraction"] == 0.0
    stopped = counting.self_stopped_batch(model, _rigged_stop(params, 50.0), batch)
    assert [ex["generated_frames"] for ex in stopped] == [r] * 3
    references = [batch["target_frames"][i, :n] for i, n in enumerate(refs)]
    want = np.mean(
        [dtw_l1(ex["generated"], ref) for ex, ref in zip(stopped, references, strict=True)]
    )
    assert figs["dtw_l1_stopped"] == pytest.approx(want)
    # The cut figure is today's: generated for the batch's frame slots, cut to the reference.
    assert "dtw_l1" in figs and samples[0]["generated"].shape == (8, model.config.n_mels)

    # A head that never fires: every example runs to the batch's 8 frame slots.
    never = counting.self_stopped_batch(model, _rigged_stop(params, -50.0), batch)
    figs = counting.self_stopped_figures(never, references, num_dtw_examples=1)
    assert [ex["generated_frames"] for ex in never] == [8] * 3
    assert not any(ex["stopped"] for ex in never)
    assert figs["hit_max_fraction"] == 1.0
    assert figs["length_error_frames_mean"] == pytest.approx((0 + 3 + 6) / 3)
    assert figs["dtw_l1_stopped"] == pytest.approx(dtw_l1(never[0]["generated"], references[0]))


# -- targets and the printed report ----------------------------------------------------------


def _figures(first=1.0, exact=1.0, ratio=0.4, tf=1.0, copy=2.0):
    return {
        "num_examples": 200.0,
        "first_word_accuracy": first,
        "exact_match": exact,
        "tf_l1": tf,
        "tf_l1_mean_frame": tf / ratio,
        "tf_l1_copy_previous": copy,
        "tf_l1_ratio_mean": ratio,
        "tf_l1_ratio_copy": tf / copy,
        "dtw_l1": 1.1,
        "dtw_l1_mean_frame": 2.0,
    }


def test_targets_use_the_unseen_voice_thresholds_on_the_unseen_split():
    targets = counting.CountingTargets()
    figs = _figures(first=0.95, exact=0.92, ratio=0.55)
    assert counting.check_targets(figs, "validation_unseen_voices", targets) == []
    missed = counting.check_targets(figs, "validation", targets)
    assert [m.split()[0] for m in missed] == [
        "validation/first_word_accuracy",
        "validation/exact_match",
        "validation/tf_l1_ratio_mean",
    ]
    # Beating the mean frame is not enough: the model must also beat copying.
    missed = counting.check_targets(_figures(tf=2.5, copy=2.0), "validation", targets)
    assert missed == ["validation/tf_l1 not below copy-previous-group L1"]


def test_report_prints_figures_beside_targets():
    report = counting.format_report(
        {"validation": _figures(), "validation_unseen_voices": _figures(first=0.5)},
        counting.CountingTargets(),
        step=300,
    )
    assert "step 300" in report
    assert ">= 98%" in report and ">= 90%" in report and "<= 0.42x" in report
    assert "0.400x" in report and "100.0%" in report
    assert report.count("all met") == 1
    assert "MISSED validation_unseen_voices/first_word_accuracy 0.500 < 0.9" in report
    assert "self-stopped" not in report  # No stop head, no (e).
    stopped = {"dtw_l1_stopped": 1.5, "length_error_frames_mae": 4.0}
    stopped.update(length_error_frames_mean=-2.5, hit_max_fraction=0.25)
    report = counting.format_report(
        {"validation": {**_figures(), **stopped}}, counting.CountingTargets(), step=300
    )
    assert "self-stopped DTW-L1 (uncut)" in report and "-2.50" in report and "25.0%" in report


# -- the pipeline on a random tiny model ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    config = st.tiny_config()
    batch = st.random_batch(config, batch_size=3, num_groups=4)
    return st.tiny_model(config), st.init_params(config, batch), batch


def test_evaluate_split_agrees_with_its_parts(tiny):
    from spectron_jax.decoding import DecodeConfig, generate

    model, params, batch = tiny

    def decode(ids):
        return " ".join(f"w{i}" for i in ids)

    mean = np.full(model.config.n_mels, 0.1)
    figs, samples = counting.evaluate_split(
        model,
        params,
        [batch, batch],
        decode,
        mean,
        max_examples=4,  # Stops after the second batch (6 examples).
        num_dtw_examples=2,
        num_samples=2,
    )
    assert figs["num_examples"] == 6
    # (a)/(b) recomputed from generate's own output.
    out = generate(
        model,
        params,
        batch,
        DecodeConfig(
            max_text_tokens=batch["decoder_target_tokens"].shape[1] + 4,
            max_frames=batch["target_frames"].shape[1],
        ),
    )
    prompts, conts = samples_lib.reference_texts(
        batch["decoder_target_tokens"], batch["text_part"], decode
    )
    hyps = [
        decode([int(t) for t in out["text_tokens"][i, : out["text_lengths"][i]]]) for i in range(3)
    ]
    refs = [f"{p} {c}" for p, c in zip(prompts, conts, strict=True)]
    assert figs["first_word_accuracy"] == counting.first_word_accuracy(hyps, prompts)
    assert figs["exact_match"] == counting.exact_match_accuracy(hyps, refs)
    # (c) from the teacher-forced network output on the batch, twice.
    pred = counting.teacher_forced_frames(model, params, batch)
    tf = counting.teacher_forced_figures(
        np.concatenate([pred, pred]),
        np.concatenate([batch["target_frames"]] * 2),
        np.concatenate([batch["frame_mask"]] * 2),
        mean,
        model.config.reduction_factor,
    )
    for key, value in tf.items():
        assert figs[key] == pytest.approx(value, rel=1e-6), key
    assert figs["dtw_l1"] > 0 and figs["dtw_l1_mean_frame"] > 0
    # Samples: generated continuations cut to the reference's duration.
    assert len(samples) == 2
    n_ref = int(batch["frame_mask"][1].sum())
    assert samples[1]["reference"].shape == samples[1]["generated"].shape == (n_ref, 8)


def test_write_samples_writes_playable_wavs_and_a_png(tiny, tmp_path):
    model, _, _ = tiny
    cfg = model.config.spectrogram
    rng = np.random.default_rng(0)
    samples = [
        {
            "prompt_features": rng.normal(size=(5, cfg.n_mels)) - 2,
            "reference": rng.normal(size=(6, cfg.n_mels)) - 2,
            "generated": rng.normal(size=(4, cfg.n_mels)) - 2,
            "reference_text": "one two three",
            "generated_text": "one two four",
        }
    ]
    media = samples_lib.write_samples(samples, str(tmp_path), "validation", cfg, True)
    for kind, frames in (("reference", 11), ("generated", 9)):
        wave, rate = sf.read(tmp_path / f"validation-0-{kind}.wav")
        assert rate == cfg.sample_rate
        assert len(wave) == frames * cfg.hop_length  # prompt + continuation
        assert np.abs(wave).max() <= 1.0
    assert (tmp_path / "validation-spectrograms.png").stat().st_size > 1000
    assert media["image"].dtype == np.uint8 and media["image"].shape[-1] == 3
    assert media["audio"].shape == (1, 9 * cfg.hop_length, 1)


# -- train()'s hook -------------------------------------------------------------------------------


class _AtTheEnd:
    """An evaluator that, like `CountingEvaluator`, runs only after the last step."""

    name, every = "final", 0

    def __init__(self):
        self.contexts = []

    def run(self, context):
        self.contexts.append(context)
        return {"validation/exact_match": 0.5}


@pytest.mark.slow  # Two train() runs: ~15 s of CPU, minutes under load.
def test_train_runs_the_final_evaluation_once_at_the_end(tmp_path):
    import tiny_model as tm

    from spectron_jax import partitioning, train

    evaluator = _AtTheEnd()
    assert counting.CountingEvaluator("task", {}).every == 0  # The real one runs at the end too.
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    result = train.train(
        tm.TinyModel(),
        tm.make_dataset_fn(4),
        str(tmp_path),
        3,
        mesh=mesh,
        log_every=1,
        evaluators=[evaluator],
    )
    assert result.step == 3 and len(evaluator.contexts) == 1
    context = evaluator.contexts[0]
    assert context.step == 3 and context.model_dir == str(tmp_path) and context.seed == 0
    assert context.train_dataset_fn is not None and context.writer is not None
    np.testing.assert_array_equal(
        jax.tree.leaves(context.params)[0], jax.tree.leaves(result.state.params)[0]
    )
    # A finished run that is started again only re-runs the evaluation.
    train.train(
        tm.TinyModel(),
        tm.make_dataset_fn(4),
        str(tmp_path),
        3,
        mesh=mesh,
        evaluators=[evaluator],
    )
    assert len(evaluator.contexts) == 2 and evaluator.contexts[1].step == 3


class _RecordingWriter:
    def __init__(self):
        self.images, self.audios = {}, {}

    def write_images(self, step, images):
        self.images.update({(step, k): v for k, v in images.items()})

    def write_audios(self, step, audios, *, sample_rate):
        self.audios.update({(step, k): v for k, v in audios.items()})


def test_counting_evaluator_writes_json_and_returns_flat_figures(tiny, tmp_path, monkeypatch):
    model, params, batch = tiny

    def fake_seqio_dataset_fn(name, lengths, batch_size, *, model, split, shuffle, repeat):
        assert (name, shuffle, repeat) == ("task", False, False)
        assert model is tiny[0]  # Batches laid out by the model's own feature converter.
        return lambda shard, num_shards, seed, skip: iter([batch])

    monkeypatch.setattr(data, "seqio_dataset_fn", fake_seqio_dataset_fn)
    evaluator = counting.CountingEvaluator("task", {}, num_samples=1)
    assert (evaluator.name, evaluator.every) == ("final", 0)
    writer = _RecordingWriter()
    context = EvalContext(
        model=model,
        params=params,
        step=7,
        model_dir=str(tmp_path),
        writer=writer,
        train_dataset_fn=lambda *a: iter([batch, batch]),
    )
    flat = evaluator.run(context)
    saved = json.loads((tmp_path / "final_eval.json").read_text())
    assert saved["step"] == 7 and set(saved["figures"]) == set(counting.DEFAULT_SPLITS)
    for split in counting.DEFAULT_SPLITS:
        assert flat[f"{split}/num_examples"] == 3
        assert (tmp_path / "samples" / f"{split}-0-generated.wav").exists()
        assert (7, f"final/{split}/spectrograms") in writer.images
        assert (7, f"final/{split}/generated") in writer.audios
    assert saved["targets"]["first_word"] == 0.98
    with pytest.raises(ValueError, match="train_dataset_fn"):
        evaluator.run(EvalContext(model=model, params=params, step=7, model_dir=str(tmp_path)))


# -- the experiment files ------------------------------------------------------------------------

REPO = pathlib.Path(__file__).resolve().parents[1]


def _parse_experiment(name, bindings=()):
    import gin

    from spectron_jax import train

    gin.clear_config()
    train.parse_gin([str(REPO / "gin" / name)], list(bindings), [str(REPO), str(REPO / "gin")])


def test_tiny_gin_runs_the_counting_evaluation_at_the_end():
    import gin

    try:
        _parse_experiment("spectron_tiny.gin")
        evaluators = [e.selector.split(".")[-1] for e in gin.query_parameter("train.evaluators")]
        # Speech samples periodically, the counting figures at the end, no loss evaluation.
        assert evaluators == ["SpeechSamples", "CountingEvaluator"]
        assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "spectron_synthetic_counting"
        lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
        config = gin.query_parameter("spectron.spectron_model.config").scoped_configurable_fn()
        # Frame slots hold whole groups: the frame length must divide by the reduction factor.
        assert lengths["continuation_frames"] % config.reduction_factor == 0
    finally:
        gin.clear_config()


@pytest.mark.slow  # Traces the ~935M-parameter model twice.
def test_base_gin_builds_abstractly():
    """The paper-scale experiment: parses (every required macro set) and its train state builds
    abstractly (eval_shape, shardings on the gin mesh over 8 fake devices); nothing allocated."""
    import gin

    from spectron_jax import models, partitioning
    from spectron_jax import trainer as trainer_lib

    try:
        _parse_experiment(
            "spectron_base.gin", ["MODEL_DIR = '/tmp/x'", "INIT_CHECKPOINT = '/tmp/enc'"]
        )
        model = models.spectron_model()
        lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
        batch_size = gin.query_parameter("%BATCH_SIZE")
        mesh = partitioning.create_mesh()
        optimizer = trainer_lib.OptimizerConfig()
    finally:
        gin.clear_config()
    config = model.config
    assert config.encoder_frozen and config.dtype == "bfloat16"
    assert config.decoder.remat == "full"
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    model_lengths = model.feature_converter().get_model_feature_lengths(lengths)
    shapes = models.example_input_shapes(
        config,
        batch_size=batch_size,
        prompt_frames=model_lengths["encoder_features"],
        text_length=model_lengths["decoder_input_tokens"],
        num_frames=model_lengths["target_frames"],
    )
    abstract_batch = {
        k: jax.ShapeDtypeStruct(shapes[k], models.INPUT_TYPES[k]) for k in models.INPUT_TYPES
    }
    trainer = trainer_lib.Trainer(model, mesh, optimizer)
    state = trainer.setup(abstract_batch)
    counts = models.param_counts(config)
    assert 330e6 <= counts["decoder"] <= 370e6 and 570e6 <= counts["encoder"] <= 600e6
    # The frozen encoder has no optimizer state: only the trainable params get Adam moments.
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_params == counts["total"]
    assert n_opt == pytest.approx(2 * (counts["total"] - counts["encoder"]), rel=1e-3)
    # The big matrices are sharded over fsdp.
    emb = state.params["decoder"]
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(emb))

"""Speech samples while training (spectron_jax/evaluation/samples.py): the files and TensorBoard
media they write, their figures against the decoder's own output, and train()'s evaluators."""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest
import soundfile as sf
import spectron_testing as st

from spectron_jax import data
from spectron_jax.evaluation import samples as samples_lib
from spectron_jax.evaluation.metrics import dtw_l1
from spectron_jax.interfaces import EvalContext, Evaluator

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "trainer"))


@pytest.fixture(scope="module")
def tiny():
    """A random tiny model whose vocabulary writes id i as the word "w<i>"."""
    config = st.tiny_config()
    batch = st.random_batch(config, batch_size=2, num_groups=4)
    return st.tiny_model(config), st.init_params(config, batch), batch


@pytest.fixture
def fake_task(tiny, monkeypatch):
    """`SpeechSamples` reading `batch` as the first examples of any split of task 'task'."""
    model, _, batch = tiny
    requests = []

    def fake_seqio_dataset_fn(name, lengths, batch_size, *, model, split, shuffle, repeat):
        requests.append((name, batch_size, model, split, shuffle, repeat))
        rows = {k: np.asarray(v)[:batch_size] for k, v in batch.items()}
        return lambda shard, num_shards, seed, skip: iter([rows] if split != "empty" else [])

    monkeypatch.setattr(data, "seqio_dataset_fn", fake_seqio_dataset_fn)
    return requests


def _samples(**kwargs):
    return samples_lib.SpeechSamples(mixture_or_task_name="task", task_feature_lengths={}, **kwargs)


def _context(model, params, tmp_path, step, writer=None):
    return EvalContext(
        model=model, params=params, step=step, model_dir=str(tmp_path), writer=writer
    )


class _RecordingWriter:
    def __init__(self):
        self.images, self.audios, self.texts = {}, {}, {}

    def write_images(self, step, images):
        self.images.update({(step, k): v for k, v in images.items()})

    def write_audios(self, step, audios, *, sample_rate):
        self.audios.update({(step, k): (v, sample_rate) for k, v in audios.items()})

    def write_texts(self, step, texts):
        self.texts.update({(step, k): v for k, v in texts.items()})


def test_speech_samples_writes_wavs_png_and_tensorboard_media(tiny, fake_task, tmp_path):
    from spectron_jax.decoding import DecodeConfig, generate

    model, params, batch = tiny
    writer = _RecordingWriter()
    evaluator = _samples(num_examples=2)
    assert isinstance(evaluator, Evaluator)
    assert (evaluator.name, evaluator.every) == ("samples", 1000)
    figures = evaluator.run(_context(model, params, tmp_path, 40, writer))
    # The batches are the model's (its feature converter), in order, once.
    assert fake_task == [("task", 2, model, "validation", False, False)]

    # Figures agree with the decoder's own output on the same prompts.
    decode = DecodeConfig(
        max_text_tokens=batch["decoder_target_tokens"].shape[1] + 4,
        max_frames=batch["target_frames"].shape[1],
    )
    out = jax.device_get(generate(model, params, batch, decode))
    dtws = []
    for i in range(2):
        n_ref = int(batch["frame_mask"][i].sum())
        generated = out["frames"][i, : max(int(out["frame_lengths"][i]), 1)][:n_ref]
        dtws.append(dtw_l1(generated, batch["target_frames"][i, :n_ref]))
    assert figures["validation/dtw_l1"] == pytest.approx(np.mean(dtws), rel=1e-5)
    assert 0.0 <= figures["validation/exact_match"] <= 1.0

    # Files: two playable WAVs per example (prompt + continuation) and one PNG.
    step_dir = tmp_path / "samples" / "step_40"
    cfg = model.config.spectrogram
    for i in range(2):
        for kind in ("reference", "generated"):
            wave, rate = sf.read(step_dir / f"validation-{i}-{kind}.wav")
            assert rate == cfg.sample_rate and len(wave) > 0 and np.abs(wave).max() <= 1.0
    assert (step_dir / "validation-spectrograms.png").stat().st_size > 1000

    # TensorBoard media at the training step.
    image = writer.images[(40, "samples/validation/spectrograms")]
    assert image.dtype == np.uint8 and image.ndim == 4 and image.shape[-1] == 3
    audio, rate = writer.audios[(40, "samples/validation/generated")]
    assert audio.shape[0] == 2 and audio.shape[-1] == 1 and rate == cfg.sample_rate
    transcripts = writer.texts[(40, "samples/validation/transcripts")]
    assert "reference" in transcripts
    # Texts are decoded with the model's own vocabulary.
    assert "'w" in transcripts


def test_speech_samples_on_an_empty_split_names_it(tiny, fake_task, tmp_path):
    model, params, _ = tiny
    with pytest.raises(ValueError, match="split 'empty' of task is empty"):
        _samples(splits=("empty",)).run(_context(model, params, tmp_path, 1))


def test_speech_samples_reach_tensorboard_event_files(tiny, fake_task, tmp_path):
    """Through the trainer's real MetricsLogger: image and audio summaries land in the events."""
    import tensorflow as tf

    from spectron_jax.summaries import MetricsLogger

    model, params, _ = tiny
    logger = MetricsLogger(str(tmp_path / "tb"), num_steps=10, peak_flops=1.0)
    _samples(num_examples=1).run(_context(model, params, tmp_path, 3, logger))
    logger.close()
    tags = set()
    for path in (tmp_path / "tb").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update((event.step, v.tag) for v in event.summary.value)
    assert (3, "samples/validation/spectrograms") in tags
    assert (3, "samples/validation/generated") in tags


class _Probe:
    """An evaluator that records the contexts it is run with."""

    def __init__(self, name, every):
        self.name, self.every, self.contexts = name, every, []

    def run(self, context):
        self.contexts.append(context)
        return {"figure": float(context.step)}


def _event_tags(logdir):
    import tensorflow as tf

    tags = set()
    for path in pathlib.Path(logdir).glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update((event.step, v.tag) for v in event.summary.value)
    return tags


def test_train_runs_evaluators_every_n_steps_and_at_the_end(tmp_path):
    import tiny_model as tm

    from spectron_jax import partitioning, train

    every_two, at_end = _Probe("probe", 2), _Probe("final", 0)
    dataset_fn = tm.make_dataset_fn(4)
    result = train.train(
        tm.TinyModel(),
        dataset_fn,
        str(tmp_path),
        5,
        mesh=partitioning.create_mesh(devices=jax.devices()[:1]),
        log_every=1,
        evaluators=[every_two, at_end],
    )
    assert result.step == 5
    # Every 2 steps, and once after the last step (5 is not a multiple of 2).
    assert [c.step for c in every_two.contexts] == [2, 4, 5]
    assert [c.step for c in at_end.contexts] == [5]
    last = at_end.contexts[-1]
    assert last.model_dir == str(tmp_path) and last.seed == 0
    assert last.train_dataset_fn is dataset_fn
    assert last.trainer is not None and last.mesh is not None and last.writer is not None
    np.testing.assert_array_equal(
        jax.tree.leaves(last.params)[0], jax.tree.leaves(result.state.params)[0]
    )
    # Figures go to TensorBoard under each evaluator's name.
    tags = _event_tags(tmp_path / "tensorboard")
    assert {(2, "probe/figure"), (4, "probe/figure"), (5, "probe/figure")} <= tags
    assert (5, "final/figure") in tags and (4, "final/figure") not in tags

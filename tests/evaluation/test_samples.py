"""Speech samples while training (spectron_jax/evaluation/samples.py): the files and TensorBoard
media they write, their figures against the decoder's own output, and train()'s periodic hook."""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest
import soundfile as sf
import spectron_testing as st

from spectron_jax.evaluation import samples as samples_lib
from spectron_jax.evaluation.metrics import dtw_l1
from spectron_jax.models import SpectronModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "trainer"))


class _WordVocab:
    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def tiny():
    config = st.tiny_config()
    batch = st.random_batch(config, batch_size=2, num_groups=4)
    return SpectronModel(config), st.init_params(config, batch), batch


@pytest.fixture
def fake_task(tiny, monkeypatch):
    """`speech_samples` reading `batch` as the first examples of any split of task 'task'."""
    _, _, batch = tiny
    requests = []

    def fake_seqio_dataset_fn(name, lengths, batch_size, split, shuffle, repeat):
        requests.append((name, batch_size, split, shuffle, repeat))
        rows = {k: np.asarray(v)[:batch_size] for k, v in batch.items()}
        return lambda shard, num_shards, seed, skip: iter([rows] if split != "empty" else [])

    import spectron_jax.train as train_lib

    monkeypatch.setattr(train_lib, "seqio_dataset_fn", fake_seqio_dataset_fn)
    monkeypatch.setattr(samples_lib, "task_vocabulary", lambda name: _WordVocab())
    return requests


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
    figures = samples_lib.speech_samples(
        model=model,
        params=params,
        model_dir=str(tmp_path),
        step=40,
        writer=writer,
        mixture_or_task_name="task",
        task_feature_lengths={},
        num_examples=2,
    )
    assert fake_task == [("task", 2, "validation", False, False)]

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
    assert "reference" in writer.texts[(40, "samples/validation/transcripts")]


def test_speech_samples_on_an_empty_split_names_it(tiny, fake_task, tmp_path):
    model, params, _ = tiny
    with pytest.raises(ValueError, match="split 'empty' of task is empty"):
        samples_lib.speech_samples(
            model=model,
            params=params,
            model_dir=str(tmp_path),
            step=1,
            mixture_or_task_name="task",
            task_feature_lengths={},
            splits=("empty",),
        )


def test_speech_samples_reach_tensorboard_event_files(tiny, fake_task, tmp_path):
    """Through the trainer's real MetricsLogger: image and audio summaries land in the events."""
    import tensorflow as tf

    from spectron_jax.metrics import MetricsLogger

    model, params, _ = tiny
    logger = MetricsLogger(str(tmp_path / "tb"), num_steps=10, peak_flops=1.0)
    samples_lib.speech_samples(
        model=model,
        params=params,
        model_dir=str(tmp_path),
        step=3,
        writer=logger,
        mixture_or_task_name="task",
        task_feature_lengths={},
        num_examples=1,
    )
    logger.close()
    tags = set()
    for path in (tmp_path / "tb").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update((event.step, v.tag) for v in event.summary.value)
    assert (3, "samples/validation/spectrograms") in tags
    assert (3, "samples/validation/generated") in tags


def test_train_calls_sample_fn_every_eval_every_steps_and_at_the_end(tmp_path):
    import tiny_model as tm

    from spectron_jax import partitioning, train

    calls = []

    def sample_fn(**kwargs):
        calls.append(kwargs)
        return {"validation/exact_match": 0.25}

    result = train.train(
        tm.TinyModel(),
        tm.make_dataset_fn(4),
        str(tmp_path),
        5,
        mesh=partitioning.create_mesh(devices=jax.devices()[:1]),
        eval_every=2,
        log_every=1,
        sample_fn=sample_fn,
    )
    assert result.step == 5
    assert [c["step"] for c in calls] == [2, 4, 5]
    assert set(calls[0]) == {"model", "params", "model_dir", "step", "writer"}
    assert calls[-1]["model_dir"] == str(tmp_path)
    np.testing.assert_array_equal(
        jax.tree.leaves(calls[-1]["params"])[0], jax.tree.leaves(result.state.params)[0]
    )

"""The tasks' seqio metrics: postprocessing cuts predictions at the prompt's words; scores match
hand counts; seqio's own evaluator computes them from a registered task's examples."""

from __future__ import annotations

import numpy as np
import pytest

from spectron_jax.evaluation import seqio_metrics

EXAMPLE = {"prompt_text": b"one two three", "continuation_text": b"four five six seven"}


def test_postprocess_gives_the_target_parts_and_cuts_the_prediction():
    target = seqio_metrics.postprocess("ignored", example=EXAMPLE, is_target=True)
    assert target == {"transcript": "one two three", "continuation": "four five six seven"}
    # One word misheard ("tree"), the continuation one word short: the cut stays at the
    # prompt's boundary.
    pred = seqio_metrics.postprocess("one two tree four five six", example=EXAMPLE)
    assert pred == {"transcript": "one two tree", "continuation": "four five six"}
    with pytest.raises(ValueError, match="prompt_text"):
        seqio_metrics.postprocess("one two", example={"continuation_text": b"x"})


def test_text_metrics_against_hand_counts():
    targets = [
        {"transcript": "one two three", "continuation": "four five six seven"},
        {"transcript": "five six", "continuation": "seven eight"},
    ]
    predictions = [
        {"transcript": "one two tree", "continuation": "four five six"},
        {"transcript": "five six", "continuation": "seven eight"},
    ]
    got = seqio_metrics.text_metrics(targets, predictions)
    # Transcripts: 1 substitution in 5 reference words; one of two exact.
    assert got["transcript_wer"] == pytest.approx(1 / 5)
    assert got["transcript_exact_match"] == pytest.approx(0.5)
    # Continuations: 1 deletion in 6 words; word accuracy (1 - 1/4 + 1) / 2; one exact.
    assert got["continuation_wer"] == pytest.approx(1 / 6)
    assert got["continuation_word_accuracy"] == pytest.approx((0.75 + 1.0) / 2)
    assert got["continuation_exact_match"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 targets but 1"):
        seqio_metrics.text_metrics(targets, predictions[:1])
    with pytest.raises(ValueError, match="no examples"):
        seqio_metrics.text_metrics([], [])


def test_qa_metrics_finds_the_answer_in_a_longer_one():
    targets = [
        {"transcript": "what is the capital of france", "continuation": "paris"},
        {"transcript": "how many legs has a spider", "continuation": "eight"},
    ]
    predictions = [
        {"transcript": "what is the capital of france", "continuation": "it is paris"},
        {"transcript": "how many legs has a spider", "continuation": "six"},
    ]
    got = seqio_metrics.qa_metrics(targets, predictions)
    assert got["qa_accuracy"] == pytest.approx(0.5)
    assert got["transcript_wer"] == 0.0 and got["transcript_exact_match"] == 1.0


def test_seqio_evaluator_scores_a_registered_task():
    """A registered Spectron task through seqio's own metric path (LegacyMetric), as t5x.eval
    runs it: targets decoded from `continuation_transcript`, predictions from the model's ids."""
    import seqio
    import tensorflow as tf

    from spectron_jax.vocabularies import default_vocabulary
    from spectron_tasks import speech_task

    vocab = default_vocabulary()
    texts = [("one two", "three four"), ("five six", "seven eight")]

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        n = len(texts)
        return tf.data.Dataset.from_tensor_slices(
            {
                "prompt_audio": tf.zeros([n, 1600]),
                "continuation_audio": tf.zeros([n, 1600]),
                "prompt_text": [p for p, _ in texts],
                "continuation_text": [c for _, c in texts],
                "speaker_id": [""] * n,
                "id": [str(i) for i in range(n)],
            }
        )

    source = seqio.FunctionDataSource(dataset_fn, splits=("validation",))
    task = speech_task.register_speech_task("spectron_test_seqio_metrics", source)
    try:
        examples = list(
            task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator()
        )
        # The model writes transcript then continuation: example 0 right, example 1 wrong.
        written = ["one two three four", "five six seven nine"]
        ids = [vocab.encode(t) + [vocab.eos_id] for t in written]
        width = max(map(len, ids))
        model_output = np.array([i + [0] * (width - len(i)) for i in ids])
        metric, frame_metric = task.metric_objs
        instance = metric.from_model_output(
            examples, model_output, task.output_features, seqio_metrics.TARGET_FIELD
        )
        value, _ = instance.actual_compute(
            examples, task.output_features, seqio_metrics.TARGET_FIELD
        )
        assert value["transcript_exact_match"] == 1.0
        assert value["continuation_exact_match"] == pytest.approx(0.5)
        assert value["continuation_wer"] == pytest.approx(1 / 4)
        # The frames come as aux (predict_with_aux): the examples' own frames score 0.
        references = [ex["continuation_frames"] for ex in examples]
        aux = {
            "frames": np.stack(references),
            "frame_lengths": np.array([len(f) for f in references]),
        }
        instance = frame_metric.from_model_output(
            examples, (model_output, aux), task.output_features, seqio_metrics.TARGET_FIELD
        )
        value, _ = instance.actual_compute(
            examples, task.output_features, seqio_metrics.TARGET_FIELD
        )
        assert value["frame_dtw_l1"] == pytest.approx(0.0, abs=1e-6)
        assert value["frame_length_ratio"] == pytest.approx(1.0)
    finally:
        seqio.TaskRegistry.remove("spectron_test_seqio_metrics")


def test_frame_metrics_against_known_frames():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(6, 4)).astype(np.float32)
    targets = [{"transcript": "a", "continuation": "b", "frames": ref}] * 3
    predictions = [{"transcript": "a", "continuation": "b"}] * 3
    padded = np.zeros((10, 4), np.float32)
    same, shifted = padded.copy(), padded.copy()
    same[:6] = ref
    shifted[:6] = ref + 0.5  # every bin 0.5 off: DTW-L1 is exactly 0.5 on the diagonal
    aux = {"frames": [same, shifted, padded], "frame_lengths": [6, 6, 0]}
    got = seqio_metrics.frame_metrics(targets, predictions, aux)
    assert got["frame_dtw_l1"] == pytest.approx(0.25, abs=1e-6)  # (0 + 0.5) / 2 non-empty
    assert got["frame_length_ratio"] == pytest.approx((1 + 1 + 0) / 3)
    assert got["frame_empty_fraction"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="aux 'frames'"):
        seqio_metrics.frame_metrics(targets, predictions, {})


def test_targets_carry_the_reference_frames():
    frames = np.ones((5, 3), np.float32)
    target = seqio_metrics.postprocess(
        "x", example={**EXAMPLE, "continuation_frames": frames}, is_target=True
    )
    np.testing.assert_array_equal(target["frames"], frames)

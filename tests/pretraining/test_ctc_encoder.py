"""Stage 1 of the recipe: the CTC encoder (loss, greedy decoding, the batch), its WER evaluator,
and the checkpoint a frozen Spectron encoder starts from."""

from __future__ import annotations

import itertools
import json
import pathlib

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import spectron_testing

from spectron_jax import checkpoints, partitioning
from spectron_jax import train as train_lib
from spectron_jax import trainer as trainer_lib
from spectron_jax.audio.spectrogram import SpectrogramConfig
from spectron_jax.interfaces import EvalContext
from spectron_jax.models import example_input_shapes
from spectron_jax.pretraining import ctc_encoder as ce

GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "gin"
VOCAB = 16  # blank = 16
BLANK = VOCAB


def _config(**overrides) -> ce.CtcEncoderConfig:
    """The CTC encoder over `spectron_testing.tiny_config()`'s Conformer (8 mel bins)."""
    spectron = spectron_testing.tiny_config()
    kw = dict(
        encoder=spectron.encoder,
        vocab_size=VOCAB,
        spectrogram=SpectrogramConfig(n_mels=8),
    )
    kw.update(overrides)
    return ce.CtcEncoderConfig(**kw)


def _model(config: ce.CtcEncoderConfig | None = None) -> ce.CtcEncoderModel:
    config = config or _config()
    return ce.CtcEncoderModel(config, spectron_testing.WordVocabulary(config.vocab_size))


def _batch(batch_size: int = 4, frames: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Random features with padded rows, and 1-3 labels each (8 encoder frames: all fit)."""
    rng = np.random.default_rng(seed)
    lengths = [frames, frames - 5, frames - 12, frames // 2][:batch_size]
    mask = (np.arange(frames)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    n_labels = [3, 2, 1, 3][:batch_size]
    label_mask = (np.arange(4)[None] < np.asarray(n_labels)[:, None]).astype(np.int32)
    return {
        "encoder_features": (rng.normal(size=(batch_size, frames, 8)) * mask[..., None]).astype(
            np.float32
        ),
        "encoder_mask": mask,
        "ctc_labels": (rng.integers(4, VOCAB, size=(batch_size, 4)) * label_mask).astype(np.int32),
        "ctc_label_mask": label_mask,
    }


def _one_device_mesh():
    return partitioning.create_mesh(data=1, devices=jax.devices()[:1])


# ------------------------------------------------------------------------------------------------
# Loss and decoding.
# ------------------------------------------------------------------------------------------------


def _brute_force_nll(logits: np.ndarray, labels: list[int], blank: int) -> float:
    """-log sum over every frame path that collapses to `labels` (repeats merged, blanks cut)."""
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    total = []
    for path in itertools.product(range(logits.shape[-1]), repeat=logits.shape[0]):
        collapsed = [k for i, k in enumerate(path) if k != blank and (i == 0 or path[i - 1] != k)]
        if collapsed == labels:
            total.append(sum(logp[t, k] for t, k in enumerate(path)))
    return float(-np.logaddexp.reduce(total))


def test_ctc_loss_is_optax_per_example_and_the_mean_over_counted_examples():
    rng = np.random.default_rng(1)
    blank = 3
    logits = rng.normal(size=(3, 5, 4)).astype(np.float32)
    frame_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], np.int32)
    # Row 2 is infeasible: "1 1" needs a blank in between, 3 frames, and has 2.
    labels = np.array([[0, 1, 0], [2, 2, 0], [1, 1, 0]], np.int32)
    label_mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 0]], np.int32)
    loss, metrics = ce.ctc_metrics(
        jnp.asarray(logits), frame_mask, jnp.asarray(labels), label_mask, blank
    )
    direct = []
    for i in range(2):  # Each feasible row alone, unpadded.
        t, n = frame_mask[i].sum(), label_mask[i].sum()
        direct.append(
            optax.ctc_loss(
                logits[i : i + 1, :t],
                np.zeros((1, t), np.float32),
                labels[i : i + 1, :n],
                np.zeros((1, n), np.float32),
                blank_id=blank,
            )[0]
        )
    np.testing.assert_allclose(float(loss), np.mean(direct), rtol=1e-5)
    assert float(metrics["feasible_fraction"]) == pytest.approx(2 / 3)
    # And optax's convention is CTC's: row 1 against every path of its 3 frames.
    np.testing.assert_allclose(direct[1], _brute_force_nll(logits[1, :3], [2, 2], blank), rtol=1e-5)
    nll, weight = ce.ctc_loss(jnp.asarray(logits), frame_mask, labels, label_mask, blank)
    np.testing.assert_allclose(nll[:2], direct, rtol=1e-5)
    np.testing.assert_array_equal(weight, [1, 1, 0])


def _random_params(model, batch, seed=0):
    """Random parameters with the model's exact tree, filled by numpy (`init_params`' way:
    compiling the real initialisers costs more CPU than the tests themselves)."""
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    abstract = jax.eval_shape(
        lambda r: nn.unbox(model.get_initial_variables(r, shapes)["params"]),
        jax.random.PRNGKey(seed),
    )
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if len(leaf.shape) >= 2:
            return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray(1.0 + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree.map(fill, abstract)


def test_loss_decreases_over_a_few_optimizer_steps_on_a_fixed_batch():
    model = _model()
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    params = _random_params(model, batch)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, rng):
        (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    opt_state, losses = tx.init(params), []
    for _ in range(6):  # One dropout key: the same SpecAugment masks, a fixed objective.
        params, opt_state, loss, metrics = step(params, opt_state, jax.random.PRNGKey(0))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert {"ctc_loss", "token_error_rate", "sequence_accuracy", "blank_fraction"} <= set(metrics)
    assert float(metrics["token_error_rate"]) >= 0.0
    assert 0.0 <= float(metrics["blank_fraction"]) <= 1.0


def _one_hot_logits(paths: list[list[int]], classes: int) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[np.asarray(paths)] * 5.0


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    b = BLANK
    paths = [
        [5, 5, b, 5, 7, 7, b, b, 9, 4, 4],  # last two frames are padding
        [b, b, b, b, b, b, b, b, b, b, b],
        [6, b, 6, 6, b, 8, 8, 8, 8, 8, 8],
    ]
    mask = np.ones((3, 11), np.int32)
    mask[0, 9:] = 0
    ids, lengths = ce.greedy_ctc_decode(jnp.asarray(_one_hot_logits(paths, VOCAB + 1)), mask, b)
    ids, lengths = np.asarray(ids), np.asarray(lengths)
    np.testing.assert_array_equal(lengths, [4, 0, 3])
    np.testing.assert_array_equal(ids[0, :4], [5, 5, 7, 9])
    np.testing.assert_array_equal(ids[2, :3], [6, 6, 8])
    assert not ids[0, 4:].any() and not ids[1].any() and not ids[2, 3:].any()


def _levenshtein(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_edit_distance_matches_the_textbook_recurrence():
    rng = np.random.default_rng(0)
    hyp, ref = rng.integers(0, 3, (40, 7)), rng.integers(0, 3, (40, 5))
    hyp_len, ref_len = rng.integers(0, 8, 40), rng.integers(0, 6, 40)
    got = np.asarray(ce.edit_distance(hyp, hyp_len, ref, ref_len))
    want = [
        _levenshtein(list(h[:n]), list(r[:m]))
        for h, n, r, m in zip(hyp, hyp_len, ref, ref_len, strict=True)
    ]
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------------
# The parameter tree and the stage-1 -> Spectron checkpoint.
# ------------------------------------------------------------------------------------------------


def _abstract_params(model, shapes):
    return jax.eval_shape(
        lambda r: model.get_initial_variables(r, shapes)["params"], jax.random.PRNGKey(0)
    )


def _tree_signature(tree) -> dict[str, tuple]:
    """Path -> (shape, dtype, logical axis names) of every leaf of a boxed parameter tree."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )[0]
    out = {}
    for path, leaf in leaves:
        names = getattr(leaf, "names", None)
        value = nn.unbox(leaf)
        out[jax.tree_util.keystr(path)] = (value.shape, value.dtype, names)
    return out


def _assert_same_encoder_tree(ctc_config, spectron_config):
    ctc = _abstract_params(
        ce.CtcEncoderModel(ctc_config, spectron_testing.WordVocabulary(ctc_config.vocab_size)),
        {"encoder_features": (1, 16, ctc_config.encoder_feature_dim), "encoder_mask": (1, 16)},
    )
    spectron = _abstract_params(
        spectron_testing.tiny_model(spectron_config), example_input_shapes(spectron_config)
    )
    assert set(ctc) == {"encoder", "ctc_head"}
    assert _tree_signature(ctc["encoder"]) == _tree_signature(spectron["encoder"])
    head = nn.unbox(ctc["ctc_head"])
    assert head["kernel"].shape == (ctc_config.encoder.hidden_dim, ctc_config.vocab_size + 1)


def test_encoder_parameter_tree_is_spectrons_encoder_subtree():
    spectron = spectron_testing.tiny_config()
    _assert_same_encoder_tree(_config(encoder=spectron.encoder), spectron)


def test_config_round_trips_through_json():
    config = _config()
    assert ce.CtcEncoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="input_dim"):
        _config(encoder_front_end="w2v_bert_fbank")


def test_stage1_checkpoint_loads_into_spectrons_encoder_which_then_stays_frozen(tmp_path):
    """The loading path of `train(init_checkpoint=..., init_subtrees=SPECTRON_INIT_SUBTREES)`
    (`checkpoints.load_subtrees`), then the trainer's optimizer on the frozen model."""
    ctc_model = _model()
    ctc_params = _random_params(ctc_model, _batch(), seed=1)
    step_dir = checkpoints.save_for_inference(tmp_path / "stage1", ctc_model, ctc_params, step=2)
    config = spectron_testing.tiny_config()  # encoder_frozen=True, the paper's setting
    assert config.encoder_frozen and config.encoder == ctc_model.config.encoder
    batch = spectron_testing.random_batch(config)
    fresh = spectron_testing.init_params(config, batch)
    mesh = _one_device_mesh()
    shardings = jax.tree.map(lambda _: partitioning.replicated(mesh), fresh)
    for source in (step_dir, tmp_path / "stage1" / "checkpoints"):  # a step, or the newest one
        loaded = checkpoints.load_subtrees(fresh, source, ce.SPECTRON_INIT_SUBTREES, shardings)
        _assert_trees_equal(loaded["encoder"], ctc_params["encoder"])
        _assert_trees_equal(loaded["decoder"], fresh["decoder"])
    model = spectron_testing.tiny_model(config)
    tx = trainer_lib.make_optimizer(
        trainer_lib.OptimizerConfig(learning_rate=3e-3, warmup_steps=0, decay="constant"),
        model.trainable_mask(loaded),
    )
    grad_fn = spectron_testing.jitted_value_and_grad(config)  # Shared with test_models.
    update = jax.jit(lambda p, s, g: tx.update(g, s, p))
    params, opt_state = loaded, tx.init(loaded)
    for i in range(2):
        _, grads = grad_fn(params, batch, jax.random.PRNGKey(i))
        updates, opt_state = update(params, opt_state, grads)
        params = optax.apply_updates(params, updates)
    _assert_trees_equal(params["encoder"], ctc_params["encoder"])
    assert not np.array_equal(params["connector"]["kernel"], loaded["connector"]["kernel"])


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # About 55 s: two trainings (the fast load-and-freeze test covers the gist).
def test_a_spectron_run_starts_from_the_stage1_checkpoint_and_keeps_it_frozen(tmp_path):
    """The whole chain through `train()`: 2 CTC steps, then 2 frozen-encoder Spectron steps."""
    mesh = _one_device_mesh()
    optimizer = trainer_lib.OptimizerConfig(learning_rate=3e-3, warmup_steps=0, decay="constant")
    ctc_batch = _batch()
    stage1 = train_lib.train(
        model=_model(),
        dataset_fn=lambda *_: itertools.repeat(ctc_batch),
        model_dir=str(tmp_path / "stage1"),
        num_steps=2,
        mesh=mesh,
        optimizer=optimizer,
        log_every=1,
    )
    stage1_encoder = jax.device_get(stage1.state.params["encoder"])
    config = spectron_testing.tiny_config(encoder_frozen=True)
    assert config.encoder == _config().encoder
    spectron_batch = spectron_testing.random_batch(config, batch_size=2)
    step_dir = tmp_path / "stage1" / "checkpoints" / "2"
    stage3 = train_lib.train(
        model=spectron_testing.tiny_model(config),
        dataset_fn=lambda *_: itertools.repeat(spectron_batch),
        model_dir=str(tmp_path / "stage3"),
        num_steps=2,
        mesh=mesh,
        optimizer=optimizer,
        init_checkpoint=str(step_dir),
        init_subtrees=ce.SPECTRON_INIT_SUBTREES,
        log_every=1,
    )
    assert str(step_dir) in stage3.init_source and stage3.step == 2
    # Loaded, then left alone by two optimizer steps with a non-zero gradient elsewhere.
    _assert_trees_equal(stage1_encoder, jax.device_get(stage3.state.params["encoder"]))
    assert stage3.last_metrics["grad_norm"] > 0
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(stage3.state.opt_state)[0]
    ]
    assert any("'decoder'" in p for p in paths) and not any("'encoder'" in p for p in paths)


# ------------------------------------------------------------------------------------------------
# The batch, the evaluator and the gin file (TensorFlow / seqio).
# ------------------------------------------------------------------------------------------------


def _task_example(prompt_frames, continuation_frames, prompt_ids, continuation_ids, trimmed=0):
    import tensorflow as tf

    return {
        "prompt_features": tf.ones([prompt_frames, 8]),
        "prompt_length": tf.constant(prompt_frames + trimmed, tf.int32),
        "prompt_transcript": tf.constant(prompt_ids, tf.int32),
        "continuation_frames": 2 * tf.ones([continuation_frames, 8]),
        "continuation_length": tf.constant(continuation_frames, tf.int32),
        "continuation_transcript": tf.constant(continuation_ids, tf.int32),
    }


def _convert(converter, examples, lengths):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensors(examples[0])
    for ex in examples[1:]:
        ds = ds.concatenate(tf.data.Dataset.from_tensors(ex))
    return list(converter(ds, lengths).as_numpy_iterator())


def test_feature_converter_gives_both_halves_padded_and_drops_unusable_ones():
    lengths = {
        "prompt_features": 6,
        "prompt_transcript": 3,
        "continuation_transcript": 4,
        "continuation_frames": 10,
    }
    examples = [
        _task_example(5, 9, [4, 5], [6, 7, 8]),
        _task_example(6, 0, [4], [5]),  # continuation without frames: dropped
        _task_example(6, 3, [9], [10], trimmed=2),  # prompt cut by seqio's trim: dropped
    ]
    converter = _model().feature_converter()
    assert converter.use_continuation
    rows = _convert(converter, examples, lengths)
    assert len(rows) == 4
    assert {k: v.shape for k, v in rows[0].items()} == {
        "encoder_features": (10, 8),
        "encoder_mask": (10,),
        "ctc_labels": (4,),
        "ctc_label_mask": (4,),
    }
    np.testing.assert_array_equal(rows[0]["encoder_mask"], [1] * 5 + [0] * 5)
    np.testing.assert_array_equal(rows[0]["ctc_labels"], [4, 5, 0, 0])
    np.testing.assert_array_equal(rows[0]["ctc_label_mask"], [1, 1, 0, 0])
    assert rows[0]["encoder_features"][:5].min() == 1 and not rows[0]["encoder_features"][5:].any()
    np.testing.assert_array_equal(rows[1]["encoder_mask"], [1] * 9 + [0])
    np.testing.assert_array_equal(rows[1]["ctc_labels"], [6, 7, 8, 0])
    assert rows[1]["encoder_features"][:9].min() == 2
    np.testing.assert_array_equal(rows[2]["ctc_labels"], [4, 0, 0, 0])
    np.testing.assert_array_equal(rows[3]["ctc_labels"], [10, 0, 0, 0])
    # An fbank encoder cannot read the continuation's log-mel: prompts only.
    prompts = _convert(converter.__class__(use_continuation=False), examples, lengths)
    assert len(prompts) == 2 and prompts[0]["encoder_features"].shape == (6, 8)
    assert prompts[0]["ctc_labels"].shape == (3,)


class _FixedTranscripts:
    """A stand-in model whose greedy CTC output is given."""

    def __init__(self, ids, lengths):
        self.vocabulary = spectron_testing.WordVocabulary(VOCAB)
        self._ids, self._lengths = jnp.asarray(ids), jnp.asarray(lengths)

    def predict_batch_with_aux(self, params, batch, rng=None):
        del params, batch, rng
        return self._ids, {"lengths": self._lengths}


def test_decoded_rows_are_scored_with_corpus_wer():
    from spectron_jax.pretraining import ctc_evaluation

    model = _FixedTranscripts([[4, 5, 9], [6, 0, 0]], [2, 1])
    batch = {
        "encoder_features": np.zeros((2, 4, 8), np.float32),
        "encoder_mask": np.ones((2, 4), np.int32),
        "ctc_labels": np.array([[4, 5, 0], [6, 7, 0]], np.int32),
        "ctc_label_mask": np.array([[1, 1, 0], [1, 1, 0]], np.int32),
    }
    rows = ctc_evaluation.decode_rows(model, None, [batch, batch], max_examples=3)
    assert rows[:2] == [
        {"reference": "w4 w5", "hypothesis": "w4 w5"},
        {"reference": "w6 w7", "hypothesis": "w6"},
    ]
    scores = ctc_evaluation.score_rows(rows)
    assert scores["wer"] == pytest.approx(1 / 6)  # one deletion in 6 reference words
    assert scores["exact_match"] == pytest.approx(2 / 3) and scores["num_examples"] == 3


def test_evaluator_skips_a_split_whose_data_is_absent(tmp_path):
    import seqio

    from spectron_jax.pretraining import ctc_evaluation
    from spectron_tasks import fsdd_counting

    fsdd_counting.register("test_ctc_fsdd_absent", data_dir=str(tmp_path / "no_fsdd"))
    try:
        evaluator = ctc_evaluation.CtcWerEvaluator(
            task_feature_lengths={
                "prompt_features": 16,
                "prompt_transcript": 4,
                "continuation_transcript": 4,
                "continuation_frames": 16,
            },
            splits=["test_ctc_fsdd_absent:test"],
        )
        config = _config(
            encoder=_tiny_80_bin_encoder(), vocab_size=1024, spectrogram=SpectrogramConfig()
        )
        model = ce.CtcEncoderModel(config)  # The tasks' tiny SentencePiece vocabulary.
        context = EvalContext(model=model, params=None, step=3, model_dir=str(tmp_path))
        assert evaluator.run(context) == {}
    finally:
        seqio.TaskRegistry.remove("test_ctc_fsdd_absent")
    report = json.loads((tmp_path / "asr" / "step_3.json").read_text())
    assert "Free Spoken Digit Dataset not found" in report["skipped"]["test_ctc_fsdd_absent:test"]


def _tiny_80_bin_encoder():
    import dataclasses

    return dataclasses.replace(spectron_testing.tiny_config().encoder, input_dim=80)


def test_stage1_gin_builds_the_tiny_runs_encoder():
    """The recipe's stage 1 trains exactly the Conformer gin/models/tiny.gin gives Spectron."""
    from spectron_jax import config as config_lib

    try:
        train_lib.parse_gin(
            [str(GIN_DIR / "recipe" / "stage1_encoder_ctc.gin")], [], [str(GIN_DIR)]
        )
        ctc_config = ce.ctc_encoder_config()
        spectron_config = config_lib.spectron_config()
        assert gin.query_parameter("model/gin.singleton.constructor").selector == (
            "spectron.ctc_encoder_model"
        )
    finally:
        gin.clear_config()
    assert ctc_config.encoder == spectron_config.encoder
    assert ctc_config.spectrogram == spectron_config.spectrogram
    assert ctc_config.vocab_size >= 1000  # the tiny SentencePiece vocabulary
    _assert_same_encoder_tree(ctc_config, spectron_config)

"""Stage 2: the number-text task, the text LM (`spectron_jax.pretraining.text_lm`), and Spectron
starting from its checkpoint."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import spectron_testing as st

from spectron_jax import checkpoints, partitioning, train
from spectron_jax import config as config_lib
from spectron_jax import trainer as trainer_lib
from spectron_jax.interfaces import EvalContext
from spectron_jax.models import SpectronModel, example_input_shapes
from spectron_jax.nn.decoder import DecoderConfig
from spectron_jax.pretraining import text_lm
from spectron_tasks import number_text, synthetic_counting

REPO = pathlib.Path(__file__).resolve().parents[2]
TEXT_LEN = 9


def _text_batch(vocab_size: int, batch_size: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Random lines of 3..TEXT_LEN-1 ids in the converter's layout (row 0 full length)."""
    rng = np.random.default_rng(seed)
    inputs = np.zeros((batch_size, TEXT_LEN), np.int32)
    targets = np.zeros_like(inputs)
    weights = np.zeros((batch_size, TEXT_LEN), np.float32)
    for i in range(batch_size):
        n = TEXT_LEN - 1 if i == 0 else int(rng.integers(3, TEXT_LEN))
        ids = rng.integers(4, vocab_size, size=n)
        inputs[i, : n + 1] = [st.WordVocabulary.bos_id, *ids]
        targets[i, : n + 1] = [*ids, st.WordVocabulary.eos_id]
        weights[i, : n + 1] = 1
    return {
        "decoder_input_tokens": inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": weights,
    }


def _text_model(decoder: DecoderConfig | None = None) -> text_lm.TextLmModel:
    decoder = decoder or st.tiny_config().decoder
    return text_lm.TextLmModel(decoder, st.WordVocabulary(decoder.vocab_size))


def _one_device_mesh():
    return partitioning.create_mesh(devices=jax.devices()[:1])


# ------------------------------------------------------------------------------------------------
# The task.
# ------------------------------------------------------------------------------------------------


def test_task_lines_are_deterministic_and_held_out_by_the_documented_rule():
    config = number_text.NumberTextConfig()
    train_lines = number_text.plan_split(config, "train")
    val_lines = number_text.plan_split(config, "validation")
    assert train_lines == number_text.plan_split(config, "train")
    train_texts = {line["text"] for line in train_lines}
    assert not train_texts & {line["text"] for line in val_lines}
    for line in val_lines:
        n = line["numbers"][0]
        assert (n % 10 == 5) if line["kind"] in number_text.RUNS else (n % 10 == 7)
    assert {line["kind"] for line in val_lines} == {"count", "count_down", "after", "before"}
    assert all(0 <= n <= 99 for line in train_lines for n in line["numbers"])
    # Every successor and predecessor fact the held-out lines use is stated by a training run.
    pairs = {
        (a, b)
        for line in train_lines
        if line["kind"] in number_text.RUNS
        for a, b in zip(line["numbers"], line["numbers"][1:], strict=False)
    }
    assert pairs == {(n, n + 1) for n in range(99)} | {(n + 1, n) for n in range(99)}
    assert "what comes after forty one forty two" in train_texts
    assert "forty one forty thirty nine" in train_texts
    assert "what comes before twenty seven twenty six" not in train_texts


def test_every_word_encodes_without_unk_and_round_trips():
    from spectron_jax.vocabularies import default_vocabulary

    vocab = default_vocabulary()
    unk = vocab.tokenizer.unk_id()
    for word in number_text.all_words():
        ids = vocab.encode(word)
        assert ids and unk not in ids, word
    for split in number_text.SPLITS:
        for line in number_text.plan_split(number_text.NumberTextConfig(), split):
            ids = vocab.encode(line["text"])
            assert unk not in ids and vocab.decode(ids) == line["text"]
            assert len(ids) <= 16  # gin/recipe/stage2_text_lm.gin's TASK_FEATURE_LENGTHS


def test_text_only_numbers_are_absent_from_the_speech_corpus():
    speech = number_text.speech_numbers()
    assert speech == range(0, 23)
    config = synthetic_counting.SyntheticCountingConfig()
    spoken = set()
    for split in synthetic_counting.SPLITS:
        for ex in synthetic_counting.plan_split(config, split):
            text = f"{ex['prompt_text']} {ex['continuation_text']}"
            spoken.update(number_text.parse_numbers(text))
            assert "what" not in text  # no questions in the speech data
    assert spoken == set(speech)
    prompts = number_text.heldout_prompts()
    groups = {p["group"] for p in prompts}
    assert groups == {
        "count_speech_range",
        "count_text_only",
        "count_down",
        "question_after",
        "question_before",
    }
    for p in prompts:
        (answer,) = number_text.parse_numbers(p["answer"])
        numbers = number_text.parse_numbers(p["prompt"].removeprefix("what comes after "))
        if p["group"] == "count_text_only":
            assert answer not in spoken
        if p["group"] == "count_speech_range":
            assert {answer, *numbers} <= spoken
    text_only = [p for p in prompts if p["group"] == "count_text_only"]
    assert len(text_only) == 16 and len(prompts) == 60


def test_number_parsing_and_matching():
    assert number_text.parse_numbers("forty forty one forty two") == [40, 41, 42]
    assert number_text.parse_numbers("nineteen twenty twenty one what") == [19, 20, 21]
    assert number_text.parse_numbers("") == []
    assert number_text.next_number_matches("forty forty one", "forty")
    assert not number_text.next_number_matches("forty one forty two", "forty")
    assert not number_text.next_number_matches("what", "forty")


def test_registered_task_through_the_models_converter():
    from spectron_jax import data

    decoder = dataclasses.replace(st.tiny_config().decoder, vocab_size=1024)
    model = text_lm.TextLmModel(decoder)  # The shipped tiny vocabulary.
    dataset_fn = data.seqio_dataset_fn(
        number_text.TASK_NAME,
        {"targets": 16},
        8,
        model=model,
        split="validation",
        shuffle=False,
        repeat=False,
    )
    batch = next(iter(dataset_fn(0, 1, 0, 0)))
    lines = number_text.plan_split(number_text.NumberTextConfig(), "validation")
    for row in range(8):
        ids = model.vocabulary.encode(lines[row]["text"])
        n = len(ids)
        np.testing.assert_array_equal(batch["decoder_input_tokens"][row, : n + 1], [3, *ids])
        np.testing.assert_array_equal(batch["decoder_target_tokens"][row, : n + 1], [*ids, 1])
        assert batch["decoder_loss_weights"][row].tolist() == [1.0] * (n + 1) + [0.0] * (16 - n)
        assert not batch["decoder_input_tokens"][row, n + 1 :].any()


def test_converter_layout_and_length_check():
    import tensorflow as tf

    converter = _text_model().feature_converter()
    ds = tf.data.Dataset.from_generator(
        lambda: iter([{"targets": [7, 8, 9]}, {"targets": [5]}]),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)},
    )
    rows = list(converter(ds, {"targets": 4}).as_numpy_iterator())
    assert rows[0]["decoder_input_tokens"].tolist() == [3, 7, 8, 9, 0]
    assert rows[0]["decoder_target_tokens"].tolist() == [7, 8, 9, 1, 0]
    assert rows[0]["decoder_loss_weights"].tolist() == [1, 1, 1, 1, 0]
    assert rows[1]["decoder_input_tokens"].tolist() == [3, 5, 0, 0, 0]
    assert rows[1]["decoder_target_tokens"].tolist() == [5, 1, 0, 0, 0]
    assert converter.get_model_feature_lengths({"targets": 4})["decoder_target_tokens"] == 5
    with pytest.raises(ValueError, match="pack"):
        _text_model().feature_converter(pack=True)


# ------------------------------------------------------------------------------------------------
# The model.
# ------------------------------------------------------------------------------------------------


def _boxed_params(model, shapes):
    return jax.eval_shape(lambda r: model.get_initial_variables(r, shapes), jax.random.PRNGKey(0))[
        "params"
    ]


def _described(tree):
    """path -> (shape, dtype, logical axis names) of every boxed leaf."""
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )[0]
    return {
        jax.tree_util.keystr(path): (leaf.value.shape, leaf.value.dtype, tuple(leaf.names))
        for path, leaf in flat
    }


def _tiny_gin_decoder() -> DecoderConfig:
    try:
        return config_lib.config_from_gin_file(
            str(REPO / "gin" / "models" / "tiny.gin"), (str(REPO / "gin"),)
        ).decoder
    finally:
        gin.clear_config()


@pytest.mark.parametrize("variant", ["tiny_test", "tied_with_biases", "tiny_gin"])
def test_decoder_tree_is_spectrons_decoder_subtree(variant):
    spectron_config = st.tiny_config()
    if variant == "tied_with_biases":
        decoder = dataclasses.replace(spectron_config.decoder, tie_embeddings=True, qkv_bias=True)
        spectron_config = dataclasses.replace(spectron_config, decoder=decoder)
    if variant == "tiny_gin":
        spectron_config = dataclasses.replace(spectron_config, decoder=_tiny_gin_decoder())
    spectron = _boxed_params(SpectronModel(spectron_config), example_input_shapes(spectron_config))
    lm = _boxed_params(
        text_lm.TextLmModel(spectron_config.decoder), {"decoder_input_tokens": (2, TEXT_LEN)}
    )
    assert set(lm) == {"decoder"}
    assert _described(lm["decoder"]) == _described(spectron["decoder"])
    assert ("lm_head" in lm["decoder"]) == (not spectron_config.decoder.tie_embeddings)


def _decoder_params(config=None):
    """Random `{"decoder": ...}` params: Spectron's decoder subtree (numpy-filled, no init
    compile), which the text LM takes as its own."""
    config = config or st.tiny_config()
    return {"decoder": st.init_params(config, st.random_batch(config))["decoder"]}


def test_loss_is_mean_ce_over_valid_tokens_and_decreases():
    model = _text_model()
    batch = {k: jnp.asarray(v) for k, v in _text_batch(32).items()}
    params = _decoder_params()

    @jax.jit
    def evaluate(params):
        loss, metrics = model.loss_fn(params, batch, None)
        valid = batch["decoder_loss_weights"] > 0
        logits = model.module.apply({"params": params}, batch["decoder_input_tokens"], valid)
        return loss, metrics, logits, model.score_batch(params, batch)

    loss, metrics, logits, scores = evaluate(params)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    w = batch["decoder_loss_weights"]
    np.testing.assert_allclose(loss, jnp.sum(nll * w) / jnp.sum(w), rtol=1e-5)
    assert float(metrics["num_tokens"]) == float(w.sum())
    np.testing.assert_allclose(scores, -jnp.sum(nll * w, -1), rtol=1e-5)

    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        value, grads = jax.value_and_grad(lambda p: model.loss_fn(p, batch, None)[0])(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value

    history = []
    for _ in range(8):
        params, opt_state, value = step(params, opt_state)
        history.append(float(value))
    assert history[-1] < 0.8 * history[0]
    assert all(b < a for a, b in zip(history, history[1:], strict=False))


def test_greedy_generation_is_the_teacher_forced_argmax_and_feeds_the_evaluator(tmp_path):
    model = _text_model()
    params = _decoder_params()
    prompts = ["w5 w6", "w7", "w9 w10 w11"]
    tokens, lengths = text_lm.encode_prompts(model, prompts)
    assert tokens[1].tolist() == [3, 7, 0, 0] and lengths.tolist() == [3, 2, 4]
    out = np.asarray(text_lm.greedy_generate(model.config.decoder, params, tokens, lengths, 4))
    # One teacher-forced pass over [BOS] prompt generated (left-aligned, padded after).
    seq = np.zeros((3, tokens.shape[1] + 4), np.int32)
    for row, n in enumerate(lengths):
        seq[row, : n + 4] = [*tokens[row, :n], *out[row]]
    valid = np.arange(seq.shape[1])[None] < (lengths + 4)[:, None]
    logits = jax.jit(model.module.apply)({"params": params}, seq, valid)
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(np.argmax(logits[row, n - 1 : n + 3], -1), out[row])
    # The BaseModel method continues a batch's valid inputs the same way.
    batch = {
        "decoder_input_tokens": tokens,
        "decoder_loss_weights": (np.arange(4)[None] < lengths[:, None]).astype(np.float32),
    }
    predicted, aux = model.predict_batch_with_aux(params, batch, max_new_tokens=4)
    np.testing.assert_array_equal(predicted, out)
    eos = [row.tolist().index(1) if 1 in row.tolist() else 4 for row in out]
    assert aux["text_lengths"].tolist() == eos

    texts = text_lm.generate_text(model, params, prompts, 4, batch_size=2)
    assert len(texts) == 3
    # Answers the model gets right by construction (its own first word), except the last one.
    examples = [
        {"prompt": p, "answer": (t.split() or ["w999"])[0], "group": "a" if i else "b"}
        for i, (p, t) in enumerate(zip(prompts, texts, strict=True))
    ]
    examples[2]["answer"] = "w999"
    correct = [bool(t) for t in texts[:2]] + [False]
    evaluator = text_lm.NextNumberEvaluator(examples, max_new_tokens=4, batch_size=2)
    context = EvalContext(model=model, params=params, step=3, model_dir=str(tmp_path))
    figures = evaluator.run(context)
    assert figures["accuracy_b"] == correct[0] and figures["accuracy_a"] == correct[1] / 2
    assert figures["num_a"] == 2 and np.isclose(figures["accuracy"], sum(correct) / 3)
    written = json.loads((tmp_path / "next_number" / "step_3.json").read_text())
    assert [e["output"] for e in written["examples"]] == texts


# ------------------------------------------------------------------------------------------------
# Stage 2 -> stage 3: train() of the text LM, then a Spectron train() initialised from it.
# ------------------------------------------------------------------------------------------------


def _repeat(batch):
    def dataset_fn(shard, num_shards, seed, skip):
        del shard, num_shards, seed, skip
        while True:
            yield batch

    return dataset_fn


@pytest.mark.slow  # About 100 s on 2 cores: two real parameter inits and two trainings.
def test_spectron_starts_from_the_stage2_decoder(tmp_path):
    config = st.tiny_config()
    optimizer = trainer_lib.OptimizerConfig(warmup_steps=0, learning_rate=1e-2, decay_steps=2)
    ckpt_config = checkpoints.CheckpointConfig(async_save=False)
    stage2 = train.train(
        _text_model(config.decoder),
        _repeat(_text_batch(config.decoder.vocab_size)),
        str(tmp_path / "stage2"),
        2,
        mesh=_one_device_mesh(),
        optimizer=optimizer,
        checkpoint_config=ckpt_config,
        seed=1,  # Not stage 3's seed: equal decoders below can only come from the checkpoint.
    )
    assert stage2.step == 2
    step_dir = checkpoints.find_step_dir(tmp_path / "stage2")
    assert step_dir.name == "2"

    spectron_batch = st.random_batch(config, batch_size=2)
    stage3 = train.train(
        st.tiny_model(config),
        _repeat(spectron_batch),
        str(tmp_path / "stage3"),
        0,
        mesh=_one_device_mesh(),
        optimizer=optimizer,
        checkpoint_config=ckpt_config,
        init_checkpoint=str(step_dir),
        init_subtrees=text_lm.SPECTRON_INIT_SUBTREES,
    )
    assert int(stage3.state.step) == 0 and "stage2" in stage3.init_source
    got = jax.device_get(stage3.state.params["decoder"])
    want = jax.device_get(stage2.state.params["decoder"])
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_stage2_gin_builds_the_text_lm_over_the_tiny_decoder():
    try:
        train.parse_gin(
            ["recipe/stage2_text_lm.gin"], [], [str(REPO), str(REPO / "gin")], finalize=False
        )
        model = text_lm.text_lm_model()
        assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == number_text.TASK_NAME
    finally:
        gin.clear_config()
    assert model.config.decoder == _tiny_gin_decoder()
    model.check_vocabulary_fits()

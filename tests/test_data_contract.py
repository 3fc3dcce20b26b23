"""The model owns its data contract: vocabulary, special ids and reduction factor reach the
batches, the checkpoint and inference from the model, for a vocabulary other than the default.

The vocabulary here is built by the test with Gemma's id layout (pad 0, eos 1, bos 2, unk 3), so
that a hidden default of the shipped tiny vocabulary (bos 3) anywhere on the path shows up.
"""

import dataclasses

import jax
import numpy as np
import pytest
import sentencepiece as spm
import seqio
import tensorflow as tf
from spectron_testing import tiny_config

from spectron_jax import checkpoints, data, inference, train, vocabularies
from spectron_jax.audio.spectrogram import SpectrogramConfig
from spectron_jax.models import SpectronModel
from spectron_tasks import speech_task

HOP = 256
WORDS = ["one two", "three four", "five six", "seven eight", "nine ten", "two three"]
# continuation_frames is odd on purpose: the model's r = 2 pads it to 8 (masked).
LENGTHS = {
    "prompt_features": 32,
    "prompt_transcript": 12,
    "continuation_transcript": 12,
    "continuation_frames": 7,
}


@pytest.fixture(scope="module")
def bos2_vocab_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bos2_vocab")
    (folder / "corpus.txt").write_text("\n".join(WORDS * 20) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "gemma_like"),
        vocab_size=24,
        model_type="char",
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    return folder / "gemma_like.model"


def _source(num_examples: int = 8) -> seqio.DataSource:
    """Raw examples with noise audio: 31 prompt frames and exactly 7 continuation frames."""

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        rng = np.random.default_rng(0)

        def examples():
            for i in range(num_examples):
                yield {
                    "prompt_audio": rng.normal(0, 0.1, 30 * HOP).astype(np.float32),
                    "continuation_audio": rng.normal(0, 0.1, 6 * HOP).astype(np.float32),
                    "prompt_text": WORDS[i % len(WORDS)],
                    "continuation_text": WORDS[(i + 1) % len(WORDS)],
                    "speaker_id": "s0",
                    "id": f"ex{i}",
                }

        return tf.data.Dataset.from_generator(
            examples, output_signature=speech_task.raw_output_signature()
        )

    return seqio.FunctionDataSource(dataset_fn, splits=["train"])


def _register(name: str, vocabulary) -> None:
    speech_task.register_speech_task(
        name, _source(), target_config=SpectrogramConfig(n_mels=8), vocabulary=vocabulary
    )


@pytest.fixture(scope="module")
def bos2_task(bos2_vocab_file):
    vocab = vocabularies.vocabulary(bos2_vocab_file)
    _register("test_contract_bos2", vocab)
    return "test_contract_bos2", vocab


def test_the_test_vocabulary_has_gemma_ids(bos2_task):
    _, vocab = bos2_task
    assert vocabularies.special_ids(vocab) == vocabularies.SpecialIds(bos_id=2, eos_id=1, pad_id=0)
    light = vocabularies.vocabulary(vocabularies.vocabulary_file(vocab), light=True)
    assert vocabularies.same_vocabulary(vocab, light)
    assert not vocabularies.same_vocabulary(vocab, vocabularies.default_vocabulary())


@pytest.mark.slow  # ~60-85 s on 2 cores: kept out of the default suite (under 20 min)
def test_trainer_batches_checkpoint_and_inference_use_the_models_bos(bos2_task, tmp_path):
    name, vocab = bos2_task
    model = SpectronModel(tiny_config(), vocab)
    assert (model.bos_id, model.eos_id) == (2, 1)
    seen = []
    result = train.train(
        model=model,
        dataset_fn=data.seqio_dataset_fn(name, LENGTHS, 8, model=model),
        model_dir=str(tmp_path),
        num_steps=2,
        log_every=1,
        batch_callback=lambda step, batch: seen.append(batch),
    )
    assert result.step == 2 and len(seen) == 2
    for batch in seen:
        assert (batch["decoder_input_tokens"][:, 0] == 2).all()
        n = batch["decoder_loss_weights"].sum(axis=1).astype(int)
        targets = batch["decoder_target_tokens"]
        assert (targets[np.arange(len(n)), n - 1] == 1).all()  # EOS ends every transcript
        # 7 task frames, padded to a multiple of r = 2; the padding frame is masked out.
        assert batch["target_frames"].shape[1] == 8
        assert (batch["frame_mask"].sum(axis=1) == 7).all()
        assert np.isfinite(result.last_metrics["loss"])

    step_dir = checkpoints.find_step_dir(tmp_path)
    record = checkpoints.read_vocabulary_record(step_dir)
    assert (record["bos_id"], record["eos_id"], record["pad_id"]) == (2, 1, 0)
    stored = open(record["path"], "rb").read()
    assert stored == open(vocabularies.vocabulary_file(vocab), "rb").read()

    loaded = inference.load_model_for_inference(tmp_path)  # no vocabulary given
    assert loaded.model.bos_id == 2
    assert loaded.vocabulary.decode(vocab.encode("three four")) == "three four"


def test_task_with_another_vocabulary_is_an_error_naming_both(bos2_task):
    name, vocab = bos2_task
    model = SpectronModel(_wide_config())  # the shipped tiny vocabulary
    with pytest.raises(ValueError, match=r"tiny_spm\.model.*gemma_like\.model|gemma_like.*tiny"):
        data.seqio_dataset_fn(name, LENGTHS, 8, model=model)


def _wide_config():
    """The tiny test config with a decoder wide enough for the shipped tiny vocabulary."""
    config = tiny_config()
    return dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, vocab_size=1024))


def test_vocabulary_larger_than_the_decoder_is_an_error(bos2_task):
    name, _ = bos2_task
    model = SpectronModel(tiny_config())  # default tiny vocabulary: 1000 ids > 32
    with pytest.raises(
        ValueError, match=r"1000 ids but the model embeds only 32 \(decoder_config.vocab_size\)"
    ):
        data.seqio_dataset_fn(name, LENGTHS, 8, model=model)


@pytest.mark.slow  # ~40 s on 2 cores
def test_frames_not_a_multiple_of_r_are_rejected_by_the_model():
    from spectron_testing import random_batch

    model = SpectronModel(tiny_config())
    batch = random_batch(model.config)
    batch["target_frames"] = batch["target_frames"][:, :-1]
    batch["frame_mask"] = batch["frame_mask"][:, :-1]
    variables = model.get_initial_variables(
        jax.random.PRNGKey(0), {k: v.shape for k, v in random_batch(model.config).items()}
    )
    with pytest.raises(ValueError, match="not a multiple of reduction_factor=2"):
        model.loss_fn(variables["params"], batch, None)

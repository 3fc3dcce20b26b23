"""SentencePiece and HF tokenizer.json files as seqio vocabularies, on files the test builds."""

import pickle

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from spectron_jax import vocabularies

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "spectrograms carry the voice of the speaker",
    "the quick brown fox jumps over the lazy dog",
    "speech in, speech out",
] * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    text = folder / "corpus.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    # T5 / seqio id layout: pad 0, eos 1, unk 2.
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(folder / "tiny"),
        vocab_size=40,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return folder / "tiny.model"


@pytest.fixture(scope="module")
def hf_tokenizer_file(tmp_path_factory):
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=120,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_sentencepiece_matches_the_processor(sp_model):
    vocab = vocabularies.sentencepiece_vocabulary(sp_model, extra_ids=3)
    proc = spm.SentencePieceProcessor(model_file=str(sp_model))
    text = "the dog sat in the park"
    ids = vocab.encode(text)
    assert list(ids) == proc.encode(text)
    assert vocab.decode(ids) == text
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert vocab.vocab_size == proc.get_piece_size() + 3
    np.testing.assert_array_equal(vocab.encode_tf(tf.constant(text)).numpy(), ids)


def test_sentencepiece_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="SentencePiece model not found"):
        vocabularies.sentencepiece_vocabulary(tmp_path / "absent.model")


def test_hf_tokenizer_round_trip_and_special_ids(hf_tokenizer_file):
    vocab = vocabularies.HFTokenizerVocabulary(hf_tokenizer_file)
    ref = tokenizers.Tokenizer.from_file(str(hf_tokenizer_file))
    text = "the lazy cat ran over the mat"
    ids = vocab.encode(text)
    assert list(ids) == ref.encode(text).ids
    assert vocab.decode(ids) == text
    assert (vocab.pad_id, vocab.eos_id, vocab.bos_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.vocab_size == ref.get_vocab_size()
    # Decoding stops after the first EOS and drops special tokens.
    assert vocab.decode([2, *ids, 1, *ids]) == text


def test_hf_tokenizer_tf_ops(hf_tokenizer_file):
    vocab = vocabularies.HFTokenizerVocabulary(hf_tokenizer_file)
    texts = ["the cat sat", "a dog ran in the park"]
    ds = tf.data.Dataset.from_tensor_slices(texts).map(vocab.encode_tf)
    encoded = [x.numpy().tolist() for x in ds]
    assert encoded == [vocab.encode(t) for t in texts]

    width = max(map(len, encoded)) + 1
    batch = np.zeros((2, width), np.int32)  # pad 0 after EOS
    for row, ids in zip(batch, encoded, strict=True):
        row[: len(ids) + 1] = [*ids, vocab.eos_id]
    decoded = vocab.decode_tf(tf.constant(batch)).numpy().tolist()
    assert [d.decode() for d in decoded] == texts


def test_hf_tokenizer_explicit_tokens_and_pickle(hf_tokenizer_file):
    vocab = vocabularies.HFTokenizerVocabulary(hf_tokenizer_file, extra_ids=2, eos_token="<bos>")
    assert vocab.eos_id == 2
    assert vocab.vocab_size == vocab.tokenizer.get_vocab_size() + 2
    clone = pickle.loads(pickle.dumps(vocab))  # gin needs vocabularies to pickle
    assert clone == vocab and clone.encode("the cat") == vocab.encode("the cat")
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        vocabularies.HFTokenizerVocabulary(hf_tokenizer_file, eos_token="<nope>")

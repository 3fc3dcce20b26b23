"""Tokenizers that ship with pretrained LMs, as seqio vocabularies.

- SentencePiece model files (Gemma's `tokenizer.model`, T5): `sentencepiece_vocabulary`.
- HF `tokenizer.json` (Llama 3, Qwen2, Gemma 3 fast tokenizers): `HFTokenizerVocabulary`, a thin
  `seqio.Vocabulary` over the `tokenizers` library, with TF ops through `tf.py_function`.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf

PathLike = str | os.PathLike

# Special-token spellings of the common families, most specific first.
_EOS_TOKENS = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>")
_BOS_TOKENS = ("<bos>", "<s>", "<|begin_of_text|>")
_PAD_TOKENS = ("<pad>", "<|finetune_right_pad_id|>", "[PAD]")
_UNK_TOKENS = ("<unk>", "[UNK]")


def sentencepiece_vocabulary(model_file: PathLike, extra_ids: int = 0) -> seqio.Vocabulary:
    """A SentencePiece model file as `seqio.SentencePieceVocabulary`.

    Raises:
      FileNotFoundError: `model_file` does not exist.
    """
    path = pathlib.Path(model_file)
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model not found: {path}")
    return seqio.SentencePieceVocabulary(str(path), extra_ids=extra_ids)


def _find(vocab: dict[str, int], explicit: str | None, candidates: Sequence[str]) -> int | None:
    if explicit is not None:
        if explicit not in vocab:
            raise ValueError(f"special token {explicit!r} is not in the tokenizer's vocabulary")
        return vocab[explicit]
    for token in candidates:
        if token in vocab:
            return vocab[token]
    return None


class HFTokenizerVocabulary(seqio.Vocabulary):
    """An HF `tokenizer.json` as a seqio vocabulary.

    `encode` adds no special tokens (seqio adds EOS itself); `decode` stops after the first EOS
    (seqio's base class) and drops special tokens. Special ids are looked up by the usual
    spellings unless given; PAD falls back to seqio's 0 when the tokenizer has none.

    Args:
      tokenizer_file: path of `tokenizer.json`.
      extra_ids: sentinel ids appended after the tokenizer's vocabulary.
      eos_token, bos_token, pad_token, unk_token: spellings of the special tokens (None: look up
        the common ones).
    """

    def __init__(
        self,
        tokenizer_file: PathLike,
        extra_ids: int = 0,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
    ):
        path = pathlib.Path(tokenizer_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        self._path = str(path)
        self._tokenizer = None
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self._eos_id = _find(vocab, eos_token, _EOS_TOKENS)
        self._bos_id = _find(vocab, bos_token, _BOS_TOKENS)
        self._pad_id = _find(vocab, pad_token, _PAD_TOKENS)
        self._unk_id = _find(vocab, unk_token, _UNK_TOKENS)
        super().__init__(extra_ids=extra_ids)

    @property
    def tokenizer(self):
        """The `tokenizers.Tokenizer`, loaded lazily (so the vocabulary pickles for gin)."""
        if self._tokenizer is None:
            import tokenizers

            self._tokenizer = tokenizers.Tokenizer.from_file(self._path)
        return self._tokenizer

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        return state

    def __eq__(self, other) -> bool:
        if not isinstance(other, HFTokenizerVocabulary):
            return False
        return (self._path, self.extra_ids) == (other._path, other.extra_ids)

    def __hash__(self) -> int:
        return hash((self._path, self.extra_ids))

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id if self._pad_id is not None else seqio.PAD_ID

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self._base_vocab_size]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """tf.string[] -> tf.int32[L] (python tokenizer inside the graph via tf.py_function)."""

        def encode(x):
            return np.asarray(self._encode(x.numpy().decode("utf-8")), np.int32)

        ids = tf.py_function(encode, [s], tf.int32)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """tf.int32[..., L] -> tf.string[...], one string per last-axis row."""

        def decode(x):
            x = x.numpy()
            rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
            out = [self._decode(row.tolist()).encode("utf-8") for row in rows]
            return np.asarray(out, dtype=object).reshape(x.shape[:-1])

        out = tf.py_function(decode, [ids], tf.string)
        out.set_shape(ids.shape[:-1])
        return out

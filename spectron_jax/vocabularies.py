"""Vocabularies: the one module that knows tokenizer files, special ids and how to load them.

- SentencePiece model files (the shipped tiny model, Gemma's `tokenizer.model`, T5):
  `seqio.SentencePieceVocabulary` for data pipelines, `SentencePieceText` (the same ids, no
  TensorFlow) for inference.
- HF `tokenizer.json` (Llama 3, Qwen2, Gemma 3 fast tokenizers): `HFTokenizerVocabulary`, a thin
  `seqio.Vocabulary` over the `tokenizers` library, with TF ops through `tf.py_function`.

The model owns its vocabulary (`models.SpectronModel.vocabulary`); its special ids
(`special_ids`) drive the feature converter, decoding and the checkpoint, which stores the file
itself (`vocabulary_file`) so that a checkpoint decodes with nothing but its path.

seqio (and with it TensorFlow) is imported only where a seqio class is asked for: a command-line
call that only turns ids into words should not pay for TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import gin
import numpy as np

PathLike = str | os.PathLike

# The tiny SentencePiece model shipped in the package (built by scripts/build_tiny_vocab.py):
# pad = 0, eos = 1, unk = 2, bos = 3; byte fallback, so any UTF-8 text encodes.
TINY_SPM_PATH = str(pathlib.Path(__file__).resolve().parent / "assets" / "tiny_spm.model")

# Special-token spellings of the common families, most specific first.
_EOS_TOKENS = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>")
_BOS_TOKENS = ("<bos>", "<s>", "<|begin_of_text|>")
_PAD_TOKENS = ("<pad>", "<|finetune_right_pad_id|>", "[PAD]")
_UNK_TOKENS = ("<unk>", "[UNK]")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The ids of the model's data contract.

    Attributes:
      bos_id: the decoder's first input token (tiny vocabulary: 3; Gemma: 2).
      eos_id: appended after the continuation transcript; ends text decoding.
      pad_id: padding of token rows (0 in every family we load: seqio's convention).
    """

    bos_id: int
    eos_id: int
    pad_id: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _valid_id(value: Any) -> int | None:
    return int(value) if isinstance(value, int | np.integer) and int(value) >= 0 else None


def special_ids(
    vocabulary: Any, *, bos_id: int | None = None, eos_id: int | None = None
) -> SpecialIds:
    """The BOS / EOS / PAD ids of a vocabulary, explicit values taking precedence.

    Raises:
      ValueError: the vocabulary defines no BOS or EOS and none was given (naming it).
    """
    bos = bos_id if bos_id is not None else _valid_id(getattr(vocabulary, "bos_id", None))
    if bos is None and hasattr(vocabulary, "tokenizer") and hasattr(vocabulary.tokenizer, "bos_id"):
        bos = _valid_id(vocabulary.tokenizer.bos_id())  # seqio.SentencePieceVocabulary
    eos = eos_id if eos_id is not None else _valid_id(getattr(vocabulary, "eos_id", None))
    missing = [n for n, v in (("bos_id", bos), ("eos_id", eos)) if v is None]
    if missing:
        raise ValueError(
            f"vocabulary {describe(vocabulary)} defines no {' or '.join(missing)}; pass it "
            "explicitly (spectron_model.bos_id / eos_id)"
        )
    pad = _valid_id(getattr(vocabulary, "pad_id", None))
    return SpecialIds(bos_id=bos, eos_id=eos, pad_id=0 if pad is None else pad)


def vocabulary_file(vocabulary: Any) -> str | None:
    """The tokenizer file behind a vocabulary (None for one that has no file)."""
    for name in ("file", "sentencepiece_model_file"):
        value = getattr(vocabulary, name, None)
        if isinstance(value, str | os.PathLike) and os.path.isfile(value):
            return os.fspath(value)
    return None


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, mtime: float) -> str:
    del mtime  # Part of the cache key only.
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def file_digest(path: PathLike) -> str:
    """sha256 of a file's bytes (hex)."""
    path = os.fspath(path)
    return _file_digest(path, os.path.getmtime(path))


def describe(vocabulary: Any) -> str:
    """A short name for messages: the class and the file it reads."""
    path = vocabulary_file(vocabulary)
    return f"{type(vocabulary).__name__}({path or '?'})"


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two vocabularies map text to the same ids: same tokenizer bytes, same extra ids."""
    fa, fb = vocabulary_file(a), vocabulary_file(b)
    if fa is None or fb is None:
        return a == b
    extra = getattr(a, "extra_ids", 0) == getattr(b, "extra_ids", 0)
    return extra and (fa == fb or file_digest(fa) == file_digest(fb))


class SentencePieceText:
    """A SentencePiece model file as plain Python (`vocab_size`, `encode`, `decode`, special
    ids), without seqio or TensorFlow: what inference needs."""

    def __init__(self, model_file: PathLike):
        import sentencepiece as spm

        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
        self.file = os.fspath(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=self.file)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        return _valid_id(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _valid_id(self._sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        return _valid_id(self._sp.pad_id())

    def encode(self, s: str) -> list[int]:
        return list(self._sp.encode(s))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


@gin.configurable(module="spectron")
def vocabulary(path: PathLike | None = None, extra_ids: int = 0, light: bool = False) -> Any:
    """A vocabulary from its file: a SentencePiece `.model`, or an HF `tokenizer.json`.

    Args:
      path: the tokenizer file; None = the shipped tiny SentencePiece model (`TINY_SPM_PATH`).
      extra_ids: sentinel ids after the tokenizer's own (seqio's convention).
      light: for SentencePiece, `SentencePieceText` (no TensorFlow) instead of seqio's class.

    Raises:
      FileNotFoundError: the file does not exist.
    """
    path = os.fspath(path) if path is not None else TINY_SPM_PATH
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    if path.endswith(".json"):
        return _hf_tokenizer_class()(path, extra_ids=extra_ids)
    if light and not extra_ids:
        return SentencePieceText(path)
    return sentencepiece_vocabulary(path, extra_ids=extra_ids)


class TextContract:
    """The text half of a model's data contract, shared by every model the trainer runs.

    A mixin: the model calls `_set_vocabulary` in its constructor and says how many ids it
    scores (`_id_capacity`, and the knob that sets it for the message); it then has the
    vocabulary, its special ids, T5X's `input_vocabulary` / `output_vocabulary`, and
    `check_vocabulary_fits` (which the data pipeline and checkpoint loading call).
    """

    vocabulary: Any
    special_ids: SpecialIds
    ID_CAPACITY_KNOB = "decoder_config.vocab_size"

    def _set_vocabulary(
        self, vocabulary_: Any = None, bos_id: int | None = None, eos_id: int | None = None
    ) -> None:
        """Default: the shipped tiny SentencePiece model, without TensorFlow."""
        self.vocabulary = vocabulary_ if vocabulary_ is not None else vocabulary(light=True)
        self.special_ids = special_ids(self.vocabulary, bos_id=bos_id, eos_id=eos_id)

    def _id_capacity(self) -> int:
        """How many ids the model embeds or scores."""
        raise NotImplementedError

    def check_vocabulary_fits(self) -> None:
        """Raises ValueError when the vocabulary has more ids than the model embeds or scores
        (random test models need not fit the default vocabulary, so this is not checked at
        construction)."""
        if self.vocabulary.vocab_size > self._id_capacity():
            raise ValueError(
                f"vocabulary {describe(self.vocabulary)} has {self.vocabulary.vocab_size} ids "
                f"but the model embeds only {self._id_capacity()} ({self.ID_CAPACITY_KNOB}): "
                "pass the vocabulary the model was built for"
            )

    @property
    def input_vocabulary(self) -> Any:
        return self.vocabulary

    @property
    def output_vocabulary(self) -> Any:
        return self.vocabulary

    @property
    def bos_id(self) -> int:
        return self.special_ids.bos_id

    @property
    def eos_id(self) -> int:
        return self.special_ids.eos_id


@functools.cache
def default_vocabulary() -> Any:
    """The shipped tiny SentencePiece vocabulary as `seqio.SentencePieceVocabulary`.

    seqio reads the file at first use (so task registration works before the file exists, as in
    `scripts/build_tiny_vocab.py`).
    """
    import seqio

    return seqio.SentencePieceVocabulary(TINY_SPM_PATH)


def sentencepiece_vocabulary(model_file: PathLike, extra_ids: int = 0) -> Any:
    """A SentencePiece model file as `seqio.SentencePieceVocabulary`.

    Raises:
      FileNotFoundError: `model_file` does not exist.
    """
    path = pathlib.Path(model_file)
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model not found: {path}")
    import seqio

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


class _HFTokenizerMethods:
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
        self.file = self._path
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
        if not isinstance(other, _HFTokenizerMethods):
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
        return self._pad_id if self._pad_id is not None else 0

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

    def _encode_tf(self, s):
        """tf.string[] -> tf.int32[L] (python tokenizer inside the graph via tf.py_function)."""
        import tensorflow as tf

        def encode(x):
            return np.asarray(self._encode(x.numpy().decode("utf-8")), np.int32)

        ids = tf.py_function(encode, [s], tf.int32)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids):
        """tf.int32[..., L] -> tf.string[...], one string per last-axis row."""
        import tensorflow as tf

        def decode(x):
            x = x.numpy()
            rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
            out = [self._decode(row.tolist()).encode("utf-8") for row in rows]
            return np.asarray(out, dtype=object).reshape(x.shape[:-1])

        out = tf.py_function(decode, [ids], tf.string)
        out.set_shape(ids.shape[:-1])
        return out


@functools.cache
def _hf_tokenizer_class() -> type:
    """`HFTokenizerVocabulary` = the methods above on `seqio.Vocabulary`, built at first use so
    that importing this module needs no seqio."""
    import seqio

    class HFTokenizerVocabulary(_HFTokenizerMethods, seqio.Vocabulary):
        __doc__ = _HFTokenizerMethods.__doc__

    HFTokenizerVocabulary.__qualname__ = "HFTokenizerVocabulary"  # Pickles by module attribute.
    return HFTokenizerVocabulary


def __getattr__(name: str) -> Any:
    # PEP 562: `vocabularies.HFTokenizerVocabulary` (and pickling it) work without importing
    # seqio at module import.
    if name == "HFTokenizerVocabulary":
        return _hf_tokenizer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

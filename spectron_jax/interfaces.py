"""The typed interfaces between the parts (docs/CONTRACTS.md): what each side may rely on.

These are `typing.Protocol`s: nothing subclasses them, anything with the right attributes fits
(a seqio vocabulary, an HF tokenizer, a test double). They import nothing heavy, so any module
may name them in its signatures without pulling in TensorFlow, seqio or Flax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

PyTree = Any


@runtime_checkable
class FrontEnd(Protocol):
    """Encoder features of a waveform (`SpectrogramConfig`, `W2vBertFbankConfig`).

    `features_numpy(float32[S]) -> float32[T, feature_dim]` and its tf.data twin
    `features_tf(tf.float32[S]) -> tf.float32[T, feature_dim]` agree numerically.
    """

    sample_rate: int

    @property
    def feature_dim(self) -> int: ...

    def features_numpy(self, waveform: np.ndarray) -> np.ndarray: ...

    def features_tf(self, waveform: Any) -> Any: ...


@runtime_checkable
class Vocoder(Protocol):
    """Log-mel frames to audio: float32[B, T, n_mels] -> float32[B, T * hop]."""

    def __call__(self, log_mel: Any) -> Any: ...


@runtime_checkable
class Vocabulary(Protocol):
    """Text <-> ids, with the special ids the model's data contract uses.

    seqio vocabularies fit (`SentencePieceVocabulary`, `vocabularies.HFTokenizerVocabulary`),
    as does the TensorFlow-free `vocabularies.SentencePieceText` used at inference.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int | None: ...

    def encode(self, s: str) -> Sequence[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class Model(Protocol):
    """The T5X `BaseModel` shape the trainer, decoding and evaluation code against.

    `vocabulary` and the special ids belong to the model, so that data, decoding and the
    checkpoint ask it instead of repeating them.
    """

    config: Any

    @property
    def vocabulary(self) -> Vocabulary: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def check_vocabulary_fits(self) -> None: ...

    def get_initial_variables(
        self, rng: Any, input_shapes: Mapping[str, tuple[int, ...]], input_types: Any = None
    ) -> PyTree: ...

    def loss_fn(
        self, params: PyTree, batch: Mapping[str, Any], dropout_rng: Any
    ) -> tuple[Any, Mapping[str, Any]]: ...

    def trainable_mask(self, params: PyTree) -> PyTree: ...


@runtime_checkable
class Evaluator(Protocol):
    """Side work on the current parameters during or after training (big_vision's shape).

    Attributes:
      name: TensorBoard prefix of its figures (e.g. "eval", "samples", "final").
      every: also run every `every` steps; 0 = only once the last step is done.
    """

    name: str
    every: int

    def run(self, context: Any) -> Mapping[str, float]:
        """Figures (name -> value) for the parameters in `context` (an `EvalContext`)."""
        ...


@dataclasses.dataclass
class EvalContext:
    """What an `Evaluator` gets from the training loop (one object, so the loop's signature
    does not grow with each kind of evaluation).

    Attributes:
      model: the model being trained.
      params: its current parameters (sharded over `mesh`).
      step: the optimizer steps taken.
      model_dir: the run's directory (evaluators write under it).
      writer: the run's `summaries.MetricsLogger` (TensorBoard), or None.
      trainer: the `trainer.Trainer` (its jitted eval step, state shardings).
      mesh: the device mesh.
      train_dataset_fn: the run's training `DatasetFn` (e.g. for baselines over training data).
      seed: the run's data / dropout seed.
    """

    model: Any
    params: PyTree
    step: int
    model_dir: str
    writer: Any = None
    trainer: Any = None
    mesh: Any = None
    train_dataset_fn: Any = None
    seed: int = 0

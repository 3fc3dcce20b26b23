"""Stage 1 of the recipe: the speech encoder pretrained for ASR (CTC), in a shape Spectron loads.

`CtcEncoderModel` has the T5X `BaseModel` methods the trainer uses (`get_initial_variables`,
`loss_fn`, `trainable_mask`, plus `score_batch` and a greedy `predict_batch_with_aux`) and owns
its data contract like `SpectronModel`: vocabulary, BOS / EOS (unused by CTC, kept for the
shared interface), `feature_converter()`. Its flax module `CtcEncoder` holds
`nn.conformer.ConformerEncoder` under the name `encoder`, so its encoder parameters are exactly
`Spectron`'s `params/encoder` subtree for the same `ConformerConfig`, and a Spectron run starts
from a stage-1 checkpoint (and keeps it frozen with `encoder_frozen=True`) with

    train(..., init_checkpoint=<stage-1 model dir>/checkpoints[/<step>],
          init_subtrees={"encoder": "params/encoder"})    # = SPECTRON_INIT_SUBTREES

Besides the encoder there is one linear CTC head, `ctc_head`, over the vocabulary plus a blank
(class `vocab_size`, the last one), trained with `optax.ctc_loss` on the encoder frames.

The batch (`CtcFeatureConverter`, from the Spectron speech tasks of docs/CONTRACTS.md section 1)
holds one utterance half per row: the prompt features with the prompt transcript, and, where the
encoder reads the target log-mel, the continuation frames with the continuation transcript:

    encoder_features  float32[B, T, F]   features of one half, zero-padded
    encoder_mask      int32[B, T]        valid frames
    ctc_labels        int32[B, L]        SentencePiece ids of that half's words, 0-padded
    ctc_label_mask    int32[B, L]        valid ids
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax

from spectron_jax import vocabularies
from spectron_jax.audio.spectrogram import SpectrogramConfig
from spectron_jax.config import FRONT_ENDS, W2V_BERT_FBANK_DIM, dtype_overrides
from spectron_jax.interfaces import Vocabulary
from spectron_jax.nn import stack
from spectron_jax.nn.conformer import ConformerConfig, ConformerEncoder
from spectron_jax.nn.layers import default_kernel_init
from spectron_jax.nn.spec_augment import SpecAugmentConfig, spec_augment

PyTree = Any
Batch = Mapping[str, jax.Array]

# What a Spectron run passes as `init_subtrees` to start from a stage-1 checkpoint.
SPECTRON_INIT_SUBTREES = {"encoder": "params/encoder"}

INPUT_TYPES = {
    "encoder_features": jnp.float32,
    "encoder_mask": jnp.int32,
    "ctc_labels": jnp.int32,
    "ctc_label_mask": jnp.int32,
}


@dataclasses.dataclass(frozen=True)
class CtcEncoderConfig:
    """The stage-1 ASR model: Spectron's encoder config, its input and the CTC head.

    Attributes:
      encoder: the Conformer (must equal the Spectron run's `SpectronConfig.encoder` to load).
      vocab_size: ids the head scores besides the blank (at least the vocabulary's size); the
        blank is class `vocab_size`, so the head has `vocab_size + 1` outputs.
      spectrogram: the target log-mel of the tasks (the encoder's input with "log_mel").
      encoder_front_end: "log_mel" (the target `spectrogram`; the continuation frames are then
        encoder input too) or "w2v_bert_fbank" (F = 160; prompts only).
      spec_augment: SpecAugment policy on the features (training only).
      dtype: compute dtype of the head.
      param_dtype: parameter dtype of the head.
    """

    encoder: ConformerConfig
    vocab_size: int
    spectrogram: SpectrogramConfig = SpectrogramConfig()
    encoder_front_end: str = "log_mel"
    spec_augment: SpecAugmentConfig = SpecAugmentConfig()
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        problems = []
        if self.vocab_size < 1:
            problems.append(f"vocab_size={self.vocab_size} must be >= 1")
        if self.encoder_front_end not in FRONT_ENDS:
            problems.append(f"encoder_front_end={self.encoder_front_end!r} not in {FRONT_ENDS}")
        elif self.encoder.input_dim != self.encoder_feature_dim:
            problems.append(
                f"encoder.input_dim={self.encoder.input_dim} but the {self.encoder_front_end} "
                f"front end gives {self.encoder_feature_dim} features"
            )
        if problems:
            raise ValueError("Invalid CtcEncoderConfig: " + "; ".join(problems))

    @property
    def blank_id(self) -> int:
        return self.vocab_size

    @property
    def num_classes(self) -> int:
        return self.vocab_size + 1

    @property
    def encoder_feature_dim(self) -> int:
        """F of `encoder_features`."""
        if self.encoder_front_end == "log_mel":
            return self.spectrogram.n_mels
        return W2V_BERT_FBANK_DIM

    # -- JSON round trip (written into checkpoints; no pickle) -----------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CtcEncoderConfig:
        d = dict(d)
        for name, sub in (
            ("encoder", ConformerConfig),
            ("spectrogram", SpectrogramConfig),
            ("spec_augment", SpecAugmentConfig),
        ):
            if isinstance(d.get(name), Mapping):
                d[name] = sub(**(stack.saved_layout(d[name]) if name == "encoder" else d[name]))
        return cls(**d)


@gin.configurable(module="spectron")
def ctc_encoder_config(
    encoder: ConformerConfig = gin.REQUIRED,
    vocab_size: int = gin.REQUIRED,
    spectrogram: SpectrogramConfig | None = None,
    spec_augment: SpecAugmentConfig | None = None,
    dtype: str | None = None,
    param_dtype: str | None = None,
    **knobs,
) -> CtcEncoderConfig:
    """Builds a `CtcEncoderConfig`; `dtype` / `param_dtype` apply to the encoder and the head
    alike (as `spectron.spectron_config` does), `knobs` are the remaining fields."""
    dtypes = dtype_overrides(dtype, param_dtype)
    if dtypes:
        encoder = dataclasses.replace(encoder, **dtypes)
    return CtcEncoderConfig(
        encoder=encoder,
        vocab_size=vocab_size,
        spectrogram=spectrogram or SpectrogramConfig(),
        spec_augment=spec_augment or SpecAugmentConfig(),
        **dtypes,
        **knobs,
    )


class CtcEncoder(nn.Module):
    """Conformer + linear CTC head; parameters `encoder/...` and `ctc_head/{kernel,bias}`."""

    config: CtcEncoderConfig

    def setup(self):
        c = self.config
        # The attribute name is the parameter scope: it must stay `encoder`, as in `Spectron`.
        self.encoder = ConformerEncoder(c.encoder)
        # The class axis is left unsharded: vocab_size + 1 rarely divides a tensor axis.
        self.ctc_head = nn.Dense(
            c.num_classes,
            dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
            kernel_init=nn.with_logical_partitioning(default_kernel_init(), ("embed", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        )

    def __call__(
        self, features: jax.Array, mask: jax.Array, *, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """float[B, T, F], int32[B, T] -> (logits float32[B, T', V + 1], mask int32[B, T']).

        Training (`deterministic=False`) applies SpecAugment and dropout (`dropout` rng).
        """
        c = self.config
        if not deterministic and c.spec_augment.enabled:
            features = spec_augment(self.make_rng("dropout"), features, mask, c.spec_augment)
        hidden, out_mask = self.encoder(features, mask, deterministic=deterministic)
        return self.ctc_head(hidden).astype(jnp.float32), out_mask


# ------------------------------------------------------------------------------------------------
# CTC: loss, greedy decoding, edit distance (jittable, fixed shapes).
# ------------------------------------------------------------------------------------------------


def ctc_feasible(num_frames: jax.Array, labels: jax.Array, label_mask: jax.Array) -> jax.Array:
    """bool[B]: the labels fit in the frames (CTC needs a blank between two equal labels).

    Args:
      num_frames: int[B] valid encoder frames.
      labels: int32[B, L]; label_mask: int[B, L] (a valid prefix per row).
    """
    valid = label_mask > 0
    repeats = jnp.sum((labels[:, 1:] == labels[:, :-1]) & valid[:, 1:] & valid[:, :-1], axis=-1)
    return jnp.sum(valid, axis=-1) + repeats <= num_frames


def ctc_loss(
    logits: jax.Array,
    logit_mask: jax.Array,
    labels: jax.Array,
    label_mask: jax.Array,
    blank_id: int,
) -> tuple[jax.Array, jax.Array]:
    """Per-example CTC negative log-likelihood and which examples count.

    Args:
      logits: float[B, T, C] (unnormalised); logit_mask: int[B, T] valid frames.
      labels: int32[B, L]; label_mask: int[B, L] valid labels.
      blank_id: the blank class.

    Returns:
      (nll float32[B], weight float32[B]): weight is 1 for rows with frames whose labels fit
      (`ctc_feasible`); an infeasible row's nll is huge but finite (optax's log epsilon), so
      weighting it by 0 keeps it out of the loss and the gradient.
    """
    frame_valid = (logit_mask > 0).astype(jnp.float32)
    label_valid = (label_mask > 0).astype(jnp.float32)
    nll = optax.ctc_loss(
        logits.astype(jnp.float32), 1.0 - frame_valid, labels, 1.0 - label_valid, blank_id=blank_id
    )
    num_frames = jnp.sum(frame_valid, axis=-1)
    ok = (num_frames > 0) & ctc_feasible(num_frames, labels, label_mask)
    return nll, ok.astype(jnp.float32)


def greedy_ctc_decode(
    logits: jax.Array, mask: jax.Array, blank_id: int
) -> tuple[jax.Array, jax.Array]:
    """Best path per frame, repeats collapsed, blanks removed, left-aligned.

    Args:
      logits: float[B, T, C]; mask: int[B, T] valid frames (a valid prefix per row).
      blank_id: the blank class.

    Returns:
      (ids int32[B, T] with 0 after each row's end, lengths int32[B]).
    """
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, T]
    # A frame starts a new label where it differs from the frame before (blank before frame 0):
    # "a a _ a" -> "a a".
    previous = jnp.pad(best[:, :-1], ((0, 0), (1, 0)), constant_values=blank_id)
    keep = (mask > 0) & (best != blank_id) & (best != previous)
    batch, frames = best.shape
    slot = jnp.where(keep, jnp.cumsum(keep, axis=-1) - 1, frames)  # out of range: dropped
    rows = jnp.arange(batch)[:, None]
    ids = jnp.zeros_like(best).at[rows, slot].set(best, mode="drop")
    return ids, jnp.sum(keep, axis=-1).astype(jnp.int32)


def edit_distance(
    hyp: jax.Array, hyp_lengths: jax.Array, ref: jax.Array, ref_lengths: jax.Array
) -> jax.Array:
    """Levenshtein distance per row between id sequences: int32[B].

    One DP row per hypothesis token (a `lax.scan`); within a row, the chain of deletions is a
    running minimum (`d[j] = min_k (base[k] + j - k)`), so each row is vectorised.

    Args:
      hyp: int[B, H], hyp_lengths: int[B]; ref: int[B, R], ref_lengths: int[B].
    """
    batch, n_ref = ref.shape
    cols = jnp.arange(n_ref + 1, dtype=jnp.int32)
    first = jnp.broadcast_to(cols, (batch, n_ref + 1))

    def row(prev, xs):
        token, active = xs  # int[B], bool[B]
        substitute = prev[:, :-1] + (ref != token[:, None]).astype(jnp.int32)
        insert = prev[:, 1:] + 1
        base = jnp.concatenate([prev[:, :1] + 1, jnp.minimum(substitute, insert)], axis=1)
        new = jax.lax.cummin(base - cols, axis=1) + cols
        return jnp.where(active[:, None], new, prev), None

    active = jnp.arange(hyp.shape[1])[:, None] < hyp_lengths[None, :]  # [H, B]
    last, _ = jax.lax.scan(row, first, (hyp.T.astype(jnp.int32), active))
    return jnp.take_along_axis(last, ref_lengths[:, None].astype(jnp.int32), axis=1)[:, 0]


def ctc_metrics(
    logits: jax.Array,
    logit_mask: jax.Array,
    labels: jax.Array,
    label_mask: jax.Array,
    blank_id: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The CTC loss (mean over counted examples) and greedy-decoding figures of one batch.

    Returns:
      (loss float32[], metrics): `ctc_loss` (= loss), `token_error_rate` (greedy ids against
      the labels: edits / label ids), `sequence_accuracy` (rows decoded exactly),
      `blank_fraction` (valid frames whose best class is the blank: near 1 early in training)
      and `feasible_fraction` (rows counted in the loss), float32 scalars.
    """
    nll, weight = ctc_loss(logits, logit_mask, labels, label_mask, blank_id)
    counted = jnp.maximum(jnp.sum(weight), 1.0)
    loss = jnp.sum(nll * weight) / counted
    hyp, hyp_len = greedy_ctc_decode(logits, logit_mask, blank_id)
    ref_len = jnp.sum(label_mask > 0, axis=-1).astype(jnp.int32)
    dist = edit_distance(hyp, hyp_len, labels, ref_len).astype(jnp.float32)
    frame_valid = logit_mask > 0
    is_blank = (jnp.argmax(logits, axis=-1) == blank_id) & frame_valid
    metrics = {
        "ctc_loss": loss,
        "token_error_rate": jnp.sum(dist) / jnp.maximum(jnp.sum(ref_len), 1).astype(jnp.float32),
        "sequence_accuracy": jnp.mean((dist == 0).astype(jnp.float32)),
        "blank_fraction": jnp.sum(is_blank) / jnp.maximum(jnp.sum(frame_valid), 1),
        "feasible_fraction": jnp.mean(weight),
    }
    return loss, {k: v.astype(jnp.float32) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------
# The feature converter: Spectron speech-task examples -> one utterance half per row.
# ------------------------------------------------------------------------------------------------

# (features, pre-trim length, transcript) of each half of a task example (CONTRACTS.md §1).
_PROMPT_HALF = ("prompt_features", "prompt_length", "prompt_transcript")
_CONTINUATION_HALF = ("continuation_frames", "continuation_length", "continuation_transcript")


@functools.cache
def feature_converter_class() -> type:
    """`CtcFeatureConverter` (built on first use: seqio needs TensorFlow)."""
    import seqio
    import tensorflow as tf

    from spectron_jax.feature_converter import pad_or_trim as pad_to

    spec = seqio.FeatureConverter.FeatureSpec

    class CtcFeatureConverter(seqio.FeatureConverter):
        """Task features (CONTRACTS.md §1) -> CTC rows (module docstring), padded, never packed.

        Each example gives its prompt half and, with `use_continuation`, its continuation half
        (the continuation frames are the target log-mel, so only an encoder that reads the
        target log-mel can take them). T = the longer of the two feature lengths, L = the
        longer of the two transcript lengths. A half is dropped when it has no frames or no
        ids, or when its features were longer than the task length (seqio trims them before
        conversion, which would cut words off the audio that stay in the transcript; the
        task's `*_length` feature is the length before trimming). Transcripts trimmed by seqio
        cannot be told apart: give their lengths room.
        """

        TASK_FEATURES = {
            "prompt_features": spec(dtype=tf.float32, rank=2),
            "prompt_transcript": spec(dtype=tf.int32),
            "continuation_transcript": spec(dtype=tf.int32),
            "continuation_frames": spec(dtype=tf.float32, rank=2),
        }
        MODEL_FEATURES = {
            "encoder_features": spec(dtype=tf.float32, rank=2),
            "encoder_mask": spec(dtype=tf.int32),
            "ctc_labels": spec(dtype=tf.int32),
            "ctc_label_mask": spec(dtype=tf.int32),
        }
        PACKING_FEATURE_DTYPES = {}

        def __init__(self, *, use_continuation: bool = True, pack: bool = False, **kwargs):
            if pack:
                raise ValueError("CtcFeatureConverter does not pack")
            self._use_continuation = use_continuation
            super().__init__(pack=False, **kwargs)

        @property
        def use_continuation(self) -> bool:
            return self._use_continuation

        def _halves(self) -> tuple[tuple[str, str, str], ...]:
            return (_PROMPT_HALF, _CONTINUATION_HALF) if self._use_continuation else (_PROMPT_HALF,)

        def _half(self, ex, names, task_lengths, lengths):
            features_key, length_key, labels_key = names
            t, n_labels = lengths["encoder_features"], lengths["ctc_labels"]
            features, labels = ex[features_key], ex[labels_key]
            n = tf.shape(features)[0]
            untrimmed = tf.cast(ex.get(length_key, n), tf.int32)
            keep = (n > 0) & (tf.size(labels) > 0) & (untrimmed <= task_lengths[features_key])
            return {
                "encoder_features": pad_to(features, t),
                "encoder_mask": tf.cast(tf.range(t) < n, tf.int32),
                "ctc_labels": pad_to(labels, n_labels),
                "ctc_label_mask": tf.cast(tf.range(n_labels) < tf.size(labels), tf.int32),
            }, keep

        def _convert_features(self, ds, task_feature_lengths):
            lengths = self.get_model_feature_lengths(task_feature_lengths)

            def halves(ex):
                rows = [self._half(ex, h, task_feature_lengths, lengths) for h in self._halves()]
                out = tf.data.Dataset.from_tensors(rows[0])
                for row in rows[1:]:
                    out = out.concatenate(tf.data.Dataset.from_tensors(row))
                return out

            return ds.flat_map(halves).filter(lambda row, keep: keep).map(lambda row, _: row)

        def get_model_feature_lengths(self, task_feature_lengths):
            t = max(task_feature_lengths[h[0]] for h in self._halves())
            n_labels = max(task_feature_lengths[h[2]] for h in self._halves())
            return {
                "encoder_features": t,
                "encoder_mask": t,
                "ctc_labels": n_labels,
                "ctc_label_mask": n_labels,
            }

    return CtcFeatureConverter


# ------------------------------------------------------------------------------------------------
# The model.
# ------------------------------------------------------------------------------------------------


class CtcEncoderModel(vocabularies.TextContract):
    """The stage-1 ASR encoder with the T5X `BaseModel` methods.

    Attributes:
      config: `CtcEncoderConfig` (written into every checkpoint's `config/`).
      module: the `CtcEncoder` flax module.
      vocabulary: the text vocabulary of the transcripts (the Spectron run's).
      special_ids: BOS / EOS / PAD, from the vocabulary unless given (CTC uses none of them;
        they are part of the interface every model shares).
    """

    def __init__(
        self,
        config: CtcEncoderConfig,
        vocabulary: Vocabulary | None = None,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ):
        """Args:

        config: the model config.
        vocabulary: default the shipped tiny SentencePiece model.
        bos_id, eos_id: override the vocabulary's.
        """
        self.config = config
        self.module = CtcEncoder(config)
        self._set_vocabulary(vocabulary, bos_id, eos_id)

    # -- the data contract (vocabulary, special ids: `TextContract`) ------------------------

    ID_CAPACITY_KNOB = "ctc_encoder_config.vocab_size"

    def _id_capacity(self) -> int:
        return self.config.vocab_size

    @property
    def blank_id(self) -> int:
        return self.config.blank_id

    @property
    def FEATURE_CONVERTER_CLS(self) -> type:  # noqa: N802 - T5X's name for it.
        return feature_converter_class()

    def feature_converter(self, **kwargs) -> Any:
        """`CtcFeatureConverter`; continuation halves only where the encoder reads log-mel."""
        kwargs.setdefault("use_continuation", self.config.encoder_front_end == "log_mel")
        return self.FEATURE_CONVERTER_CLS(**kwargs)

    # -- init, loss, decoding ----------------------------------------------------------------

    def get_initial_variables(
        self,
        rng: jax.Array,
        input_shapes: Mapping[str, tuple[int, ...]],
        input_types: Mapping[str, Any] | None = None,
    ) -> PyTree:
        """{"params": {"encoder": ..., "ctc_head": ...}} with `nn.LogicallyPartitioned` leaves.

        Args:
          rng: PRNG key.
          input_shapes: needs `encoder_features` (B, T, F) and `encoder_mask` (B, T).
          input_types: unused (features are float32, masks int32).
        """
        del input_types
        missing = sorted({"encoder_features", "encoder_mask"} - set(input_shapes))
        if missing:
            raise ValueError(f"input_shapes lacks batch keys {missing}")
        features = jnp.zeros(input_shapes["encoder_features"], jnp.float32)
        mask = jnp.zeros(input_shapes["encoder_mask"], jnp.int32)
        params_rng, dropout_rng = jax.random.split(rng)
        return self.module.init(
            {"params": params_rng, "dropout": dropout_rng}, features, mask, deterministic=True
        )

    def _logits(self, params: PyTree, batch: Batch, dropout_rng: jax.Array | None):
        deterministic = dropout_rng is None
        return self.module.apply(
            {"params": params},
            batch["encoder_features"],
            batch["encoder_mask"],
            deterministic=deterministic,
            rngs=None if deterministic else {"dropout": dropout_rng},
        )

    def loss_fn(
        self, params: PyTree, batch: Batch, dropout_rng: jax.Array | None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """CTC loss, the mean over examples of each one's negative log-likelihood.

        Args:
          params: the parameter tree.
          batch: the CTC batch (module docstring).
          dropout_rng: PRNG key for SpecAugment and dropout; None evaluates deterministically.

        Returns:
          (loss float32[], metrics): see `ctc_metrics`.
        """
        logits, mask = self._logits(params, batch, dropout_rng)
        return ctc_metrics(
            logits, mask, batch["ctc_labels"], batch["ctc_label_mask"], self.blank_id
        )

    def score_batch(self, params: PyTree, batch: Batch) -> jax.Array:
        """Log-likelihood of each row's labels under CTC: float32[B]."""
        logits, mask = self._logits(params, batch, None)
        nll, _ = ctc_loss(logits, mask, batch["ctc_labels"], batch["ctc_label_mask"], self.blank_id)
        return -nll

    def predict_batch_with_aux(
        self, params: PyTree, batch: Batch, rng: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Greedy CTC transcripts of `encoder_features` / `encoder_mask`.

        Returns:
          (int32[B, T'] ids, left-aligned and 0 after the end, {"lengths": int32[B]}).
        """
        del rng
        logits, mask = self._logits(params, batch, None)
        ids, lengths = greedy_ctc_decode(logits, mask, self.blank_id)
        return ids, {"lengths": lengths}

    def trainable_mask(self, params: PyTree) -> PyTree:
        """Everything is trained."""
        return jax.tree.map(lambda _: True, params)


@gin.configurable(module="spectron")
def ctc_encoder_model(
    config: CtcEncoderConfig = gin.REQUIRED,
    vocabulary: Vocabulary | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> CtcEncoderModel:
    """Gin entry point: `model/gin.singleton.constructor = @spectron.ctc_encoder_model` with
    `config = @spectron.ctc_encoder_config()` (gin/recipe/stage1_encoder_ctc.gin)."""
    return CtcEncoderModel(config, vocabulary, bos_id=bos_id, eos_id=eos_id)

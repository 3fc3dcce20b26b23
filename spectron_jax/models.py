"""`SpectronModel`: the T5X `BaseModel` shape around the `Spectron` network.

`get_initial_variables`, `loss_fn`, `score_batch` and `predict_batch_with_aux`
(docs/CONTRACTS.md section 3), plus `trainable_mask`, which the trainer uses to keep a frozen
encoder out of the optimizer (`optax.multi_transform` with `set_to_zero`: no update, no state).

The model owns its contract with the data, as T5X models do (`FEATURE_CONVERTER_CLS`,
`input_vocabulary` / `output_vocabulary`): its vocabulary, the special ids taken from it, and a
feature converter built with those ids and the model's `reduction_factor`. The data pipeline,
decoding, inference, evaluation and the checkpoint ask the model; nothing repeats them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp

from spectron_jax import decoding, losses, vocabularies
from spectron_jax.config import SpectronConfig, example_input_shapes
from spectron_jax.interfaces import Vocabulary
from spectron_jax.network import Spectron

PyTree = Any
Batch = Mapping[str, jax.Array]

# Keys the network reads, with their dtypes (CONTRACTS.md section 2).
INPUT_TYPES = {
    "encoder_features": jnp.float32,
    "encoder_mask": jnp.int32,
    "decoder_input_tokens": jnp.int32,
    "decoder_target_tokens": jnp.int32,
    "decoder_loss_weights": jnp.float32,
    "text_part": jnp.int32,
    "target_frames": jnp.float32,
    "frame_mask": jnp.int32,
}

# Pre-net dropout stays on outside training (Tacotron 2 practice); without a caller rng, evaluation
# and scoring draw it from this fixed key, so they are reproducible.
_EVAL_DROPOUT_SEED = 0
_SAMPLE_STREAM = 1  # fold_in(dropout key, this) = the frame head's noise key.


class SpectronModel(vocabularies.TextContract):
    """Spectron with the T5X `BaseModel` methods.

    Attributes:
      config: the model config.
      module: the `Spectron` flax module.
      vocabulary: the text vocabulary (input and output: one decoder writes all the text).
      special_ids: BOS / EOS / PAD of the data contract, from the vocabulary unless given.
    """

    def __init__(
        self,
        config: SpectronConfig,
        vocabulary: Vocabulary | None = None,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ):
        """Args:

        config: the model config.
        vocabulary: its vocabulary; default the shipped tiny SentencePiece model.
        bos_id, eos_id: override the vocabulary's (for tokenizers that define none).

        Raises:
          ValueError: the vocabulary defines no BOS/EOS and none is given.
        """
        self.config = config
        self.module = Spectron(config)
        self._set_vocabulary(vocabulary, bos_id, eos_id)

    # -- the data contract (vocabulary, special ids: `TextContract`) ------------------------

    def _id_capacity(self) -> int:
        return self.config.decoder.vocab_size

    @property
    def reduction_factor(self) -> int:
        return self.config.reduction_factor

    @property
    def FEATURE_CONVERTER_CLS(self) -> type:  # noqa: N802 - T5X's name for it.
        """The seqio feature converter class (imported here: it needs TensorFlow)."""
        from spectron_jax.feature_converter import SpectronFeatureConverter

        return SpectronFeatureConverter

    def feature_converter(self, **kwargs) -> Any:
        """`SpectronFeatureConverter` with this model's BOS / EOS ids and reduction factor."""
        return self.FEATURE_CONVERTER_CLS(
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            reduction_factor=self.reduction_factor,
            **kwargs,
        )

    # -- init --------------------------------------------------------------------------------

    def get_initial_variables(
        self,
        rng: jax.Array,
        input_shapes: Mapping[str, tuple[int, ...]],
        input_types: Mapping[str, Any] | None = None,
    ) -> PyTree:
        """Initial variables (parameters boxed with their logical axis names).

        Args:
          rng: PRNG key.
          input_shapes: shape per batch key (at least the keys of `INPUT_TYPES`).
          input_types: dtype per key; defaults to `INPUT_TYPES`.

        Returns:
          {"params": ...} with `nn.LogicallyPartitioned` leaves (`nn.unbox` gives arrays).
        """
        missing = sorted(set(INPUT_TYPES) - set(input_shapes))
        if missing:
            raise ValueError(f"input_shapes lacks batch keys {missing}")
        types = dict(INPUT_TYPES)
        types.update(input_types or {})
        batch = {k: jnp.zeros(input_shapes[k], types[k]) for k in INPUT_TYPES}
        params_rng, dropout_rng = jax.random.split(rng)
        sample_rng = jax.random.fold_in(dropout_rng, _SAMPLE_STREAM)
        return self.module.init(
            {"params": params_rng, "dropout": dropout_rng, "sample": sample_rng},
            batch,
            deterministic=True,
        )

    # -- training ----------------------------------------------------------------------------

    def _apply(self, params: PyTree, batch: Batch, dropout_rng: jax.Array | None):
        deterministic = dropout_rng is None
        if dropout_rng is None:
            dropout_rng = jax.random.PRNGKey(_EVAL_DROPOUT_SEED)
        # A stochastic frame head's noise: its own stream, derived from the dropout key.
        sample_rng = jax.random.fold_in(dropout_rng, _SAMPLE_STREAM)
        return self.module.apply(
            {"params": params},
            dict(batch),
            deterministic=deterministic,
            rngs={"dropout": dropout_rng, "sample": sample_rng},
        )

    def loss_fn(
        self, params: PyTree, batch: Batch, dropout_rng: jax.Array | None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Weighted Spectron loss of one batch.

        Args:
          params: the parameter tree (boxed or not).
          batch: a model batch (CONTRACTS.md section 2).
          dropout_rng: PRNG key for dropout and SpecAugment; None evaluates deterministically.

        Returns:
          (loss float32[], metrics): float32 scalar means over the batch, see
          `losses.spectron_loss` (`loss`, `ce`, `spec`, `freq_delta`, `time_delta`, accuracies,
          counts).
        """
        logits, frames, aux = self._apply(params, batch, dropout_rng)
        return losses.spectron_loss(
            logits=logits,
            target_tokens=batch["decoder_target_tokens"],
            loss_weights=batch["decoder_loss_weights"],
            text_part=batch["text_part"],
            pred_frames=frames,
            target_frames=batch["target_frames"],
            frame_mask=batch["frame_mask"],
            config=self.config.loss,
            stop_logits=aux.get("stop_logits"),
            reduction_factor=self.config.reduction_factor,
            frame_head=self.config.frame_head,
            head_outputs=aux.get("frame_head"),
        )

    def score_batch(self, params: PyTree, batch: Batch) -> jax.Array:
        """Log-likelihood of each example's transcript: float32[B], summed over valid targets."""
        logits, _, _ = self._apply(params, batch, None)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target = jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
        return jnp.sum(target * batch["decoder_loss_weights"].astype(jnp.float32), axis=-1)

    def predict_batch_with_aux(
        self, params: PyTree, batch: Batch, rng: jax.Array | None = None, **decode_options
    ) -> tuple[Any, dict[str, Any]]:
        """Text then speech generation with a KV cache (`spectron_jax.decoding`).

        `decode_options` are `decoding.DecodeConfig` fields (max_text_tokens, max_frames,
        temperature, top_k, top_p, text_mode, ...); BOS / EOS are the model's. Returns
        ({text_tokens int32[B, L], frames float32[B, T, n_mels]}, {text_lengths, frame_lengths}).
        """
        options = {"bos_id": self.bos_id, "eos_id": self.eos_id, **decode_options}
        return decoding.predict_batch_with_aux(self, params, batch, rng, **options)

    # -- optimizer partition -----------------------------------------------------------------

    def trainable_mask(self, params: PyTree) -> PyTree:
        """bool tree like `params`: False under `encoder` when the encoder is frozen."""
        frozen = self.config.encoder_frozen

        def trainable(path, _):
            top = getattr(path[0], "key", None) if path else None
            return not (frozen and top == "encoder")

        return jax.tree_util.tree_map_with_path(trainable, params)


@gin.configurable(module="spectron")
def spectron_model(
    config: SpectronConfig = gin.REQUIRED,
    vocabulary: Vocabulary | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> SpectronModel:
    """Gin entry point: `MODEL = @spectron.spectron_model()` with `config = %MODEL_CONFIG` and
    `vocabulary = @spectron.vocabulary()` (default: the shipped tiny SentencePiece model)."""
    return SpectronModel(config, vocabulary, bos_id=bos_id, eos_id=eos_id)


# ------------------------------------------------------------------------------------------------
# Parameter counts (abstract: nothing is allocated).
# ------------------------------------------------------------------------------------------------


def param_counts(config: SpectronConfig) -> dict[str, int]:
    """Parameters per top-level component (`encoder`, `connector`, `decoder`, ...) and `total`."""
    model = SpectronModel(config)
    shapes = example_input_shapes(config)
    variables = jax.eval_shape(
        lambda rng: model.get_initial_variables(rng, shapes), jax.random.PRNGKey(0)
    )
    counts = {
        name: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(sub))
        for name, sub in variables["params"].items()
    }
    counts["total"] = sum(counts.values())
    return counts

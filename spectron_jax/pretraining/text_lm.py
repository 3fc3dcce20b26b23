"""Stage 2 of the recipe: the decoder LM trained on text alone, in a shape Spectron loads.

`TextLmModel` has the T5X `BaseModel` methods the trainer uses (`get_initial_variables`,
`loss_fn`, `trainable_mask`, plus `score_batch` and a greedy `predict_batch_with_aux`) and owns
its data contract like `SpectronModel`: vocabulary, BOS / EOS, `feature_converter()`. Its flax
module `TextLm` holds `nn.decoder.Decoder` under the name `decoder`, so its parameters are
exactly `Spectron`'s `params/decoder` subtree for the same `DecoderConfig`, and a Spectron run
starts from a stage-2 checkpoint with

    train(..., init_checkpoint=<stage-2 MODEL_DIR/checkpoints, or one step dir in it>,
          init_subtrees={"decoder": "params/decoder"})    # = SPECTRON_INIT_SUBTREES

The batch is the text part of Spectron's (docs/CONTRACTS.md section 2) without a prefix or
frames:

    decoder_input_tokens   [BOS] t_1 .. t_n  pad ..
    decoder_target_tokens  t_1 .. t_n [EOS]  pad ..
    decoder_loss_weights   1   .. 1    1     0 ..

RoPE positions are `cumsum(valid) - 1` from 0 here and from the prefix length in Spectron; RoPE
scores depend on position differences only, so the text is seen the same way in both.

`NextNumberEvaluator` greedily continues held-out text prompts (examples and matcher from the
task, e.g. `spectron_tasks.number_text`) and reports the accuracy of the next number.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from spectron_jax import losses, vocabularies
from spectron_jax.interfaces import Vocabulary
from spectron_jax.nn import stack
from spectron_jax.nn.attention import causal_mask, positions_from_valid
from spectron_jax.nn.decoder import Decoder, DecoderConfig

PyTree = Any
Batch = Mapping[str, jax.Array]
logger = logging.getLogger(__name__)

# What a Spectron run passes as `init_subtrees` to start from a stage-2 checkpoint.
SPECTRON_INIT_SUBTREES = {"decoder": "params/decoder"}

INPUT_TYPES = {
    "decoder_input_tokens": jnp.int32,
    "decoder_target_tokens": jnp.int32,
    "decoder_loss_weights": jnp.float32,
}
_EVAL_DROPOUT_SEED = 0


@dataclasses.dataclass(frozen=True)
class TextLmConfig:
    """The text LM: Spectron's decoder config, and the loss knob it uses.

    Attributes:
      decoder: the LM (must equal the Spectron run's `SpectronConfig.decoder` to be loaded).
      z_loss: weight of log(Z)^2 (as `LossConfig.z_loss`).
    """

    decoder: DecoderConfig
    z_loss: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TextLmConfig:
        d = dict(d)
        if isinstance(d.get("decoder"), Mapping):
            d["decoder"] = DecoderConfig(**stack.saved_layout(d["decoder"]))
        return cls(**d)


class TextLm(nn.Module):
    """A causal LM over tokens; parameters `decoder/...` (the `Decoder`'s, nothing else)."""

    config: DecoderConfig

    def setup(self):
        # The attribute name is the parameter scope: it must stay `decoder`, as in `Spectron`.
        self.decoder = Decoder(self.config)

    def __call__(
        self, tokens: jax.Array, valid: jax.Array, *, deterministic: bool = True
    ) -> jax.Array:
        """int32[B, T] tokens, bool/int[B, T] valid slots -> float32[B, T, V] logits."""
        x = self.decoder.embed(tokens)
        hidden = self.decoder(
            x, positions_from_valid(valid), causal_mask(valid), deterministic=deterministic
        )
        return self.decoder.logits(hidden)


@functools.cache
def feature_converter_class() -> type:
    """`TextLmFeatureConverter` (built on first use: seqio needs TensorFlow)."""
    import seqio
    import tensorflow as tf

    spec = seqio.FeatureConverter.FeatureSpec

    class TextLmFeatureConverter(seqio.FeatureConverter):
        """Task feature `targets` int32[n] (no EOS) -> the text LM batch (module docstring),
        padded to `targets` length + 1, never packed."""

        TASK_FEATURES = {"targets": spec(dtype=tf.int32)}
        MODEL_FEATURES = {
            "decoder_input_tokens": spec(dtype=tf.int32),
            "decoder_target_tokens": spec(dtype=tf.int32),
            "decoder_loss_weights": spec(dtype=tf.float32),
        }
        PACKING_FEATURE_DTYPES = {}

        def __init__(self, *, bos_id: int, eos_id: int, pack: bool = False, **kwargs):
            if pack:
                raise ValueError("TextLmFeatureConverter does not pack")
            self._eos_id = eos_id
            super().__init__(pack=False, bos_id=bos_id, **kwargs)

        @property
        def eos_id(self) -> int:
            return self._eos_id

        def _convert_example(self, ex, length: int):
            t = ex["targets"]
            inputs = tf.concat([[self.bos_id], t], axis=0)[:length]
            targets = tf.concat([t, [self._eos_id]], axis=0)[:length]
            n = tf.size(targets)
            pad = [[0, length - n]]
            return {
                "decoder_input_tokens": tf.ensure_shape(tf.pad(inputs, pad), [length]),
                "decoder_target_tokens": tf.ensure_shape(tf.pad(targets, pad), [length]),
                "decoder_loss_weights": tf.cast(tf.range(length) < n, tf.float32),
            }

        def _convert_features(self, ds, task_feature_lengths):
            length = self.get_model_feature_lengths(task_feature_lengths)["decoder_input_tokens"]
            return ds.map(
                lambda ex: self._convert_example(ex, length), num_parallel_calls=tf.data.AUTOTUNE
            )

        def get_model_feature_lengths(self, task_feature_lengths):
            length = task_feature_lengths["targets"] + 1
            return {k: length for k in self.MODEL_FEATURES}

    return TextLmFeatureConverter


class TextLmModel(vocabularies.TextContract):
    """The stage-2 text LM with the T5X `BaseModel` methods.

    Attributes:
      config: `TextLmConfig` (written into every checkpoint's `config/`).
      module: the `TextLm` flax module.
      vocabulary: the text vocabulary (the Spectron run's).
      special_ids: BOS / EOS / PAD, from the vocabulary unless given.
    """

    def __init__(
        self,
        config: TextLmConfig | DecoderConfig,
        vocabulary: Vocabulary | None = None,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ):
        """Args:

        config: the model config (a bare `DecoderConfig` means no z-loss).
        vocabulary: default the shipped tiny SentencePiece model.
        bos_id, eos_id: override the vocabulary's.
        """
        if isinstance(config, DecoderConfig):
            config = TextLmConfig(decoder=config)
        self.config = config
        self.module = TextLm(config.decoder)
        self._set_vocabulary(vocabulary, bos_id, eos_id)

    # -- the data contract (vocabulary, special ids: `TextContract`) ------------------------

    def _id_capacity(self) -> int:
        return self.config.decoder.vocab_size

    @property
    def FEATURE_CONVERTER_CLS(self) -> type:  # noqa: N802 - T5X's name for it.
        return feature_converter_class()

    def feature_converter(self, **kwargs) -> Any:
        """`TextLmFeatureConverter` with this model's BOS / EOS."""
        return self.FEATURE_CONVERTER_CLS(bos_id=self.bos_id, eos_id=self.eos_id, **kwargs)

    # -- init and loss -----------------------------------------------------------------------

    def get_initial_variables(
        self,
        rng: jax.Array,
        input_shapes: Mapping[str, tuple[int, ...]],
        input_types: Mapping[str, Any] | None = None,
    ) -> PyTree:
        """{"params": {"decoder": ...}} with `nn.LogicallyPartitioned` leaves.

        Args:
          rng: PRNG key.
          input_shapes: needs `decoder_input_tokens` (B, L).
          input_types: unused (tokens are int32).
        """
        del input_types
        if "decoder_input_tokens" not in input_shapes:
            raise ValueError("input_shapes lacks decoder_input_tokens")
        tokens = jnp.zeros(input_shapes["decoder_input_tokens"], jnp.int32)
        params_rng, dropout_rng = jax.random.split(rng)
        return self.module.init(
            {"params": params_rng, "dropout": dropout_rng}, tokens, tokens >= 0, deterministic=True
        )

    def _logits(self, params: PyTree, batch: Batch, dropout_rng: jax.Array | None) -> jax.Array:
        # An input slot is valid where its target is (BOS and t_1..t_n against t_1..t_n, EOS).
        valid = batch["decoder_loss_weights"] > 0
        deterministic = dropout_rng is None
        if dropout_rng is None:
            dropout_rng = jax.random.PRNGKey(_EVAL_DROPOUT_SEED)
        return self.module.apply(
            {"params": params},
            batch["decoder_input_tokens"],
            valid,
            deterministic=deterministic,
            rngs={"dropout": dropout_rng},
        )

    def loss_fn(
        self, params: PyTree, batch: Batch, dropout_rng: jax.Array | None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Next-token CE, the mean over valid targets (plus the z-loss where set).

        Args:
          params: the parameter tree.
          batch: `decoder_input_tokens`, `decoder_target_tokens` int32[B, L],
            `decoder_loss_weights` float32[B, L].
          dropout_rng: PRNG key for dropout; None evaluates deterministically.

        Returns:
          (loss float32[], metrics): `loss`, `ce`, `z_loss`, `accuracy` (argmax = target),
          `num_tokens`, float32 scalars.
        """
        logits = self._logits(params, batch, dropout_rng)
        weights = batch["decoder_loss_weights"].astype(jnp.float32)
        nll, z, correct = losses.cross_entropy(
            logits, batch["decoder_target_tokens"], weights, z_loss=self.config.z_loss
        )
        n = jnp.sum(weights)
        denom = jnp.maximum(n, 1.0)
        metrics = {
            "ce": jnp.sum(nll) / denom,
            "z_loss": jnp.sum(z) / denom,
            "accuracy": jnp.sum(correct) / denom,
            "num_tokens": n,
        }
        metrics["loss"] = metrics["ce"] + metrics["z_loss"]
        return metrics["loss"], metrics

    def score_batch(self, params: PyTree, batch: Batch) -> jax.Array:
        """Log-likelihood of each row's valid targets: float32[B]."""
        logp = jax.nn.log_softmax(self._logits(params, batch, None), axis=-1)
        target = jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
        return jnp.sum(target * batch["decoder_loss_weights"], axis=-1)

    def predict_batch_with_aux(
        self, params: PyTree, batch: Batch, rng: jax.Array | None = None, max_new_tokens: int = 16
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Greedy continuation of each row's valid inputs ([BOS] + prompt).

        Returns:
          (int32[B, max_new_tokens] generated ids, {"text_lengths": int32[B]} ids before the
          first EOS).
        """
        del rng
        lengths = jnp.sum(batch["decoder_loss_weights"] > 0, axis=-1).astype(jnp.int32)
        out = greedy_generate(
            self.config.decoder, params, batch["decoder_input_tokens"], lengths, max_new_tokens
        )
        is_eos = out == self.eos_id
        text_lengths = jnp.where(jnp.any(is_eos, -1), jnp.argmax(is_eos, -1), max_new_tokens)
        return out, {"text_lengths": text_lengths.astype(jnp.int32)}

    def trainable_mask(self, params: PyTree) -> PyTree:
        """Everything is trained."""
        return jax.tree.map(lambda _: True, params)


@gin.configurable(module="spectron")
def text_lm_model(
    decoder: DecoderConfig = gin.REQUIRED,
    z_loss: float = 0.0,
    vocabulary: Vocabulary | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> TextLmModel:
    """Gin entry point: `MODEL = @spectron.text_lm_model()` with `decoder =
    @spectron.decoder_config()` (the Spectron model file's decoder bindings)."""
    return TextLmModel(TextLmConfig(decoder, z_loss), vocabulary, bos_id=bos_id, eos_id=eos_id)


# ------------------------------------------------------------------------------------------------
# Greedy generation (uncached: the prompts here are a few tokens long).
# ------------------------------------------------------------------------------------------------


@functools.cache
def _greedy_fn(config: DecoderConfig, max_new_tokens: int) -> Callable:
    module = TextLm(config)

    def run(params, tokens, lengths):
        b, t = tokens.shape
        s = t + max_new_tokens
        rows = jnp.arange(b)
        buf = jnp.pad(tokens.astype(jnp.int32), ((0, 0), (0, max_new_tokens)))

        def step(_, carry):
            buf, n = carry
            # The whole buffer is recomputed each step; slots at or after n are masked out.
            logits = module.apply({"params": params}, buf, jnp.arange(s)[None] < n[:, None])
            nxt = jnp.argmax(logits[rows, n - 1], axis=-1).astype(jnp.int32)
            return buf.at[rows, n].set(nxt), n + 1

        buf, _ = jax.lax.fori_loop(0, max_new_tokens, step, (buf, lengths.astype(jnp.int32)))
        return jnp.take_along_axis(buf, lengths[:, None] + jnp.arange(max_new_tokens)[None], 1)

    return jax.jit(run)


def greedy_generate(
    config: DecoderConfig,
    params: PyTree,
    tokens: jax.Array,
    lengths: jax.Array,
    max_new_tokens: int,
) -> jax.Array:
    """Greedy continuation of left-aligned prompts (compiled per config, length and shapes).

    Args:
      config: the decoder config.
      params: {"decoder": ...} (a `TextLm`'s, or a Spectron's params: only `decoder` is read).
      tokens: int32[B, T], [BOS] + prompt ids in the first `lengths` slots, anything after.
      lengths: int32[B] >= 1 valid slots per row.
      max_new_tokens: N, ids generated per row (EOS is not special: cut at it afterwards).

    Returns:
      int32[B, N] the generated ids.
    """
    return _greedy_fn(config, max_new_tokens)(
        {"decoder": params["decoder"]}, jnp.asarray(tokens), jnp.asarray(lengths)
    )


def encode_prompts(model: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> ([BOS] + ids left-aligned int32[B, T], lengths int32[B]) with the model's ids."""
    rows = [[model.bos_id, *model.vocabulary.encode(t)] for t in texts]
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return tokens, np.asarray([len(r) for r in rows], np.int32)


def generate_text(
    model: Any, params: PyTree, texts: Sequence[str], max_new_tokens: int = 8, batch_size: int = 64
) -> list[str]:
    """Greedy continuations of `texts`, decoded up to the first EOS.

    Batches are padded to `batch_size` rows (one compile for every batch).
    """
    tokens, lengths = encode_prompts(model, texts)
    out = []
    for start in range(0, len(texts), batch_size):
        tok, n = tokens[start : start + batch_size], lengths[start : start + batch_size]
        pad = batch_size - len(n)
        tok = np.concatenate([tok, np.repeat(tok[:1], pad, 0)])
        n = np.concatenate([n, np.repeat(n[:1], pad)])
        gen = np.asarray(greedy_generate(model.config.decoder, params, tok, n, max_new_tokens))
        for row in gen[: len(gen) - pad]:
            row = row.tolist()
            ids = row[: row.index(model.eos_id)] if model.eos_id in row else row
            out.append(model.vocabulary.decode(ids))
    return out


# ------------------------------------------------------------------------------------------------
# The evaluator.
# ------------------------------------------------------------------------------------------------


def prefix_matches(output: str, answer: str) -> bool:
    """The default matcher: the output's first words are the answer's words."""
    want = answer.split()
    return bool(want) and output.split()[: len(want)] == want


@gin.configurable
class NextNumberEvaluator:
    """Greedy continuations of held-out text prompts, scored against their answers.

    Figures: `accuracy` over all examples and `accuracy_<group>` per group, next to
    `num_<group>`; process 0 writes every prompt, answer and output to
    `<model_dir>/<name>/step_<N>.json`.

    Attributes:
      examples: [{"prompt", "answer", "group" (optional)}], e.g.
        `spectron_tasks.number_text.heldout_prompts()`.
      matcher: (output, answer) -> bool; `number_text.next_number_matches` compares the first
        number, which reads compounds ("forty one") right; default `prefix_matches`.
      max_new_tokens: ids generated per prompt.
      batch_size: prompts per compiled batch.
      every: steps between evaluations; 0 = only at the end.
      name: TensorBoard prefix.
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, str]] = gin.REQUIRED,
        matcher: Callable[[str, str], bool] = prefix_matches,
        max_new_tokens: int = 8,
        batch_size: int = 64,
        every: int = 0,
        name: str = "next_number",
    ):
        if not examples:
            raise ValueError("NextNumberEvaluator needs examples")
        self.examples = [dict(e) for e in examples]
        self.matcher = matcher
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.every = every
        self.name = name

    def score(self, outputs: Sequence[str]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The figures and per-example records of outputs aligned with `examples`."""
        records = [
            {**e, "output": o, "correct": bool(self.matcher(o, e["answer"]))}
            for e, o in zip(self.examples, outputs, strict=True)
        ]
        figures = {"accuracy": float(np.mean([r["correct"] for r in records]))}
        for group in sorted({r.get("group", "all") for r in records}):
            hits = [r["correct"] for r in records if r.get("group", "all") == group]
            figures[f"accuracy_{group}"] = float(np.mean(hits))
            figures[f"num_{group}"] = float(len(hits))
        return figures, records

    def run(self, context: Any) -> dict[str, float]:
        """Decodes every prompt with `context.params`; see the class docstring."""
        outputs = generate_text(
            context.model,
            context.params,
            [e["prompt"] for e in self.examples],
            self.max_new_tokens,
            self.batch_size,
        )
        figures, records = self.score(outputs)
        logger.info(
            "%s at step %d: %s", self.name, context.step, json.dumps(figures, sort_keys=True)
        )
        if jax.process_index() == 0 and context.model_dir:
            directory = os.path.join(context.model_dir, self.name)
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f"step_{context.step}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"figures": figures, "examples": records}, f, indent=1)
        return figures

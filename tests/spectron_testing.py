"""Model-test helpers: a tiny `SpectronConfig` and random valid batches (CONTRACTS.md 2)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spectron_jax.audio.spectrogram import SpectrogramConfig
from spectron_jax.config import SpectronConfig
from spectron_jax.losses import LossConfig
from spectron_jax.models import SpectronModel
from spectron_jax.network import Spectron
from spectron_jax.nn.conformer import ConformerConfig
from spectron_jax.nn.decoder import DecoderConfig


class WordVocabulary:
    """A tokenizer-free vocabulary of made-up words "w<i>" for the tiny test models, whose
    decoders embed fewer ids than any real tokenizer has (the tiny SentencePiece model: 1000).

    Special ids as in the shipped tiny vocabulary: pad 0, eos 1, bos 3.
    """

    bos_id, eos_id, pad_id = 3, 1, 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, s: str) -> list[int]:
        return [int(w[1:]) for w in s.split()]

    def decode(self, ids) -> str:
        return " ".join(f"w{int(i)}" for i in ids)


def tiny_model(config: SpectronConfig) -> SpectronModel:
    """`SpectronModel(config)` with a `WordVocabulary` that fits its decoder's embedding."""
    return SpectronModel(config, WordVocabulary(config.decoder.vocab_size))


def tiny_config(**overrides) -> SpectronConfig:
    """A few-thousand-parameter Spectron with every feature on (GQA, relative-key encoder)."""
    n_mels = overrides.pop("n_mels", 8)
    kw = dict(
        decoder=DecoderConfig(
            vocab_size=32,
            num_layers=2,
            d_model=32,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            mlp_dim=64,
        ),
        encoder=ConformerConfig(
            input_dim=n_mels,
            stem="subsampling",
            subsampling_channels=4,
            hidden_dim=16,
            num_layers=1,
            num_heads=2,
            mlp_dim=32,
            conv_kernel_size=3,
        ),
        spectrogram=SpectrogramConfig(n_mels=n_mels),
        reduction_factor=2,
        prenet_hidden_dim=16,
        postnet_hidden_dim=16,
        loss=LossConfig(),
    )
    kw.update(overrides)
    return SpectronConfig(**kw)


def random_batch(
    config: SpectronConfig,
    *,
    batch_size: int = 3,
    prompt_frames: int = 16,
    text_length: int = 7,
    num_groups: int = 4,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A random batch in the fixed-slot layout, with padding in every region.

    Example 0 is full; the others have shorter prompts, transcripts and continuations (the last
    one's final frame group only partly valid), as the feature converter pads them.
    """
    rng = np.random.default_rng(seed)
    r = config.reduction_factor
    b, t_p, n_l, t_f = batch_size, prompt_frames, text_length, num_groups * r
    vocab = config.decoder.vocab_size
    p_len = [t_p] + [max(4, t_p - 5 * i) for i in range(1, b)]
    text_len = [n_l] + [max(2, n_l - 2 * i) for i in range(1, b)]
    frame_len = [t_f] + [max(1, t_f - 3 * i) for i in range(1, b)]
    enc_mask = np.zeros((b, t_p), np.int32)
    text_part = np.zeros((b, n_l), np.int32)
    frame_mask = np.zeros((b, t_f), np.int32)
    for i in range(b):
        enc_mask[i, : p_len[i]] = 1
        n_prompt = text_len[i] // 2
        text_part[i, :n_prompt] = 1
        text_part[i, n_prompt : text_len[i]] = 2
        frame_mask[i, : frame_len[i]] = 1
    targets = rng.integers(3, vocab, size=(b, n_l)).astype(np.int32) * (text_part > 0)
    inputs = np.concatenate([np.full((b, 1), 1, np.int32), targets[:, :-1]], axis=1)
    inputs = inputs * (text_part > 0)
    return {
        "encoder_features": (
            rng.normal(size=(b, t_p, config.encoder_feature_dim)) * enc_mask[..., None]
        ).astype(np.float32),
        "encoder_mask": enc_mask,
        "decoder_input_tokens": inputs.astype(np.int32),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (text_part > 0).astype(np.float32),
        "text_part": text_part,
        "target_frames": (rng.normal(size=(b, t_f, config.n_mels)) * frame_mask[..., None]).astype(
            np.float32
        ),
        "frame_mask": frame_mask,
    }


# Compiled once per config (and batch shapes): eager flax dispatch is far slower on 2 CPU cores.


def init_params(config: SpectronConfig, batch: dict[str, np.ndarray], seed: int = 0):
    """Random parameters with the model's exact tree and shapes, without compiling `init`.

    `get_initial_variables` runs abstractly (jax.eval_shape); numpy fills the leaves (matrices
    ~ N(0, 1/fan_in), vectors ~ 1 + N(0, 0.1^2)). Compiling the real initialisers (one PRNG
    program per parameter) costs more CPU than every test here together; the real init is
    checked abstractly in test_models.
    """
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    model = tiny_model(config)
    abstract = jax.eval_shape(
        lambda r: nn.unbox(model.get_initial_variables(r, shapes)["params"]),
        jax.random.PRNGKey(seed),
    )
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if len(leaf.shape) >= 2:
            fan_in = int(np.prod(leaf.shape[:-1]))
            x = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
        else:
            x = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(x, leaf.dtype)

    return jax.tree.map(fill, abstract)


@functools.cache
def jitted_apply(config: SpectronConfig, deterministic: bool = True):
    """jit(params, batch, rng) -> (logits, frames, aux) of `Spectron(config)`."""
    net = Spectron(config)

    def fn(params, batch, rng):
        rngs = {"dropout": rng, "sample": jax.random.fold_in(rng, 1)}
        return net.apply({"params": params}, batch, deterministic=deterministic, rngs=rngs)

    return jax.jit(fn)


def apply(config, params, batch, *, deterministic=True, seed=0):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return jitted_apply(config, deterministic)(params, batch, jax.random.PRNGKey(seed))


@functools.cache
def jitted_value_and_grad(config: SpectronConfig):
    """jit(params, batch, rng) -> ((loss, metrics), grads) of `SpectronModel(config).loss_fn`."""
    return jax.jit(jax.value_and_grad(tiny_model(config).loss_fn, has_aux=True))


def variant_config() -> SpectronConfig:
    """The tiny config with the optional parts on: stop head, connector stacking by 3."""
    return tiny_config(stop_head=True, connector_stack=3)


@functools.cache
def jitted_loss(config: SpectronConfig):
    """jit(params, batch, rng | None) -> (loss, metrics) of `SpectronModel(config).loss_fn`."""
    return jax.jit(tiny_model(config).loss_fn)

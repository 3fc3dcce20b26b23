"""A tiny model with the BaseModel interface of CONTRACTS.md section 3, and a deterministic
synthetic dataset, for trainer tests that must not depend on the real model."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

VOCAB, LENGTH, WIDTH, MLP = 32, 8, 16, 32


def _param(module, name, shape, axes, scale=0.3):
    init = nn.with_logical_partitioning(nn.initializers.normal(scale), axes)
    return module.param(name, init, shape)


class TinyNet(nn.Module):
    """Embedding -> "encoder" MLP -> "decoder" MLP -> vocab head, with logical axis names."""

    @nn.compact
    def __call__(self, tokens):
        emb = _param(self, "embedding", (VOCAB, WIDTH), ("vocab", "embed"))
        x = emb[tokens]  # [B, L] -> [B, L, D]
        enc = self.encoder_weights()
        x = x + jnp.tanh(x @ enc["wi"]) @ enc["wo"]
        wi = _param(self, "dec_wi", (WIDTH, MLP), ("embed", "mlp"))
        wo = _param(self, "dec_wo", (MLP, WIDTH), ("mlp", "embed"))
        scale = self.param(
            "norm_scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (WIDTH,)
        )
        x = (x + jnp.tanh(x @ wi) @ wo) * scale
        head = _param(self, "head", (WIDTH, VOCAB), ("embed", "vocab"))
        return x @ head  # [B, L, V]

    def encoder_weights(self):
        with_axes = nn.with_logical_partitioning
        return {
            "wi": self.param(
                "enc_wi", with_axes(nn.initializers.normal(0.3), ("embed", "mlp")), (WIDTH, MLP)
            ),
            "wo": self.param(
                "enc_wo", with_axes(nn.initializers.normal(0.3), ("mlp", "embed")), (MLP, WIDTH)
            ),
        }


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    vocab: int = VOCAB
    frozen_prefix: str = ""  # params whose name starts with this are frozen


class TinyModel:
    """BaseModel shape: get_initial_variables / loss_fn / trainable_mask."""

    def __init__(self, frozen_prefix: str = ""):
        self.config = TinyConfig(frozen_prefix=frozen_prefix)
        self.module = TinyNet()

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        del input_types
        return self.module.init(rng, jnp.zeros(input_shapes["inputs"], jnp.int32))

    def loss_fn(self, params, batch, dropout_rng):
        del dropout_rng
        logits = self.module.apply({"params": params}, batch["inputs"])
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        weights = batch["weights"]
        loss = jnp.sum(xent * weights) / jnp.sum(weights)
        # "poison" lets a dataset make the loss non-finite at a chosen batch.
        loss = loss + jnp.sum(batch["poison"])
        acc = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * weights) / jnp.sum(weights)
        return loss, {"accuracy": acc}

    def trainable_mask(self, params):
        prefix = self.config.frozen_prefix
        return {k: not (prefix and k.startswith(prefix)) for k in params}


def make_dataset_fn(global_batch: int = 8, poison_at: int | None = None):
    """Deterministic batches; batch b holds example ids b * global_batch + [0, global_batch).

    Returns:
      A `DatasetFn` (shard_index, num_shards, seed, skip) -> iterator of host batches.
    """

    def dataset_fn(shard, num_shards, seed, skip):
        local = global_batch // num_shards
        b = skip
        while True:
            ids = b * global_batch + shard * local + np.arange(local)
            rng = np.random.default_rng([seed, b])
            tokens = rng.integers(0, VOCAB, (global_batch, LENGTH + 1))[shard * local :][:local]
            poison = np.zeros((local,), np.float32)
            if poison_at is not None and b == poison_at:
                poison[:] = np.nan
            yield {
                "inputs": tokens[:, :-1].astype(np.int32),
                "targets": tokens[:, 1:].astype(np.int32),
                "weights": np.ones((local, LENGTH), np.float32),
                "poison": poison,
                "example_id": ids.astype(np.int32),
                "text": np.array([f"ex{i}" for i in ids]),  # string feature: not sent to device
            }
            b += 1

    return dataset_fn


def first_batch(global_batch: int = 8):
    batch = next(make_dataset_fn(global_batch)(0, 1, 0, 0))
    return {k: v for k, v in batch.items() if k != "text"}


def params_to_numpy(params):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)


def register_with_gin():
    """Makes the tiny model and data available to gin files (the CLI test)."""
    import gin

    gin.external_configurable(TinyModel, module="tiny")
    gin.external_configurable(make_dataset_fn, module="tiny")

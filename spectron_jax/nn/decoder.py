"""Decoder-only LM covering Gemma 3 (text) and the Llama / Qwen2 families.

The Spectron network feeds this decoder embeddings that are not all tokens (the encoder prefix, the
spectrogram pre-net outputs), so `__call__` takes embeddings, explicit positions and the caller's
mask; `embed` and `logits` are separate methods (docs/CONTRACTS.md section 4).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectron_jax.nn import stack
from spectron_jax.nn.attention import Attention, causal_mask, positions_from_valid
from spectron_jax.nn.layers import ACTIVATIONS, NORM_VARIANTS, Embed, GatedMLP, RMSNorm

ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of the decoder LM (bound from gin; written into every checkpoint).

    Attributes:
      vocab_size: V.
      num_layers: number of blocks.
      d_model: D.
      num_heads: H query heads.
      num_kv_heads: K key/value heads (GQA when K < H).
      head_dim: Dh.
      mlp_dim: hidden width of the gated MLP.
      activation: "gelu_tanh" (Gemma) or "silu" (Llama, Qwen2).
      norm_variant: "gemma" (x * (1 + w)) or "llama" (x * w).
      norm_eps: RMSNorm epsilon.
      qk_norm: RMSNorm on queries and keys per head (Gemma 3).
      post_norms: sandwich norms after attention and MLP (Gemma 2/3).
      rope_theta: RoPE base of global layers.
      rope_local_theta: RoPE base of sliding-window layers (None: rope_theta).
      sliding_window: window of local layers, None for all-global attention.
      sliding_window_pattern: every Nth layer (1-based) is global, the rest local (Gemma 3: 6);
        0 makes every layer local when `sliding_window` is set.
      query_pre_attn_scalar: scores scale is this**-0.5 (Gemma); None: head_dim**-0.5.
      scale_embeddings: multiply token embeddings by sqrt(d_model) (Gemma).
      tie_embeddings: the output head is the embedding table.
      final_logit_softcap: tanh cap of the output logits, None for none.
      attn_logit_softcap: tanh cap of the attention scores, None for none.
      attention_query_chunk: attend this many queries at a time in training and prefill (the
        float32 scores of a layer shrink from [B, H, T, S] to [B, H, chunk, S]; the same
        result); 0: all at once.
      qkv_bias: biases on q/k/v (Qwen2; Llama with attention_bias).
      attn_out_bias: bias on the attention output projection (Llama attention_bias).
      mlp_bias: biases in the MLP (Llama mlp_bias).
      dropout_rate: dropout on attention and MLP outputs during training.
      dtype: compute dtype name ("float32", "bfloat16").
      param_dtype: parameter dtype name.
      remat: what the backward pass keeps of each block, one of `stack.REMAT_POLICIES`
        ("none", "full", "minimal", "save_dots", "save_attention_proj", "offload"; older "dots" =
        "minimal").
      scan_layers: run the blocks under `nn.scan` (parameters under `layers` with a leading layer
        axis; compile time independent of depth); False unrolls them (`layers_0`, ...).
      max_position_embeddings: longest sequence the positions were trained for (HF's key of the
        same name); not enforced here, carried so that an HF export states it. None: unknown.
    """

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "silu"
    norm_variant: str = "llama"
    norm_eps: float = 1e-6
    qk_norm: bool = False
    post_norms: bool = False
    rope_theta: float = 10_000.0
    rope_local_theta: float | None = None
    sliding_window: int | None = None
    sliding_window_pattern: int = 0
    query_pre_attn_scalar: float | None = None
    scale_embeddings: bool = False
    tie_embeddings: bool = False
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    attention_query_chunk: int = 0
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    max_position_embeddings: int | None = None
    scan_layers: bool = True

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not in {sorted(ACTIVATIONS)}")
        if self.norm_variant not in NORM_VARIANTS:
            raise ValueError(f"norm_variant {self.norm_variant!r} not in {NORM_VARIANTS}")
        object.__setattr__(self, "remat", stack.canonical_remat(self.remat))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.max_position_embeddings is not None and self.max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings {self.max_position_embeddings} must be >= 1")

    def is_local_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) uses the sliding window."""
        if self.sliding_window is None:
            return False
        if self.sliding_window_pattern <= 0:
            return True
        return (layer + 1) % self.sliding_window_pattern != 0

    @property
    def local_layers(self) -> tuple[bool, ...]:
        """`is_local_layer` of every block, in order."""
        return tuple(self.is_local_layer(i) for i in range(self.num_layers))

    @property
    def attention_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(base) ** -0.5


def num_params(config: DecoderConfig) -> int:
    """Parameter count of `Decoder(config)`, computed from the shapes alone."""
    c = config
    d, q, kv = c.d_model, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attn = d * (q + 2 * kv) + q * d
    attn += (q + 2 * kv) * c.qkv_bias + d * c.attn_out_bias + 2 * c.head_dim * c.qk_norm
    mlp = 3 * d * c.mlp_dim + (2 * c.mlp_dim + d) * c.mlp_bias
    norms = d * (4 if c.post_norms else 2)
    embed = c.vocab_size * d * (1 if c.tie_embeddings else 2)
    return c.num_layers * (attn + mlp + norms) + d + embed


class DecoderBlock(nn.Module):
    """Pre-norm block: attention then gated MLP, each with an optional post-norm (sandwich).

    `local` says whether the block attends through the sliding window (with the local RoPE
    base): a Python bool where every layer of the stack is alike or the layers are unrolled, a
    traced bool[] where a scanned stack mixes local and global layers (Gemma 3).
    """

    config: DecoderConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        local: bool | jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        decode: bool = False,
        deterministic: bool = True,
    ) -> tuple[jax.Array, None]:
        """float[B, T, D], bool, int32[B, T], bool[B, 1, T, S] -> (float[B, T, D], None).

        The (carry, None) pair is what `nn.scan` wants of its body.
        """
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        norm = dict(variant=c.norm_variant, eps=c.norm_eps, dtype=dtype, param_dtype=pdtype)

        h = RMSNorm(**norm, name="pre_attention_norm")(x)
        h = Attention(
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            rope_theta=c.rope_theta,
            local_rope_theta=c.rope_local_theta,
            scale=c.attention_scale,
            sliding_window=c.sliding_window,
            qk_norm=c.qk_norm,
            norm_variant=c.norm_variant,
            norm_eps=c.norm_eps,
            qkv_bias=c.qkv_bias,
            out_bias=c.attn_out_bias,
            logit_softcap=c.attn_logit_softcap,
            query_chunk=c.attention_query_chunk,
            dropout_rate=c.dropout_rate,
            dtype=dtype,
            param_dtype=pdtype,
            name="attn",
        )(h, positions, mask, decode=decode, deterministic=deterministic, local=local)
        if c.post_norms:
            h = RMSNorm(**norm, name="post_attention_norm")(h)
        x = x + h

        h = RMSNorm(**norm, name="pre_mlp_norm")(x)
        h = GatedMLP(
            mlp_dim=c.mlp_dim,
            activation=c.activation,
            use_bias=c.mlp_bias,
            dropout_rate=c.dropout_rate,
            dtype=dtype,
            param_dtype=pdtype,
            name="mlp",
        )(h, deterministic=deterministic)
        if c.post_norms:
            h = RMSNorm(**norm, name="post_mlp_norm")(h)
        x = x + h
        return nn.with_logical_constraint(x, ACTIVATION_AXES), None


# Call arguments of DecoderBlock that are Python values (0 is the module): decode, deterministic.
_STATIC_ARGS = (5, 6)
_LOCAL_ARG = 2


def _mixed_locality(config: DecoderConfig) -> bool:
    """Whether the stack mixes sliding-window and global layers (then a scan feeds flags)."""
    return len(set(config.local_layers)) > 1


class Decoder(nn.Module):
    """Decoder LM over embeddings (docs/CONTRACTS.md section 4).

    Parameters: `embedder/embedding` [V, D], the blocks (scanned: `layers/...` with a leading
    [L] axis; unrolled: `layers_{i}/...`), `final_norm/scale` [D] and, when not tied,
    `lm_head/kernel` [D, V].
    """

    config: DecoderConfig

    def setup(self):
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.embedder = Embed(c.vocab_size, c.d_model, dtype=dtype, param_dtype=pdtype)
        if c.scan_layers:
            mixed = _mixed_locality(c)
            static = _STATIC_ARGS if mixed else (_LOCAL_ARG, *_STATIC_ARGS)
            block = stack.rematted(DecoderBlock, c.remat, static, scanned=True)
            local_axis = 0 if mixed else nn.broadcast
            in_axes = (local_axis, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast)
            # Assigned to `self.layers`: the scope names are `layers` here, `layers_{i}` below.
            self.layers = stack.scanned(block, c.num_layers, in_axes)(c)
        else:
            static = (_LOCAL_ARG, *_STATIC_ARGS)
            block = stack.rematted(DecoderBlock, c.remat, static, scanned=False)
            self.layers = [block(c) for _ in range(c.num_layers)]
        self.final_norm = RMSNorm(
            variant=c.norm_variant, eps=c.norm_eps, dtype=dtype, param_dtype=pdtype
        )
        if not c.tie_embeddings:
            self.lm_head = nn.Dense(
                c.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=pdtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=c.d_model**-0.5), ("embed", "vocab")
                ),
            )

    def embed(self, tokens: jax.Array) -> jax.Array:
        """int32[B, T] -> dtype[B, T, D], times sqrt(D) where the family scales embeddings."""
        x = self.embedder(tokens)
        if self.config.scale_embeddings:
            # HF casts the normaliser to the compute dtype first (bf16: 45.25, not 45.2548).
            x = x * jnp.asarray(self.config.d_model**0.5, dtype=x.dtype)
        return nn.with_logical_constraint(x, ACTIVATION_AXES)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        *,
        decode: bool = False,
        deterministic: bool = True,
    ) -> jax.Array:
        """Runs the blocks and the final norm.

        Args:
          x: float[B, T, D] input embeddings.
          positions: int32[B, T] RoPE positions (cumsum of valid slots - 1).
          attention_mask: bool[B, 1, T, S]; S = T without cache, the cache length with `decode`.
          decode: read and write the KV cache in the `cache` collection.
          deterministic: disables dropout.

        Returns:
          dtype[B, T, D] hidden states after the final norm.
        """
        x = nn.with_logical_constraint(x.astype(jnp.dtype(self.config.dtype)), ACTIVATION_AXES)
        c = self.config
        if c.scan_layers:
            local = jnp.asarray(c.local_layers) if _mixed_locality(c) else c.local_layers[0]
            x, _ = self.layers(x, local, positions, attention_mask, decode, deterministic)
        else:
            for block, local in zip(self.layers, c.local_layers, strict=True):
                x, _ = block(x, local, positions, attention_mask, decode, deterministic)
        return self.final_norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """dtype[B, T, D] -> float32[B, T, V] (tied or separate head, soft-capped where set)."""
        if self.config.tie_embeddings:
            out = self.embedder.attend(hidden)
        else:
            out = self.lm_head(hidden)
        out = out.astype(jnp.float32)
        cap = self.config.final_logit_softcap
        if cap is not None:
            out = jnp.tanh(out / cap) * cap
        return nn.with_logical_constraint(
            out, ("activation_batch", "activation_length", "activation_vocab")
        )

    def forward_tokens(
        self, tokens: jax.Array, valid: jax.Array | None = None, *, deterministic: bool = True
    ) -> jax.Array:
        """Plain causal LM over tokens: int32[B, T] (+ valid bool[B, T]) -> float32[B, T, V].

        Also the method that initialises every parameter (`embed`, blocks, head) in one call.
        """
        if valid is None:
            valid = jnp.ones(tokens.shape, bool)
        x = self.embed(tokens)
        h = self(x, positions_from_valid(valid), causal_mask(valid), deterministic=deterministic)
        return self.logits(h)


def init_cache(decoder: Decoder, batch_size: int, cache_length: int) -> Any:
    """A zero KV cache (index 0) for `cache_length` slots, built abstractly (no parameter init)."""
    c = decoder.config
    x = jnp.zeros((batch_size, cache_length, c.d_model), jnp.dtype(c.dtype))
    positions = jnp.zeros((batch_size, cache_length), jnp.int32)
    mask = jnp.ones((batch_size, 1, cache_length, cache_length), bool)
    shapes = jax.eval_shape(
        lambda: decoder.init(jax.random.PRNGKey(0), x, positions, mask, decode=True)["cache"]
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

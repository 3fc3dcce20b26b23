"""Rotary embeddings, attention masks and grouped-query attention with a KV cache.

Conventions: queries float[B, T, H, Dh], keys/values float[B, S, K, Dh] with K kv heads and
G = H / K query heads per kv head; masks are bool[B, 1, T, S] (True = may attend). Positions are
explicit int32[B, T] (`positions_from_valid`: cumsum of valid slots - 1), so padding slots anywhere
in the sequence shift neither RoPE nor the sliding window.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectron_jax.nn.layers import DenseGeneral, RMSNorm
from spectron_jax.nn.stack import tag

Dtype = Any


# ---------------------------------------------------------------------------------------------
# Positions and masks.
# ---------------------------------------------------------------------------------------------


def positions_from_valid(valid: jax.Array) -> jax.Array:
    """RoPE positions that skip padding: int/bool[B, T] -> int32[B, T] (cumsum(valid) - 1, >= 0)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(valid: jax.Array) -> jax.Array:
    """bool[B, T] -> bool[B, 1, T, T]: query i sees valid keys j <= i; padding queries see none."""
    return prefix_lm_mask(valid, jnp.zeros_like(valid, dtype=bool))


def prefix_lm_mask(valid: jax.Array, prefix: jax.Array) -> jax.Array:
    """Prefix-LM mask: bidirectional among valid prefix slots, causal over valid slots elsewhere.

    Args:
      valid: bool/int[B, T], 1 = real slot.
      prefix: bool/int[B, T], 1 = slot of the bidirectional prefix (a block at the start).

    Returns:
      bool[B, 1, T, T]: [b, 0, i, j] = valid_i & valid_j & (j <= i | (prefix_i & prefix_j)).
    """
    valid = valid.astype(bool)
    prefix = prefix.astype(bool) & valid
    t = valid.shape[-1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # [T, T]
    both_prefix = prefix[:, :, None] & prefix[:, None, :]  # [B, T, T]
    both_valid = valid[:, :, None] & valid[:, None, :]
    return (both_valid & (causal[None] | both_prefix))[:, None]


def sliding_window_mask(q_positions: jax.Array, k_positions: jax.Array, window: int) -> jax.Array:
    """int32[B, T], int32[B, S] -> bool[B, 1, T, S]: |pos_q - pos_k| < window (exclusive, as HF)."""
    dist = jnp.abs(q_positions[:, :, None] - k_positions[:, None, :])
    return (dist < window)[:, None]


def decode_mask(key_valid: jax.Array, start: jax.Array | int, length: int) -> jax.Array:
    """Causal mask for a chunk of `length` queries written at cache slots [start, start + length).

    Args:
      key_valid: bool/int[B, S], 1 = cache slot holding (or about to hold) a real position.
      start: cache index of the chunk's first slot.
      length: T, the chunk length.

    Returns:
      bool[B, 1, T, S]: query t attends valid slots j <= start + t.
    """
    s = key_valid.shape[-1]
    q_slot = start + jnp.arange(length)
    causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T, S]
    return (causal[None] & key_valid.astype(bool)[:, None, :])[:, None]


# ---------------------------------------------------------------------------------------------
# Rotary embeddings.
# ---------------------------------------------------------------------------------------------


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the rotate-half layout HF checkpoints use (no weight permutation needed).

    Args:
      x: float[B, T, N, Dh] with Dh even.
      positions: int32[B, T].
      theta: RoPE base (Gemma 3 uses one for local and another for global layers).

    Returns:
      float[B, T, N, Dh] in x's dtype (angles in float32).
    """
    dh = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))  # [Dh/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------------------------


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    logit_softcap: float | None = None,
    query_chunk: int = 0,
) -> jax.Array:
    """Grouped-query attention, softmax in float32.

    Args:
      q: float[B, T, H, Dh].
      k, v: float[B, S, K, Dh] with H % K == 0.
      mask: bool[B, 1, T, S].
      scale: multiplies q.k (after the product, as HF does).
      logit_softcap: tanh soft cap of the scaled scores (Gemma 2 style), None for none.
      query_chunk: > 0 and < T: attend `query_chunk` queries at a time (`lax.map`, each chunk
        rematerialised in the backward pass), so the float32 scores held at once are
        [B, H, query_chunk, S] instead of [B, H, T, S]; the same result (each query still sees
        all its keys in one softmax).

    Returns:
      float[B, T, H, Dh] in q's dtype. A query with no allowed key gets the mean of the values
      (finite), never NaN.
    """
    b, t, h, dh = q.shape
    if not 0 < query_chunk < t:
        return _attend(q, k, v, mask, scale, logit_softcap)
    n = -(-t // query_chunk)
    pad = n * query_chunk - t  # Padded queries see no key; their rows are cut off below.
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)))
    q_chunks = q.reshape(b, n, query_chunk, h, dh).swapaxes(0, 1)  # [n, B, C, H, Dh]
    mask_chunks = mask.reshape(b, 1, n, query_chunk, -1).transpose(2, 0, 1, 3, 4)

    @jax.checkpoint
    def chunk(args):
        return _attend(args[0], k, v, args[1], scale, logit_softcap)

    out = jax.lax.map(chunk, (q_chunks, mask_chunks))  # [n, B, C, H, Dh]
    return out.swapaxes(0, 1).reshape(b, n * query_chunk, h, dh)[:, :t]


def _attend(q, k, v, mask, scale, logit_softcap):
    """`dot_product_attention` of all queries at once (shapes as there)."""
    b, t, h, dh = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, dh)  # [B,T,H,Dh] -> [B,T,K,G,Dh]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * scale
    if logit_softcap is not None:
        scores = jnp.tanh(scores / logit_softcap) * logit_softcap
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)  # [B,1,1,T,S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, dh)


def _where(flag: bool | jax.Array, if_true: Any, if_false: Any) -> Any:
    """`if_true if flag else if_false` for a Python flag, `jnp.where` for a traced one."""
    if isinstance(flag, bool):
        return if_true if flag else if_false
    return jnp.where(flag, if_true, if_false)


class Attention(nn.Module):
    """Multi-head attention with GQA, optional QK-norm, RoPE, sliding window and a KV cache.

    With `decode=True` the `cache` collection holds `cached_key`/`cached_value` float[B, S, K, Dh],
    `cached_positions` int32[B, S] (for the sliding window) and `cache_index` int32[]. The first
    call (module.init with decode=True) only creates a zero cache whose length S is that call's T;
    later calls write their chunk of T >= 1 slots at `cache_index` and attend over all S slots,
    restricted to the caller's mask and to slots written so far.

    Attributes:
      num_heads: H.
      num_kv_heads: K.
      head_dim: Dh.
      rope_theta: RoPE base (of global calls).
      local_rope_theta: RoPE base of local calls; None: rope_theta.
      scale: score multiplier (Dh**-0.5 or query_pre_attn_scalar**-0.5).
      sliding_window: the window (exclusive, in positions) of local calls; None: never local.
      qk_norm: RMSNorm over Dh on queries and keys before RoPE (Gemma 3).
      norm_variant, norm_eps: of the QK-norm.
      qkv_bias: biases on q/k/v (Qwen2, Llama attention_bias).
      out_bias: bias on the output projection (Llama attention_bias).
      logit_softcap: tanh cap of the scores, None for none.
      query_chunk: attend this many queries at a time (see `dot_product_attention`); 0: all.
      dropout_rate: dropout on the output.
      dtype, param_dtype: compute and parameter dtypes.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    scale: float
    local_rope_theta: float | None = None
    sliding_window: int | None = None
    qk_norm: bool = False
    norm_variant: str = "llama"
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    out_bias: bool = False
    logit_softcap: float | None = None
    query_chunk: int = 0
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _proj(self, heads: int, heads_axis: str, bias: bool, name: str) -> DenseGeneral:
        return DenseGeneral(
            features=(heads, self.head_dim),
            kernel_axes=("embed", heads_axis, "head_dim"),
            use_bias=bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        *,
        decode: bool = False,
        deterministic: bool = True,
        local: bool | jax.Array | None = None,
    ) -> jax.Array:
        """float[B, T, D], int32[B, T], bool[B, 1, T, S] -> float[B, T, D].

        `local`: attend through the sliding window with the local RoPE base; a Python bool, or a
        traced bool[] (a scanned stack of mixed layers); None: local iff `sliding_window` is set.
        """
        if self.sliding_window is None:
            local = False
        elif local is None:
            local = True
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of {self.num_kv_heads}")
        b, t, d_model = x.shape
        q = self._proj(self.num_heads, "heads", self.qkv_bias, "q_proj")(x)
        k = self._proj(self.num_kv_heads, "kv_heads", self.qkv_bias, "k_proj")(x)
        v = self._proj(self.num_kv_heads, "kv_heads", self.qkv_bias, "v_proj")(x)
        if self.qk_norm:
            norm = dict(variant=self.norm_variant, eps=self.norm_eps, param_dtype=self.param_dtype)
            q = RMSNorm(**norm, name="q_norm")(q)
            k = RMSNorm(**norm, name="k_norm")(k)
        theta = _where(local, self.local_rope_theta or self.rope_theta, self.rope_theta)
        q = tag(apply_rope(q, positions, theta), "query_proj")
        k = tag(apply_rope(k, positions, theta), "key_proj")
        v = tag(v, "value_proj")
        q = nn.with_logical_constraint(
            q, ("activation_batch", "activation_length", "activation_heads", None)
        )
        k = nn.with_logical_constraint(
            k, ("activation_batch", "activation_length", "activation_kv_heads", None)
        )

        k_positions, written = positions, None
        if decode:
            k, v, k_positions, written = self._update_cache(k, v, positions)
        if mask.ndim != 4 or mask.shape[1:] != (1, t, k.shape[1]):
            raise ValueError(
                f"attention mask shape {mask.shape} does not match [B, 1, T, S] = "
                f"[{b}, 1, {t}, {k.shape[1]}]"
            )
        if written is not None:
            mask = mask & written[None, None, None, :]
        if local is not False:
            window = sliding_window_mask(positions, k_positions, self.sliding_window)
            mask = mask & _where(local, window, True)

        out = dot_product_attention(
            q,
            k,
            v,
            mask,
            scale=self.scale,
            logit_softcap=self.logit_softcap,
            query_chunk=0 if decode else self.query_chunk,
        )
        out = nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)
        out = DenseGeneral(
            features=d_model,
            kernel_axes=("heads", "head_dim", "embed"),
            axis=(-2, -1),
            use_bias=self.out_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="o_proj",
        )(out)
        return tag(out, "attention_out")

    def _update_cache(
        self, k: jax.Array, v: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """Writes the chunk at cache_index -> (keys, values, key positions, written slots)."""
        initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cached_pos = self.variable(
            "cache", "cached_positions", jnp.zeros, positions.shape, jnp.int32
        )
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:
            # Creation call: S = this T; attend as a plain (non-cached) pass.
            return k, v, positions, None
        i = index.value
        cached_k.value = jax.lax.dynamic_update_slice(
            cached_k.value, k.astype(cached_k.value.dtype), (0, i, 0, 0)
        )
        cached_v.value = jax.lax.dynamic_update_slice(
            cached_v.value, v.astype(cached_v.value.dtype), (0, i, 0, 0)
        )
        cached_pos.value = jax.lax.dynamic_update_slice(
            cached_pos.value, positions.astype(jnp.int32), (0, i)
        )
        index.value = i + k.shape[1]
        # Sharded decoding keeps the cache where the keys are: batch and kv heads split.
        axes = ("activation_batch", "activation_length", "activation_kv_heads", None)
        cached_k.value = nn.with_logical_constraint(cached_k.value, axes)
        cached_v.value = nn.with_logical_constraint(cached_v.value, axes)
        written = jnp.arange(cached_k.value.shape[1]) < index.value
        return cached_k.value, cached_v.value, cached_pos.value, written

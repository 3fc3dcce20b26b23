"""The Spectron network: encoder -> connector -> prefix-LM decoder -> text and spectrogram heads.

One forward pass over the fixed-slot sequence of docs/CONTRACTS.md section 2:

    [P prefix slots: connector(encoder(prompt))] [L text slots: embed(tokens)]
    [K / r primer slots] [N frame slots]

Frame slot j holds `pre_net(frame group j - 1)` (zeros for j = 0) and its post-net output predicts
frame group j (`reduction_factor` frames). With `primer_frames` K > 0 the frame stream starts with
the prompt's last K log-mel frames (`prompt_tail`): frame slot 0 then reads the last primer group,
as if the continuation went on from the prompt's own voice, and the primer slots' outputs are not
predictions of anything (no loss). Without it (K = 0, the paper's layout) the voice can only come
through the prefix, while teacher forcing hands every later slot the true previous frame.

RoPE positions are `cumsum(valid) - 1`, so padding inside any region shifts nothing; the mask
is bidirectional among valid prefix slots and causal over valid slots elsewhere
(`nn.attention.prefix_lm_mask`). Padded slots never change a valid output.

Besides `__call__` (teacher-forced training), `encode`, `frame_inputs` and `frame_outputs` are the
pieces that step-by-step decoding reuses through `Module.apply(..., method=...)`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectron_jax.config import SpectronConfig
from spectron_jax.nn.attention import positions_from_valid, prefix_lm_mask
from spectron_jax.nn.conformer import ConformerEncoder
from spectron_jax.nn.decoder import Decoder
from spectron_jax.nn.frame_heads import make_frame_head
from spectron_jax.nn.layers import default_kernel_init
from spectron_jax.nn.spec_augment import spec_augment
from spectron_jax.nn.speech_heads import (
    PreNet,
    StopHead,
    group_frames,
    shift_groups,
    ungroup_frames,
)

Batch = dict[str, jax.Array]


def prompt_tail(features: jax.Array, mask: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """The last `length` valid frames of each prompt, right-aligned (the acoustic prompt).

    Args:
      features: float[B, T_p, M] prompt log-mel, valid frames first (`encoder_mask`).
      mask: int[B, T_p].
      length: K frames to take.

    Returns:
      (float32[B, K, M] zeros where a prompt is shorter than K, int32[B, K] 1 on real frames).
    """
    n = jnp.sum(mask > 0, axis=-1)
    idx = n[:, None] - length + jnp.arange(length)[None, :]
    valid = idx >= 0
    tail = jnp.take_along_axis(features, jnp.maximum(idx, 0)[..., None], axis=1)
    return tail.astype(jnp.float32) * valid[..., None], valid.astype(jnp.int32)


def stack_frames(x: jax.Array, mask: jax.Array, stack: int) -> tuple[jax.Array, jax.Array]:
    """Stacks `stack` consecutive frames: float[B, T, D], int[B, T] -> [B, ceil(T/s), s*D], [B, .].

    Padded frames are zeroed first; a stacked slot is valid when any of its frames is.
    """
    if stack == 1:
        return x, mask
    b, t, d = x.shape
    pad = -t % stack
    x = jnp.pad(x * (mask > 0)[..., None].astype(x.dtype), ((0, 0), (0, pad), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
    x = x.reshape(b, (t + pad) // stack, stack * d)  # [B,T,D] -> [B,T/s,s*D]
    mask = jnp.any(mask.reshape(b, -1, stack) > 0, axis=-1).astype(jnp.int32)
    return x, mask


def group_mask(frame_mask: jax.Array, reduction_factor: int) -> jax.Array:
    """int[B, T_f] -> int32[B, T_f / r]: a frame group is valid when any of its frames is."""
    b, t = frame_mask.shape
    return jnp.any(
        frame_mask.reshape(b, t // reduction_factor, reduction_factor) > 0, axis=-1
    ).astype(jnp.int32)


class Spectron(nn.Module):
    """Spectron (arXiv 2305.15255) as one flax module.

    Parameters: `encoder/...` (ConformerEncoder), `connector/{kernel,bias}`, `decoder/...`
    (Decoder), `pre_net/...`, `post_net/...` (the regression head; another frame head is
    `frame_head/...`) and, with `stop_head`, `stop/...`.
    """

    config: SpectronConfig

    def setup(self):
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.encoder = ConformerEncoder(c.encoder)
        self.connector = nn.Dense(
            c.decoder.d_model,
            dtype=dtype,
            param_dtype=pdtype,
            kernel_init=nn.with_logical_partitioning(default_kernel_init(), (None, "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        )
        self.decoder = Decoder(c.decoder)
        self.pre_net = PreNet(
            hidden_dim=c.prenet_hidden_dim,
            output_dim=c.decoder.d_model,
            dropout_rate=c.prenet_dropout,
            always_dropout=c.prenet_dropout_at_inference,
            dtype=dtype,
            param_dtype=pdtype,
        )
        head = make_frame_head(
            c.frame_head,
            hidden_dim=c.postnet_hidden_dim,
            n_mels=c.n_mels,
            reduction_factor=c.reduction_factor,
            dtype=dtype,
            param_dtype=pdtype,
        )
        # The paper's head keeps the post-net's parameter names; the others are `frame_head`.
        if c.frame_head.kind == "regression":
            self.post_net = head
        else:
            self.frame_head = head
        if c.stop_head:
            self.stop = StopHead(param_dtype=pdtype)

    # -- pieces ------------------------------------------------------------------------------

    def encode(
        self, features: jax.Array, mask: jax.Array, *, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """Prompt features -> decoder prefix.

        Args:
          features: float32[B, T_p, F_enc].
          mask: int32[B, T_p].
          deterministic: no SpecAugment and no dropout.

        Returns:
          (prefix float[B, P, D], prefix_mask int32[B, P]).
        """
        c = self.config
        if not deterministic and c.spec_augment.enabled:
            features = spec_augment(self.make_rng("dropout"), features, mask, c.spec_augment)
        # A frozen encoder also runs without dropout: it is not being trained.
        enc, enc_mask = self.encoder(
            features, mask, deterministic=deterministic or c.encoder_frozen
        )
        if c.encoder_frozen:
            enc = jax.lax.stop_gradient(enc)
        enc, enc_mask = stack_frames(enc, enc_mask, c.connector_stack)
        prefix = self.connector(enc.astype(jnp.dtype(c.dtype)))
        prefix = prefix * (enc_mask > 0)[..., None].astype(prefix.dtype)
        return prefix, enc_mask

    def frame_inputs(self, prev_groups: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Pre-net: float[B, N, r * n_mels] (the previous frame groups) -> float[B, N, D]."""
        return self.pre_net(prev_groups, deterministic=deterministic)

    def primer(self, features: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Primer groups float32[B, K / r, r * n_mels] and their validity int32[B, K / r]."""
        c = self.config
        tail, valid = prompt_tail(features, mask, c.primer_frames)
        return group_frames(tail, c.reduction_factor), group_mask(valid, c.reduction_factor)

    def frame_head_outputs(
        self,
        hidden: jax.Array,
        group_index: jax.Array,
        temperature: float | jax.Array = 1.0,
        num_samples: int = 1,
    ) -> dict[str, jax.Array]:
        """The frame head on frame slots (`nn.frame_heads`).

        Args:
          hidden: float[B, N, D] the slots' hidden states.
          group_index: int32[N] which continuation group each slot predicts (its noise key).
          temperature: the stochastic heads' noise scale (0 = the mean; no effect on
            regression).
          num_samples: draws per slot (the energy_distance head's training score).

        Returns:
          `frames` float32[B, N, r * n_mels] and the head's other outputs.
        """
        head = self.config.frame_head
        if head.kind == "regression":
            return {"frames": self.post_net(hidden)}
        if head.kind == "gaussian":
            return self.frame_head(hidden, group_index, temperature)
        return self.frame_head(hidden, group_index, temperature, num_samples)

    def frame_outputs(
        self,
        hidden: jax.Array,
        group_index: jax.Array | None = None,
        temperature: float | jax.Array = 1.0,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Heads on frame slots: float[B, N, D] -> (float32[B, N, r*n_mels], stop float32[B, N]).

        `group_index` int32[N] defaults to 0..N-1 (see `frame_head_outputs`).
        """
        if group_index is None:
            group_index = jnp.arange(hidden.shape[1], dtype=jnp.int32)
        groups = self.frame_head_outputs(hidden, group_index, temperature)["frames"]
        stop = self.stop(hidden) if self.config.stop_head else None
        return groups, stop

    # -- teacher-forced forward --------------------------------------------------------------

    def __call__(
        self, batch: Batch, *, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
        """Teacher-forced pass over a model batch (CONTRACTS.md section 2).

        Args:
          batch: `encoder_features`, `encoder_mask`, `decoder_input_tokens`, `text_part`,
            `target_frames`, `frame_mask` (other keys are ignored).
          deterministic: no SpecAugment, no dropout (the pre-net keeps its dropout when
            `prenet_dropout_at_inference`; it then needs a `dropout` rng).

        Returns:
          (logits float32[B, L, V] on the text slots, frames float32[B, T_f, n_mels] predicted
          on the frame slots, aux): aux holds `stop_logits` float32[B, N] (with a stop head),
          `frame_head` (a stochastic head's outputs, [B, N, r * n_mels] each, drawn at
          temperature 1 from the `sample` rng stream),
          `prefix_mask` int32[B, P] and `attention_mask` bool[B, 1, S, S] / `positions`
          int32[B, S] of the whole sequence (S = P + L + N).
        """
        c = self.config
        r = c.reduction_factor
        prefix, prefix_mask = self.encode(
            batch["encoder_features"], batch["encoder_mask"], deterministic=deterministic
        )
        tokens = batch["decoder_input_tokens"]
        text_valid = (batch["text_part"] > 0).astype(jnp.int32)
        text = self.decoder.embed(tokens)

        frame_mask = batch["frame_mask"]
        frames = batch["target_frames"].astype(jnp.float32)
        # Padded frames are zeroed so that a partly valid last group feeds no padding forward.
        frames = frames * (frame_mask > 0)[..., None]
        groups = group_frames(frames, r)  # [B,T_f,M] -> [B,N,r*M]
        frame_valid = group_mask(frame_mask, r)
        if c.primer_frames:  # The stream starts from the prompt's own last frames.
            primer, primer_valid = self.primer(batch["encoder_features"], batch["encoder_mask"])
            groups = jnp.concatenate([primer, groups], axis=1)
            frame_valid = jnp.concatenate([primer_valid, frame_valid], axis=1)
        frame_in = self.frame_inputs(shift_groups(groups), deterministic=deterministic)

        p, n_text = prefix.shape[1], tokens.shape[1]
        dtype = jnp.dtype(c.decoder.dtype)
        x = jnp.concatenate([prefix.astype(dtype), text.astype(dtype), frame_in.astype(dtype)], 1)
        valid = jnp.concatenate([prefix_mask, text_valid, frame_valid], axis=1)
        is_prefix = jnp.zeros_like(valid).at[:, :p].set(prefix_mask)
        mask = prefix_lm_mask(valid, is_prefix)
        positions = positions_from_valid(valid)
        hidden = self.decoder(x, positions, mask, deterministic=deterministic)

        logits = self.decoder.logits(hidden[:, p : p + n_text])
        frame_hidden = hidden[:, p + n_text + c.primer_groups :]
        index = jnp.arange(frame_hidden.shape[1], dtype=jnp.int32)
        samples = c.frame_head.num_samples if c.frame_head.kind == "energy_distance" else 1
        head = self.frame_head_outputs(frame_hidden, index, 1.0, samples)
        pred_frames = ungroup_frames(head["frames"], c.n_mels)  # [B,N,r*M] -> [B,T_f,M]
        aux = {"prefix_mask": prefix_mask, "attention_mask": mask, "positions": positions}
        if c.stop_head:
            aux["stop_logits"] = self.stop(frame_hidden)
        if c.frame_head.stochastic:
            aux["frame_head"] = head
        return logits, pred_frames, aux

"""Model FLOPs per train step, from the architecture alone (the numerator of MFU).

The formula counts the multiply-adds of matmuls, convolutions and attention (2 FLOPs each) and
nothing else (norms, softmax, activations and the optimizer are bandwidth, not FLOPs). For one
matmul whose forward costs `f`:

* trained weight whose input carries a gradient: `3f` (forward, input gradient, weight gradient);
  summed over a transformer this is the usual `6 * N * tokens`;
* trained weight fed by data (the pre-net's first layer, the conv stem's first conv, the connector
  behind a frozen encoder): `2f`, no input gradient exists;
* frozen weight (the frozen encoder, behind `stop_gradient`): `f`, forward only.

Attention adds, per layer, `2 * 2 * B * T * S * H * Dh` forward FLOPs (Q.K and P.V) for T queries
over S keys, counted in full (no saving for causal masking, as T5X, MaxText and the PaLM MFU
definition count it), times 3 for training.

Decoder-only LM (`decoder_train_flops`), B sequences of T tokens, L layers:

    6 * (L * N_block + D * V) * B * T  +  12 * L * B * T^2 * H * Dh,
    N_block = D * (H + 2K) * Dh + H * Dh * D + 3 * D * F           (q, k, v, o; gate, up, down)

which gives 1,030.8 GFLOP for the reference shape (D 512, L 8, H = K = 8, Dh 64,
F 2048, V 8192, B 8, T 512). The embedding lookup is a gather, not a matmul: 0 FLOPs (the head is
counted whether tied or not, it is a matmul either way).

Spectron (`spectron_train_flops`) over S = P + L_text + N decoder slots: the decoder blocks run
over all S slots, the LM head over the L_text text slots only, the pre-net and post-net over the
N frame slots, the connector over the P prefix slots, and the encoder over its T_p input frames
(conv stem) and T_e = T_p / 4 (subsampling stem) or T_p (projection stem) Conformer frames.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from spectron_jax.config import SpectronConfig
from spectron_jax.nn.conformer import ConformerConfig
from spectron_jax.nn.decoder import DecoderConfig
from spectron_jax.nn.layers import ceil_div

# Pass multipliers over the forward FLOPs of one matmul (module docstring).
TRAINED = 3
TRAINED_DATA_INPUT = 2
FROZEN = 1


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Model FLOPs of one train step, itemised.

    Attributes:
      terms: component name -> FLOPs per train step (forward + backward).
    """

    terms: Mapping[str, float]

    @property
    def total(self) -> float:
        return float(sum(self.terms.values()))

    def __add__(self, other: FlopCount) -> FlopCount:
        merged = dict(self.terms)
        for k, v in other.terms.items():
            merged[k] = merged.get(k, 0.0) + v
        return FlopCount(merged)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / 1e9:,.1f}" for k, v in self.terms.items())
        return f"{self.total / 1e9:,.1f} GFLOP ({parts})"


def decoder_block_params(config: DecoderConfig) -> int:
    """Matmul weights of one decoder block: q, k, v, o and the gated MLP (no norms, no biases)."""
    c = config
    attn = c.d_model * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    attn += c.num_heads * c.head_dim * c.d_model
    return attn + 3 * c.d_model * c.mlp_dim


def attention_forward_flops(batch: int, queries: int, keys: int, heads: int, head_dim: int) -> int:
    """Q.K plus P.V of one layer, full (unmasked) score matrix: 4 * B * T * S * H * Dh."""
    return 4 * batch * queries * keys * heads * head_dim


def decoder_train_flops(
    config: DecoderConfig, batch: int, length: int, head_positions: int | None = None
) -> FlopCount:
    """Train-step FLOPs of the decoder LM over `batch` sequences of `length` slots.

    Args:
      config: the decoder.
      batch: B.
      length: T, slots per sequence (all go through the blocks).
      head_positions: slots per sequence that go through the LM head (default: all `length`).

    Returns:
      FlopCount with `decoder_matmuls`, `decoder_attention` and `lm_head` terms.
    """
    c = config
    head_positions = length if head_positions is None else head_positions
    tokens = batch * length
    blocks = 2 * c.num_layers * decoder_block_params(c) * tokens * TRAINED
    attn = c.num_layers * attention_forward_flops(batch, length, length, c.num_heads, c.head_dim)
    head = 2 * c.d_model * c.vocab_size * batch * head_positions * TRAINED
    return FlopCount(
        {"decoder_matmuls": blocks, "decoder_attention": attn * TRAINED, "lm_head": head}
    )


def conformer_forward_flops(config: ConformerConfig, batch: int, frames: int) -> FlopCount:
    """Forward FLOPs of the Conformer encoder on `frames` input frames (before subsampling).

    Returns:
      FlopCount with `encoder_stem` (first conv / projection), `encoder_stem_rest`,
      `encoder_matmuls` and `encoder_attention` terms, forward only.
    """
    c = config
    h = c.hidden_dim
    if c.stem == "subsampling":
        ch = c.subsampling_channels
        # 3x3 stride-2 convs with padding 1 halve each axis, rounding up.
        t1, f1 = ceil_div(frames, 2), ceil_div(c.input_dim, 2)
        t2, f2 = ceil_div(t1, 2), ceil_div(f1, 2)
        stem = 2 * batch * t1 * f1 * 9 * ch  # conv1: one input channel.
        stem_rest = 2 * batch * t2 * f2 * 9 * ch * ch + 2 * batch * t2 * (f2 * ch) * h
        t = t2
    else:
        stem, stem_rest, t = 2 * batch * frames * c.input_dim * h, 0, frames
    per_token = (
        2 * 2 * h * c.mlp_dim  # ffn1, ffn2.
        + 4 * h * h  # query, key, value, out.
        + h * 2 * h
        + c.conv_kernel_size * h
        + h * h  # pointwise_in (GLU), depthwise, out.
    )
    matmuls = 2 * c.num_layers * per_token * batch * t
    attn = c.num_layers * attention_forward_flops(batch, t, t, c.num_heads, c.head_dim)
    if c.position == "relative_key":
        distances = c.left_max_positions + c.right_max_positions + 1
        attn += c.num_layers * 2 * batch * t * c.num_heads * c.head_dim * distances
    return FlopCount(
        {
            "encoder_stem": float(stem),
            "encoder_stem_rest": float(stem_rest),
            "encoder_matmuls": float(matmuls),
            "encoder_attention": float(attn),
        }
    )


def spectron_train_flops(
    config: SpectronConfig, batch: int, prompt_frames: int, text_length: int, target_frames: int
) -> FlopCount:
    """Train-step FLOPs of Spectron for one batch layout (docs/CONTRACTS.md section 2).

    Args:
      config: the model.
      batch: B.
      prompt_frames: T_p, encoder input frames.
      text_length: L, text slots.
      target_frames: T_f, continuation frames (N = T_f / reduction_factor frame slots).

    Returns:
      FlopCount: decoder terms (blocks over S = P + L + N slots, head over L), encoder terms
      (forward only when frozen), `connector`, `pre_net`, `post_net` (the frame head, whichever
      kind; and `stop_head`).
    """
    c = config
    r, mels, d = c.reduction_factor, c.n_mels, c.decoder.d_model
    n = target_frames // r
    p = c.prefix_length(prompt_frames)
    count = decoder_train_flops(c.decoder, batch, p + text_length + n, head_positions=text_length)

    enc = conformer_forward_flops(c.encoder, batch, prompt_frames)
    if c.encoder_frozen:
        scale = {k: FROZEN for k in enc.terms}
    else:
        scale = {k: TRAINED for k in enc.terms}
        scale["encoder_stem"] = TRAINED_DATA_INPUT
    count += FlopCount({k: v * scale[k] for k, v in enc.terms.items()})

    enc_width = c.encoder.hidden_dim * c.connector_stack
    connector_pass = TRAINED_DATA_INPUT if c.encoder_frozen else TRAINED
    h_pre, h_post = c.prenet_hidden_dim, c.postnet_hidden_dim
    terms = {
        "connector": 2 * batch * p * enc_width * d * connector_pass,
        "pre_net": 2
        * batch
        * n
        * (r * mels * h_pre * TRAINED_DATA_INPUT + (h_pre * h_pre + h_pre * d) * TRAINED),
        "post_net": 2 * batch * n * _frame_head_macs(c.frame_head, d, h_post, r * mels) * TRAINED,
    }
    if c.stop_head:
        terms["stop_head"] = 2 * batch * n * d * TRAINED
    return count + FlopCount({k: float(v) for k, v in terms.items()})


def _frame_head_macs(head, d: int, h: int, g: int) -> int:
    """Multiply-adds per frame slot of the frame head (`nn.frame_heads`), G = r * n_mels."""
    if head.kind == "gaussian":  # latent layer to mean and log-variance, then the refiner
        return d * h + h * 2 * g + g * h + h * g
    if head.kind == "energy_distance":  # the context once, then each training sample
        return d * h + head.num_samples * (head.noise_dim * h + h * h + h * g)
    return d * h + h * g

"""Conformer speech encoder (flax.linen), expressive enough to load w2v-BERT 2.0.

One `ConformerConfig` covers two uses:

* the public w2v-BERT 2.0 encoder (HF `Wav2Vec2BertModel`, 24 x 1024, ~580M parameters): the
  `projection` stem (LayerNorm + Linear over 160 stacked fbank features, `audio/fbank.py`),
  `relative_key` attention (a learned embedding per clipped query-key distance, added to the
  logits as q . E[clip(j - i)]), and a causal depthwise convolution (HF pads it on the left only);
  `convert/hf_w2v_bert.py` turns such a checkpoint into this module's parameters;
* small encoders trained from scratch on log-mel input: the `subsampling` stem (two 3x3 stride-2
  convolutions, T -> ceil(T / 4)), `rotary` or no positions, centred depthwise convolution.

Block (Conformer, arXiv 2005.08100, as HF orders it):
`x += 0.5 ffn1(norm(x)); x += attn(norm(x)); x += conv(x); x += 0.5 ffn2(norm(x)); x = norm(x)`.

Masking: padded keys get no attention weight and padded frames are zeroed before the depthwise
convolution (and before each stem convolution), so padding never changes a valid output; padded
output frames are returned as zeros.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spectron_jax.nn import stack
from spectron_jax.nn.layers import DenseGeneral, ceil_div

STEMS = ("projection", "subsampling")
POSITIONS = ("relative_key", "rotary", "none")
NORMS = ("layer_norm", "rms_norm")
ACTIVATIONS = {
    "swish": nn.swish,
    "silu": nn.swish,
    "relu": nn.relu,
    # HF's "gelu" is the exact (erf) GELU.
    "gelu": lambda x: nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class ConformerConfig:
    """Conformer encoder hyper-parameters. Defaults: w2v-BERT 2.0 (`facebook/w2v-bert-2.0`)."""

    input_dim: int = 160  # F of the input features (160 = 80 fbank bins stacked by 2).
    stem: str = "projection"  # "projection" (w2v-BERT) or "subsampling" (T -> ceil(T/4)).
    subsampling_channels: int = 256  # Channels of the two stem convolutions ("subsampling").
    hidden_dim: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    conv_kernel_size: int = 31  # Depthwise kernel taps; odd.
    causal_conv: bool = True  # w2v-BERT pads the depthwise conv on the left only.
    activation: str = "swish"  # Feed-forward and convolution-module activation.
    norm_type: str = "layer_norm"
    norm_eps: float = 1e-5
    position: str = "relative_key"
    left_max_positions: int = 64  # relative_key: distances clipped to [-left, right].
    right_max_positions: int = 8
    rope_base: float = 10_000.0  # rotary only (standard RoPE on q and k).
    # Dropout rates (HF names in brackets): after the input stem [feat_proj_dropout]; on the
    # encoder input and after each feed-forward [hidden_dropout]; inside feed-forwards
    # [activation_dropout]; on attention weights and the attention output [attention_dropout];
    # after the convolution module [conformer_conv_dropout].
    feat_proj_dropout: float = 0.0
    hidden_dropout: float = 0.0
    activation_dropout: float = 0.0
    attention_dropout: float = 0.0
    conv_dropout: float = 0.0
    dtype: str = "float32"  # Compute dtype (e.g. "bfloat16").
    param_dtype: str = "float32"
    remat: str = "none"  # What backward keeps of each block: one of stack.REMAT_POLICIES.
    scan_layers: bool = True  # Blocks under nn.scan (`layers/...`, [L] axis); False: layers_{i}.

    def __post_init__(self):
        object.__setattr__(self, "remat", stack.canonical_remat(self.remat))
        problems = []
        if self.stem not in STEMS:
            problems.append(f"stem={self.stem!r} not in {STEMS}")
        if self.position not in POSITIONS:
            problems.append(f"position={self.position!r} not in {POSITIONS}")
        if self.norm_type not in NORMS:
            problems.append(f"norm_type={self.norm_type!r} not in {NORMS}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation={self.activation!r} not in {sorted(ACTIVATIONS)}")
        if self.hidden_dim % self.num_heads:
            problems.append(f"hidden_dim={self.hidden_dim} not divisible by num_heads")
        if self.position == "rotary" and (self.hidden_dim // self.num_heads) % 2:
            problems.append("rotary needs an even head_dim")
        if self.conv_kernel_size < 1 or self.conv_kernel_size % 2 == 0:
            problems.append(f"conv_kernel_size={self.conv_kernel_size} must be odd")
        for name in ("input_dim", "hidden_dim", "num_layers", "num_heads", "mlp_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if problems:
            raise ValueError("Invalid ConformerConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    def output_length(self, length: int) -> int:
        """Output frames for `length` input frames (the stem's subsampling)."""
        if self.stem == "subsampling":
            return ceil_div(length, 4)
        return length


def _init(init, names):
    return nn.with_logical_partitioning(init, names)


def _dense(config, features, in_names, out_names, *, axis=-1, use_bias=True, name=None):
    """DenseGeneral with logical names on kernel (in_names + out_names) and bias (out_names)."""
    return DenseGeneral(
        features=features,
        kernel_axes=in_names + out_names,
        axis=axis,
        use_bias=use_bias,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        name=name,
    )


def _norm(config, name):
    common = dict(
        epsilon=config.norm_eps,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        scale_init=_init(nn.initializers.ones_init(), ("norm",)),
        name=name,
    )
    if config.norm_type == "rms_norm":
        return nn.RMSNorm(**common)
    # Two-pass variance: matches PyTorch's LayerNorm to float32 rounding.
    return nn.LayerNorm(
        bias_init=_init(nn.initializers.zeros_init(), ("norm",)), use_fast_variance=False, **common
    )


def _rotary(x, base):
    """Standard RoPE (rotate-half) over positions 0..T-1. x: [B, T, H, hd]."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float32) / half)
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq  # [T, hd/2]
    sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]  # [T, 1, hd/2]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class _FeedForward(nn.Module):
    config: ConformerConfig

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.config
        x = _dense(cfg, cfg.mlp_dim, ("embed",), ("mlp",), name="wi")(x)
        x = ACTIVATIONS[cfg.activation](x)
        x = nn.Dropout(cfg.activation_dropout)(x, deterministic=deterministic)
        x = _dense(cfg, cfg.hidden_dim, ("mlp",), ("embed",), name="wo")(x)
        return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class _SelfAttention(nn.Module):
    config: ConformerConfig

    @nn.compact
    def __call__(self, x, mask, deterministic):
        cfg = self.config
        heads, head_dim = cfg.num_heads, cfg.head_dim
        length = x.shape[1]

        def project(name):
            return _dense(cfg, (heads, head_dim), ("embed",), ("heads", "head_dim"), name=name)

        q, k, v = project("query")(x), project("key")(x), project("value")(x)  # [B,T,H,hd]
        if cfg.position == "rotary":
            q, k = _rotary(q, cfg.rope_base), _rotary(k, cfg.rope_base)
        q, k, v = stack.tag(q, "query_proj"), stack.tag(k, "key_proj"), stack.tag(v, "value_proj")
        scale = head_dim**-0.5
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
        if cfg.position == "relative_key":
            left, right = cfg.left_max_positions, cfg.right_max_positions
            table = self.param(
                "distance_embedding",
                _init(nn.initializers.normal(0.02), (None, "head_dim")),
                (left + right + 1, head_dim),
                jnp.dtype(cfg.param_dtype),
            )
            # Only left + right + 1 distinct distances: score q against each, then gather per
            # (query, key) pair, instead of materialising a [T, T, hd] embedding as HF does.
            per_distance = jnp.einsum("bqhd,rd->bhqr", q, table.astype(q.dtype))  # [B,H,T,R]
            pos = np.arange(length)
            index = np.clip(pos[None, :] - pos[:, None], -left, right) + left  # [q, k]
            logits = logits + scale * jnp.take_along_axis(
                per_distance, jnp.asarray(index)[None, None], axis=-1
            )
        # Softmax in float32; a finite fill keeps an all-padding row finite (uniform weights).
        logits = logits.astype(jnp.float32)
        logits = jnp.where(mask[:, None, None, :].astype(bool), logits, -1e30)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        weights = nn.Dropout(cfg.attention_dropout)(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = _dense(
            cfg, cfg.hidden_dim, ("heads", "head_dim"), ("embed",), axis=(-2, -1), name="out"
        )(out)
        return stack.tag(out, "attention_out")


class _DepthwiseConv(nn.Module):
    """Depthwise 1D convolution over time: x float[B, T, D] -> float[B, T, D].

    The kernel is `nn.Conv`'s (`kernel` float[K, 1, D], so checkpoints and converters see the
    same tree), but the product is a sum of K shifted elementwise products accumulated in
    float32: one fused loop. XLA:CPU runs a grouped convolution through a generic loop nest
    whose backward pass inside a scanned stack is ~40x slower (853 against 19 ms for two layers
    at [4, 512, 128], K = 15); TPUs run a depthwise convolution on the vector units either way.
    """

    config: ConformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        taps = cfg.conv_kernel_size
        kernel = self.param(
            "kernel",
            _init(nn.initializers.lecun_normal(), ("conv", None, "mlp")),
            (taps, 1, x.shape[-1]),
            jnp.dtype(cfg.param_dtype),
        )
        left = taps - 1 if cfg.causal_conv else taps // 2
        padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (left, taps - 1 - left), (0, 0)))
        kernel = kernel.astype(jnp.dtype(cfg.dtype)).astype(jnp.float32)
        length = x.shape[1]
        out = sum(padded[:, j : j + length] * kernel[j, 0] for j in range(taps))
        return out.astype(jnp.dtype(cfg.dtype))


class _ConvModule(nn.Module):
    """norm -> pointwise (2D) + GLU -> mask -> depthwise -> norm -> act -> pointwise."""

    config: ConformerConfig

    @nn.compact
    def __call__(self, x, mask, deterministic):
        cfg = self.config
        x = _norm(cfg, "norm")(x)
        # [B,T,D] -> [B,T,2,D]: value half and gate half of the GLU (PyTorch GLU order).
        x = _dense(
            cfg, (2, cfg.hidden_dim), ("embed",), (None, "mlp"), use_bias=False, name="pointwise_in"
        )(x)
        x = x[..., 0, :] * nn.sigmoid(x[..., 1, :])
        # Zeroing padded frames here keeps them out of every valid frame's receptive field.
        x = x * mask[..., None].astype(x.dtype)
        x = _DepthwiseConv(cfg, name="depthwise")(x)
        x = _norm(cfg, "depthwise_norm")(x)
        x = ACTIVATIONS[cfg.activation](x)
        pointwise_out = _dense(
            cfg, cfg.hidden_dim, ("mlp",), ("embed",), use_bias=False, name="pointwise_out"
        )
        x = pointwise_out(x)
        return nn.Dropout(cfg.conv_dropout)(x, deterministic=deterministic)


class ConformerBlock(nn.Module):
    """One macaron Conformer block: x float[B, T, D], mask int32[B, T] -> (float[B, T, D], None).

    The (carry, None) pair is what `nn.scan` wants of its body.
    """

    config: ConformerConfig

    @nn.compact
    def __call__(self, x, mask, deterministic=True):
        cfg = self.config
        x = x + 0.5 * _FeedForward(cfg, name="ffn1")(_norm(cfg, "ffn1_norm")(x), deterministic)
        h = _SelfAttention(cfg, name="attention")(
            _norm(cfg, "attention_norm")(x), mask, deterministic
        )
        x = x + nn.Dropout(cfg.attention_dropout)(h, deterministic=deterministic)
        x = x + _ConvModule(cfg, name="conv")(x, mask, deterministic)
        x = x + 0.5 * _FeedForward(cfg, name="ffn2")(_norm(cfg, "ffn2_norm")(x), deterministic)
        x = _norm(cfg, "final_norm")(x)
        x = nn.with_logical_constraint(
            x, ("activation_batch", "activation_length", "activation_embed")
        )
        return x, None


def _halve_mask(mask):
    """Valid-frame mask after one stride-2, pad-1, 3-tap conv: length L -> ceil(L / 2)."""
    lengths = jnp.sum(mask.astype(jnp.int32), axis=-1, keepdims=True)  # [B, 1]
    out_len = (mask.shape[1] + 1) // 2
    return (jnp.arange(out_len)[None, :] < (lengths + 1) // 2).astype(jnp.int32)


class _SubsamplingStem(nn.Module):
    """Two 3x3 stride-2 convs (ReLU) over (time, feature), then Linear to D. T -> ceil(T/4).

    Masks must be right-padded (valid frames first). Padded frames are zeroed before each conv,
    so a valid output frame sees exactly the zeros the conv padding would give an unpadded clip.
    """

    config: ConformerConfig

    @nn.compact
    def __call__(self, features, mask):
        cfg = self.config
        x = features[..., None]  # [B,T,F] -> [B,T,F,1]
        for i in range(2):
            x = x * mask[:, :, None, None].astype(x.dtype)
            x = nn.Conv(
                features=cfg.subsampling_channels,
                kernel_size=(3, 3),
                strides=(2, 2),
                padding=((1, 1), (1, 1)),
                dtype=jnp.dtype(cfg.dtype),
                param_dtype=jnp.dtype(cfg.param_dtype),
                # One logical name per dimension (Flax rejects a repeated one): time x freq.
                kernel_init=_init(nn.initializers.lecun_normal(), ("conv", None, None, "mlp")),
                bias_init=_init(nn.initializers.zeros_init(), ("mlp",)),
                name=f"conv{i + 1}",
            )(x)  # [B,T,F,C] -> [B,ceil(T/2),ceil(F/2),C]
            x = nn.relu(x)
            mask = _halve_mask(mask)
        batch, frames, bins, channels = x.shape
        x = x.reshape(batch, frames, bins * channels)  # [B,T/4,F/4,C] -> [B,T/4,F/4*C]
        x = _dense(cfg, cfg.hidden_dim, ("enc_features",), ("embed",), name="dense")(x)
        return x, mask


class ConformerEncoder(nn.Module):
    """Conformer encoder (CONTRACTS.md section 4).

    `__call__(features float[B, T, F], mask int32[B, T], *, deterministic=True)
    -> (hidden float[B, T', D], mask int32[B, T'])`, T' = `config.output_length(T)`.
    """

    config: ConformerConfig

    @nn.compact
    def __call__(self, features, mask, *, deterministic=True):
        cfg = self.config
        if features.shape[-1] != cfg.input_dim:
            raise ValueError(
                f"features have {features.shape[-1]} channels, ConformerConfig.input_dim is "
                f"{cfg.input_dim}"
            )
        features = features.astype(jnp.dtype(cfg.dtype))
        mask = mask.astype(jnp.int32)
        if cfg.stem == "projection":
            x = _norm(cfg, "feature_norm")(features)
            x = _dense(
                cfg, cfg.hidden_dim, ("enc_features",), ("embed",), name="feature_projection"
            )(x)
        else:
            x, mask = _SubsamplingStem(cfg, name="subsampling")(features, mask)
        x = nn.Dropout(cfg.feat_proj_dropout)(x, deterministic=deterministic)
        x = x * mask[..., None].astype(x.dtype)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        # Call arguments (0 is the module): x, mask, deterministic (a Python bool).
        block = stack.rematted(ConformerBlock, cfg.remat, (3,), scanned=cfg.scan_layers)
        if cfg.scan_layers:
            layers = stack.scanned(block, cfg.num_layers, (nn.broadcast, nn.broadcast))
            x, _ = layers(cfg, name=stack.LAYER_AXIS)(x, mask, deterministic)
        else:
            for i in range(cfg.num_layers):
                x, _ = block(cfg, name=stack.unrolled_name(i))(x, mask, deterministic)
        return x * mask[..., None].astype(x.dtype), mask


def abstract_variables(config: ConformerConfig, length: int = 8):
    """Shapes/dtypes (with logical axis boxes) of the encoder's variables; allocates nothing."""
    model = ConformerEncoder(config)
    features = jax.ShapeDtypeStruct((1, length, config.input_dim), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return jax.eval_shape(lambda f, m: model.init(jax.random.PRNGKey(0), f, m), features, mask)


def count_params(config: ConformerConfig) -> int:
    """Number of parameters of `ConformerEncoder(config)`, computed abstractly."""
    params = abstract_variables(config)["params"]
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))

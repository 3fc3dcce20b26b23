"""HF w2v-BERT 2.0 (`Wav2Vec2BertModel`) folder -> `ConformerConfig` + `ConformerEncoder` params.

Reads `config.json` and the weights of a folder the user provides (`model.safetensors`, or the
shards named by `model.safetensors.index.json`) with `convert/safetensors_io.py`, through
safetensors' numpy API: no torch, no pickle, no download. Keys may carry the `wav2vec2_bert.`
prefix of HF's task models (CTC, classification); task heads and the SpecAugment embedding
(`masked_spec_embed`) are skipped, every other encoder tensor must be used exactly once.

Layout differences handled here: PyTorch Linear weights are [out, in] (ours [in, out], attention
split per head), 1x1 Conv1d weights are [out, in, 1], depthwise Conv1d weights are [D, 1, K]
(ours [K, 1, D]), and the GLU pointwise conv's 2D outputs become our [D, 2, D] kernel (value
half first, as torch's GLU).

    config, params = load_hf_w2v_bert("/path/to/w2v-bert-2.0")
    hidden, mask = ConformerEncoder(config).apply({"params": params}, features, mask)
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spectron_jax.convert import safetensors_io
from spectron_jax.nn import conformer

_PREFIX = "wav2vec2_bert."
# Tensors of a Wav2Vec2BertModel that the encoder does not use (SpecAugment is done elsewhere).
_SKIPPED = ("masked_spec_embed",)
_ENCODER_ROOTS = ("feature_projection.", "encoder.", "adapter.", "intermediate_ffn.")


def config_from_hf(hf_config: dict, **overrides) -> conformer.ConformerConfig:
    """Maps an HF `Wav2Vec2BertConfig` dict to a `ConformerConfig`; `overrides` win (e.g. dtype).

    Raises ValueError for features the encoder does not implement (adapter, HF's rotary and
    Transformer-XL `relative` positions) rather than load a model that computes something else.
    """
    problems = []
    if hf_config.get("model_type", "wav2vec2-bert") != "wav2vec2-bert":
        problems.append(f"model_type={hf_config.get('model_type')!r} is not 'wav2vec2-bert'")
    if hf_config.get("add_adapter", False):
        problems.append("add_adapter=true (the convolutional adapter) is not supported")
    if hf_config.get("use_intermediate_ffn_before_adapter", False):
        problems.append("use_intermediate_ffn_before_adapter=true is not supported")
    position = hf_config.get("position_embeddings_type", "relative_key")
    if position not in ("relative_key", None):
        problems.append(
            f"position_embeddings_type={position!r} is not supported (only 'relative_key' or "
            "null; our 'rotary' is standard RoPE on q/k, not HF's rotation of the input)"
        )
    activation = hf_config.get("hidden_act", "swish")
    if activation not in conformer.ACTIVATIONS:
        problems.append(f"hidden_act={activation!r} not in {sorted(conformer.ACTIVATIONS)}")
    if problems:
        raise ValueError("Unsupported w2v-BERT config: " + "; ".join(problems))
    kwargs = dict(
        input_dim=hf_config.get("feature_projection_input_dim", 160),
        stem="projection",
        hidden_dim=hf_config.get("hidden_size", 1024),
        num_layers=hf_config.get("num_hidden_layers", 24),
        num_heads=hf_config.get("num_attention_heads", 16),
        mlp_dim=hf_config.get("intermediate_size", 4096),
        conv_kernel_size=hf_config.get("conv_depthwise_kernel_size", 31),
        causal_conv=True,
        activation=activation,
        norm_type="layer_norm",
        norm_eps=hf_config.get("layer_norm_eps", 1e-5),
        position="relative_key" if position == "relative_key" else "none",
        left_max_positions=hf_config.get("left_max_position_embeddings", 64),
        right_max_positions=hf_config.get("right_max_position_embeddings", 8),
        feat_proj_dropout=hf_config.get("feat_proj_dropout", 0.0),
        hidden_dropout=hf_config.get("hidden_dropout", 0.0),
        activation_dropout=hf_config.get("activation_dropout", 0.0),
        attention_dropout=hf_config.get("attention_dropout", 0.0),
        conv_dropout=hf_config.get("conformer_conv_dropout", 0.0),
    )
    kwargs.update(overrides)
    return conformer.ConformerConfig(**kwargs)


class _Tensors:
    """Takes tensors by HF name, tracking which were used."""

    def __init__(self, tensors: dict[str, np.ndarray], dtype):
        self._tensors = {
            k[len(_PREFIX) :] if k.startswith(_PREFIX) else k: v for k, v in tensors.items()
        }
        self._dtype = dtype
        self.used: set[str] = set()

    def __call__(self, key: str) -> np.ndarray:
        if key not in self._tensors:
            raise KeyError(f"w2v-BERT checkpoint lacks tensor {key!r}")
        self.used.add(key)
        return np.asarray(self._tensors[key]).astype(self._dtype)

    def unused_encoder_keys(self) -> list[str]:
        return sorted(
            k
            for k in self._tensors
            if k not in self.used and k not in _SKIPPED and k.startswith(_ENCODER_ROOTS)
        )


def params_from_hf(tensors: dict[str, np.ndarray], config: conformer.ConformerConfig) -> dict:
    """HF tensor dict -> our `params` tree (numpy, `config.param_dtype`), shapes checked."""
    take = _Tensors(tensors, jnp.dtype(config.param_dtype))  # jnp: knows bfloat16
    heads, head_dim = config.num_heads, config.head_dim

    def norm(prefix):
        return {"scale": take(f"{prefix}.weight"), "bias": take(f"{prefix}.bias")}

    def linear(prefix, bias=True):
        out = {"kernel": take(f"{prefix}.weight").T}  # [out, in] -> [in, out]
        if bias:
            out["bias"] = take(f"{prefix}.bias")
        return out

    def ffn(prefix):
        return {
            "wi": linear(f"{prefix}.intermediate_dense"),
            "wo": linear(f"{prefix}.output_dense"),
        }

    def qkv(prefix):
        kernel = take(f"{prefix}.weight").T  # [D, H*hd]
        return {
            "kernel": kernel.reshape(-1, heads, head_dim),
            "bias": take(f"{prefix}.bias").reshape(heads, head_dim),
        }

    params = {
        "feature_norm": norm("feature_projection.layer_norm"),
        "feature_projection": linear("feature_projection.projection"),
    }
    for i in range(config.num_layers):
        p = f"encoder.layers.{i}"
        attention = {
            name: qkv(f"{p}.self_attn.linear_{name[0]}") for name in ("query", "key", "value")
        }
        out_kernel = take(f"{p}.self_attn.linear_out.weight").T  # [H*hd, D]
        attention["out"] = {
            "kernel": out_kernel.reshape(heads, head_dim, -1),
            "bias": take(f"{p}.self_attn.linear_out.bias"),
        }
        if config.position == "relative_key":
            attention["distance_embedding"] = take(f"{p}.self_attn.distance_embedding.weight")
        pw_in = take(f"{p}.conv_module.pointwise_conv1.weight")[:, :, 0]  # [2D, D]
        pw_out = take(f"{p}.conv_module.pointwise_conv2.weight")[:, :, 0]  # [D, D]
        depthwise = take(f"{p}.conv_module.depthwise_conv.weight")  # [D, 1, K]
        params[f"layers_{i}"] = {
            "ffn1_norm": norm(f"{p}.ffn1_layer_norm"),
            "ffn1": ffn(f"{p}.ffn1"),
            "attention_norm": norm(f"{p}.self_attn_layer_norm"),
            "attention": attention,
            "conv": {
                "norm": norm(f"{p}.conv_module.layer_norm"),
                # [2D, D] -> [D, 2, D]: rows 0..D-1 are GLU values, D..2D-1 gates.
                "pointwise_in": {"kernel": pw_in.T.reshape(pw_in.shape[1], 2, -1)},
                "depthwise": {"kernel": depthwise.transpose(2, 1, 0)},
                "depthwise_norm": norm(f"{p}.conv_module.depthwise_layer_norm"),
                "pointwise_out": {"kernel": pw_out.T},
            },
            "ffn2_norm": norm(f"{p}.ffn2_layer_norm"),
            "ffn2": ffn(f"{p}.ffn2"),
            "final_norm": norm(f"{p}.final_layer_norm"),
        }
    unused = take.unused_encoder_keys()
    if unused:
        raise ValueError(
            f"{len(unused)} encoder tensors were not used (config and checkpoint disagree?): "
            f"{unused[:8]}"
        )
    _check_shapes(params, config)
    return params


def _check_shapes(params: dict, config: conformer.ConformerConfig) -> None:
    """Raises ValueError unless `params` has exactly the tree and shapes the module creates."""
    expected = nn.unbox(conformer.abstract_variables(config)["params"])
    want = {
        jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)
    }
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want != got:
        diff = sorted(
            f"{k}: expected {want.get(k)}, got {got.get(k)}"
            for k in set(want) | set(got)
            if want.get(k) != got.get(k)
        )
        raise ValueError(
            "converted w2v-BERT params do not match the module: " + "; ".join(diff[:8])
        )


def load_hf_w2v_bert(
    folder: str | os.PathLike, **config_overrides
) -> tuple[conformer.ConformerConfig, dict]:
    """Reads an HF w2v-BERT folder -> (ConformerConfig, params tree of numpy arrays)."""
    config = config_from_hf(safetensors_io.read_config(folder), **config_overrides)
    return config, params_from_hf(safetensors_io.read_tensors(folder), config)

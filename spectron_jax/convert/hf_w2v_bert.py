"""HF w2v-BERT 2.0 (`Wav2Vec2BertModel`) folder <-> `ConformerConfig` + `ConformerEncoder` params.

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

Export (`save_hf_w2v_bert`, `params_to_hf`) inverts every one of these layout changes exactly
(transposes and reshapes only, stored dtype kept), so HF -> ours -> HF reproduces each tensor the
import reads bit for bit. It writes a bare `Wav2Vec2BertModel` and, by construction, not the
tensors the import drops:
  masked_spec_embed: SpecAugment's learned mask vector (float32[D]); our SpecAugment
    (`nn/spec_augment.py`) runs on the input features and has no such parameter. transformers
    initialises it at random when the config asks for masking (mask_time_prob > 0); it is only
    read when training with SpecAugment, never by inference.
  task heads and the `wav2vec2_bert.` prefix of `Wav2Vec2BertFor*` models (lm_head, projector,
    classifier, ...): not part of the encoder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spectron_jax.convert import safetensors_io
from spectron_jax.nn import conformer, stack

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
    if config.scan_layers:
        params = stack.stack_layers(params, config.num_layers)
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


# ---------------------------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------------------------


def config_to_hf(config: conformer.ConformerConfig, base: Mapping | None = None) -> dict:
    """`ConformerConfig` -> an HF `Wav2Vec2BertConfig` dict that `config_from_hf` maps back to it.

    Args:
      config: a w2v-BERT-shaped encoder (projection stem, causal LayerNorm conformer,
        relative_key or no positions).
      base: an HF config dict (e.g. the imported checkpoint's) whose keys this module does not
        map (SpecAugment probabilities, layerdrop, CTC vocabulary, ...) are kept; None leaves
        them to transformers' defaults.

    Raises:
      ValueError: the config uses a feature `Wav2Vec2BertModel` does not have.
    """
    c = config
    problems = [
        f"{name}={getattr(c, name)!r} (HF has {want!r})"
        for name, want in (
            ("stem", "projection"),
            ("causal_conv", True),
            ("norm_type", "layer_norm"),
        )
        if getattr(c, name) != want
    ]
    if c.position not in ("relative_key", "none"):
        problems.append(f"position={c.position!r} (HF's rotary differs; see config_from_hf)")
    if problems:
        raise ValueError("config cannot be exported as w2v-BERT: " + "; ".join(problems))
    hf = dict(base or {})
    hf.update(
        model_type="wav2vec2-bert",
        architectures=["Wav2Vec2BertModel"],
        feature_projection_input_dim=c.input_dim,
        hidden_size=c.hidden_dim,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.mlp_dim,
        conv_depthwise_kernel_size=c.conv_kernel_size,
        hidden_act=c.activation,
        layer_norm_eps=c.norm_eps,
        position_embeddings_type="relative_key" if c.position == "relative_key" else None,
        left_max_position_embeddings=c.left_max_positions,
        right_max_position_embeddings=c.right_max_positions,
        feat_proj_dropout=c.feat_proj_dropout,
        hidden_dropout=c.hidden_dropout,
        activation_dropout=c.activation_dropout,
        attention_dropout=c.attention_dropout,
        conformer_conv_dropout=c.conv_dropout,
        add_adapter=False,
        use_intermediate_ffn_before_adapter=False,
        dtype=c.param_dtype,
    )
    return hf


def params_to_hf(params: dict, config: conformer.ConformerConfig) -> dict[str, np.ndarray]:
    """Our `ConformerEncoder` params (numpy or jax, boxed or not) -> `Wav2Vec2BertModel` tensors.

    The exact inverse of `params_from_hf` (dtype kept); names carry no `wav2vec2_bert.` prefix.
    Raises ValueError unless the tree is exactly the one `ConformerEncoder(config)` creates.
    """
    params = jax.tree_util.tree_map(np.asarray, nn.unbox(params))
    _check_shapes(params, config)
    if config.scan_layers:
        params = stack.unstack_layers(params, config.num_layers)
    out: dict[str, np.ndarray] = {}

    def norm(prefix, p):
        out[f"{prefix}.weight"], out[f"{prefix}.bias"] = p["scale"], p["bias"]

    def linear(prefix, p):
        out[f"{prefix}.weight"] = p["kernel"].T  # [in, out] -> [out, in]
        if "bias" in p:
            out[f"{prefix}.bias"] = p["bias"]

    def ffn(prefix, p):
        linear(f"{prefix}.intermediate_dense", p["wi"])
        linear(f"{prefix}.output_dense", p["wo"])

    norm("feature_projection.layer_norm", params["feature_norm"])
    linear("feature_projection.projection", params["feature_projection"])
    for i in range(config.num_layers):
        p, layer = f"encoder.layers.{i}", params[f"layers_{i}"]
        attention, conv = layer["attention"], layer["conv"]
        for name in ("query", "key", "value"):
            kernel, bias = attention[name]["kernel"], attention[name]["bias"]  # [D, H, hd], [H, hd]
            out[f"{p}.self_attn.linear_{name[0]}.weight"] = kernel.reshape(len(kernel), -1).T
            out[f"{p}.self_attn.linear_{name[0]}.bias"] = bias.reshape(-1)
        kernel = attention["out"]["kernel"]  # [H, hd, D] -> [D, H*hd]
        out[f"{p}.self_attn.linear_out.weight"] = kernel.reshape(-1, kernel.shape[-1]).T
        out[f"{p}.self_attn.linear_out.bias"] = attention["out"]["bias"]
        if config.position == "relative_key":
            out[f"{p}.self_attn.distance_embedding.weight"] = attention["distance_embedding"]
        pw_in = conv["pointwise_in"]["kernel"]  # [D, 2, D] -> [2D, D, 1], GLU values first
        pw_out = conv["pointwise_out"]["kernel"]  # [D, D] -> [D, D, 1]
        depthwise = conv["depthwise"]["kernel"]  # [K, 1, D] -> [D, 1, K]
        out[f"{p}.conv_module.pointwise_conv1.weight"] = pw_in.reshape(len(pw_in), -1).T[..., None]
        out[f"{p}.conv_module.depthwise_conv.weight"] = depthwise.transpose(2, 1, 0)
        out[f"{p}.conv_module.pointwise_conv2.weight"] = pw_out.T[..., None]
        norm(f"{p}.conv_module.layer_norm", conv["norm"])
        norm(f"{p}.conv_module.depthwise_layer_norm", conv["depthwise_norm"])
        for name in ("ffn1", "ffn2"):
            norm(f"{p}.{name}_layer_norm", layer[f"{name}_norm"])
            ffn(f"{p}.{name}", layer[name])
        norm(f"{p}.self_attn_layer_norm", layer["attention_norm"])
        norm(f"{p}.final_layer_norm", layer["final_norm"])
    return {name: np.ascontiguousarray(value) for name, value in out.items()}


def save_hf_w2v_bert(
    folder: str | os.PathLike,
    params: dict,
    config: conformer.ConformerConfig,
    *,
    base_config: Mapping | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Writes an HF folder (config.json + safetensors) that `Wav2Vec2BertModel` loads.

    Args:
      folder: created if absent.
      params: `ConformerEncoder(config)` params; written in their own dtype.
      config: the encoder; see `config_to_hf` for what can be exported.
      base_config: HF config dict whose unmapped keys are kept (pass the imported checkpoint's
        `safetensors_io.read_config(folder)` to round-trip SpecAugment and training settings).
      max_shard_bytes: largest safetensors shard; None writes one model.safetensors.
    """
    hf_config = config_to_hf(config, base_config)  # Validates before anything is written.
    safetensors_io.write_folder(
        folder, hf_config, params_to_hf(params, config), max_shard_bytes=max_shard_bytes
    )

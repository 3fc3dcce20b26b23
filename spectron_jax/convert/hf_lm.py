"""HF decoder LMs (Gemma 3 text, Llama, Qwen2) <-> `DecoderConfig` and the `Decoder` param tree.

Import: `load_hf_lm(folder)` reads config.json + safetensors (sharded or not) into
`(DecoderConfig, params)`, and `special_ids_from_hf(folder)` the BOS / EOS / PAD ids; export:
`save_hf_lm(folder, config, params, model_type, bos_id=, eos_id=, pad_id=)` writes the same
names, shapes and dtypes back, so HF -> ours -> HF reproduces every tensor bit for bit.

The export states the model's contract rather than leaving it to transformers' class defaults
(Llama's would say BOS 1, EOS 2 and 2048 positions whatever the model was trained with):
config.json carries `max_position_embeddings` and the special ids, and generation_config.json
the ids `generate` uses (EOS stops a row, PAD fills the rows that stopped).

Layout changes (all exact: transposes and reshapes only):
  HF Linear weight [out, in]          <-> Dense kernel [in, out]
  q/k/v_proj weight [N*Dh, D]         <-> DenseGeneral kernel [D, N, Dh], bias [N*Dh] <-> [N, Dh]
  o_proj weight [D, H*Dh]             <-> DenseGeneral kernel [H, Dh, D]
RMSNorm weights are stored as-is (Gemma's `1 + w` lives in the module), and RoPE needs no
permutation because `apply_rope` uses HF's rotate-half layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from spectron_jax.convert import safetensors_io
from spectron_jax.nn import stack
from spectron_jax.nn.decoder import Decoder, DecoderConfig

SUPPORTED_MODEL_TYPES = ("gemma3_text", "gemma3", "llama", "qwen2")
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "silu": "silu"}
_TO_HF_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}
# Buffers that older checkpoints saved and that carry no learned state.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
GENERATION_CONFIG_FILE = "generation_config.json"
# Our keyword -> the HF config / generation config key.
_SPECIAL_ID_KEYS = {"bos_id": "bos_token_id", "eos_id": "eos_token_id", "pad_id": "pad_token_id"}

Params = dict[str, Any]
# One id, or several EOS ids (any of them ends a sequence, as Gemma 3's generation config has).
TokenIds = int | list[int] | None


# ---------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------


def _rope_thetas(hf: Mapping, family: str) -> tuple[float, float | None]:
    """(global theta, local theta) from `rope_parameters` (transformers 5) or the older keys."""
    params = hf.get("rope_parameters")
    if family == "gemma3":
        if params and "full_attention" in params:
            full, local = params["full_attention"], params.get("sliding_attention") or {}
        else:
            full = dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 1e6))
            local = {"rope_theta": hf.get("rope_local_base_freq", 1e4)}
        for kind in (full, local):
            if kind.get("rope_type", kind.get("type", "default")) != "default":
                raise NotImplementedError(f"RoPE scaling {kind} is not supported yet")
        return float(full.get("rope_theta", 1e6)), float(local.get("rope_theta", 1e4))
    params = params or dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 1e4))
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise NotImplementedError(f"RoPE scaling {params} is not supported yet")
    return float(params.get("rope_theta", 1e4)), None


def _window_pattern(layer_types: list[str], num_layers: int) -> int:
    """The `sliding_window_pattern` whose local/global layout equals HF's `layer_types`."""
    local = [t == "sliding_attention" for t in layer_types]
    if all(local):
        return 0
    for pattern in range(1, num_layers + 1):
        if local == [(i + 1) % pattern != 0 for i in range(num_layers)]:
            return pattern
    raise NotImplementedError(
        f"layer_types {layer_types} is not 'every Nth layer global'; not supported"
    )


def config_from_hf(hf: Mapping, **overrides: Any) -> DecoderConfig:
    """HF config.json dict -> DecoderConfig (float32 unless `overrides` say otherwise)."""
    model_type = hf.get("model_type")
    if model_type == "gemma3":
        hf = dict(hf["text_config"], model_type="gemma3_text")
        model_type = "gemma3_text"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"model_type {model_type!r} not supported; expected one of {SUPPORTED_MODEL_TYPES}"
        )
    gemma = model_type == "gemma3_text"
    family = "gemma3" if gemma else model_type
    num_layers = hf["num_hidden_layers"]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    act = hf.get("hidden_activation" if gemma else "hidden_act") or hf.get("hidden_act")
    if act not in _ACTIVATIONS:
        raise NotImplementedError(f"activation {act!r} not supported")
    theta, local_theta = _rope_thetas(hf, family)

    if gemma:
        default_pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % default_pattern else "full_attention"
            for i in range(num_layers)
        ]
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
        raise NotImplementedError("Qwen2 use_sliding_window=True is not supported")
    else:
        layer_types = ["full_attention"] * num_layers
    if hf.get("use_bidirectional_attention"):
        raise NotImplementedError("use_bidirectional_attention is not supported")
    any_local = "sliding_attention" in layer_types
    attention_bias = bool(hf.get("attention_bias", False))

    kwargs = dict(
        vocab_size=hf["vocab_size"],
        num_layers=num_layers,
        d_model=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        mlp_dim=hf["intermediate_size"],
        activation=_ACTIVATIONS[act],
        norm_variant="gemma" if gemma else "llama",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qk_norm=gemma,
        post_norms=gemma,
        rope_theta=theta,
        rope_local_theta=local_theta if any_local else None,
        sliding_window=hf.get("sliding_window") if any_local else None,
        sliding_window_pattern=_window_pattern(layer_types, num_layers) if any_local else 0,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)) if gemma else None,
        scale_embeddings=gemma,
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        final_logit_softcap=hf.get("final_logit_softcapping") if gemma else None,
        # transformers' Gemma 3 attention never applies `attn_logit_softcapping` (Gemma 3 dropped
        # it for QK-norm); follow the implementation, not the config key.
        attn_logit_softcap=None,
        qkv_bias=model_type == "qwen2" or attention_bias,
        attn_out_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        max_position_embeddings=hf.get("max_position_embeddings"),
    )
    kwargs.update(overrides)
    return DecoderConfig(**kwargs)


def config_to_hf(
    config: DecoderConfig,
    model_type: str,
    *,
    bos_id: TokenIds,
    eos_id: TokenIds,
    pad_id: TokenIds,
) -> dict:
    """DecoderConfig -> an HF config.json dict for `model_type` (gemma3_text, llama or qwen2).

    The special ids are required and written as given, None as null: a missing key would let
    transformers substitute its class default, an id the model was never trained with.

    Raises:
      ValueError: the config is not of `model_type`'s family, lacks `max_position_embeddings`,
        or an id is outside the vocabulary.
    """
    c = config
    if c.max_position_embeddings is None:
        raise ValueError(
            "config.max_position_embeddings is None: set it (dataclasses.replace) to the longest "
            "sequence the model was trained for, or transformers assumes its class default"
        )
    ids = _check_special_ids(dict(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id), c.vocab_size)
    hf = dict(
        model_type=model_type,
        max_position_embeddings=c.max_position_embeddings,
        **{_SPECIAL_ID_KEYS[k]: v for k, v in ids.items()},
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.mlp_dim,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings,
        dtype=c.param_dtype,
    )
    act = _TO_HF_ACTIVATION[c.activation]
    layer_types = [
        "sliding_attention" if c.is_local_layer(i) else "full_attention"
        for i in range(c.num_layers)
    ]
    if model_type == "gemma3_text":
        expected = dict(norm_variant="gemma", qk_norm=True, post_norms=True, scale_embeddings=True)
        _check_family(c, model_type, expected)
        hf.update(
            architectures=["Gemma3ForCausalLM"],
            hidden_activation=act,
            query_pre_attn_scalar=_int_if_integral(c.query_pre_attn_scalar or c.head_dim),
            sliding_window=c.sliding_window,
            layer_types=layer_types,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": c.rope_theta},
                "sliding_attention": {
                    "rope_type": "default",
                    "rope_theta": c.rope_local_theta or c.rope_theta,
                },
            },
            final_logit_softcapping=c.final_logit_softcap,
            attn_logit_softcapping=c.attn_logit_softcap,
            attention_bias=c.qkv_bias,
        )
    elif model_type in ("llama", "qwen2"):
        expected = dict(
            norm_variant="llama",
            qk_norm=False,
            post_norms=False,
            scale_embeddings=False,
            sliding_window=None,
        )
        if model_type == "qwen2":
            expected.update(qkv_bias=True, attn_out_bias=False, mlp_bias=False)
        _check_family(c, model_type, expected)
        hf.update(
            architectures=["LlamaForCausalLM" if model_type == "llama" else "Qwen2ForCausalLM"],
            hidden_act=act,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        )
        if model_type == "llama":
            hf.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    else:
        raise NotImplementedError(f"export to model_type {model_type!r} not supported")
    return hf


def _check_special_ids(ids: Mapping[str, TokenIds], vocab_size: int) -> dict[str, TokenIds]:
    """`ids` with int-like values as int and EOS sequences as lists; ValueError if out of range."""
    out: dict[str, TokenIds] = {}
    for name, value in ids.items():
        if value is None:
            out[name] = None
            continue
        many = isinstance(value, Sequence) and not isinstance(value, str)
        if many and name != "eos_id":
            raise ValueError(f"{name} must be one id, got {value!r}")
        values = [int(v) for v in value] if many else [int(value)]
        if not values or not all(0 <= v < vocab_size for v in values):
            raise ValueError(f"{name}={value!r} is not in the vocabulary [0, {vocab_size})")
        out[name] = values if many else values[0]
    return out


def _int_if_integral(x: float) -> int | float:
    # transformers' strict config classes type some of these fields as int.
    return int(x) if float(x).is_integer() else x


def _check_family(config: DecoderConfig, model_type: str, expected: Mapping) -> None:
    wrong = {k: getattr(config, k) for k, v in expected.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError(f"config cannot be exported as {model_type}: {wrong} (need {expected})")


# ---------------------------------------------------------------------------------------------
# Weights.
# ---------------------------------------------------------------------------------------------

# (import, export) pairs; each is exact (a transpose and/or reshape).
_Transform = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _identity() -> _Transform:
    return (lambda w: w), (lambda p: p)


def _linear() -> _Transform:
    return (lambda w: w.T), (lambda p: p.T)


def _heads_in(n: int, dh: int) -> _Transform:
    # [N*Dh, D] -> [D, N, Dh]
    return (lambda w: w.T.reshape(w.shape[1], n, dh)), (lambda p: p.reshape(p.shape[0], n * dh).T)


def _heads_bias(n: int, dh: int) -> _Transform:
    return (lambda w: w.reshape(n, dh)), (lambda p: p.reshape(n * dh))


def _heads_out(n: int, dh: int) -> _Transform:
    # [D, H*Dh] -> [H, Dh, D]
    return (lambda w: w.T.reshape(n, dh, w.shape[0])), (lambda p: p.reshape(n * dh, p.shape[2]).T)


def weight_map(
    config: DecoderConfig, prefix: str = "model."
) -> dict[str, tuple[tuple, _Transform]]:
    """HF tensor name -> (path in our unrolled param tree, (import, export) transforms).

    The paths name blocks `layers_{i}`; a scanned config's tree is that one stacked
    (`stack.stack_layers`), which `params_from_hf` / `params_to_hf` do at the boundary.
    """
    c = config
    out: dict[str, tuple[tuple, _Transform]] = {
        f"{prefix}embed_tokens.weight": (("embedder", "embedding"), _identity()),
        f"{prefix}norm.weight": (("final_norm", "scale"), _identity()),
    }
    if not c.tie_embeddings:
        out["lm_head.weight"] = (("lm_head", "kernel"), _linear())
    for i in range(c.num_layers):
        hf, us = f"{prefix}layers.{i}.", f"layers_{i}"
        names = {
            "input_layernorm.weight": ((us, "pre_attention_norm", "scale"), _identity()),
            "mlp.gate_proj.weight": ((us, "mlp", "gate", "kernel"), _linear()),
            "mlp.up_proj.weight": ((us, "mlp", "up", "kernel"), _linear()),
            "mlp.down_proj.weight": ((us, "mlp", "down", "kernel"), _linear()),
        }
        if c.post_norms:
            names.update(
                {
                    "post_attention_layernorm.weight": (
                        (us, "post_attention_norm", "scale"),
                        _identity(),
                    ),
                    "pre_feedforward_layernorm.weight": (
                        (us, "pre_mlp_norm", "scale"),
                        _identity(),
                    ),
                    "post_feedforward_layernorm.weight": (
                        (us, "post_mlp_norm", "scale"),
                        _identity(),
                    ),
                }
            )
        else:
            # Llama's "post_attention_layernorm" is the norm before the MLP.
            names["post_attention_layernorm.weight"] = ((us, "pre_mlp_norm", "scale"), _identity())
        for proj, n in (("q", c.num_heads), ("k", c.num_kv_heads), ("v", c.num_kv_heads)):
            names[f"self_attn.{proj}_proj.weight"] = (
                (us, "attn", f"{proj}_proj", "kernel"),
                _heads_in(n, c.head_dim),
            )
            if c.qkv_bias:
                names[f"self_attn.{proj}_proj.bias"] = (
                    (us, "attn", f"{proj}_proj", "bias"),
                    _heads_bias(n, c.head_dim),
                )
        names["self_attn.o_proj.weight"] = (
            (us, "attn", "o_proj", "kernel"),
            _heads_out(c.num_heads, c.head_dim),
        )
        if c.attn_out_bias:
            names["self_attn.o_proj.bias"] = ((us, "attn", "o_proj", "bias"), _identity())
        if c.qk_norm:
            names["self_attn.q_norm.weight"] = ((us, "attn", "q_norm", "scale"), _identity())
            names["self_attn.k_norm.weight"] = ((us, "attn", "k_norm", "scale"), _identity())
        if c.mlp_bias:
            for proj, ours in (("gate", "gate"), ("up", "up"), ("down", "down")):
                names[f"mlp.{proj}_proj.bias"] = ((us, "mlp", ours, "bias"), _identity())
        out.update({hf + k: v for k, v in names.items()})
    return out


def detect_prefix(names: list[str] | set[str]) -> str:
    """The HF prefix before `embed_tokens.weight` ("model.", "model.language_model.", ...)."""
    for name in names:
        if name.endswith("embed_tokens.weight"):
            return name[: -len("embed_tokens.weight")]
    raise KeyError("no '*embed_tokens.weight' tensor: not a decoder LM checkpoint")


def expected_shapes(config: DecoderConfig) -> dict[tuple, tuple[int, ...]]:
    """Param path -> shape of the unrolled `Decoder(config)`, traced abstractly (no memory)."""
    config = dataclasses.replace(config, scan_layers=False)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda t: Decoder(config).init(jax.random.PRNGKey(0), t, method=Decoder.forward_tokens),
        tokens,
    )
    flat = traverse_util.flatten_dict(nn.unbox(shapes["params"]))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def params_from_hf(
    tensors: Mapping[str, np.ndarray],
    config: DecoderConfig,
    dtype: Any = None,
    *,
    text_only: bool = False,
) -> Params:
    """HF tensors -> our nested param dict (numpy; stored dtype unless `dtype` is given).

    Args:
      tensors: HF name -> array.
      config: the architecture the tensors must fill exactly.
      dtype: cast to this dtype; None keeps the stored one.
      text_only: ignore tensors outside the LM (a multimodal Gemma 3 checkpoint's vision tower).

    Raises:
      KeyError: a tensor the config needs is missing.
      ValueError: a tensor is left over (a config / checkpoint mismatch) or has the wrong shape.
    """
    prefix = detect_prefix(list(tensors))
    mapping = weight_map(config, prefix)
    missing = sorted(set(mapping) - set(tensors))
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensors the config needs: {missing[:5]}")
    leftover = set(tensors) - set(mapping)
    if config.tie_embeddings:
        leftover.discard("lm_head.weight")  # some exporters write the tied head anyway
    leftover = sorted(n for n in leftover if not n.endswith(_IGNORED_SUFFIXES))
    if text_only:
        leftover = [n for n in leftover if n.startswith(prefix)]
    if leftover:
        raise ValueError(f"{len(leftover)} checkpoint tensors unused by the config: {leftover[:5]}")
    shapes = expected_shapes(config)
    params: Params = {}
    for name, (path, (to_ours, _)) in mapping.items():
        if int(np.prod(tensors[name].shape)) != int(np.prod(shapes[path])):
            raise ValueError(
                f"{name} has shape {tensors[name].shape}; the config needs {shapes[path]} elements"
            )
        value = np.asarray(to_ours(tensors[name]))
        if value.shape != shapes[path]:
            raise ValueError(f"{name} -> {value.shape}, but the config needs {shapes[path]}")
        if dtype is not None:
            value = value.astype(dtype)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return stack.stack_layers(params, config.num_layers) if config.scan_layers else params


def params_to_hf(params: Params, config: DecoderConfig, prefix: str = "model.") -> dict:
    """Our param tree (numpy or jax arrays, boxed or not; scanned or not) -> HF tensors (numpy)."""
    params = nn.unbox(params)
    if config.scan_layers:
        params = stack.unstack_layers(params, config.num_layers)
    out = {}
    for name, (path, (_, to_hf)) in weight_map(config, prefix).items():
        node = params
        for key in path:
            node = node[key]
        node = getattr(node, "value", node)  # nn.LogicallyPartitioned boxes
        out[name] = np.ascontiguousarray(to_hf(np.asarray(node)))
    return out


# ---------------------------------------------------------------------------------------------
# Folders.
# ---------------------------------------------------------------------------------------------


def load_hf_lm(
    folder: str | os.PathLike, weight_dtype: Any = None, **config_overrides: Any
) -> tuple[DecoderConfig, Params]:
    """Reads an HF LM folder into (DecoderConfig, params).

    Args:
      folder: config.json + model.safetensors (or shards with model.safetensors.index.json).
      weight_dtype: cast the weights to this dtype; None keeps the stored one (bit-exact export).
      **config_overrides: DecoderConfig fields to set (dtype="bfloat16", remat="full", ...).
    """
    hf_config = safetensors_io.read_config(folder)
    config = config_from_hf(hf_config, **config_overrides)
    params = params_from_hf(
        safetensors_io.read_tensors(folder),
        config,
        dtype=weight_dtype,
        text_only=hf_config.get("model_type") == "gemma3",
    )
    return config, params


def special_ids_from_hf(folder: str | os.PathLike) -> dict[str, TokenIds]:
    """{"bos_id", "eos_id", "pad_id"} of an HF LM folder, as `save_hf_lm` takes them.

    generation_config.json wins where it has the key (it is what `generate` uses; Gemma 3's lists
    two EOS ids where config.json has one), then config.json, then its `text_config`
    (multimodal Gemma 3). A key found nowhere is None. EOS may be a list of ids.
    """
    folder = pathlib.Path(folder)
    hf = safetensors_io.read_config(folder)
    sources = [hf, hf.get("text_config") or {}]
    generation = folder / GENERATION_CONFIG_FILE
    if generation.is_file():
        sources.insert(0, json.loads(generation.read_text()))
    ids = {}
    for ours, key in _SPECIAL_ID_KEYS.items():
        ids[ours] = next((source[key] for source in sources if key in source), None)
    return ids


def save_hf_lm(
    folder: str | os.PathLike,
    config: DecoderConfig,
    params: Params,
    model_type: str,
    *,
    bos_id: TokenIds,
    eos_id: TokenIds,
    pad_id: TokenIds,
    prefix: str = "model.",
    max_shard_bytes: int | None = None,
) -> None:
    """Writes params as an HF folder that transformers loads, its contract stated explicitly.

    Files: config.json (architecture, `max_position_embeddings`, the special ids),
    generation_config.json (the ids `generate` reads: EOS stops a row, PAD fills finished rows),
    model.safetensors or shards with an index.

    Args:
      folder: created if absent.
      config: the architecture; `max_position_embeddings` must be set.
      params: `Decoder(config)` params (numpy or jax arrays, boxed or not).
      model_type: "gemma3_text", "llama" or "qwen2".
      bos_id, eos_id, pad_id: the vocabulary's ids (required: transformers' defaults differ per
        class); None states that the model has no such token; EOS may be a list of ids.
      prefix: HF name prefix of the LM tensors.
      max_shard_bytes: largest safetensors shard; None writes one file.
    """
    ids = dict(bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    hf_config = config_to_hf(config, model_type, **ids)  # Validates before anything is written.
    safetensors_io.write_folder(
        folder, hf_config, params_to_hf(params, config, prefix), max_shard_bytes=max_shard_bytes
    )
    generation = {key: hf_config[key] for key in _SPECIAL_ID_KEYS.values()}
    (pathlib.Path(folder) / GENERATION_CONFIG_FILE).write_text(
        json.dumps(generation, indent=2, sort_keys=True) + "\n"
    )

"""A `transformers` `SpeechT5HifiGan` folder (config.json + model.safetensors) <-> Flax params.

The public checkpoint is `microsoft/speecht5_hifigan` (download it yourself, e.g. with
`huggingface-cli download microsoft/speecht5_hifigan --local-dir DIR`; nothing here touches the
network). Tensors are read with the `safetensors` numpy API: no torch, no pickle. Weight-norm
parametrisations are folded into plain kernels if the file still has them, in either PyTorch
spelling (`weight_g`/`weight_v` or `parametrizations.weight.original0`/`original1`).

The HF config holds the architecture, `sampling_rate` and `model_in_dim` but not the STFT of its
training features; those are SpeechT5's (n_fft 1024, Hann 1024, 80-7600 Hz Slaney mel, log10
magnitude), which are `SpectrogramConfig`'s defaults. A vocoder trained on other features is
loaded with its own `spectrogram_config=`.

Usage:
    vocoder = load_hf_hifigan("/models/speecht5_hifigan", expected=SpectrogramConfig())
    waveform = vocoder(log_mel)  # float32[B, frames, 80] -> float32[B, frames * 256]
    save_hf_hifigan("/models/ours", vocoder.params, vocoder.config)  # SpeechT5HifiGan loads it

Export writes plain `weight` tensors, the layout of a `SpeechT5HifiGan` on which
`apply_weight_norm` was never called (as `microsoft/speecht5_hifigan` is stored), plus the `mean`
/ `scale` normalisation buffers. Hence ours -> HF -> ours is bit-exact, and so is HF -> ours -> HF
for a float32 checkpoint without weight norm. A checkpoint with weight-norm parametrisations comes
back as plain weights: biases, `mean` and `scale` bit-exact, each kernel the fold g * v / ||v||
(computed in float64, rounded once to float32), which can differ from torch's float32 fold in the
last bit; the (g, v) split itself is not recoverable from the product.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import flax.linen as nn
import jax
import numpy as np

from spectron_jax.audio.hifigan import HifiGanConfig, HifiGanGenerator, HifiGanVocoder
from spectron_jax.audio.spectrogram import SpectrogramConfig, check_compatible
from spectron_jax.convert import safetensors_io

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(HifiGanConfig))


def hifigan_config_from_hf(hf_config: dict) -> HifiGanConfig:
    """The generator fields of a `SpeechT5HifiGanConfig` dict (unknown keys ignored)."""
    model_type = hf_config.get("model_type", "speecht5_hifigan")
    if model_type != "speecht5_hifigan":
        raise ValueError(f"expected a speecht5_hifigan config, got model_type={model_type!r}")
    return HifiGanConfig(**{k: hf_config[k] for k in _CONFIG_FIELDS if k in hf_config})


def hifigan_config_to_hf(config: HifiGanConfig) -> dict:
    """`HifiGanConfig` -> a `SpeechT5HifiGanConfig` dict; `hifigan_config_from_hf` inverts it."""
    # Lists, not tuples: the dict then equals the config.json read back.
    fields = json.loads(json.dumps({k: getattr(config, k) for k in _CONFIG_FIELDS}))
    return dict(model_type="speecht5_hifigan", architectures=["SpeechT5HifiGan"], **fields)


def spectrogram_config_for(config: HifiGanConfig) -> SpectrogramConfig:
    """The features a SpeechT5-recipe vocoder of this architecture was trained on.

    Rate, mel bins and hop come from the vocoder; the STFT and mel range are SpeechT5's, which are
    our defaults. The log floor is ours: SpeechT5 floors at 1e-10, we at 1e-5 (identical inputs
    except in near-silence, see `spectrogram.py`).
    """
    return SpectrogramConfig(
        sample_rate=config.sampling_rate,
        n_mels=config.model_in_dim,
        hop_length=config.hop_length,
    )


def _fold_weight_norm(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replaces every (g, v) weight-norm pair by w = g * v / ||v|| (norm over all dims but 0)."""
    out = {}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    patterns = (
        (re.compile(r"^(.*)\.weight_([gv])$"), {"g": "g", "v": "v"}),
        (re.compile(r"^(.*)\.parametrizations\.weight\.original([01])$"), {"0": "g", "1": "v"}),
    )
    for name, value in tensors.items():
        for pattern, roles in patterns:
            match = pattern.match(name)
            if match:
                pairs.setdefault(match.group(1), {})[roles[match.group(2)]] = value
                break
        else:
            out[name] = value
    for prefix, pair in pairs.items():
        if set(pair) != {"g", "v"}:
            raise ValueError(f"incomplete weight-norm parametrisation for {prefix}: {sorted(pair)}")
        v = pair["v"].astype(np.float64)
        norm = np.sqrt(np.sum(v**2, axis=tuple(range(1, v.ndim)), keepdims=True))
        out[f"{prefix}.weight"] = (pair["g"] * v / norm).astype(np.float32)
    return out


def _hf_name(path: tuple[str, ...]) -> tuple[str, str]:
    """Flax param path -> (HF tensor name, kind) with kind in {conv, convT, vector}."""
    *modules, leaf = path
    if not modules:  # mean / scale buffers.
        return leaf, "vector"
    parts = []
    for module in modules:
        if module == "conv":  # The nn.Conv inside our _Conv1d wrapper has no HF counterpart.
            continue
        parts.append(re.sub(r"_(\d+)$", r".\1", module))  # upsampler_2 -> upsampler.2
    hf_leaf = "weight" if leaf == "kernel" else "bias"
    kind = "convT" if modules[0].startswith("upsampler") else "conv"
    return ".".join(parts) + "." + hf_leaf, kind if leaf == "kernel" else "vector"


def _param_shapes(config: HifiGanConfig) -> dict:
    """The params tree of `HifiGanGenerator(config)` as ShapeDtypeStructs (traced, no memory)."""
    dummy = np.zeros((1, 4, config.model_in_dim), np.float32)
    return jax.eval_shape(
        lambda: HifiGanGenerator(config).init(jax.random.PRNGKey(0), dummy)["params"]
    )


def convert_state_dict(tensors: dict[str, np.ndarray], config: HifiGanConfig) -> dict:
    """HF `SpeechT5HifiGan` tensors (numpy) -> Flax params of `HifiGanGenerator(config)`.

    Raises ValueError naming missing, unexpected or mis-shaped tensors.
    """
    tensors = _fold_weight_norm(tensors)
    shapes = _param_shapes(config)
    used, problems = set(), []

    def convert(path, shape):
        keys = tuple(getattr(p, "key", str(p)) for p in path)
        name, kind = _hf_name(keys)
        if name not in tensors:
            problems.append(f"missing {name}")
            return np.zeros(shape.shape, np.float32)
        used.add(name)
        value = np.asarray(tensors[name], np.float32)
        if kind == "conv":  # Conv1d [out, in, taps] -> [taps, in, out]
            value = value.transpose(2, 1, 0)
        elif kind == "convT":  # ConvTranspose1d [in, out, taps] -> [taps, in, out]
            value = value.transpose(2, 0, 1)
        if value.shape != shape.shape:
            problems.append(f"{name}: shape {value.shape} (converted) != expected {shape.shape}")
        return value

    params = jax.tree_util.tree_map_with_path(convert, shapes)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:10]}")
    if problems:
        raise ValueError(f"HiFi-GAN checkpoint does not match {config}: " + "; ".join(problems))
    return params


def params_to_hf(params: dict, config: HifiGanConfig) -> dict[str, np.ndarray]:
    """Flax params of `HifiGanGenerator(config)` -> plain `SpeechT5HifiGan` tensors (numpy).

    The inverse of `convert_state_dict` on a checkpoint without weight norm; dtypes are kept.
    Conv1d kernels [taps, in, out] -> [out, in, taps], ConvTranspose1d [taps, in, out] ->
    [in, out, taps]; `mean` / `scale` float32[model_in_dim] as they are.

    Raises ValueError unless the tree has exactly the generator's paths and shapes.
    """
    params = nn.unbox(params)
    want = {
        jax.tree_util.keystr(k): v.shape
        for k, v in jax.tree_util.tree_leaves_with_path(_param_shapes(config))
    }
    got = {
        jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ValueError(
            f"params do not match HifiGanGenerator({config}): "
            + "; ".join(f"{k}: expected {want.get(k)}, got {got.get(k)}" for k in diff[:8])
        )
    out = {}
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        name, kind = _hf_name(tuple(getattr(p, "key", str(p)) for p in path))
        value = np.asarray(value)
        if kind == "conv":
            value = value.transpose(2, 1, 0)
        elif kind == "convT":
            value = value.transpose(1, 2, 0)
        out[name] = np.ascontiguousarray(value)
    return out


def save_hf_hifigan(folder: str | os.PathLike, params: dict, config: HifiGanConfig) -> None:
    """Writes `folder/{config.json, model.safetensors}` that `SpeechT5HifiGan.from_pretrained` and
    `load_hf_hifigan` load (plain weights, no weight norm; see the module docstring).

    Args:
      folder: created if absent.
      params: `HifiGanGenerator(config)` params (e.g. `HifiGanVocoder.params`), numpy or jax.
      config: the generator's architecture.

    The HF config has no field for the vocoder's input features: a vocoder trained on other than
    SpeechT5's STFT must be loaded back with its own `spectrogram_config=`.
    """
    tensors = params_to_hf(params, config)  # Validates before anything is written.
    hf_config = hifigan_config_to_hf(config)
    dtypes = {str(v.dtype) for v in tensors.values()}
    if len(dtypes) == 1:  # As transformers records it; mixed dtypes have no single name.
        hf_config["dtype"] = dtypes.pop()
    safetensors_io.write_folder(folder, hf_config, tensors)


def load_hf_hifigan(
    model_dir: str | os.PathLike,
    *,
    expected: SpectrogramConfig | None = None,
    spectrogram_config: SpectrogramConfig | None = None,
) -> HifiGanVocoder:
    """Reads `model_dir/{config.json, model.safetensors}` into a `HifiGanVocoder`.

    Args:
      model_dir: a folder as written by `SpeechT5HifiGan.save_pretrained(safe_serialization=True)`.
      expected: the spectrogram config of the features that will be vocoded (e.g. the model's);
        a mismatch with the vocoder's raises ValueError naming both configs.
      spectrogram_config: the vocoder's training features, when not the SpeechT5 recipe.
    """
    from safetensors.numpy import load_file

    model_dir = os.fspath(model_dir)
    config_path = os.path.join(model_dir, "config.json")
    weights_path = os.path.join(model_dir, "model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: expected a HF SpeechT5HifiGan folder with config.json and "
                "model.safetensors (pytorch_model.bin is not read: it is a pickle)"
            )
    with open(config_path, encoding="utf-8") as f:
        config = hifigan_config_from_hf(json.load(f))
    params = convert_state_dict(load_file(weights_path), config)
    vocoder = HifiGanVocoder(
        config=config,
        params=params,
        spectrogram_config=spectrogram_config or spectrogram_config_for(config),
    )
    if expected is not None:
        check_compatible(expected, vocoder.spectrogram_config, f"HiFi-GAN vocoder {model_dir}")
    return vocoder

"""HiFi-GAN: Flax generator vs transformers' SpeechT5HifiGan, loader errors, RTF-size shapes,
export round trips."""

import json

import jax
import numpy as np
import pytest

from spectron_jax.audio import hifigan
from spectron_jax.audio.spectrogram import SpectrogramConfig
from spectron_jax.convert import hf_hifigan, safetensors_io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# A small random vocoder: 8 mels, hop 2 * 4 = 8 (odd/even kernels, two resblock kinds).
SMALL = dict(
    model_in_dim=8,
    sampling_rate=16000,
    upsample_initial_channel=16,
    upsample_rates=[2, 4],
    upsample_kernel_sizes=[4, 8],
    resblock_kernel_sizes=[3, 5],
    resblock_dilation_sizes=[[1, 3], [1, 2]],
    leaky_relu_slope=0.2,
    normalize_before=True,
)


def _save_hf(tmp_path, weight_norm=False, **overrides):
    torch.manual_seed(0)
    config = transformers.SpeechT5HifiGanConfig(**{**SMALL, **overrides})
    model = transformers.SpeechT5HifiGan(config).eval()
    with torch.no_grad():
        # HF's init (std 0.01) makes outputs ~1e-5, where any two implementations agree within
        # 1e-4; fan-in scaled weights give a waveform of order 0.1-1 instead.
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 10
            p.copy_(torch.randn_like(p) / fan_in**0.5)
        # Non-trivial buffers so that the normalisation is exercised.
        model.mean.copy_(torch.randn(config.model_in_dim))
        model.scale.copy_(torch.rand(config.model_in_dim) + 0.5)
    if weight_norm:
        model.apply_weight_norm()
        with torch.no_grad():  # Break g = ||v|| so that a forgotten fold would show.
            for name, p in model.named_parameters():
                if name.endswith("original0") or name.endswith("weight_g"):
                    p.mul_(1.5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("weight_norm", [False, True])
def test_matches_transformers(tmp_path, weight_norm):
    model = _save_hf(tmp_path, weight_norm=weight_norm)
    vocoder = hf_hifigan.load_hf_hifigan(tmp_path)
    log_mel = np.random.default_rng(0).normal(-2.0, 1.0, (2, 13, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(log_mel)).numpy()
    got = np.asarray(vocoder(log_mel))
    assert got.shape == expected.shape == (2, 13 * 8)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).std() > 0.05  # A real signal, not two zeros agreeing.
    # Unbatched input, as HF accepts too.
    np.testing.assert_allclose(np.asarray(vocoder(log_mel[0])), expected[0], atol=1e-4, rtol=0)


def test_normalize_before_off(tmp_path):
    model = _save_hf(tmp_path, normalize_before=False)
    vocoder = hf_hifigan.load_hf_hifigan(tmp_path)
    log_mel = np.random.default_rng(1).normal(size=(1, 7, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(log_mel)).numpy()
    np.testing.assert_allclose(np.asarray(vocoder(log_mel)), expected, atol=1e-4, rtol=0)


def test_spectrogram_config_and_mismatch(tmp_path):
    _save_hf(tmp_path)
    vocoder = hf_hifigan.load_hf_hifigan(tmp_path)
    assert vocoder.spectrogram_config == SpectrogramConfig(n_mels=8, hop_length=8)
    with pytest.raises(ValueError, match="mismatch") as error:
        hf_hifigan.load_hf_hifigan(tmp_path, expected=SpectrogramConfig())
    # Both configs are named, with the differing fields.
    assert "n_mels" in str(error.value) and "hop_length" in str(error.value)
    assert str(SpectrogramConfig()) in str(error.value)
    with pytest.raises(ValueError, match="mel bins"):
        vocoder(np.zeros((1, 5, 80), np.float32))


def test_missing_or_wrong_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_hifigan.load_hf_hifigan(tmp_path)
    _save_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["upsample_initial_channel"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape"):
        hf_hifigan.load_hf_hifigan(tmp_path)


def test_public_vocoder_size_shapes():
    """The microsoft/speecht5_hifigan architecture: 80 mels in, 256 samples per frame out."""
    config = hifigan.HifiGanConfig()
    shapes = jax.eval_shape(lambda: hifigan.init_params(config, jax.random.PRNGKey(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    hf_model = transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig())
    assert count == sum(t.numel() for t in hf_model.state_dict().values())  # Buffers included.
    out = jax.eval_shape(
        hifigan.HifiGanGenerator(config).apply,
        {"params": shapes},
        jax.ShapeDtypeStruct((2, 10, 80), np.float32),
    )
    assert out.shape == (2, 10 * 256)


@pytest.mark.slow
def test_matches_transformers_at_public_size(tmp_path):
    """The full microsoft/speecht5_hifigan architecture (random weights), 20 frames."""
    model = _save_hf(
        tmp_path,
        **{k: v for k, v in transformers.SpeechT5HifiGanConfig().to_dict().items() if k in SMALL},
    )
    vocoder = hf_hifigan.load_hf_hifigan(tmp_path, expected=SpectrogramConfig())
    log_mel = np.random.default_rng(0).normal(-2.0, 1.0, (1, 20, 80)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(log_mel)).numpy()
    np.testing.assert_allclose(np.asarray(vocoder(log_mel)), expected, atol=1e-4, rtol=0)
    assert np.abs(expected).std() > 0.05


# ---------------------------------------------------------------------------------------------
# Export (save_hf_hifigan): exact round trips, and transformers loads what we write.
# ---------------------------------------------------------------------------------------------


def _assert_same_tensors(before, after):
    """Names, dtypes, shapes and bits."""
    assert sorted(before) == sorted(after)
    for name, value in before.items():
        assert after[name].dtype == value.dtype and after[name].shape == value.shape, name
        assert np.array_equal(after[name].view(np.uint32), value.view(np.uint32)), name


def _hf_waveform(model, log_mel):
    with torch.no_grad():
        return model(torch.from_numpy(log_mel)).numpy()


def test_hf_to_ours_to_hf_is_bit_exact(tmp_path):
    model = _save_hf(tmp_path / "hf")
    vocoder = hf_hifigan.load_hf_hifigan(tmp_path / "hf")
    hf_hifigan.save_hf_hifigan(tmp_path / "out", vocoder.params, vocoder.config)

    before = safetensors_io.read_tensors(tmp_path / "hf")
    assert {"mean", "scale"} <= set(before)  # The normalisation buffers are round-tripped too.
    _assert_same_tensors(before, safetensors_io.read_tensors(tmp_path / "out"))
    original = safetensors_io.read_config(tmp_path / "hf")
    exported = safetensors_io.read_config(tmp_path / "out")
    for key in (*hf_hifigan._CONFIG_FIELDS, "model_type", "architectures", "dtype"):
        assert exported[key] == original[key], key

    reloaded = transformers.SpeechT5HifiGan.from_pretrained(tmp_path / "out").eval()
    log_mel = np.random.default_rng(2).normal(-2.0, 1.0, (2, 9, 8)).astype(np.float32)
    expected = _hf_waveform(model, log_mel)
    assert np.abs(expected).std() > 0.05
    np.testing.assert_array_equal(_hf_waveform(reloaded, log_mel), expected)


@pytest.mark.parametrize("normalize_before", [True, False])
def test_ours_to_hf_to_ours_is_bit_exact(tmp_path, normalize_before):
    config = hifigan.HifiGanConfig(**{**SMALL, "normalize_before": normalize_before})
    params = hifigan.init_params(config, jax.random.PRNGKey(3))
    # init leaves mean 0 and scale 1: give the buffers values a dropped transpose would change.
    params = dict(params, mean=np.linspace(-1, 1, 8, dtype=np.float32))
    params["scale"] = np.linspace(0.5, 2, 8, dtype=np.float32)
    hf_hifigan.save_hf_hifigan(tmp_path, params, config)

    vocoder = hf_hifigan.load_hf_hifigan(tmp_path)
    assert vocoder.config == config
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        vocoder.params,
        params,
    )
    # transformers computes what our generator computes on the exported weights.
    model = transformers.SpeechT5HifiGan.from_pretrained(tmp_path).eval()
    log_mel = np.random.default_rng(4).normal(-2.0, 1.0, (1, 11, 8)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(vocoder(log_mel)), _hf_waveform(model, log_mel), atol=1e-4, rtol=0
    )


def test_weight_norm_checkpoint_exports_folded_plain_weights(tmp_path):
    """g, v pairs come back as one plain `weight` each: what is and is not bit-exact."""
    model = _save_hf(tmp_path / "hf", weight_norm=True)
    vocoder = hf_hifigan.load_hf_hifigan(tmp_path / "hf")
    hf_hifigan.save_hf_hifigan(tmp_path / "out", vocoder.params, vocoder.config)
    before = safetensors_io.read_tensors(tmp_path / "hf")
    after = safetensors_io.read_tensors(tmp_path / "out")
    assert not any("parametrizations" in name for name in after)
    # The effective (folded) weights of the weight-norm model, by plain name.
    effective = {
        f"{name}.weight": module.weight.detach().numpy()
        for name, module in model.named_modules()
        if hasattr(module, "parametrizations")
    }
    plain = {name for name in before if "parametrizations" not in name}
    assert effective and sorted(after) == sorted(plain | set(effective))
    for name, value in after.items():
        if name in effective:  # float64 fold vs torch's float32 one: equal up to rounding.
            np.testing.assert_allclose(value, effective[name], rtol=1e-6, atol=1e-7)
        else:  # Biases, mean, scale: untouched by the fold.
            assert np.array_equal(value.view(np.uint32), before[name].view(np.uint32)), name
    reloaded = transformers.SpeechT5HifiGan.from_pretrained(tmp_path / "out").eval()
    log_mel = np.random.default_rng(5).normal(-2.0, 1.0, (1, 9, 8)).astype(np.float32)
    np.testing.assert_allclose(
        _hf_waveform(reloaded, log_mel), _hf_waveform(model, log_mel), atol=1e-5, rtol=0
    )


def test_export_rejects_params_of_another_architecture(tmp_path):
    config = hifigan.HifiGanConfig(**SMALL)
    params = hifigan.init_params(config, jax.random.PRNGKey(0))
    wider = hifigan.HifiGanConfig(**{**SMALL, "upsample_initial_channel": 32})
    with pytest.raises(ValueError, match="conv_pre"):
        hf_hifigan.save_hf_hifigan(tmp_path, params, wider)
    assert not any(tmp_path.iterdir())

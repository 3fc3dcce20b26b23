"""Every gin/models/*.gin builds its model abstractly, with the parameter counts its name says."""

import functools
import pathlib

import gin
import pytest

from spectron_jax import config as config_lib
from spectron_jax import models
from spectron_jax.nn import conformer, decoder

GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin"
MODEL_FILES = sorted((GIN_DIR / "models").glob("*.gin"))
# Four files share the w2v-BERT encoder: trace it once.
encoder_params = functools.cache(conformer.count_params)

# (component, low, high) in parameters. The Gemma 3 decoders equal HF's counts exactly
# (google/gemma-3-270m: 268,098,176; google/gemma-3-1b-pt: 999,885,952). The w2v-BERT 2.0 encoder
# is ~580M (HF facebook/w2v-bert-2.0 without its masked-LM head).
W2V_BERT = ("encoder", 570e6, 600e6)
EXPECTED = {
    "tiny": [("total", 3e6, 6e6)],
    "base": [W2V_BERT, ("decoder", 330e6, 370e6)],
    "gemma3_270m": [W2V_BERT, ("decoder", 268_098_176, 268_098_176)],
    "gemma3_1b": [W2V_BERT, ("decoder", 999_885_952, 999_885_952)],
    "llama_350m": [W2V_BERT, ("decoder", 330e6, 370e6)],
}


def test_every_model_file_has_expectations():
    assert {p.stem for p in MODEL_FILES} == set(EXPECTED)


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
def test_model_file_builds_with_expected_counts(path):
    try:
        config = config_lib.config_from_gin_file(str(path), (str(GIN_DIR),))
        model = gin.query_parameter("spectron.spectron_model.config")  # The MODEL macro's config.
        assert model is not None
    finally:
        gin.clear_config()
    counts = models.param_counts(config)
    for component, low, high in EXPECTED[path.stem]:
        assert low <= counts[component] <= high, (component, counts)
    # Two independent counts agree: the abstract module init and each layer's own formula.
    assert counts["decoder"] == decoder.num_params(config.decoder)
    assert counts["encoder"] == encoder_params(config.encoder)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    # The encoder reads what the front end makes; the heads what the spectrogram holds.
    assert config.encoder.input_dim == config.encoder_feature_dim


def test_paper_scale_files_freeze_the_encoder_and_tiny_trains_it():
    for path in MODEL_FILES:
        config = config_lib.config_from_gin_file(str(path), (str(GIN_DIR),))
        gin.clear_config()
        assert config.encoder_frozen == (path.stem != "tiny"), path.stem


def test_tiny_ends_speech_by_itself():
    """The embedded default's model has the end-of-speech head, its positive weighted 20."""
    config = config_lib.config_from_gin_file(str(GIN_DIR / "models" / "tiny.gin"), (str(GIN_DIR),))
    gin.clear_config()
    assert config.stop_head and config.loss.stop_pos_weight == 20.0

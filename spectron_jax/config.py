"""`SpectronConfig`: the one frozen description of a Spectron model, bound from gin.

Gin binds a few registered factories (never leaf layers), e.g.:

    MODEL_CONFIG = @spectron.spectron_config()
    spectron.spectron_config.decoder = @spectron.decoder_config()
    spectron.decoder_config.num_layers = 4

Each factory forwards its bound keyword arguments to the dataclass, whose own validation names a
wrong value; unknown names fail there too. The config also round-trips through plain JSON
(`to_dict` / `from_dict`) so that it can be written into every checkpoint without pickle.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import gin

from spectron_jax.audio.spectrogram import SpectrogramConfig
from spectron_jax.losses import LossConfig
from spectron_jax.nn import stack
from spectron_jax.nn.conformer import ConformerConfig
from spectron_jax.nn.decoder import DecoderConfig
from spectron_jax.nn.frame_heads import FrameHeadConfig
from spectron_jax.nn.layers import ceil_div
from spectron_jax.nn.spec_augment import SpecAugmentConfig

FRONT_ENDS = ("log_mel", "w2v_bert_fbank")
W2V_BERT_FBANK_DIM = 160  # 80 Kaldi fbank bins stacked by 2 (CONTRACTS.md section 5).


@dataclasses.dataclass(frozen=True)
class SpectronConfig:
    """Architecture, heads and loss of a Spectron model.

    Attributes:
      decoder: the LM.
      encoder: the speech encoder.
      spectrogram: the target log-mel (shared with the data pipeline and the vocoder).
      encoder_front_end: features the encoder reads: "log_mel" (the target `spectrogram`) or
        "w2v_bert_fbank" (80-bin Kaldi fbank stacked by 2, F = 160).
      encoder_frozen: no gradients and no optimizer state for the encoder (the paper's setting).
      connector_stack: encoder frames stacked per prefix slot before the linear connector
        (downsampling the prefix by this factor).
      reduction_factor: spectrogram frames per decoder step r (paper: 1).
      prenet_hidden_dim: width of the pre-net's two layers.
      prenet_dropout: pre-net dropout rate (Tacotron 2: 0.5).
      prenet_dropout_at_inference: keep pre-net dropout on outside training.
      postnet_hidden_dim: width of the frame head's hidden layers (the post-net's, for the
        regression head).
      frame_head: the head that turns a frame slot's hidden state into frames
        (`nn.frame_heads`: "regression", the paper's post-net; "gaussian"; "energy_distance").
        A kind name is taken as `FrameHeadConfig(kind=name)`.
      primer_frames: the acoustic prompt K: the speech stream starts with the last K frames of
        the prompt's own log-mel, fed through the pre-net (no loss on them) before the first
        continuation frame, in training and in decoding alike. 0 (the paper's layout): the
        first frame slot reads zeros, and the voice must come through the prefix alone.
        A multiple of `reduction_factor`; needs the "log_mel" front end (the prompt features
        are then the target log-mel).
      stop_head: learn an end-of-speech logit on the frame slots (a BCE weighted by
        `loss.stop_weight`, its one positive per example by `loss.stop_pos_weight`); inference,
        the CLI and evaluation then end the speech on it unless asked for a fixed duration.
      loss: loss weights.
      spec_augment: SpecAugment policy on the prompt features (training only).
      dtype: compute dtype of the connector and heads ("float32", "bfloat16").
      param_dtype: parameter dtype of the connector and heads.
    """

    decoder: DecoderConfig
    encoder: ConformerConfig
    spectrogram: SpectrogramConfig = SpectrogramConfig()
    encoder_front_end: str = "log_mel"
    encoder_frozen: bool = True
    connector_stack: int = 1
    reduction_factor: int = 1
    prenet_hidden_dim: int = 256
    prenet_dropout: float = 0.5
    prenet_dropout_at_inference: bool = True
    postnet_hidden_dim: int = 512
    frame_head: FrameHeadConfig = FrameHeadConfig()
    primer_frames: int = 0
    stop_head: bool = False
    loss: LossConfig = LossConfig()
    spec_augment: SpecAugmentConfig = SpecAugmentConfig()
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.frame_head, str):  # `frame_head = "gaussian"` from gin or a dict.
            object.__setattr__(self, "frame_head", FrameHeadConfig(kind=self.frame_head))
        problems = []
        if self.encoder_front_end not in FRONT_ENDS:
            problems.append(f"encoder_front_end={self.encoder_front_end!r} not in {FRONT_ENDS}")
        else:
            want = self.encoder_feature_dim
            if self.encoder.input_dim != want:
                problems.append(
                    f"encoder.input_dim={self.encoder.input_dim} but the {self.encoder_front_end} "
                    f"front end gives {want} features"
                )
        for name in (
            "connector_stack",
            "reduction_factor",
            "prenet_hidden_dim",
            "postnet_hidden_dim",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.primer_frames < 0 or self.primer_frames % max(self.reduction_factor, 1):
            problems.append(
                f"primer_frames={self.primer_frames} must be >= 0 and a multiple of "
                f"reduction_factor={self.reduction_factor}"
            )
        if self.primer_frames and self.encoder_front_end != "log_mel":
            problems.append(
                f"primer_frames={self.primer_frames} needs encoder_front_end='log_mel' (the "
                f"primer is read from the prompt features; {self.encoder_front_end!r} features "
                "are not the target log-mel)"
            )
        if not 0.0 <= self.prenet_dropout < 1.0:
            problems.append(f"prenet_dropout={self.prenet_dropout} must be in [0, 1)")
        if problems:
            raise ValueError("Invalid SpectronConfig: " + "; ".join(problems))

    @property
    def primer_groups(self) -> int:
        """Frame slots of the acoustic prompt: primer_frames / reduction_factor."""
        return self.primer_frames // self.reduction_factor

    @property
    def n_mels(self) -> int:
        return self.spectrogram.n_mels

    @property
    def encoder_feature_dim(self) -> int:
        """F_enc of `encoder_features` (CONTRACTS.md section 2)."""
        if self.encoder_front_end == "log_mel":
            return self.spectrogram.n_mels
        return W2V_BERT_FBANK_DIM

    def prefix_length(self, num_feature_frames: int) -> int:
        """P, the prefix slots for T_p encoder input frames (stem subsampling, then stacking)."""
        return ceil_div(self.encoder.output_length(num_feature_frames), self.connector_stack)

    # -- JSON round trip (written into checkpoints; no pickle) -----------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpectronConfig:
        d = dict(d)
        for name, sub in _SUB_CONFIGS.items():
            if name in d and isinstance(d[name], dict):
                fields = stack.saved_layout(d[name]) if name in _STACKS else d[name]
                d[name] = sub(**fields)
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> SpectronConfig:
        return cls.from_dict(json.loads(text))


_STACKS = ("decoder", "encoder")  # Sub-configs with a `scan_layers` layout.
_SUB_CONFIGS = {
    "decoder": DecoderConfig,
    "encoder": ConformerConfig,
    "spectrogram": SpectrogramConfig,
    "loss": LossConfig,
    "spec_augment": SpecAugmentConfig,
    "frame_head": FrameHeadConfig,
}


# ------------------------------------------------------------------------------------------------
# Gin factories.
# ------------------------------------------------------------------------------------------------


@gin.configurable(module="spectron")
def decoder_config(**kwargs) -> DecoderConfig:
    """`DecoderConfig(**bindings)`."""
    return DecoderConfig(**kwargs)


@gin.configurable(module="spectron")
def conformer_config(**kwargs) -> ConformerConfig:
    """`ConformerConfig(**bindings)`."""
    return ConformerConfig(**kwargs)


@gin.configurable(module="spectron")
def spectrogram_config(**kwargs) -> SpectrogramConfig:
    """`SpectrogramConfig(**bindings)`."""
    return SpectrogramConfig(**kwargs)


@gin.configurable(module="spectron")
def loss_config(**kwargs) -> LossConfig:
    """`LossConfig(**bindings)`."""
    return LossConfig(**kwargs)


@gin.configurable(module="spectron")
def frame_head_config(**kwargs) -> FrameHeadConfig:
    """`FrameHeadConfig(**bindings)`, e.g. `spectron.frame_head_config.kind = "gaussian"`."""
    return FrameHeadConfig(**kwargs)


@gin.configurable(module="spectron")
def spec_augment_config(**kwargs) -> SpecAugmentConfig:
    """`SpecAugmentConfig(**bindings)`."""
    return SpecAugmentConfig(**kwargs)


def config_from_gin_file(path: str, search_paths: tuple[str, ...] = ()) -> SpectronConfig:
    """Parses one gin model file alone (clearing gin's config) and builds its `SpectronConfig`."""
    gin.clear_config()
    for p in search_paths:
        gin.add_config_file_search_path(p)
    gin.parse_config_file(path)
    return spectron_config()  # Bound by the file.


def dtype_overrides(dtype: str | None, param_dtype: str | None) -> dict[str, str]:
    """The dtype fields a config factory sets on every part alike (only those given)."""
    dtypes = {"dtype": dtype, "param_dtype": param_dtype}
    return {k: v for k, v in dtypes.items() if v is not None}


@gin.configurable(module="spectron")
def spectron_config(
    decoder: DecoderConfig = gin.REQUIRED,
    encoder: ConformerConfig = gin.REQUIRED,
    spectrogram: SpectrogramConfig | None = None,
    loss: LossConfig | None = None,
    spec_augment: SpecAugmentConfig | None = None,
    dtype: str | None = None,
    param_dtype: str | None = None,
    **knobs,
) -> SpectronConfig:
    """Builds a `SpectronConfig`.

    Args:
      decoder, encoder, spectrogram, loss, spec_augment: sub-configs (None: defaults).
      dtype, param_dtype: when given, set on the decoder, the encoder and the heads alike, so one
        binding switches the whole model to bf16 compute.
      **knobs: the remaining `SpectronConfig` fields.

    Returns:
      The frozen config.
    """
    dtypes = dtype_overrides(dtype, param_dtype)
    if dtypes:
        decoder = dataclasses.replace(decoder, **dtypes)
        encoder = dataclasses.replace(encoder, **dtypes)
    return SpectronConfig(
        decoder=decoder,
        encoder=encoder,
        spectrogram=spectrogram or SpectrogramConfig(),
        loss=loss or LossConfig(),
        spec_augment=spec_augment or SpecAugmentConfig(),
        **dtypes,
        **knobs,
    )


def with_stacks(config: SpectronConfig, **fields: Any) -> SpectronConfig:
    """`config` with `fields` (e.g. scan_layers, remat) set on both layer stacks, decoder and
    encoder."""
    return dataclasses.replace(
        config,
        decoder=dataclasses.replace(config.decoder, **fields),
        encoder=dataclasses.replace(config.encoder, **fields),
    )


def example_input_shapes(
    config: SpectronConfig,
    batch_size: int = 1,
    prompt_frames: int = 16,
    text_length: int = 8,
    num_frames: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Shapes of a model batch (for abstract init and parameter counts)."""
    t_f = num_frames if num_frames is not None else 2 * config.reduction_factor
    return {
        "encoder_features": (batch_size, prompt_frames, config.encoder_feature_dim),
        "encoder_mask": (batch_size, prompt_frames),
        "decoder_input_tokens": (batch_size, text_length),
        "decoder_target_tokens": (batch_size, text_length),
        "decoder_loss_weights": (batch_size, text_length),
        "text_part": (batch_size, text_length),
        "target_frames": (batch_size, t_f, config.n_mels),
        "frame_mask": (batch_size, t_f),
    }

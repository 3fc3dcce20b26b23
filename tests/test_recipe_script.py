"""scripts/recipe.py: every grid variant is a valid gin experiment, and its tables read right."""

from __future__ import annotations

import importlib.util
import os
import sys

import gin
import pytest

from spectron_jax import config as config_lib
from spectron_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("recipe", os.path.join(ROOT, "scripts", "recipe.py"))
recipe = importlib.util.module_from_spec(spec)
sys.modules["recipe"] = recipe  # dataclasses look their module up
spec.loader.exec_module(recipe)

VARIANTS = {v.name: v for v in recipe.variants("/s1/checkpoints", "/s2/checkpoints")}


def _parse(variant: recipe.Variant) -> config_lib.SpectronConfig:
    gin.clear_config()
    overrides = ["MODEL_DIR='/tmp/unused'", "STAGE1_CHECKPOINTS='/s1/checkpoints'"]
    overrides += ["STAGE2_CHECKPOINTS='/s2/checkpoints'", *variant.overrides]
    train.parse_gin([variant.gin_file], overrides, [os.path.join(ROOT, "gin"), ROOT])
    return config_lib.spectron_config()


def _resolve(value):
    """Macro references (`%STAGE1_CHECKPOINTS` as a dict key) -> their values."""
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn()
    if isinstance(value, dict):
        return {_resolve(k): _resolve(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_parses_and_changes_what_it_says(name):
    try:
        config = _parse(VARIANTS[name])
        sources = _resolve(gin.query_parameter("train.init_checkpoints"))
        task = _resolve(gin.query_parameter("train/seqio_dataset_fn.mixture_or_task_name"))
    finally:
        gin.clear_config()
    full = {
        "primer_frames": 32,
        "reduction_factor": 2,
        "encoder_frozen": True,
        "stop_head": True,
        "ce_weight": 1.0,
        "freq_delta_weight": 1.0,
        "frame_head": "regression",
    }
    got = {
        "primer_frames": config.primer_frames,
        "reduction_factor": config.reduction_factor,
        "encoder_frozen": config.encoder_frozen,
        "stop_head": config.stop_head,
        "ce_weight": config.loss.ce_weight,
        "freq_delta_weight": config.loss.freq_delta_weight,
        "frame_head": config.frame_head.kind,
    }
    changed = {k for k in full if got[k] != full[k]}
    expected = {
        "full": set(),
        "no_primer": {"primer_frames"},
        "no_ce": {"ce_weight"},
        "no_derivatives": {"freq_delta_weight"},
        "random_lm": set(),
        "encoder_trained": {"encoder_frozen"},
        "r1": {"reduction_factor"},
        "no_transcript": set(),
        "fsdd": set(),
        "gaussian": {"frame_head"},
        "energy_distance": {"frame_head"},
    }[name]
    assert changed == expected
    assert config.loss.stop_pos_weight == 20.0
    assert sorted(sources) == (
        ["/s1/checkpoints"] if name == "random_lm" else ["/s1/checkpoints", "/s2/checkpoints"]
    )
    assert sources["/s1/checkpoints"] == {"encoder": "params/encoder"}
    want_task = {"fsdd": "spectron_fsdd_counting"}.get(
        name, "spectron_synthetic_counting" + ("_no_transcript" if name == "no_transcript" else "")
    )
    assert task == want_task


def test_knowledge_row_counts_first_number_both_and_heard():
    metrics = {
        "examples": [
            {
                "continuation_text": "five four",
                "hyp_continuation": "five four",
                "continuation_exact": True,
                "transcript_wer": 0.0,
            },
            {
                "continuation_text": "nine eight",
                "hyp_continuation": "nine ten",
                "continuation_exact": False,
                "transcript_wer": 0.0,
            },
            {
                "continuation_text": "two one",
                "hyp_continuation": "three four",
                "continuation_exact": False,
                "transcript_wer": 0.5,
            },
            {
                "continuation_text": "twenty three twenty four",
                "hyp_continuation": "twenty three twenty four",
                "continuation_exact": True,
                "transcript_wer": 0.5,
            },
        ]
    }
    row = recipe.knowledge_row("full", "spectron_counting_down", "validation", metrics)
    # n 4; transcript exact 2/4; first number 3/4; both 2/4; both among heard right 1/2.
    assert row == "| full | spectron_counting_down:validation | 4 | 0.50 | 0.75 | 0.50 | 0.50 | - |"
    forced = recipe.knowledge_row(
        "full", "spectron_counting_down", "validation", metrics, {"accuracy_continuation": 0.25}
    )
    assert forced.endswith("| 0.50 | 0.25 |")


def test_per_speaker_means():
    metrics = {
        "examples": [
            {
                "speaker_id": "a",
                "judge_speaker_sim_generated": 0.8,
                "judge_word_accuracy_generated_vs_reference": 1.0,
            },
            {
                "speaker_id": "a",
                "judge_speaker_sim_generated": 0.6,
                "judge_word_accuracy_generated_vs_reference": 0.0,
            },
            {"speaker_id": "b", "judge_speaker_sim_generated": 0.5},
        ]
    }
    got = recipe.per_speaker(metrics)
    assert got["a"]["judge_speaker_sim_generated"] == pytest.approx(0.7)
    assert got["a"]["n"] == 2 and got["b"]["n"] == 0
    assert "judge_speaker_sim_other_speaker" not in got["a"]

"""Helpers of the task tests: the tiny synthetic config and the CONTRACTS.md §1 checks."""

import numpy as np

from spectron_tasks import synthetic_counting

CONTRACT_KEYS = {
    "prompt_features",
    "prompt_length",
    "prompt_transcript",
    "continuation_transcript",
    "continuation_frames",
    "continuation_length",
    "prompt_text",
    "continuation_text",
    "speaker_id",
    "id",
}
TINY = synthetic_counting.SyntheticCountingConfig(
    num_train=6, num_validation=3, num_validation_unseen=4
)


def check_contract(ex, n_features: int, n_mels: int = 80) -> None:
    """Asserts the keys, dtypes and shapes of CONTRACTS.md §1 on one numpy example."""
    assert set(ex) == CONTRACT_KEYS
    assert ex["prompt_features"].dtype == np.float32
    assert ex["prompt_features"].ndim == 2 and ex["prompt_features"].shape[1] == n_features
    assert ex["continuation_frames"].dtype == np.float32
    assert ex["continuation_frames"].ndim == 2 and ex["continuation_frames"].shape[1] == n_mels
    for key in ("prompt_length", "continuation_length"):
        assert ex[key].dtype == np.int32 and ex[key].shape == ()
    assert ex["prompt_length"] == ex["prompt_features"].shape[0]
    assert ex["continuation_length"] == ex["continuation_frames"].shape[0]
    for key in ("prompt_transcript", "continuation_transcript"):
        assert ex[key].dtype == np.int32 and ex[key].ndim == 1
    for key in ("prompt_text", "continuation_text", "speaker_id", "id"):
        assert isinstance(ex[key], bytes)
    assert np.all(np.isfinite(ex["prompt_features"]))
    assert np.all(np.isfinite(ex["continuation_frames"]))

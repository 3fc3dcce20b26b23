"""The config check before a run: 25 bad configs of gin/spectron_tiny.gin (and one of the base),
each one clear message naming the setting; lengths against a task's real data; warnings that
do not stop a run; the command line's exit code 2 without a traceback."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import gin
import numpy as np
import pytest

from spectron_jax import config_check

REPO = pathlib.Path(__file__).resolve().parents[2]
SEARCH = [str(REPO), str(REPO / "gin")]
TINY = ["gin/spectron_tiny.gin"]
# What earlier tests may leave in os.environ that makes a run join jax.distributed.
MULTI_PROCESS_VARIABLES = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.fixture(autouse=True)
def _clean_gin(monkeypatch):
    # Most cases need no data: the length check reads a task only where a test asks for it.
    monkeypatch.setattr(config_check, "DATA_EXAMPLES", 0)
    _clear()
    yield
    _clear()


def _clear():
    gin.clear_config()  # also unlocks: a checked config is finalized (locked), as a run's is


def _problems(bindings, files=TINY) -> str:
    with pytest.raises(config_check.ConfigError) as err:
        config_check.parse_and_check(files, bindings, SEARCH)
    return str(err.value)


# (bindings, what the message must say: the setting named, the value, what would be valid).
BAD_CONFIGS = [
    (["TRAIN_STEPZ = 5"], ["--gin.TRAIN_STEPZ = 5: no file", "did you mean TRAIN_STEPS"]),
    (["BATCH_SIZ = 8"], ["--gin.BATCH_SIZ", "did you mean BATCH_SIZE"]),
    (["LEARNIN_RATE = 0.1"], ["--gin.LEARNIN_RATE", "did you mean LEARNING_RATE"]),
    (["TRAIN_STEPS = 0"], ["train.num_steps = 0", "num_steps must be >= 1"]),
    (["TRAIN_STEPS = -3"], ["train.num_steps = -3", ">= 1"]),
    (["TRAIN_STEPS = '500'"], ["train.num_steps = '500'", "must be an integer, got str"]),
    (["TRAIN_STEPS = 2.5"], ["train.num_steps = 2.5", "must be an integer"]),
    (["TRAIN_STEPS = True"], ["train.num_steps = True", "must be an integer, got bool"]),
    (["BATCH_SIZE = 0"], ["batch_size = 0", ">= 1"]),
    (["BATCH_SIZE = 30"], ["BATCH_SIZE = 30", "must divide by 8 (data 8 x fsdp 1", "e.g. 24"]),
    (["BATCH_SIZE = 3"], ["BATCH_SIZE = 3", "must divide by 8", "e.g. 8"]),
    (["LEARNING_RATE = 0"], ["learning_rate = 0", "must be > 0.0"]),
    (["LEARNING_RATE = 'fast'"], ["learning_rate = 'fast'", "must be a number, got str"]),
    (["WARMUP_STEPS = -1"], ["warmup_steps = -1", ">= 0"]),
    (["CHECKPOINT_EVERY_STEPS = -5"], ["every_steps = -5", ">= 0"]),
    (["checkpoints.CheckpointConfig.keep_last = 0"], ["keep_last = 0", ">= 1"]),
    (["train.log_every = 0"], ["train.log_every = 0", ">= 1"]),
    (["train.grad_accum_steps = 0"], ["grad_accum_steps = 0", ">= 1"]),
    (
        ["MIXTURE_OR_TASK_NAME = 'spectron_synthetic_countng'"],
        ["'spectron_synthetic_countng'", "did you mean spectron_synthetic_counting"],
    ),
    (["TASK_FEATURE_LENGTHS = 96"], ["TASK_FEATURE_LENGTHS = 96", "must be a dict"]),
    (
        [
            "TASK_FEATURE_LENGTHS = {'prompt_features': 0, 'prompt_transcript': 3, "
            "'continuation_transcript': 4, 'continuation_frames': 96}"
        ],
        ["TASK_FEATURE_LENGTHS['prompt_features'] = 0", "integer >= 1"],
    ),
    (["train.num_stepz = 5"], ["--gin.train.num_stepz = 5: ", "did you mean num_steps"]),
    (["trian.num_steps = 5"], ["--gin.trian.num_steps", "trian", "did you mean train"]),
    (["TRAIN_STEPS = "], ["--gin.TRAIN_STEPS = "]),
    (["create_mesh.fsdp = 3"], ["create_mesh: 8 devices do not split into mesh [-1, 3, 1]"]),
    (
        ["spectron.spectron_config.frame_head = 'flow'"],
        ["the model config (spectron.spectron_config)", "kind='flow' not in ('regression'"],
    ),
    (
        ["spectron.spectron_config.primer_frames = 3"],
        ["the model config", "primer_frames=3 must be >= 0 and a multiple of reduction_factor"],
    ),
]


@pytest.mark.parametrize("bindings,expected", BAD_CONFIGS, ids=[b[0] for b, _ in BAD_CONFIGS])
def test_a_bad_config_is_one_clear_message(bindings, expected):
    message = _problems(bindings)
    assert message.startswith("the config has 1 problem:\n  "), message
    for text in expected:
        assert text in message, (text, message)
    assert "Traceback" not in message


def test_every_problem_of_a_kind_in_one_block():
    message = _problems(["TRAIN_STEPZ = 5", "BATCH_SIZ = 8"])
    assert message.startswith("the config has 2 problems:")
    _clear()
    message = _problems(["TRAIN_STEPS = 0", "LEARNING_RATE = 0", "train.log_every = 0"])
    assert message.startswith("the config has 3 problems:")


def test_a_required_setting_left_unset_is_named():
    message = _problems(["MODEL_DIR = '/tmp/x'"], files=["gin/spectron_base.gin"])
    assert "INIT_CHECKPOINT" in message


def test_the_shipped_config_passes_and_short_runs_warn():
    assert config_check.parse_and_check(TINY, [], SEARCH) == []
    _clear()
    warnings = config_check.parse_and_check(TINY, ["TRAIN_STEPS = 20"], SEARCH)
    assert [w.setting for w in warnings] == ["WARMUP_STEPS", "CHECKPOINT_EVERY_STEPS"]
    assert "peak learning rate is never reached" in str(warnings[0])


# ------------------------------------------------------------------------------------------------
# Feature lengths against the task's data
# ------------------------------------------------------------------------------------------------

LENGTHS = {
    "prompt_features": 96,
    "prompt_transcript": 8,
    "continuation_transcript": 8,
    "continuation_frames": 96,
}


@pytest.fixture(scope="module")
def short_task():
    """20 examples: prompts of 30 hops, continuations of 40 hops (~40 frames each)."""
    import seqio
    import tensorflow as tf

    from spectron_tasks import speech_task

    name = "test_config_check_lengths"
    if name in seqio.TaskRegistry.names():
        return name
    hop = 160

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        rng = np.random.default_rng(0)

        def examples():
            for i in range(20):
                yield {
                    "prompt_audio": rng.normal(0, 0.1, 30 * hop).astype(np.float32),
                    "continuation_audio": rng.normal(0, 0.1, 40 * hop).astype(np.float32),
                    "prompt_text": "one two",
                    "continuation_text": "three four",
                    "speaker_id": "s0",
                    "id": f"ex{i}",
                }

        return tf.data.Dataset.from_generator(
            examples, output_signature=speech_task.raw_output_signature()
        )

    source = seqio.FunctionDataSource(dataset_fn, splits=["train"])
    speech_task.register_speech_task(name, source)
    return name


def _with_task(name, lengths):
    return [f"MIXTURE_OR_TASK_NAME = '{name}'", f"TASK_FEATURE_LENGTHS = {lengths!r}"]


def test_lengths_too_short_for_the_data_are_an_error(short_task, monkeypatch):
    monkeypatch.setattr(config_check, "DATA_EXAMPLES", 200)
    message = _problems(_with_task(short_task, {**LENGTHS, "continuation_frames": 16}))
    assert "TASK_FEATURE_LENGTHS['continuation_frames'] = 16" in message
    assert "20 of the first 20 examples of test_config_check_lengths:train are longer" in message
    _clear()
    assert config_check.parse_and_check(TINY, _with_task(short_task, LENGTHS), SEARCH) == []


def test_the_command_line_prints_the_block_and_exits_2():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "spectron_jax.train",
            "--gin_file=gin/spectron_tiny.gin",
            "--gin.TRAIN_STEPZ=5",
            "--check_config",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k not in MULTI_PROCESS_VARIABLES},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: the config has 1 problem:\n  --gin.TRAIN_STEPZ=5: no file" in proc.stderr
    assert "did you mean TRAIN_STEPS" in proc.stderr and "Traceback" not in proc.stderr

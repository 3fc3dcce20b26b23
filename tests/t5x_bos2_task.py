"""A Gemma-layout vocabulary and a task encoded with it, for tests/test_t5x_adapter.py.

Gemma's SentencePiece ids are pad 0, eos 1, bos 2, unk 3; the shipped tiny vocabulary's are
pad 0, eos 1, unk 2, bos 3. A model (and the batches T5X trains it on) that really takes its
special ids from its vocabulary starts every decoder input with 2 here, not 3.

- `train_gemma_style_vocabulary(path)`: a tiny unigram SentencePiece model over the number words
  0..99 (every word one piece) with Gemma's special ids and spellings.
- `register(vocab_path, cache_dir)`: registers `TASK`, a small `spectron_synthetic_counting`
  (eSpeak NG, synthesised into `cache_dir` on first use) whose transcripts use that vocabulary.
- Imported by `python -m t5x.train` through tests/t5x_bos2_task.gin (tests/ on PYTHONPATH), the
  module registers `TASK` from the environment (`SPECTRON_T5X_BOS2_VOCAB`,
  `SPECTRON_T5X_BOS2_CACHE`), and `recording_get_dataset` (bound as `train.get_dataset_fn`)
  saves the first training batch T5X builds to `SPECTRON_T5X_BOS2_BATCH_LOG` (npz).
"""

from __future__ import annotations

import io
import os

import numpy as np

TASK = "spectron_synthetic_counting_bos2"
GEMMA_SPECIAL_IDS = {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3}
GEMMA_SPECIAL_PIECES = {
    "pad_piece": "<pad>",
    "eos_piece": "<eos>",
    "bos_piece": "<bos>",
    "unk_piece": "<unk>",
}
# Numbers stay below 20 (max_start 15 + 2 + 2 words): every transcript word is one piece, so each
# transcript is exactly 2 ids and fits gin/t5x/spectron_tiny_train.gin's feature lengths.
SPLIT_SIZES = {"num_train": 16, "num_validation": 8, "num_validation_unseen": 4}
MAX_START = 15
# Model features saved from the first batch T5X trains on.
RECORDED_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")

ENV_VOCAB = "SPECTRON_T5X_BOS2_VOCAB"
ENV_CACHE = "SPECTRON_T5X_BOS2_CACHE"
ENV_BATCH_LOG = "SPECTRON_T5X_BOS2_BATCH_LOG"


def counting_lines() -> list[str]:
    """Counting runs of 1..4 numbers in words, 0..99."""
    from spectron_tasks.synthetic_counting import number_words

    return [
        " ".join(number_words(n) for n in range(start, start + k))
        for start in range(100)
        for k in range(1, 5)
        if start + k <= 100
    ]


def train_gemma_style_vocabulary(path: str | os.PathLike) -> str:
    """Writes a SentencePiece model with Gemma's special ids to `path` (deterministic)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(counting_lines()),
        model_writer=model,
        model_type="unigram",
        vocab_size=64,
        hard_vocab_limit=False,  # ~50 pieces: the 28 words, their letters and the specials.
        character_coverage=1.0,
        normalization_rule_name="identity",
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
        **GEMMA_SPECIAL_IDS,
        **GEMMA_SPECIAL_PIECES,
    )
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def counting_config():
    from spectron_tasks.synthetic_counting import SyntheticCountingConfig

    return SyntheticCountingConfig(max_start=MAX_START, **SPLIT_SIZES)


def register(vocab_path: str, cache_dir: str):
    """Registers `TASK` over a small synthetic counting corpus, encoded with `vocab_path`."""
    from spectron_jax import vocabularies
    from spectron_tasks import synthetic_counting

    return synthetic_counting.register(
        TASK,
        counting_config(),
        cache_dir=cache_dir,
        vocabulary=vocabularies.vocabulary(vocab_path),
    )


def recording_get_dataset(cfg, shard_id, num_shards, feature_converter_cls, **kwargs):
    """`t5x.utils.get_dataset`, saving its first batch's text features to the batch log.

    T5X calls it with the model's `FEATURE_CONVERTER_CLS`, so the saved batch is laid out
    exactly as the batches it trains on.
    """
    from t5x import utils

    from spectron_jax import t5x_adapter

    # The adapter's own dataset function where it has one (it may check the task's vocabulary).
    get_dataset = getattr(t5x_adapter, "get_dataset", utils.get_dataset)
    ds = get_dataset(cfg, shard_id, num_shards, feature_converter_cls, **kwargs)
    log = os.environ.get(ENV_BATCH_LOG)
    if log:
        batch = next(iter(ds.take(1).as_numpy_iterator()))
        np.savez(log, **{k: np.asarray(batch[k]) for k in RECORDED_FEATURES})
    return ds


if os.environ.get(ENV_VOCAB):
    register(os.environ[ENV_VOCAB], os.environ[ENV_CACHE])

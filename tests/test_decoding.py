"""Decoding: the KV-cached generation loop against teacher-forced and uncached references.

Random-init tiny Spectron (tests/spectron_testing.py) with a stop head and the pre-net's inference
dropout off, so that the cached loop must reproduce `Spectron.__call__` over the generated
sequence exactly. Compiles are shared through module fixtures (each one costs seconds on 2 cores).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import spectron_testing as st

from spectron_jax import decoding
from spectron_jax.decoding import DecodeConfig
from spectron_jax.models import SpectronModel

MAX_TEXT = 10
MAX_FRAMES = 8  # 4 groups of r = 2.
BOS = 3


@pytest.fixture(scope="module")
def setup():
    config = st.tiny_config(stop_head=True, prenet_dropout_at_inference=False)
    batch = st.random_batch(config, batch_size=3)
    # Prompts of 16, 11 and 6 frames: different prefix lengths P in one batch.
    params = st.init_params(config, batch)
    return SpectronModel(config), params, batch


def _greedy(**kw) -> DecodeConfig:
    return DecodeConfig(max_text_tokens=MAX_TEXT, max_frames=MAX_FRAMES, bos_id=BOS, **kw)


@pytest.fixture(scope="module")
def eos_run(setup):
    """Greedy run whose EOS id is chosen to end the three rows' texts at different lengths.

    The EOS id is a traced value (no recompile): a first run with an EOS that never occurs shows
    each row's token stream; the chosen EOS is the id whose first occurrences differ most.
    """
    model, params, batch = setup
    free = jax.device_get(decoding.generate(model, params, batch, _greedy(eos_id=-1)))
    streams = free["text_tokens"]

    def lengths(v):
        return tuple(int(np.argmax(row == v)) if np.any(row == v) else MAX_TEXT for row in streams)

    # Not 0 (padding). With this seed: EOS 7, lengths (2, 3, 10): the last row hits the limit.
    eos = max(range(1, model.config.decoder.vocab_size), key=lambda v: len(set(lengths(v))))
    out = jax.device_get(decoding.generate(model, params, batch, _greedy(eos_id=eos)))
    return eos, free, out


def _teacher_batch(out, batch):
    """The model batch of the generated sequence: [BOS] text (no EOS) and the generated frames."""
    b = out["text_tokens"].shape[0]
    n = out["text_lengths"]
    inputs = np.zeros((b, MAX_TEXT + 1), np.int32)
    text_part = np.zeros((b, MAX_TEXT + 1), np.int32)
    frame_mask = np.zeros((b, MAX_FRAMES), np.int32)
    for i in range(b):
        inputs[i, 0] = BOS
        inputs[i, 1 : n[i] + 1] = out["text_tokens"][i, : n[i]]
        text_part[i, : n[i] + 1] = 1
        frame_mask[i, : out["frame_lengths"][i]] = 1
    return {
        "encoder_features": batch["encoder_features"],
        "encoder_mask": batch["encoder_mask"],
        "decoder_input_tokens": inputs,
        "text_part": text_part,
        "target_frames": np.asarray(out["frames"]),
        "frame_mask": frame_mask,
    }


def test_eos_choice_gives_different_text_lengths(eos_run):
    eos, free, out = eos_run
    n = out["text_lengths"]
    assert len(set(n.tolist())) == 3, n
    for i, row in enumerate(out["text_tokens"]):
        # Ending at EOS changes nothing before it: the prefix of the EOS-free stream, then EOS.
        np.testing.assert_array_equal(row[: n[i]], free["text_tokens"][i, : n[i]])
        assert eos not in row[: n[i]]
        if n[i] < MAX_TEXT:
            assert row[n[i]] == eos
            assert not row[n[i] + 1 :].any()


def test_cached_decoding_equals_teacher_forced_pass(setup, eos_run):
    model, params, batch = setup
    _, _, out = eos_run
    teacher = _teacher_batch(out, batch)
    logits, frames, aux = st.apply(model.config, params, teacher)
    logits, frames = np.asarray(logits), np.asarray(frames)
    for i, n in enumerate(out["text_lengths"]):
        # Text slot t (BOS or token t) predicts token t + 1 (EOS at slot n).
        steps = min(n + 1, MAX_TEXT)
        np.testing.assert_array_equal(logits[i, :steps].argmax(-1), out["text_tokens"][i, :steps])
    assert (out["frame_lengths"] == MAX_FRAMES).all()
    np.testing.assert_allclose(out["frames"], frames, atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        out["stop_probs"], jax.nn.sigmoid(aux["stop_logits"]), atol=1e-4, rtol=0
    )
    assert np.abs(out["frames"]).max() > 1e-2  # Not trivially zero.


def test_rows_decode_as_if_alone(setup, eos_run):
    model, params, batch = setup
    eos, _, out = eos_run
    for i in range(3):
        # The same batch shape (no recompile) holding only row i: nothing else in the cache.
        alone = {k: np.repeat(v[i : i + 1], 3, axis=0) for k, v in batch.items()}
        single = jax.device_get(decoding.generate(model, params, alone, _greedy(eos_id=eos)))
        np.testing.assert_array_equal(single["text_tokens"][0], out["text_tokens"][i])
        assert single["text_lengths"][0] == out["text_lengths"][i]
        np.testing.assert_allclose(single["frames"][0], out["frames"][i], atol=1e-5, rtol=0)


def test_stop_logit_ends_rows(setup, eos_run):
    model, params, batch = setup
    eos, _, out = eos_run
    probs = out["stop_probs"]  # [B, 4] without a stop rule.
    # A threshold between row 0's group-1 probability and the largest of its earlier ones stops
    # it after group 1; the other rows stop at their own first crossing (or never).
    threshold = float(probs[0, 1]) - 1e-3
    if not probs[0, 0] < threshold:
        pytest.skip("random stop head: row 0 does not rise at group 1")
    stopped = jax.device_get(
        decoding.generate(
            model,
            params,
            batch,
            _greedy(eos_id=eos, use_stop_logit=True, stop_threshold=threshold),
        )
    )
    r = model.config.reduction_factor
    for i in range(3):
        over = np.nonzero(probs[i] > threshold)[0]
        groups = over[0] + 1 if len(over) else probs.shape[1]
        want = groups * r
        assert stopped["frame_lengths"][i] == want
        np.testing.assert_allclose(
            stopped["frames"][i, :want], out["frames"][i, :want], atol=1e-5, rtol=0
        )
        assert not stopped["frames"][i, want:].any()
    assert stopped["frame_lengths"][0] == 2 * r


def test_forced_text_reproduces_transcript_and_speech(setup, eos_run):
    model, params, batch = setup
    eos, _, out = eos_run
    teacher = _teacher_batch(out, batch)
    forced = jax.device_get(
        decoding.generate(model, params, teacher, _greedy(eos_id=eos, text_mode="forced"))
    )
    np.testing.assert_array_equal(forced["text_tokens"], out["text_tokens"])
    np.testing.assert_array_equal(forced["text_lengths"], out["text_lengths"])
    # Same text, so the same speech as free decoding produced after it.
    np.testing.assert_allclose(forced["frames"], out["frames"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_uncached_recomputation_equals_cached(setup, eos_run):
    """The whole network re-run for every frame group gives the cached loop's frames."""
    model, params, batch = setup
    _, _, out = eos_run
    teacher = _teacher_batch(out, batch)
    uncached = decoding.generate_frames_uncached(model, params, teacher, MAX_FRAMES)
    np.testing.assert_allclose(np.asarray(uncached), out["frames"], atol=1e-4, rtol=0)


def test_text_only_returns_no_frames(setup, eos_run):
    model, params, batch = setup
    eos, _, out = eos_run
    text = jax.device_get(
        decoding.generate(model, params, batch, _greedy(eos_id=eos, text_mode="text_only"))
    )
    np.testing.assert_array_equal(text["text_tokens"], out["text_tokens"])
    assert text["frames"].shape == (3, 0, model.config.n_mels)
    assert not text["frame_lengths"].any()


def test_sampling_reproducible_by_seed_and_top_k_1_is_greedy(setup, eos_run):
    model, params, batch = setup
    eos, _, out = eos_run
    vocab = model.config.decoder.vocab_size
    # One compile: temperature > 0 with top-k and top-p on; their values are traced.
    base = _greedy(eos_id=eos, temperature=1.0, top_k=vocab, top_p=0.9999)

    def run(**kw):
        return jax.device_get(
            decoding.generate(model, params, batch, dataclasses.replace(base, **kw))
        )

    a, b, c = run(seed=1), run(seed=1), run(seed=2, temperature=3.0)
    for key in ("text_tokens", "frames"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["text_tokens"], c["text_tokens"])
    for greedy_like in (run(seed=5, top_k=1), run(seed=6, top_p=1e-6)):
        np.testing.assert_array_equal(greedy_like["text_tokens"], out["text_tokens"])
        np.testing.assert_allclose(greedy_like["frames"], out["frames"], atol=1e-5, rtol=0)


def test_filter_logits_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32)
    kept = np.isfinite(np.asarray(decoding.filter_logits(jnp.asarray(logits), top_k=5)))
    np.testing.assert_array_equal(kept, logits >= np.sort(logits, -1)[:, -5:-4])
    assert (kept.sum(-1) == 5).all()

    top_p = 0.6
    kept = np.isfinite(np.asarray(decoding.filter_logits(jnp.asarray(logits), top_p=top_p)))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for row, p in zip(kept, probs, strict=True):
        order = np.argsort(-p)
        n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)  # Smallest set reaching top_p.
        want = np.zeros_like(row)
        want[order[:n]] = True
        np.testing.assert_array_equal(row, want)
    # Off: nothing removed.
    assert np.isfinite(np.asarray(decoding.filter_logits(jnp.asarray(logits), 0, 1.0))).all()


def test_bad_options_and_inputs_are_errors(setup):
    model, params, batch = setup
    with pytest.raises(ValueError, match="text_mode"):
        DecodeConfig(text_mode="speech")
    with pytest.raises(ValueError, match="top_p"):
        DecodeConfig(top_p=0.0)
    with pytest.raises(ValueError, match="decoder_input_tokens"):
        decoding.generate(
            model,
            params,
            {k: batch[k] for k in ("encoder_features", "encoder_mask")},
            DecodeConfig(text_mode="forced"),
        )
    no_stop = SpectronModel(dataclasses.replace(model.config, stop_head=False))
    with pytest.raises(ValueError, match="stop_head"):
        decoding.generate(no_stop, params, batch, DecodeConfig(use_stop_logit=True))


def test_predict_batch_with_aux(setup, eos_run):
    model, params, batch = setup
    eos, _, out = eos_run
    outputs, aux = decoding.predict_batch_with_aux(
        model,
        params,
        batch,
        max_text_tokens=MAX_TEXT,
        max_frames=MAX_FRAMES,
        bos_id=BOS,
        eos_id=eos,
    )
    np.testing.assert_array_equal(outputs["text_tokens"], out["text_tokens"])
    np.testing.assert_allclose(outputs["frames"], out["frames"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(aux["text_lengths"], out["text_lengths"])
    np.testing.assert_array_equal(aux["frame_lengths"], out["frame_lengths"])

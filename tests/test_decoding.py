"""Decoding: the KV-cached generation loop against teacher-forced and uncached references.

Random-init tiny Spectron (tests/spectron_testing.py) with a stop head and the pre-net's inference
dropout off, so that the cached loop must reproduce `Spectron.__call__` over the generated
sequence exactly. Compiles are shared through module fixtures (each one costs seconds on 2 cores).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

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
BOS = st.WordVocabulary.bos_id  # The test models' (3); decoding takes it from the model.


@pytest.fixture(scope="module")
def setup():
    config = st.tiny_config(stop_head=True, prenet_dropout_at_inference=False)
    batch = st.random_batch(config, batch_size=3)
    # Prompts of 16, 11 and 6 frames: different prefix lengths P in one batch.
    params = st.init_params(config, batch)
    model = st.tiny_model(config)
    assert model.bos_id == BOS
    return model, params, batch


def _greedy(**kw) -> DecodeConfig:
    """Greedy options of these tests; BOS (and EOS unless given) are the model's."""
    return DecodeConfig(max_text_tokens=MAX_TEXT, max_frames=MAX_FRAMES, **kw)


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
    no_stop = st.tiny_model(dataclasses.replace(model.config, stop_head=False))
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
        eos_id=eos,
    )
    np.testing.assert_array_equal(outputs["text_tokens"], out["text_tokens"])
    np.testing.assert_allclose(outputs["frames"], out["frames"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(aux["text_lengths"], out["text_lengths"])
    np.testing.assert_array_equal(aux["frame_lengths"], out["frame_lengths"])


def test_decoding_uses_the_models_special_ids(setup, eos_run):
    """BOS / EOS default to the model's; an explicit DecodeConfig value overrides them."""
    model, params, batch = setup
    eos, _, out = eos_run
    vocab = st.WordVocabulary(model.config.decoder.vocab_size)

    def run(m, **kw):
        # Same static options as eos_run (the ids are traced): no recompile.
        return jax.device_get(decoding.generate(m, params, batch, _greedy(**kw)))

    bos2 = SpectronModel(model.config, vocab, bos_id=2, eos_id=eos)
    assert (bos2.bos_id, bos2.eos_id) == (2, eos)
    from_model = run(bos2)
    # Another first token, another text: the model's BOS reached the prefill.
    assert not np.array_equal(from_model["text_tokens"], out["text_tokens"])
    explicit = run(model, bos_id=2, eos_id=eos)
    own = run(bos2, bos_id=BOS)  # Overrides the model's 2.
    for key in ("text_tokens", "text_lengths", "frames", "frame_lengths"):
        np.testing.assert_array_equal(explicit[key], from_model[key])
        np.testing.assert_array_equal(own[key], out[key])
    # EOS too: `model.eos_id` ends the text when the config leaves it None.
    eos_model = SpectronModel(model.config, vocab, eos_id=eos)
    np.testing.assert_array_equal(run(eos_model)["text_tokens"], out["text_tokens"])


def test_special_ids_are_traced_and_resolved_from_the_model(setup):
    model, _, _ = setup
    default = DecodeConfig()
    assert default.bos_id is None and default.eos_id is None
    # One compiled program whatever the ids.
    assert DecodeConfig(bos_id=2, eos_id=5).static_key() == default.static_key()
    resolved = default.with_model_ids(model)
    assert (resolved.bos_id, resolved.eos_id) == (model.bos_id, model.eos_id)
    assert DecodeConfig(bos_id=7).with_model_ids(model).bos_id == 7
    with pytest.raises(ValueError, match="bos_id"):
        default.with_model_ids(type("NoIds", (), {"eos_id": 1})())


def test_decoding_does_not_import_models():
    """decoding codes against `interfaces.Model`: models.py imports decoding, not the reverse."""
    tree = ast.parse(pathlib.Path(decoding.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert "spectron_jax.interfaces.Model" in imported
    assert not {"spectron_jax.models", "spectron_jax.models.SpectronModel"} & imported


def test_loop_states_are_pytrees():
    """The while_loop carries: every field a leaf (or subtree), so jax can loop over them."""
    b, s, n = 2, 5, 3
    cursor = decoding.CacheCursor(
        cache={"decoder": {"k": jnp.zeros((b, s, 4))}},
        index=jnp.asarray(1, jnp.int32),
        key_valid=jnp.zeros((b, s), jnp.int32),
        next_pos=jnp.zeros((b,), jnp.int32),
    )
    text = decoding.TextLoopState(
        cursor=cursor,
        tok=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        tokens=jnp.zeros((b, n), jnp.int32),
        lengths=jnp.zeros((b,), jnp.int32),
        k=jnp.asarray(1, jnp.int32),
    )
    frames = decoding.FrameLoopState(
        cursor=cursor,
        prev=jnp.zeros((b, 4)),
        active=jnp.ones((b,), bool),
        groups=jnp.zeros((b, n, 4)),
        stop_probs=jnp.zeros((b, n)),
        count=jnp.zeros((b,), jnp.int32),
        j=jnp.asarray(0, jnp.int32),
    )
    for state, fields in ((text, 5), (frames, 6)):
        assert len(jax.tree.leaves(state)) == 4 + fields
        # A loop that bumps the cursor keeps the carry's type and structure.
        bumped = jax.lax.fori_loop(
            0,
            3,
            lambda _, c: c.replace(cursor=c.cursor.replace(index=c.cursor.index + 1)),
            state,
        )
        assert type(bumped) is type(state)
        assert int(bumped.cursor.index) == 4

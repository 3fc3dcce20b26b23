"""Decoding: the KV-cached generation loop against teacher-forced and uncached references.

Random-init tiny Spectron (tests/spectron_testing.py) with a stop head and the pre-net's inference
dropout off, so that the cached loop must reproduce `Spectron.__call__` over the generated
sequence exactly. Compiles are shared through module fixtures (each one costs seconds on 2 cores).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import spectron_testing as st
from inference_testing import tiny_inference_config

from spectron_jax import checkpoints, cli, decoding, inference, losses
from spectron_jax.decoding import DecodeConfig
from spectron_jax.models import SpectronModel
from spectron_jax.network import Spectron

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
    with pytest.raises(ValueError, match="stop_threshold"):
        DecodeConfig(stop_threshold=1.5)
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


# Parsed at import (collection), before any test starts a thread: see test_code_shape.TREES.
DECODING_TREE = ast.parse(pathlib.Path(decoding.__file__).read_text())


def test_decoding_does_not_import_models():
    """decoding codes against `interfaces.Model`: models.py imports decoding, not the reverse."""
    imported = set()
    for node in ast.walk(DECODING_TREE):
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


# ------------------------------------------------------------------------------------------------
# The stop rule on known stop logits.
# ------------------------------------------------------------------------------------------------


def _rigged_stop(params, bias: float):
    """`params` with a stop head whose logit is `bias` on every group (zero kernel)."""
    stop = params["stop"]["dense"]
    rigged = {"kernel": jnp.zeros_like(stop["kernel"]), "bias": jnp.full_like(stop["bias"], bias)}
    return {**params, "stop": {"dense": rigged}}


def test_stop_bias_extremes_stop_after_one_group_or_never(setup, eos_run):
    model, params, batch = setup
    eos, _, out = eos_run
    r = model.config.reduction_factor
    for bias, groups in ((50.0, 1), (-50.0, MAX_FRAMES // r)):
        # Same static options as eos_run: use_stop_logit and the threshold are traced.
        got = jax.device_get(
            decoding.generate(
                model, _rigged_stop(params, bias), batch, _greedy(eos_id=eos, use_stop_logit=True)
            )
        )
        assert (got["frame_lengths"] == groups * r).all(), (bias, got["frame_lengths"])
        assert got["stopped"].tolist() == [bias > 0] * 3
        np.testing.assert_allclose(got["stop_probs"][:, :groups], jax.nn.sigmoid(bias))
        assert not got["stop_probs"][:, groups:].any()
        assert not got["frames"][:, groups * r :].any()
        np.testing.assert_array_equal(got["text_tokens"], out["text_tokens"])  # Text untouched.
    # Without the rule the same head changes nothing: every row runs to max_frames.
    fixed = jax.device_get(
        decoding.generate(model, _rigged_stop(params, 50.0), batch, _greedy(eos_id=eos))
    )
    assert (fixed["frame_lengths"] == MAX_FRAMES).all() and not fixed["stopped"].any()


def test_a_fresh_stop_head_starts_far_below_the_threshold():
    """Its initial bias makes "the end" unlikely, so an untrained head does not cut speech."""
    import flax.linen as nn

    from spectron_jax.nn.speech_heads import StopHead

    variables = nn.unbox(StopHead().init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 16))))
    bias = variables["params"]["dense"]["bias"]
    assert float(jax.nn.sigmoid(bias[0])) < 0.05


# Stop probabilities per row and frame group of the scheduled decode below.
SCHEDULE = np.array(
    [
        [0.1, 0.7, 0.9, 0.2],
        [0.5, 0.4, 0.6, 0.95],  # 0.5 does not cross a threshold of 0.5: the rule is ">".
        [0.1, 0.2, 0.3, 0.4],
    ],
    np.float32,
)


@functools.cache
def _scheduled_program(model_config, options, mesh=None):
    """The decode program traced with the scheduled frame step; its own cache, so that no other
    test meets the patched step (the thresholds are traced: one compile serves every case)."""
    assert mesh is None
    return jax.jit(functools.partial(decoding._generate, Spectron(model_config), options))


@pytest.fixture()
def scheduled_decoding(monkeypatch):
    """`decoding.generate` whose frame step emits group j filled with j + 1 and the stop logit
    of SCHEDULE[row, j], through the real loop and stop rule."""
    real_step = decoding._frame_step
    logits = jnp.asarray(np.log(SCHEDULE / (1 - SCHEDULE)))

    def step(module, prev, positions, mask, **head_args):
        group, _ = real_step(module, prev, positions, mask, **head_args)  # Keeps the cache writes.
        j = prev[:, 0, 0].astype(jnp.int32)  # Group j - 1 holds j; group -1 is zeros.
        return jnp.ones_like(group) + prev, jnp.take_along_axis(logits, j[:, None], axis=1)

    monkeypatch.setattr(decoding, "_frame_step", step)
    monkeypatch.setattr(decoding, "_compiled", _scheduled_program)
    return decoding.generate


@pytest.mark.parametrize(
    "threshold, groups, stopped",
    [
        (0.5, [2, 3, 4], [True, True, False]),
        (0.8, [3, 4, 4], [True, True, False]),  # Row 1 stops on its last group.
        (0.0, [1, 1, 1], [True, True, True]),
    ],
)
def test_decoding_stops_at_the_first_group_over_the_threshold(
    setup, eos_run, scheduled_decoding, threshold, groups, stopped
):
    model, params, batch = setup
    eos = eos_run[0]
    options = _greedy(eos_id=eos, use_stop_logit=True, stop_threshold=threshold)
    out = jax.device_get(scheduled_decoding(model, params, batch, options))
    r = model.config.reduction_factor
    assert out["frame_lengths"].tolist() == [g * r for g in groups]
    assert out["stopped"].tolist() == stopped
    for i, g in enumerate(groups):
        # The group that crossed is kept (it is the last one), nothing after it.
        want = np.zeros((MAX_FRAMES, model.config.n_mels), np.float32)
        want[: g * r] = np.repeat(np.arange(1, g + 1), r)[:, None]
        np.testing.assert_array_equal(out["frames"][i], want)
        np.testing.assert_allclose(out["stop_probs"][i, :g], SCHEDULE[i, :g], rtol=1e-5)
        assert not out["stop_probs"][i, g:].any()
    # The group decoding ends on is the one the training target marks as the last.
    frame_mask = (np.arange(MAX_FRAMES)[None] < out["frame_lengths"][:, None]).astype(np.int32)
    targets, _ = losses.stop_targets(frame_mask, r)
    for i, g in enumerate(groups):
        assert np.asarray(targets)[i].tolist() == [float(j == g - 1) for j in range(4)]


# ------------------------------------------------------------------------------------------------
# The entry points end speech on the stop head by default.
# ------------------------------------------------------------------------------------------------


def test_for_model_uses_the_stop_head_unless_fixed_duration(setup):
    model = setup[0]
    options = DecodeConfig.for_model(model, max_frames=6, stop_threshold=0.3)
    assert options.use_stop_logit and options.stop_threshold == 0.3 and options.max_frames == 6
    assert (options.bos_id, options.eos_id) == (model.bos_id, model.eos_id)
    assert not DecodeConfig.for_model(model, fixed_duration=True).use_stop_logit
    no_stop = st.tiny_model(dataclasses.replace(model.config, stop_head=False))
    assert not DecodeConfig.for_model(no_stop).use_stop_logit
    # The low-level default stays a fixed duration (T5X's predict_batch_with_aux, samples).
    assert not DecodeConfig().use_stop_logit


@pytest.fixture(scope="module")
def stop_checkpoint(tmp_path_factory):
    """A tiny random checkpoint whose stop head says "last group" everywhere (logit +50), and a
    0.6 s noise prompt: with the stop logit its speech is one frame group long."""
    config = dataclasses.replace(tiny_inference_config(), stop_head=True)
    batch = st.random_batch(config, batch_size=1)
    params = _rigged_stop(st.init_params(config, batch, seed=1), 50.0)
    model_dir = tmp_path_factory.mktemp("stop_model")
    checkpoints.save_for_inference(model_dir, SpectronModel(config), params, 3)
    rate = config.spectrogram.sample_rate
    noise = np.random.default_rng(0).normal(0, 0.1, int(0.6 * rate)).astype(np.float32)
    wav = model_dir / "prompt.wav"
    sf.write(wav, noise, rate)
    return model_dir, config, wav


def test_continue_stops_on_the_head_by_default(stop_checkpoint, tmp_path, capsys, monkeypatch):
    model_dir, config, wav = stop_checkpoint
    configs = []
    real = decoding.generate

    def spy(model, params, batch, options, **kw):
        configs.append(options)
        return real(model, params, batch, options, **kw)

    monkeypatch.setattr(decoding, "generate", spy)
    hop, r = config.spectrogram.hop_length, config.reduction_factor
    argv = ["continue", "--checkpoint", model_dir, "--audio", wav, "--seconds", "0.5"]
    argv += ["--max-text-tokens", "4"]

    # `--stop`, the old opt-in, still parses and changes nothing.
    code = cli.main([str(a) for a in argv + ["--out", tmp_path / "a.wav", "--stop"]])
    assert code == 0
    assert configs[-1].use_stop_logit and configs[-1].stop_threshold == 0.5
    assert configs[-1].max_frames == inference.num_frames_for(config, 0.5)  # The maximum.
    assert sf.info(tmp_path / "a.wav").frames == r * hop  # One group: the head stopped it.
    assert "ended by the model" in capsys.readouterr().out

    code = cli.main([str(a) for a in argv + ["--out", tmp_path / "b.wav", "--fixed-duration"]])
    assert code == 0 and not configs[-1].use_stop_logit
    assert sf.info(tmp_path / "b.wav").frames == inference.num_frames_for(config, 0.5) * hop
    assert "ended by the model" not in capsys.readouterr().out


def test_eval_flags_reach_the_runner(monkeypatch, tmp_path, capsys):
    from spectron_jax.evaluation import runner

    seen = []

    def evaluate(checkpoint, task, split, out, options, *, vocabulary_path=None):
        seen.append(options)
        return runner.EvalResult({"num_examples": 0}, [], str(out), "", "report.md")

    monkeypatch.setattr(runner, "evaluate", evaluate)
    argv = ["eval", "--checkpoint", "x", "--task", "t", "--split", "s", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert not seen[-1].fixed_duration and seen[-1].stop_threshold == 0.5
    assert cli.main(argv + ["--fixed-duration", "--stop-threshold", "0.3"]) == 0
    assert seen[-1].fixed_duration and seen[-1].stop_threshold == 0.3
    capsys.readouterr()


def _eval_example(config, i, prompt, n_ref):
    rng = np.random.default_rng(i)
    return {
        "id": f"ex{i}",
        "speaker_id": "",
        "prompt_text": "one two",
        "continuation_text": "three",
        "prompt_features": prompt,
        "prompt_length": np.int32(len(prompt)),
        "continuation_frames": rng.normal(-2, 1, (n_ref, config.n_mels)).astype(np.float32),
        "continuation_length": np.int32(n_ref),
    }


def test_spectron_eval_measures_the_self_stopped_length(stop_checkpoint, tmp_path):
    from spectron_jax.evaluation import runner

    model_dir, config, wav = stop_checkpoint
    loaded = inference.load_model_for_inference(model_dir)
    waveform, _ = sf.read(wav, dtype="float32")
    prompt = inference.prompt_features(config, waveform)
    examples = [_eval_example(config, 0, prompt, 9), _eval_example(config, 1, prompt, 30)]
    r = config.reduction_factor

    # Without --seconds the maximum is the longest reference, with headroom (1.5 x 30) when the
    # stop logit ends the speech.
    options = runner.EvalOptions(batch_size=2, num_samples=0, max_text_tokens=4)
    assert runner.decode_config_for(loaded, examples, options).max_frames == 46  # 45 -> groups
    fixed = dataclasses.replace(options, fixed_duration=True)
    assert runner.decode_config_for(loaded, examples, fixed).max_frames == 30

    # One --seconds for both runs (one compiled program): the head ends both after one group.
    options = dataclasses.replace(options, seconds=0.25)
    most = inference.num_frames_for(config, 0.25)
    result = runner.evaluate_examples(loaded, examples, tmp_path / "stop", options)
    m = result.metrics
    assert m["hit_max_fraction"] == 0.0
    assert m["length_error_frames_mean"] == pytest.approx(((r - 9) + (r - 30)) / 2)
    assert m["length_error_frames_mae"] == pytest.approx(((9 - r) + (30 - r)) / 2)
    assert [e["length_error_frames"] for e in result.examples] == [r - 9, r - 30]
    assert all(e["stopped"] and e["generated_frames"] == r for e in result.examples)

    # A fixed duration runs to the maximum: every example hits it.
    fixed = dataclasses.replace(options, fixed_duration=True)
    m = runner.evaluate_examples(loaded, examples, tmp_path / "fixed", fixed).metrics
    assert m["hit_max_fraction"] == 1.0
    assert m["length_error_frames_mean"] == pytest.approx(((most - 9) + (most - 30)) / 2)


def test_sharded_decoding_equals_single_device():
    """8 fake devices, data x fsdp x tensor = 2 x 2 x 2: parameters placed by their logical
    axes, the batch and the KV cache over data x fsdp, kv heads over tensor."""
    from spectron_jax import partitioning

    config = st.tiny_config(stop_head=True, prenet_dropout_at_inference=False)
    batch = st.random_batch(config, batch_size=4)
    params = st.init_params(config, batch)
    model = st.tiny_model(config)
    options = _greedy(eos_id=-1)
    single = jax.device_get(decoding.generate(model, params, batch, options))
    mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
    shardings = decoding.param_shardings(model, mesh)
    # The decoder's query kernel [L, D, H, Dh] is split: D over fsdp, heads over tensor.
    q_spec = shardings["decoder"]["layers"]["attn"]["q_proj"]["kernel"].spec
    assert tuple(q_spec) == (None, "fsdp", "tensor", None)
    sharded = decoding.generate(model, params, batch, options, mesh=mesh)
    assert sharded["frames"].sharding.num_devices == 8
    sharded = jax.device_get(sharded)
    np.testing.assert_array_equal(sharded["text_tokens"], single["text_tokens"])
    np.testing.assert_array_equal(sharded["frame_lengths"], single["frame_lengths"])
    np.testing.assert_allclose(sharded["frames"], single["frames"], atol=1e-4)

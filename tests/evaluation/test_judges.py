"""The judged metrics: the pure figures on hand-made cases, the judges' wiring with stand-in models,
and, where `pip install -e ".[judges]"` put them, the real judges on eSpeak speech and in
`spectron eval`."""

import json
import types

import numpy as np
import pytest
from inference_testing import make_tiny_checkpoint, tiny_inference_config

from spectron_jax import cli, inference
from spectron_jax.evaluation import judges, metrics, runner

N_MELS = 80
SKIP_REASON = 'the judges are not installed here: pip install -e ".[judges]"'


def _require(module):
    return pytest.importorskip(module, reason=f"{module} missing; {SKIP_REASON}")


# ------------------------------------------------------------------------------------------------
# Pure figures.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference, hypothesis, expected",
    [
        ("one two three", "one two three", 1.0),
        ("one two three", "one too three", 2 / 3),  # one substitution
        ("one two three", "one three", 2 / 3),  # one deletion
        ("one two three four", "one two three four five", 3 / 4),  # one insertion
        ("one two", "five six seven eight", 0.0),  # 4 errors > 2 words: clipped at 0
        ("One, TWO!", ["one", "two"], 1.0),  # normalised; words as a sequence
        ("", "", 1.0),
        ("", "one", 0.0),
        ("one two", "", 0.0),
    ],
)
def test_word_accuracy_known_cases(reference, hypothesis, expected):
    assert metrics.word_accuracy(reference, hypothesis) == pytest.approx(expected)


def test_word_accuracy_agrees_with_wer_where_unclipped():
    ref, hyp = "twenty one twenty two twenty three", "twenty one two twenty three four"
    wer = metrics.word_error_rate([ref], [hyp])
    assert metrics.word_accuracy(ref, hyp) == pytest.approx(1 - wer)


def test_speaker_gap_known_cases():
    assert metrics.speaker_gap([0.9, 0.7], [0.5, 0.5]) == pytest.approx(0.3)
    # Pairs with a missing figure are left out, not counted as 0.
    assert metrics.speaker_gap([0.9, np.nan, 0.6], [0.4, 0.1, np.nan]) == pytest.approx(0.5)
    assert np.isnan(metrics.speaker_gap([np.nan], [0.2]))
    with pytest.raises(ValueError, match="one length"):
        metrics.speaker_gap([0.1, 0.2], [0.1])


def test_other_speaker_pairs_are_deterministic_and_cross_speaker():
    ids = ["a", "a", "b", "c", "", "b"]
    assert judges.other_speaker_pairs(ids) == [2, 2, 3, 5, None, 0]
    # An unusable partner (no generated audio) is passed over.
    assert judges.other_speaker_pairs(ids, [True, True, False, True, True, True]) == [
        3,
        3,
        3,
        5,
        None,
        0,
    ]
    assert judges.other_speaker_pairs(["a", "a"]) == [None, None]


def test_number_words_are_the_counting_vocabulary():
    from spectron_tasks.synthetic_counting import number_words

    words = {w for n in range(100) for w in number_words(n).split()}
    assert set(judges.NUMBER_WORDS) == words and len(judges.NUMBER_WORDS) == 28


def test_asr_vocabulary_specs(tmp_path):
    assert judges.resolve_asr_words(None) is None and judges.resolve_asr_words("") is None
    assert judges.resolve_asr_words("numbers") == judges.NUMBER_WORDS
    assert judges.resolve_asr_words("references", ["One two", "two, Three"]) == (
        "one",
        "three",
        "two",
    )
    assert judges.resolve_asr_words("yes,no maybe") == ("maybe", "no", "yes")
    (tmp_path / "words.txt").write_text("alpha\nbeta gamma\n")
    assert judges.resolve_asr_words(str(tmp_path / "words.txt")) == ("alpha", "beta", "gamma")
    grammar = judges.jsgf_word_grammar(["two one", "one"])
    assert grammar.startswith("#JSGF V1.0;") and "( one | two )*" in grammar
    with pytest.raises(ValueError, match="at least one word"):
        judges.jsgf_word_grammar([" "])


def test_a_missing_judge_names_the_extra(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(judges.importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[judges\]"'):
        judges.PocketSphinxAsr()
    with pytest.raises(ImportError, match="resemblyzer"):
        judges.ResemblyzerSpeakerEncoder()


def test_spectron_eval_without_the_judges_fails_before_decoding(monkeypatch, tmp_path, capsys):
    def missing():
        raise ImportError(f"the resemblyzer judge is not installed: {judges.INSTALL_HINT}")

    monkeypatch.setattr(judges, "check_installed", missing)
    args = ["eval", "--checkpoint", str(tmp_path / "none"), "--task", "t", "--split", "test"]
    assert cli.main([*args, "--out", str(tmp_path / "out"), "--judges"]) == 2
    assert 'pip install -e ".[judges]"' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# The panel with stand-in models (no install needed).
# ------------------------------------------------------------------------------------------------


class _TaggedAsr:
    """Hears the text `texts[tag]`, the tag being the waveform's first sample."""

    def __init__(self, texts):
        self.texts = texts

    def transcribe(self, waveform, sample_rate):
        assert sample_rate == 16_000
        return self.texts[round(float(waveform[0]), 3)]


class _TaggedEncoder:
    def __init__(self, vectors):
        self.vectors = vectors

    def embed_waveform(self, waveform, sample_rate):
        vector = np.asarray(self.vectors[round(float(waveform[0]), 3)], np.float32)
        return vector / np.linalg.norm(vector)


def _tagged(tag):
    return np.full(1600, tag, np.float32)


def test_judge_one_example_with_known_answers():
    asr = _TaggedAsr({0.2: "three four", 0.3: "three four five", 0.4: "three"})
    encoder = _TaggedEncoder({0.1: [1, 0], 0.2: [1, 1], 0.3: [1, 0], 0.4: [0, 1]})
    panel = judges.Judges(asr, encoder)
    record = {
        "kind": "continuation",
        "continuation_text": "three four five",
        "hyp_continuation": "three four",
    }
    audio = judges.JudgedAudio(
        sample_rate=16_000,
        prompt=_tagged(0.1),
        prompt_source="recording",
        generated=_tagged(0.2),
        reference=_tagged(0.3),
        reference_vocoded=_tagged(0.4),
    )
    prompt, generated, _ = panel.judge(record, audio)
    assert record["judge_asr_generated"] == "three four"
    assert record["judge_word_accuracy_generated_vs_text"] == 1.0
    assert record["judge_word_accuracy_generated_vs_reference"] == pytest.approx(2 / 3)
    assert record["judge_word_accuracy_reference_audio"] == 1.0
    assert record["judge_word_accuracy_reference_vocoded"] == pytest.approx(1 / 3)
    assert record["judge_speaker_sim_generated"] == pytest.approx(np.sqrt(0.5))
    assert record["judge_speaker_sim_reference"] == pytest.approx(1.0)
    assert record["judge_speaker_sim_reference_vocoded"] == pytest.approx(0.0, abs=1e-7)
    assert record["judge_prompt_audio"] == "recording"
    np.testing.assert_allclose(generated, np.array([1, 1]) / np.sqrt(2), rtol=1e-6)

    # A spoken answer: no reference figures; without prompt audio, no speaker figures.
    qa = {"kind": "qa", "continuation_text": "paris", "hyp_continuation": "three four"}
    assert panel.judge(qa, judges.JudgedAudio(16_000, generated=_tagged(0.2))) == (None, None, {})
    assert qa["judge_word_accuracy_generated_vs_text"] == 1.0
    assert not any("reference" in k or "speaker" in k for k in qa)


def test_other_speaker_baseline_and_summary():
    records = [
        {"id": "a", "speaker_id": "s1", "judge_speaker_sim_generated": 0.9},
        {"id": "b", "speaker_id": "s1", "judge_speaker_sim_generated": 0.7},
        {"id": "c", "speaker_id": "s2", "judge_speaker_sim_generated": 0.8},
    ]
    unit = np.array([1.0, 0.0], np.float32)
    half = np.array([0.6, 0.8], np.float32)
    records[0]["judge_speaker_sim_reference"] = 0.95  # Only a has a reference similarity.
    judges.judge_other_speakers(
        records,
        [(unit, unit, {}), (unit, unit, {"reference": None}), (unit, half, {"reference": unit})],
    )
    # a and b pair with c (prompt . c's generation = 0.6); c pairs with a (1.0).
    assert [r["judge_other_example"] for r in records] == ["c", "c", "a"]
    assert [r["judge_speaker_sim_other_speaker"] for r in records] == pytest.approx([0.6, 0.6, 1.0])
    summary = judges.summarize(records)
    assert summary["judge_speaker_sim_generated"] == pytest.approx(0.8)
    assert summary["judge_speaker_sim_other_speaker"] == pytest.approx(2.2 / 3)
    assert summary["judge_speaker_gap"] == pytest.approx((0.3 + 0.1 - 0.2) / 3)
    # a and b pair with c, whose reference embedding is `unit`; only a has its own reference.
    assert records[1]["judge_speaker_sim_reference_other_speaker"] == pytest.approx(1.0)
    assert "judge_speaker_sim_reference_other_speaker" not in records[2]  # a has no reference.
    assert summary["judge_speaker_gap_reference"] == pytest.approx(0.95 - 1.0)
    assert "judge_speaker_gap_ratio" not in summary  # A negative real gap gives no ratio.
    section = judges.markdown(summary, ["judges: stand-ins"])
    assert "| `judge_speaker_gap` | 0.0667 | higher |" in section
    assert "| `judge_speaker_sim_other_speaker` | 0.7333 | baseline |" in section
    assert judges.summarize([{"id": "x"}]) == {} and judges.markdown({}, []) == ""


def _example(ex_id, speaker, prompt_text, continuation_text, rng, with_audio=True):
    ex = {
        "id": ex_id,
        "speaker_id": speaker,
        "prompt_text": prompt_text,
        "continuation_text": continuation_text,
        "prompt_features": rng.normal(-2, 1, (30, N_MELS)).astype(np.float32),
        "prompt_length": np.int32(30),
        "continuation_frames": rng.normal(-2, 1, (25, N_MELS)).astype(np.float32),
        "continuation_length": np.int32(25),
    }
    if with_audio:
        ex["prompt_audio"] = rng.normal(0, 0.1, 4800).astype(np.float32)
        ex["continuation_audio"] = rng.normal(0, 0.1, 4000).astype(np.float32)
    return ex


def test_runner_reports_judged_figures_with_stand_in_judges(tmp_path, monkeypatch):
    """The wiring: every judged key in metrics.json and the report, the heard audio sources."""
    rng = np.random.default_rng(0)
    examples = [
        _example("a", "s1", "one two", "three four", rng),
        _example("b", "s2", "five six", "seven eight", rng, with_audio=False),
    ]
    texts = {"a": "one two three four", "b": "five six seven"}
    heard = []

    class ConstantAsr:
        def transcribe(self, waveform, sample_rate):
            heard.append(len(waveform))
            return "three four"

    class ConstantEncoder:
        def embed_waveform(self, waveform, sample_rate):
            return np.ones(4, np.float32) / 2

    def generate(loaded, features, decode_config, prompt_frames=None):
        gens = []
        for f in features:
            ex = next(e for e in examples if np.shares_memory(e["prompt_features"], f))
            frames = rng.normal(-2, 1, (20, N_MELS)).astype(np.float32)
            gens.append(inference.Generation(text=texts[ex["id"]], frames=frames))
        return gens

    created = []
    monkeypatch.setattr(inference, "generate", generate)
    monkeypatch.setattr(judges, "check_installed", lambda: None)
    monkeypatch.setattr(
        judges.Judges,
        "create",
        classmethod(
            lambda cls, words: created.append(words) or cls(ConstantAsr(), ConstantEncoder())
        ),
    )
    model = types.SimpleNamespace(config=tiny_inference_config(), bos_id=3, eos_id=1)
    loaded = inference.LoadedModel(model=model, params=None, vocabulary=None, step=2)
    options = runner.EvalOptions(seconds=0.2, num_samples=0, judges=True, asr_words="references")
    result = runner.evaluate_examples(loaded, examples, tmp_path, options)

    assert created == [("eight", "five", "four", "one", "seven", "six", "three", "two")]
    m = result.metrics
    # a: "three four" said and meant; b: model text "seven", reference "seven eight".
    assert m["judge_word_accuracy_generated_vs_text"] == pytest.approx(0.5)
    assert m["judge_word_accuracy_generated_vs_reference"] == pytest.approx(0.5)
    assert m["judge_word_accuracy_reference_audio"] == 1.0  # only a has the recording
    assert m["judge_word_accuracy_reference_vocoded"] == pytest.approx(0.5)
    for key in ("generated", "reference", "reference_vocoded", "other_speaker"):
        assert m[f"judge_speaker_sim_{key}"] == pytest.approx(1.0)
    assert m["judge_speaker_gap"] == pytest.approx(0.0)
    by_id = {r["id"]: r for r in result.examples}
    assert by_id["a"]["judge_prompt_audio"] == "recording"
    assert by_id["b"]["judge_prompt_audio"] == "vocoded"  # the log-mel front end's prompt
    assert (
        by_id["a"]["judge_other_example"] == "b" and "judge_speaker_sim_reference" not in by_id["b"]
    )
    hop = tiny_inference_config().spectrogram.hop_length
    # a: generated, recording, vocoded reference; b: generated, vocoded reference.
    assert heard == [20 * hop, 4000, 25 * hop, 20 * hop, 25 * hop]

    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["metrics"]["judge_speaker_gap"] == pytest.approx(0.0)
    assert any("judged prompt audio: recording, vocoded" in n for n in data["notes"])
    report = (tmp_path / "report.md").read_text()
    assert "## Judged by pretrained models" in report
    assert "| `judge_word_accuracy_reference_audio` | 1.0000 | ceiling |" in report


def test_fsdd_examples_carry_their_recordings(shared_data):
    from spectron_jax.audio.spectrogram import SpectrogramConfig

    examples = runner.load_examples("spectron_fsdd_counting", "test", 2, with_audio=True)
    spec = SpectrogramConfig()
    for ex in examples:
        # The recording is the one the features were computed from.
        mel = spec.features_numpy(ex["prompt_audio"])
        assert len(mel) == int(ex["prompt_length"])
        np.testing.assert_allclose(mel, ex["prompt_features"], atol=2e-3)
        assert len(spec.features_numpy(ex["continuation_audio"])) == ex["continuation_length"]


# ------------------------------------------------------------------------------------------------
# The real judges (where installed).
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def espeak_speech():
    """{(voice, text): float32[S]} at 22,050 Hz, and the rate."""
    from spectron_tasks.espeak import VoiceSettings, synthesize_batch

    requests = [
        ("en-us", "one two three"),
        ("en+f2", "one two three"),
        ("en-us", "five six seven eight"),
        ("en+f2", "five six seven eight"),
        ("en-us", "twenty one twenty two twenty three"),
        ("en+f2", "twenty one twenty two twenty three"),
    ]
    waves, rate = synthesize_batch(
        [t for _, t in requests], [VoiceSettings(v) for v, _ in requests]
    )
    return {r: w.astype(np.float32) / 32768 for r, w in zip(requests, waves, strict=True)}, rate


def test_pocketsphinx_hears_number_words(espeak_speech):
    _require("pocketsphinx")
    speech, rate = espeak_speech
    asr = judges.PocketSphinxAsr(judges.NUMBER_WORDS)
    for voice in ("en-us", "en+f2"):
        assert asr.transcribe(speech[voice, "one two three"], rate) == "one two three", voice
    # Order does not matter: each call is one utterance of its own.
    first = asr.transcribe(speech["en-us", "twenty one twenty two twenty three"], rate)
    asr.transcribe(speech["en+f2", "one two three"], rate)
    assert asr.transcribe(speech["en-us", "twenty one twenty two twenty three"], rate) == first
    assert asr.transcribe(np.zeros(16_000, np.float32), 16_000) == ""
    assert asr.transcribe(np.zeros(0, np.float32), 16_000) == ""
    with pytest.raises(ValueError, match="qwzx"):
        judges.PocketSphinxAsr(["one", "qwzx"])


def test_resemblyzer_tells_voices_apart(espeak_speech):
    _require("resemblyzer")
    speech, rate = espeak_speech
    encoder = judges.ResemblyzerSpeakerEncoder()
    emb = {key: encoder.embed_waveform(w, rate) for key, w in speech.items()}
    one = emb["en-us", "one two three"]
    assert one.shape == (256,) and one.dtype == np.float32
    assert np.linalg.norm(one) == pytest.approx(1.0, abs=1e-5)
    # The same utterance at another sample rate: the same speaker vector.
    from spectron_jax.audio.io import resample

    again = resample(speech["en-us", "one two three"], rate, 16_000)
    assert float(one @ encoder.embed_waveform(again, 16_000)) > 0.99
    texts = sorted({t for _, t in speech})
    same = [
        emb[v, a] @ emb[v, b] for v in ("en-us", "en+f2") for a in texts for b in texts if a < b
    ]
    different = [emb["en-us", t] @ emb["en+f2", t] for t in texts]
    assert np.mean(same) > np.mean(different) + 0.03, (same, different)
    with pytest.raises(ValueError, match="no speaker"):
        encoder.embed_waveform(np.zeros(8000, np.float32), 16_000)


@pytest.mark.slow  # One decode compile of the tiny model and both judges: about a minute.
def test_spectron_eval_with_judges_writes_the_judged_figures(shared_data, tmp_path, capsys):
    _require("pocketsphinx")
    _require("resemblyzer")
    model_dir = tmp_path / "model"
    make_tiny_checkpoint(model_dir)
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(model_dir), "--task", "spectron_fsdd_counting"]
    args += ["--split", "test", "--out", str(out), "--max-examples", "2", "--batch-size", "2"]
    args += ["--seconds", "1", "--num-samples", "0", "--max-text-tokens", "8"]
    assert cli.main([*args, "--judges", "--asr-words", "numbers"]) == 0
    assert "judge_speaker_gap" in capsys.readouterr().out
    data = json.loads((out / "metrics.json").read_text())
    for key in (*judges.MEAN_KEYS, "judge_speaker_gap"):
        assert isinstance(data["metrics"][key], float), key
    for key in ("judge_word_accuracy_reference_audio", "judge_word_accuracy_reference_vocoded"):
        assert 0.0 <= data["metrics"][key] <= 1.0
    assert {r["judge_prompt_audio"] for r in data["examples"]} == {"recording"}
    assert "## Judged by pretrained models" in (out / "report.md").read_text()


def test_speaker_gap_ratio_against_the_reference_gap():
    """Generated gap 0.2, real gap 0.4 -> ratio 0.5 (the target is at least half)."""
    e1, e2 = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    records = [
        {"id": "a", "speaker_id": "s1", "judge_speaker_sim_generated": 0.7},
        {"id": "b", "speaker_id": "s2", "judge_speaker_sim_generated": 0.7},
    ]
    for r in records:
        r["judge_speaker_sim_reference"] = 0.9
    # Prompt . other's generation = 0.5; prompt . other's reference = 0.5.
    mix = np.array([0.5, 0.5], np.float32)
    both = {"reference": mix, "reference_vocoded": e1}
    judges.judge_other_speakers(records, [(e1, mix, both), (e2, mix, both)])
    for r in records:
        r["judge_speaker_sim_reference_vocoded"] = 0.6
    summary = judges.summarize(records)
    assert summary["judge_speaker_gap"] == pytest.approx(0.2)
    assert summary["judge_speaker_gap_reference"] == pytest.approx(0.4)
    assert summary["judge_speaker_gap_ratio"] == pytest.approx(0.5)
    # Through the vocoder: a's prompt . e1 = 1, b's prompt . e1 = 0 -> gaps -0.4 and 0.6.
    assert summary["judge_speaker_gap_reference_vocoded"] == pytest.approx(0.1)
    section = judges.markdown(summary, [])
    assert "| `judge_speaker_sim_reference_other_speaker` | 0.5000 | baseline |" in section
    assert "| `judge_speaker_gap_reference` | 0.4000 | ceiling |" in section

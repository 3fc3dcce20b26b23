"""The evaluation runner: figures on hand-made cases with known answers, the files it writes, the
end-to-end `spectron eval` on real recordings, speaker encoder and the guarded log-perplexity."""

import itertools
import json
import math
import types

import numpy as np
import pytest
from inference_testing import make_tiny_checkpoint, tiny_inference_config

from spectron_jax import cli, inference
from spectron_jax.evaluation import metrics, report, runner
from spectron_jax.evaluation.perplexity import LocalLm, require_local_model_dir
from spectron_jax.evaluation.speaker import MelStatsSpeakerEncoder, load_speaker_encoder
from spectron_jax.interfaces import EvalContext, Evaluator

N_MELS = 80


def _example(ex_id, prompt_text, continuation_text, prompt, reference):
    return {
        "id": ex_id,
        "speaker_id": "",
        "prompt_text": prompt_text,
        "continuation_text": continuation_text,
        "prompt_features": prompt.astype(np.float32),
        "prompt_length": np.int32(len(prompt)),
        "continuation_frames": reference.astype(np.float32),
        "continuation_length": np.int32(len(reference)),
    }


def _fake_generate(outputs):
    """A stand-in for `inference.generate` returning fixed (text, frames) per prompt."""

    def generate(loaded, features, decode_config, prompt_frames=None):
        del loaded, decode_config, prompt_frames
        out = []
        for f in features:
            key = next(
                k
                for k, (prompt, _, _) in outputs.items()
                if len(prompt) == len(f) and np.shares_memory(prompt, f)
            )
            _, text, frames = outputs[key]
            out.append(inference.Generation(text=text, frames=frames))
        return out

    return generate


def _fake_loaded(config):
    # Special ids unlike the tiny vocabulary's (3, 1): decoding must take the model's.
    model = types.SimpleNamespace(config=config, bos_id=7, eos_id=5)
    return inference.LoadedModel(model=model, params=None, vocabulary=None, step=5)


@pytest.fixture(scope="module")
def config():
    return tiny_inference_config()


def test_figures_on_known_cases(config, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    p_a, p_b = rng.normal(-2, 1, (32, N_MELS)), rng.normal(-2, 1, (20, N_MELS))
    r_b = rng.normal(-2, 1, (30, N_MELS))
    p_c, p_d = rng.normal(-2, 1, (25, N_MELS)), rng.normal(-2, 1, (28, N_MELS))
    none = np.zeros((0, N_MELS))
    examples = [
        # Exact text; generated frames = the prompt, whose first 30 frames are the reference.
        _example("a", "one two", "three four", p_a, p_a[:30]),
        # "six" -> "sex" and a dropped "eight"; frames = reference + 1 (a pure gain change).
        _example("b", "five six", "seven eight", p_b, r_b),
        # Spoken QA (no reference frames); accents and case differ from the reference answer.
        _example("c", "what is the capital of brazil", "Brasília", p_c, none),
        _example("d", "what is the capital of france", "Paris", p_d, none),
    ]
    outputs = {
        "a": (examples[0]["prompt_features"], "one two three four", p_a.astype(np.float32)),
        "b": (
            examples[1]["prompt_features"],
            "five sex seven",
            np.concatenate([r_b + 1.0, r_b[:2]]).astype(np.float32),
        ),
        "c": (
            examples[2]["prompt_features"],
            "what is the capital of brazil it is BRASILIA",
            p_c[:10].astype(np.float32),
        ),
        "d": (
            examples[3]["prompt_features"],
            "what is the capital of france london",
            p_d[:10].astype(np.float32),
        ),
    }
    monkeypatch.setattr(inference, "generate", _fake_generate(outputs))
    options = runner.EvalOptions(seconds=0.5, num_samples=2, batch_size=3)
    result = runner.evaluate_examples(
        _fake_loaded(config), examples, tmp_path, options, task="hand_made", split="test"
    )

    m = result.metrics
    assert m["num_examples"] == 4 and m["num_continuation_examples"] == 2
    assert m["num_qa_examples"] == 2
    # One substituted prompt word out of 2 + 2 + 6 + 6 reference words.
    assert m["transcript_wer"] == pytest.approx(1 / 16)
    assert m["continuation_text_accuracy"] == 0.5
    assert m["continuation_wer"] == pytest.approx(1 / 4)  # "eight" deleted of 4 words
    assert m["qa_accuracy"] == 0.5
    # a: identical over the common 30 frames; b: every bin off by exactly 1.
    assert m["spectrogram_l1"] == pytest.approx(0.5)
    assert m["spectrogram_l2"] == pytest.approx(0.5)
    assert m["mcd_db"] == pytest.approx(0.0, abs=1e-4)  # a gain change moves only c0
    by_id = {r["id"]: r for r in result.examples}
    assert by_id["b"]["hyp_transcript"] == "five sex"
    assert by_id["b"]["hyp_continuation"] == "seven"
    assert by_id["b"]["dtw_l1"] == pytest.approx(
        metrics.dtw_l1(outputs["b"][2], r_b.astype(np.float32))
    )
    assert by_id["a"]["speaker_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert by_id["c"]["qa_correct"] and not by_id["d"]["qa_correct"]
    assert "spectrogram_l1" not in by_id["c"]

    # Files: JSON of every figure, the report, samples of the first two, TensorBoard events.
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["metrics"] == report.jsonable(m)
    assert [r["id"] for r in data["examples"]] == ["a", "b", "c", "d"]
    assert data["task"] == "hand_made" and data["step"] == 5
    assert (data["decode"]["bos_id"], data["decode"]["eos_id"]) == (7, 5)
    assert any("log-perplexity skipped" in n for n in data["notes"])
    md = (tmp_path / "report.md").read_text()
    assert "| prompt transcript WER (model's own text) (`transcript_wer`) | 0.0625 |" in md
    worst = md.split("## Worst")[1]
    assert worst.index("| b |") < worst.index("| a |")  # b has the higher WER
    assert "## Spoken QA misses (1)" in md and "| d |" in md
    for name in ("a.png", "a.wav", "b.png", "b.wav"):
        assert (tmp_path / "samples" / name).stat().st_size > 0
    assert not (tmp_path / "samples" / "c.png").exists()
    assert _tensorboard_scalar(tmp_path / "tensorboard", "eval/hand_made/transcript_wer") == (
        pytest.approx(1 / 16)
    )


def _tensorboard_scalar(logdir, tag):
    import tensorflow as tf

    values = []
    for path in logdir.glob("events.out.tfevents*"):
        for raw in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            for v in event.summary.value:
                if v.tag == tag:
                    values.append(
                        float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
                    )
    assert len(values) == 1, f"{tag}: {values}"
    return values[0]


def test_task_features_that_do_not_fit_the_model(config, tmp_path):
    ex = _example("x", "a", "b", np.zeros((10, 40)), np.zeros((5, 40)))
    with pytest.raises(ValueError, match="n_mels 80"):
        runner.evaluate_examples(_fake_loaded(config), [ex], tmp_path)


def test_llama_questions_examples_score_as_qa(config, shared_data, tmp_path, monkeypatch):
    examples = runner.load_examples("spectron_llama_questions", "test", max_examples=2)
    assert len(examples) == 2
    for ex in examples:
        assert ex["continuation_length"] == 0 and ex["prompt_features"].shape[1] == N_MELS
        assert isinstance(ex["prompt_text"], str) and ex["continuation_text"]
    outputs = {
        ex["id"]: (
            ex["prompt_features"],
            f"{ex['prompt_text']} {ex['continuation_text']}",
            np.full((4, N_MELS), -3.0, np.float32),
        )
        for ex in examples
    }
    monkeypatch.setattr(inference, "generate", _fake_generate(outputs))
    result = runner.evaluate_examples(
        _fake_loaded(config), examples, tmp_path, runner.EvalOptions(seconds=0.1, num_samples=0)
    )
    assert result.metrics["qa_accuracy"] == 1.0 and result.metrics["transcript_wer"] == 0.0


@pytest.mark.slow  # About 50 s on a busy 2-core machine: one more decode compile.
def test_spectron_eval_end_to_end(shared_data, tmp_path, capsys):
    model_dir = tmp_path / "model"
    make_tiny_checkpoint(model_dir)
    out = tmp_path / "eval"
    code = cli.main(
        [
            "eval",
            "--checkpoint",
            str(model_dir),
            "--task",
            "spectron_fsdd_counting",
            "--split",
            "test",
            "--out",
            str(out),
            "--max-examples",
            "2",
            "--batch-size",
            "2",
            "--seconds",
            "1",
            "--num-samples",
            "1",
            "--max-text-tokens",
            "8",
        ]
    )
    assert code == 0
    assert "2 examples of spectron_fsdd_counting:test" in capsys.readouterr().out
    data = json.loads((out / "metrics.json").read_text())
    for key in (
        "transcript_wer",
        "transcript_cer",
        "continuation_text_accuracy",
        "spectrogram_l1",
        "spectrogram_l2",
        "mcd_db",
        "dtw_l1",
        "speaker_similarity",
    ):
        assert isinstance(data["metrics"][key], float), key
    assert data["metrics"]["num_examples"] == 2 and data["step"] == 3
    assert data["decode"]["max_frames"] == inference.num_frames_for(tiny_inference_config(), 1.0)
    first = data["examples"][0]
    assert (out / first["png"]).exists() and (out / first["wav"]).exists()
    assert "png" not in data["examples"][1]
    assert (out / "report.md").read_text().startswith("# Spectron evaluation")
    assert list((out / "tensorboard").glob("events.out.tfevents*"))


def test_task_evaluator_in_training_equals_spectron_eval(shared_data, tmp_path):
    """The evaluator `train()` runs gives the figures `spectron eval` writes for the same params."""
    model_dir = tmp_path / "model"
    make_tiny_checkpoint(model_dir)
    options = runner.EvalOptions(max_examples=2, batch_size=2, seconds=1.0, num_samples=0)
    cli_result = runner.evaluate(
        model_dir, "spectron_fsdd_counting", "test", tmp_path / "a", options
    )
    loaded = inference.load_model_for_inference(model_dir)
    evaluator = runner.TaskEvaluator("spectron_fsdd_counting", "test", options, every=10)
    assert isinstance(evaluator, Evaluator)
    context = EvalContext(
        model=loaded.model, params=loaded.params, step=7, model_dir=str(tmp_path / "run")
    )
    figures = evaluator.run(context)
    expected = {
        k: v for k, v in cli_result.metrics.items() if isinstance(v, float | int) and v is not None
    }
    assert figures.keys() == {k for k, v in expected.items() if not isinstance(v, bool)}
    for key, value in figures.items():
        assert value == pytest.approx(expected[key], nan_ok=True), key
    written = tmp_path / "run" / "eval" / "spectron_fsdd_counting-test" / "step_7" / "metrics.json"
    assert json.loads(written.read_text())["step"] == 7


# ------------------------------------------------------------------------------------------------
# Speaker encoder.
# ------------------------------------------------------------------------------------------------


def test_mel_stats_encoder_tells_speakers_apart(shared_data):
    from spectron_jax.audio.io import load_audio
    from spectron_jax.audio.spectrogram import SpectrogramConfig

    spec = SpectrogramConfig()
    speakers = ["george", "jackson", "lucas", "theo"]
    mels = {
        (s, d): spec.features_numpy(
            load_audio(shared_data / "fsdd" / "recordings" / f"{d}_{s}_0.wav", spec.sample_rate)[0]
        )
        for s in speakers
        for d in range(3)
    }
    encoder = MelStatsSpeakerEncoder().with_cohort(list(mels.values()))
    emb = {k: encoder.embed(v) for k, v in mels.items()}
    same = [
        metrics.cosine_similarity(emb[s, a], emb[s, b])
        for s in speakers
        for a, b in itertools.combinations(range(3), 2)
    ]
    different = [
        metrics.cosine_similarity(emb[s, d], emb[t, d])
        for s, t in itertools.combinations(speakers, 2)
        for d in range(3)
    ]
    # Different digits of one speaker are closer than one digit said by two speakers.
    assert np.mean(same) > np.mean(different) + 0.1


def test_speaker_encoder_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    encoder = MelStatsSpeakerEncoder(
        num_coefficients=5,
        center=rng.normal(size=10),
        scale=rng.uniform(1, 2, 10),
        projection=rng.normal(size=(10, 3)),
    )
    encoder.save(tmp_path / "spk.npz")
    loaded = load_speaker_encoder(tmp_path / "spk.npz")
    mel = rng.normal(size=(40, 16))
    np.testing.assert_allclose(loaded.embed(mel), encoder.embed(mel), rtol=1e-6)
    assert loaded.embed(mel).shape == (3,)
    (tmp_path / "bad.npz").write_text("not numpy")
    with pytest.raises(ValueError, match="not a .npz speaker encoder"):
        load_speaker_encoder(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_speaker_encoder(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------------
# Log-perplexity (local models only).
# ------------------------------------------------------------------------------------------------


def _tiny_gpt2(path):
    import tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<|endoftext|>", "[UNK]", "one", "two", "three", "four", "five"]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="[UNK]",
    )
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(words),
            n_positions=32,
            n_embd=16,
            n_layer=1,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model, words


def _tiny_ctc_asr(path):
    """A random wav2vec2 CTC model with its processor, as a local ASR folder."""
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    path.mkdir()
    letters = ["<pad>", "<s>", "</s>", "<unk>", "|", "o", "n", "e", "t", "w"]
    (path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(letters)}))
    tokenizer = Wav2Vec2CTCTokenizer(str(path / "vocab.json"), word_delimiter_token="|")
    Wav2Vec2Processor(
        feature_extractor=Wav2Vec2FeatureExtractor(sampling_rate=16_000), tokenizer=tokenizer
    ).save_pretrained(path)
    config = Wav2Vec2Config(
        vocab_size=len(letters),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        pad_token_id=0,
    )
    Wav2Vec2ForCTC(config).save_pretrained(path)


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model, words = _tiny_gpt2(root / "gpt2")
    _tiny_ctc_asr(root / "asr")
    return root, model, words


def test_log_perplexity_matches_a_direct_computation(local_models):
    import torch

    root, model, words = local_models
    lm = LocalLm(root / "gpt2")
    ids = [0, words.index("one"), words.index("two"), words.index("three")]
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids])).logits[0].numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    # Context "one" conditions; "two three" is scored: positions 1 and 2 predict ids 2 and 3.
    want = -(logp[1, ids[2]] + logp[2, ids[3]]) / 2
    assert lm.log_perplexity("two three", context="one") == pytest.approx(want, rel=1e-5)
    all_three = -(logp[0, ids[1]] + logp[1, ids[2]] + logp[2, ids[3]]) / 3
    assert lm.log_perplexity("one two three") == pytest.approx(all_three, rel=1e-5)
    assert math.isnan(lm.log_perplexity(""))
    # Past the 32 positions only the last 32 tokens count: 31 scored predictions.
    long_ids = [0] + [words.index("four")] * 40
    with torch.no_grad():
        tail = model(torch.tensor([long_ids[-32:]])).logits[0].numpy().astype(np.float64)
    tail_logp = tail - np.log(np.exp(tail).sum(-1, keepdims=True))
    want_long = -np.mean([tail_logp[t, long_ids[-32:][t + 1]] for t in range(31)])
    assert lm.log_perplexity(" ".join(["four"] * 40)) == pytest.approx(want_long, rel=1e-5)


def test_eval_with_local_asr_and_lm(config, local_models, tmp_path, monkeypatch):
    root = local_models[0]
    rng = np.random.default_rng(1)
    prompt, reference = rng.normal(-2, 1, (20, N_MELS)), rng.normal(-2, 1, (16, N_MELS))
    examples = [
        _example("cont", "one two", "three", prompt, reference),
        _example("qa", "one plus one", "two", prompt[:12], np.zeros((0, N_MELS))),
    ]
    outputs = {
        ex["id"]: (ex["prompt_features"], "one two three", reference.astype(np.float32))
        for ex in examples
    }
    monkeypatch.setattr(inference, "generate", _fake_generate(outputs))
    options = runner.EvalOptions(
        seconds=0.2, num_samples=0, asr_dir=str(root / "asr"), lm_dir=str(root / "gpt2")
    )
    result = runner.evaluate_examples(_fake_loaded(config), examples, tmp_path, options)
    cont, qa = result.examples
    assert isinstance(cont["asr_text"], str) and isinstance(qa["asr_text"], str)
    lm = LocalLm(root / "gpt2")
    want = lm.log_perplexity(cont["asr_text"], context="one two")
    if math.isnan(want):  # The random ASR model may write nothing the LM can score.
        assert "log_perplexity" not in result.metrics
    else:
        assert result.metrics["log_perplexity"] == pytest.approx(want)
        assert result.metrics["perplexity"] == pytest.approx(math.exp(want))
    assert result.metrics["qa_accuracy_asr"] == float(metrics.qa_match(qa["asr_text"], "two"))
    assert "log-perplexity skipped" not in (tmp_path / "report.md").read_text()


def test_log_perplexity_is_guarded(tmp_path):
    with pytest.raises(ValueError, match="--lm-dir"):
        require_local_model_dir(None, "Log-perplexity", "--lm-dir")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        require_local_model_dir(tmp_path, "Log-perplexity", "--lm-dir")
    with pytest.raises(ValueError, match="also pass --asr-dir"):
        runner._external_models(runner.EvalOptions(lm_dir=str(tmp_path)))


def test_jsonable_is_strict_json():
    value = {
        "a": np.float32(0.5),
        "b": math.nan,
        "c": [np.int64(2), np.bool_(True)],
        "d": np.arange(2),
    }
    assert json.loads(json.dumps(report.jsonable(value), allow_nan=False)) == {
        "a": 0.5,
        "b": None,
        "c": [2, True],
        "d": [0, 1],
    }

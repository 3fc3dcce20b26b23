"""The `spectron` command on real recordings and broken files, and the inference plumbing.

One tiny random-init checkpoint serves most tests; all decoding calls share one shape (batch 1,
prompts under 64 frames, 1 s of speech, 8 text tokens), so the decode program compiles once.
"""

import pathlib
import shutil

import jax
import jiwer
import numpy as np
import pytest
import soundfile as sf
from inference_testing import make_tiny_checkpoint

from spectron_jax import checkpoints, cli, decoding, inference, vocabularies
from spectron_jax.audio.io import AudioError, load_audio
from spectron_jax.evaluation import text

SECONDS = 1.0
TEXT_TOKENS = "8"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny_model")
    config, params = make_tiny_checkpoint(model_dir)
    return model_dir, config, params


@pytest.fixture()
def fsdd_files(shared_data):
    rec = shared_data / "fsdd" / "recordings"
    return [rec / "3_george_0.wav", rec / "7_jackson_1.wav"]


def _broken_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    text = folder / "notes.wav"
    text.write_text("this is not audio\n")
    empty = folder / "empty.wav"
    empty.write_bytes(b"")
    return {"text": text, "empty": empty, "missing": folder / "missing.wav"}


# ------------------------------------------------------------------------------------------------
# Checkpoint loading.
# ------------------------------------------------------------------------------------------------


def test_load_model_for_inference_round_trip(checkpoint):
    model_dir, config, params = checkpoint
    step_dir = model_dir / "checkpoints" / "3"
    for where in (model_dir, model_dir / "checkpoints", step_dir):
        assert checkpoints.find_step_dir(where) == step_dir
    loaded = inference.load_model_for_inference(model_dir)
    assert loaded.config == config and loaded.step == 3
    flat_a = dict(_flatten(loaded.params))
    flat_b = dict(_flatten(params))
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_b.items():
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(value), err_msg=key)


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def test_checkpoint_round_trips_its_vocabulary(checkpoint):
    """save_for_inference stores the tokenizer; loading needs nothing but the directory."""
    model_dir = checkpoint[0]
    loaded = inference.load_model_for_inference(model_dir)
    stored = vocabularies.vocabulary(light=True)
    assert loaded.model.vocabulary is loaded.vocabulary
    assert loaded.model.special_ids == vocabularies.special_ids(stored)
    assert (loaded.model.bos_id, loaded.model.eos_id) == (3, 1)
    assert pathlib.Path(vocabularies.vocabulary_file(loaded.vocabulary)).read_bytes() == (
        pathlib.Path(vocabularies.TINY_SPM_PATH).read_bytes()
    )
    ids = stored.encode("twenty one two three")
    assert loaded.vocabulary.decode(ids) == "twenty one two three"


@pytest.fixture(scope="module")
def old_checkpoint(checkpoint, tmp_path_factory):
    """The tiny checkpoint as written before steps stored their vocabulary."""
    model_dir = tmp_path_factory.mktemp("old_layout") / "model"
    shutil.copytree(checkpoint[0], model_dir)
    shutil.rmtree(model_dir / "checkpoints" / "3" / checkpoints.VOCABULARY_ITEM)
    return model_dir


def test_a_checkpoint_without_a_vocabulary_needs_vocab(old_checkpoint, checkpoint):
    with pytest.raises(checkpoints.MissingVocabularyError, match="--vocab"):
        inference.load_model_for_inference(old_checkpoint)
    loaded = inference.load_model_for_inference(old_checkpoint, vocabularies.TINY_SPM_PATH)
    assert (loaded.model.bos_id, loaded.model.eos_id) == (3, 1) and loaded.step == 3
    params = checkpoint[2]
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(loaded.params)[0]), np.asarray(jax.tree.leaves(params)[0])
    )


def _other_sentencepiece(path: pathlib.Path) -> pathlib.Path:
    """A tiny word-level SentencePiece model whose BOS is 2 (the shipped one's is 3)."""
    import sentencepiece as spm

    words = "zero one two three four five six seven eight nine ten eleven twelve".split()
    corpus = [" ".join(words[i : i + 4]) for i in range(len(words) - 3)] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(path),
        vocab_size=300,
        model_type="word",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,  # ~270 ids, so that a random model writes some decodable ones.
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return path.with_suffix(".model")


def _spy_on_decoding(monkeypatch):
    """Records the prompt batch, decode config and output of every `decoding.generate` call."""
    calls = []
    real = decoding.generate

    def generate(model, params, batch, config, *args, **kwargs):
        out = real(model, params, batch, config, *args, **kwargs)
        calls.append((np.asarray(batch["decoder_input_tokens"]), config, out))
        return out

    monkeypatch.setattr(decoding, "generate", generate)
    return calls


def test_cli_decodes_with_the_checkpoints_own_vocabulary(fsdd_files, tmp_path, capsys, monkeypatch):
    spm_file = _other_sentencepiece(tmp_path / "other")
    other = vocabularies.SentencePieceText(spm_file)
    model_dir = tmp_path / "model"
    make_tiny_checkpoint(model_dir, vocabulary=other)
    stored = checkpoints.find_step_dir(model_dir) / checkpoints.VOCABULARY_ITEM / "other.model"
    assert stored.read_bytes() == spm_file.read_bytes()
    spm_file.unlink()  # The checkpoint's copy is all the command has.
    calls = _spy_on_decoding(monkeypatch)

    code, stdout, err = _run(
        capsys,
        "continue",
        "--checkpoint",
        model_dir,
        "--audio",
        fsdd_files[0],
        "--seconds",
        SECONDS,
        "--out",
        tmp_path / "o.wav",
        "--max-text-tokens",
        TEXT_TOKENS,
    )

    assert code == 0, err
    ((tokens, config, out),) = calls
    assert (config.bos_id, config.eos_id) == (2, 1)  # Not the shipped vocabulary's BOS 3.
    np.testing.assert_array_equal(tokens, [[2]])
    said = stdout.split("transcript:")[1].split("\n")[0].split()
    said += stdout.split("continuation:")[1].split("\n")[0].split()
    ids = np.asarray(out["text_tokens"])[0, : int(out["text_lengths"][0])]
    assert said == inference.decode_ids(other, ids, len(ids)).split()


def test_find_step_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoints.find_step_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpoints.find_step_dir(tmp_path)


# ------------------------------------------------------------------------------------------------
# Text split.
# ------------------------------------------------------------------------------------------------


def _word_distance(ref: list[str], hyp: list[str]) -> int:
    if not ref:
        return len(hyp)
    if not hyp:
        return len(ref)
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return out.substitutions + out.deletions + out.insertions


@pytest.mark.parametrize(
    "hyp, prompt, rest, want",
    [
        ("one two three four five", "one two", "three four five", 2),
        ("won two tree four", "one two", "three four", 2),  # substitutions on both sides
        ("one three four", "one two", "three four", 1),  # a deleted prompt word
        ("one two two three", "one two", "three", 2),  # tie: the earliest cut
        ("", "one two", "three", 0),
    ],
)
def test_split_at_reference_is_the_whole_alignment(hyp, prompt, rest, want):
    words, p, r = hyp.split(), prompt.split(), rest.split()
    k = text.split_at_reference(words, p, r)
    assert k == want
    # Cutting at k costs exactly the edit distance of the whole text to the whole reference.
    assert _word_distance(p, words[:k]) + _word_distance(r, words[k:]) == _word_distance(
        p + r, words
    )


def test_split_text_normalises_and_estimates():
    assert text.split_text(
        "One, two! Three four.", prompt_text="one two", reference_rest="three four"
    ) == ("One, two!", "Three four.")
    # Without the prompt's words: 2.5 words/s over 1.2 s -> the first 3 words.
    assert text.split_text("a b c d e", prompt_seconds=1.2) == ("a b c", "d e")
    with pytest.raises(ValueError, match="prompt_text or prompt_seconds"):
        text.split_text("a b")


def test_default_vocabulary_matches_the_seqio_one():
    from spectron_tasks.vocabulary import default_vocabulary

    ours, seqio_vocab = vocabularies.vocabulary(light=True), default_vocabulary()
    assert ours.vocab_size == seqio_vocab.vocab_size
    ids = vocabularies.special_ids(ours)
    assert (ids.bos_id, ids.eos_id) == (3, 1)  # The tiny vocabulary's (pad 0, eos 1, unk 2, bos 3).
    assert vocabularies.special_ids(seqio_vocab) == ids
    ids = seqio_vocab.encode("twenty one two three")
    assert ours.decode(ids) == seqio_vocab.decode(ids) == "twenty one two three"


def test_prompt_features_rejects_a_too_short_clip(checkpoint):
    _, config, _ = checkpoint
    with pytest.raises(AudioError, match="too short"):
        inference.prompt_features(config, np.zeros(100, np.float32), "tiny.wav")


# ------------------------------------------------------------------------------------------------
# The command.
# ------------------------------------------------------------------------------------------------


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_continue_batch_of_good_and_broken_files(checkpoint, fsdd_files, tmp_path, capsys):
    model_dir, config, _ = checkpoint
    broken = _broken_files(tmp_path)
    listing = tmp_path / "prompts.txt"
    entries = [fsdd_files[0], broken["text"], broken["empty"], fsdd_files[1], broken["missing"]]
    listing.write_text("# prompts\n" + "\n".join(str(p) for p in entries) + "\n")
    out, png = tmp_path / "out", tmp_path / "png"

    code, stdout, _ = _run(
        capsys,
        "continue",
        "--checkpoint",
        model_dir,
        "--audio",
        listing,
        "--seconds",
        SECONDS,
        "--out",
        out,
        "--png",
        png,
        "--max-text-tokens",
        TEXT_TOKENS,
    )

    assert code == 0  # Not everything failed.
    assert "2 of 5 file(s) done, 3 failed" in stdout
    failed = [line for line in stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 3
    assert f"FAILED {broken['text']}: not an audio file" in stdout
    assert f"FAILED {broken['empty']}: file is empty (0 bytes)" in stdout
    assert f"FAILED {broken['missing']}: no such file" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["3_george_0.wav", "7_jackson_1.wav"]
    assert sorted(p.name for p in png.iterdir()) == ["3_george_0.png", "7_jackson_1.png"]

    # The written audio is the vocoded decode of the prompt, at the model's rate and length.
    frames = inference.num_frames_for(config, SECONDS)
    wav, rate = sf.read(out / "3_george_0.wav", dtype="float32")
    assert rate == config.spectrogram.sample_rate
    assert len(wav) == frames * config.spectrogram.hop_length
    assert np.all(np.isfinite(wav)) and np.abs(wav).max() > 0
    loaded = inference.load_model_for_inference(model_dir)
    waveform, _ = load_audio(fsdd_files[0], config.spectrogram.sample_rate)
    gen = inference.generate(
        loaded,
        [inference.prompt_features(config, waveform)],
        decoding.DecodeConfig(max_text_tokens=int(TEXT_TOKENS), max_frames=frames),
    )[0]
    block = stdout.split(str(fsdd_files[0]))[1]
    transcript = block.split("transcript:")[1].split("\n")[0].split()
    continuation = block.split("continuation:")[1].split("\n")[0].split()
    assert transcript + continuation == gen.text.split()
    expected = inference.vocode(
        inference.make_vocoder("griffin_lim", config.spectrogram), gen.frames
    )
    np.testing.assert_allclose(wav, np.clip(expected, -1, 1), atol=2 / 32768)


def test_every_file_broken_exits_non_zero(checkpoint, tmp_path, capsys):
    model_dir = checkpoint[0]
    folder = tmp_path / "inputs"
    folder.mkdir()
    _broken_files(folder)
    code, stdout, _ = _run(
        capsys, "ask", "--checkpoint", model_dir, "--audio", folder, "--out", tmp_path / "answers"
    )
    assert code == 1
    assert "0 of 2 file(s) done, 2 failed" in stdout  # The folder's two .wav files.
    assert not list((tmp_path / "answers").iterdir())


def test_ask_single_file(checkpoint, fsdd_files, tmp_path, capsys):
    model_dir = checkpoint[0]
    answer = tmp_path / "answer.wav"
    code, stdout, _ = _run(
        capsys,
        "ask",
        "--checkpoint",
        model_dir,
        "--audio",
        fsdd_files[1],
        "--out",
        answer,
        "--seconds",
        SECONDS,
        "--max-text-tokens",
        TEXT_TOKENS,
        "--transcript",
        "seven",
    )
    assert code == 0
    assert "answer:" in stdout and "1 of 1 file(s) done, 0 failed" in stdout
    assert sf.info(answer).samplerate == 16_000


def test_clear_errors_without_traceback(checkpoint, tmp_path, capsys):
    model_dir = checkpoint[0]
    code, _, err = _run(
        capsys,
        "continue",
        "--checkpoint",
        tmp_path / "nowhere",
        "--audio",
        tmp_path / "a.wav",
        "--out",
        tmp_path / "o.wav",
    )
    assert code == 2 and "does not exist" in err
    code, _, err = _run(
        capsys,
        "continue",
        "--checkpoint",
        model_dir,
        "--audio",
        tmp_path / "a.wav",
        "--out",
        tmp_path / "o.wav",
        "--vocoder",
        "hifigan",
    )
    assert code == 2 and "--vocoder-dir" in err


def test_old_checkpoint_is_one_error_line_naming_vocab(
    old_checkpoint, fsdd_files, tmp_path, capsys
):
    args = [
        "continue",
        "--checkpoint",
        old_checkpoint,
        "--audio",
        fsdd_files[0],
        "--seconds",
        SECONDS,
        "--out",
        tmp_path / "o.wav",
        "--max-text-tokens",
        TEXT_TOKENS,
    ]
    code, _, err = _run(capsys, *args)
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "stores no vocabulary" in errors[0] and "--vocab" in errors[0]
    code, stdout, err = _run(capsys, *args, "--vocab", vocabularies.TINY_SPM_PATH)
    assert code == 0, err
    assert "1 of 1 file(s) done, 0 failed" in stdout


def test_console_script_is_installed():
    import importlib.metadata

    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("spectron") == "spectron_jax.cli:main"
    args = cli.build_parser().parse_args(
        ["eval", "--checkpoint", "c", "--task", "t", "--split", "s", "--out", "o"]
    )
    assert args.max_examples is None and args.vocoder == "griffin_lim"


def test_a_folder_takes_every_audio_format_and_names_the_rest(tmp_path, capsys):
    sf.write(tmp_path / "a.wav", np.zeros(160, np.float32), 16000)
    sf.write(tmp_path / "b.flac", np.zeros(160, np.float32), 16000)
    if "MP3" in sf.available_formats():
        sf.write(tmp_path / "c.mp3", np.zeros(1600, np.float32), 16000)
    (tmp_path / "notes.txt").write_text("not audio")
    files, is_batch = cli.expand_inputs(str(tmp_path))
    want = ["a.wav", "b.flac"] + (["c.mp3"] if "MP3" in sf.available_formats() else [])
    assert is_batch and [f.name for f in files] == want
    assert "left out 1 file(s) that are not audio: notes.txt" in capsys.readouterr().out


def test_notes_silence_and_strict(checkpoint, fsdd_files, tmp_path, capsys):
    """What loading changed is printed; a silent prompt is refused unless --allow-silent; with
    --strict one failure makes the exit status 1."""
    model_dir = checkpoint[0]
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(fsdd_files[0], folder / "digit.wav")  # 8 kHz: resampled
    sf.write(folder / "silent.wav", np.zeros(16000, np.float32), 16000)
    common = ["--seconds", SECONDS, "--max-text-tokens", TEXT_TOKENS]
    args = ["continue", "--checkpoint", model_dir, "--audio", folder, *common]
    code, stdout, _ = _run(capsys, *args, "--out", tmp_path / "out", "--strict")
    assert code == 1  # one of the two failed
    note = "  note:         resampled 8000 Hz -> 16000 Hz"
    assert note in stdout and stdout.index(note) > stdout.index("digit.wav")
    assert f"FAILED {folder / 'silent.wav'}: audio is silent" in stdout
    assert "--allow-silent" in stdout
    code, stdout, _ = _run(capsys, *args, "--out", tmp_path / "out2", "--allow-silent")
    assert code == 0 and "2 of 2 file(s) done, 0 failed" in stdout
    note = "  note:         audio is silent"
    assert note in stdout and stdout.index(note) > stdout.index("silent.wav")


def test_a_truncated_checkpoint_is_one_message_and_nothing_is_written(
    checkpoint, fsdd_files, tmp_path, capsys
):
    model_dir = checkpoint[0]
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    for f in (broken / "checkpoints" / "3" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"")
    out = tmp_path / "out"
    args = ["continue", "--checkpoint", broken, "--audio", fsdd_files[0].parent, "--out", out]
    code, _, err = _run(capsys, *args)
    assert code == 2 and "Traceback" not in err
    (line,) = [e for e in err.splitlines() if "error:" in e]
    assert f"checkpoint {broken / 'checkpoints' / '3'}" in line
    assert not out.exists()

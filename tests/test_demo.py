"""`spectron demo`: the server's streamed events and its answers to bad uploads (over HTTP), and
the page in a real headless browser (Debian's chromium + chromedriver, ~5 s; skipped without
them): upload a real recording, wait for the transcript and the audio, save a screenshot."""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import shutil
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile as sf
from inference_testing import make_tiny_checkpoint

from spectron_jax import demo, inference

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny_model")
    make_tiny_checkpoint(model_dir)
    loaded = inference.load_model_for_inference(model_dir)
    vocoder = inference.make_vocoder("griffin_lim", loaded.config.spectrogram)
    options = inference.decode_config(loaded, 1.0, fixed_duration=True, max_text_tokens=8)
    page = demo.Demo(loaded, vocoder, options, chunk_groups=4)  # The CLI default: one compile.
    httpd = demo.make_server(page, port=0, checkpoint=str(model_dir))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", model_dir
    httpd.shutdown()
    httpd.server_close()


def _post(url: str, data: bytes, name: str) -> list[dict]:
    request = urllib.request.Request(
        f"{url}/api/continue", data=data, headers={"X-Filename": name}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return [json.loads(line) for line in response.read().decode().splitlines() if line]


@pytest.fixture()
def recording(shared_data) -> pathlib.Path:
    return shared_data / "fsdd" / "recordings" / "3_george_0.wav"


def test_an_upload_streams_prompt_text_audio_then_done(server, recording):
    url, model_dir = server
    events = _post(url, recording.read_bytes(), recording.name)
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["prompt", "text"] and kinds[-1] == "done"
    audio = [e for e in events if e["event"] == "audio"]
    assert len(audio) >= 2 and set(kinds[2:-1]) == {"audio"}  # Several streamed chunks.
    assert events[0]["spectrogram"].startswith("data:image/png;base64,")
    done = events[-1]
    with urllib.request.urlopen(url + done["wav"], timeout=30) as response:
        wav = response.read()
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    assert rate == 16000 and abs(samples.size / rate - done["seconds"]) < 1e-3
    pcm = sum(len(base64.b64decode(e["pcm"])) // 2 for e in audio)
    assert pcm == samples.size
    with urllib.request.urlopen(url + "/", timeout=30) as response:
        assert str(model_dir) in response.read().decode()


def test_bad_uploads_are_messages_and_the_server_goes_on(server, recording, monkeypatch):
    url, _ = server
    (error,) = _post(url, b"this is not audio\n", "notes.wav")
    assert error["event"] == "error" and "notes.wav" in error["message"]
    assert "/tmp" not in error["message"]  # The upload's own name, not the server's temp file.
    (error,) = _post(url, b"", "empty.wav")
    assert error["message"] == "empty.wav is empty: choose or record an audio file"
    silent = io.BytesIO()
    sf.write(silent, np.zeros(16000, np.float32), 16000, format="WAV")
    (error,) = _post(url, silent.getvalue(), "quiet.wav")
    assert "quiet.wav is silent" in error["message"]
    monkeypatch.setattr(demo, "MAX_PROMPT_SECONDS", 0.1)  # The recording: ~0.4 s.
    (error,) = _post(url, recording.read_bytes(), recording.name)
    assert error["message"].endswith("s long; the demo takes prompts up to 0.1 s")
    monkeypatch.setattr(demo, "MAX_UPLOAD_BYTES", 1000)
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(url, recording.read_bytes(), recording.name)
    assert err.value.code == 413 and "MiB" in json.loads(err.value.read())["message"]
    monkeypatch.undo()
    assert _post(url, recording.read_bytes(), recording.name)[-1]["event"] == "done"


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1000,1100",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver)
    return webdriver.Chrome(options=options, service=service)


def test_the_page_in_a_headless_browser(server, recording, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    browser = _browser()
    try:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 240)
        # A bad upload first: a message on the page, and the next upload still works.
        notes = tmp_path / "notes.wav"
        notes.write_text("not audio")
        browser.find_element(By.ID, "file").send_keys(str(notes))
        browser.find_element(By.ID, "run").click()
        wait.until(lambda b: b.find_element(By.ID, "error").is_displayed())
        assert "notes.wav" in browser.find_element(By.ID, "error").text
        browser.find_element(By.ID, "file").send_keys(str(recording))
        browser.find_element(By.ID, "run").click()
        wait.until(lambda b: b.find_element(By.ID, "audio").get_attribute("src"))
        assert not browser.find_element(By.ID, "error").is_displayed()
        assert browser.find_element(By.ID, "transcript").text.strip()
        assert browser.find_element(By.ID, "spectrogram").is_displayed()
        duration = browser.execute_script(
            "const a = document.getElementById('audio');"
            "return new Promise(r => a.readyState >= 1 ? r(a.duration) : "
            "a.addEventListener('loadedmetadata', () => r(a.duration)));"
        )
        assert duration == pytest.approx(1.0, abs=0.1)  # The WAV the page plays back.
        shot = pathlib.Path(os.environ.get("SPECTRON_DEMO_SCREENSHOT", tmp_path / "demo.png"))
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        browser.quit()

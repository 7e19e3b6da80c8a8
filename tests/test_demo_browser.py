"""The web demo in a real headless browser (Debian's chromium through selenium), and its session without one.

A small run is served on a free port. In the browser:
- "two red circles" -> picture: the picture on the page is byte for byte the model's, and the world's image judge
  reads it as it reads the model's;
- an uploaded WAV of a spoken caption -> text: the transcript on the page is the model's;
- a corrupt picture and an empty WAV: a readable message on the page, no traceback.
The run is small and barely trained, so what it draws means nothing; that the page shows exactly what the model
made, and says what is wrong with bad input, is what is tested.
"""

from __future__ import annotations

import io
import socket

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from anyloom.demo.browser import wait_for
from anyloom.demo.session import DemoSession

pytest.importorskip("gradio")
pytest.importorskip("selenium")
from test_generation_pipeline import build_tiny_run  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, session) of a demo serving a tiny run."""
    import anyloom
    from anyloom.demo.app import build_app, launch

    run = build_tiny_run(tmp_path_factory.mktemp("runs") / "tiny")
    session = DemoSession(anyloom.load(run, device="cpu"), run)
    app = build_app(session)
    port = _free_port()
    launch(app, port=port, block=False)
    yield f"http://127.0.0.1:{port}/", session
    app.close()


@pytest.fixture(scope="module")
def browser():
    from anyloom.demo.browser import ensure_chromium, open_browser

    try:
        chromium = ensure_chromium()
    except RuntimeError as e:
        pytest.skip(f"no browser: {e}")
    driver = open_browser(chromium)
    yield driver
    driver.quit()


@pytest.fixture
def page(served, browser):
    from anyloom.demo.browser import DemoPage

    return DemoPage(browser, served[0])


def _spoken_caption(path) -> str:
    from anyloom.world.speech import Voice, get_espeak, normalize_level

    text = "two red circles"
    wave = normalize_level(get_espeak().synthesize(text, Voice("en-us", 175, 50), 0))
    sf.write(path, wave, 16000)
    return text


def test_browser_picture_from_a_prompt_is_the_models(served, page):
    from anyloom.world.judge import judge_image

    _, session = served
    assert "anyloom" in page.driver.title and "tiny" in page.driver.title
    page.type_prompt("two red circles")
    page.choose("picture")
    status = page.generate()
    assert status.startswith("done"), status
    shown = np.asarray(Image.open(io.BytesIO(page.picture())).convert("RGB"))
    expected = session.answer("two red circles", "picture")
    assert np.array_equal(shown, np.asarray(expected.picture.convert("RGB")))
    assert judge_image(shown) == judge_image(np.asarray(expected.picture.convert("RGB")))
    assert "Traceback" not in page.driver.page_source


def test_browser_transcript_of_an_uploaded_recording(served, page, tmp_path):
    _, session = served
    wav = tmp_path / "caption.wav"
    _spoken_caption(wav)
    page.type_prompt("")
    page.upload("audio", wav)
    page.choose("text")
    status = page.generate()
    assert status.startswith("done"), status
    assert page.text() == session.answer(None, "text", sound=str(wav)).text


def test_browser_bad_uploads_get_readable_messages(page, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    page.upload("picture", broken)
    note = wait_for(lambda: page.status("picture_note"), 30, what="the upload's note")
    assert "broken.png: not a readable image" in note, note
    message = page.generate()
    assert "broken.png: not a readable image" in message, message
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    page.driver.refresh()
    page.__init__(page.driver, page.url)
    page.upload("audio", empty)
    page.choose("text")
    message = page.generate()
    assert "empty.wav: the audio file is empty" in message, message
    assert "Traceback" not in page.driver.page_source


def test_session_answers_and_refusals_without_a_browser(served):
    _, session = served
    out = session.answer("two red circles", "picture", settings=session.defaults)
    assert out.picture is not None and out.gallery and not out.refused
    many = session.answer("two red circles", "picture", settings=type(session.defaults)(candidates=3))
    assert len(many.gallery) == 3 and [s for _, s in many.scores] == sorted((s for _, s in many.scores), reverse=True)
    assert session.answer("", "picture").message == "⚠️ type a prompt, or upload a picture or a recording"
    assert "choose what to make" in session.answer("x", "video").message
    speech = session.answer("one blue star", "speech")
    assert speech.sound is not None and speech.sound[0] == 16000
    assert session.targets == ["text", "picture", "speech", "reply"]
    reply = session.answer("two red circles", "reply", settings=type(session.defaults)(candidates=2, seed=3))
    again = session.pipe.generate(text="two red circles", to="any", seed=3, candidates=2, cfg_scale=2.0,
                                  vocoder="griffin_lim")
    assert not reply.refused and reply.text == again.text
    from anyloom.generation.pipeline import GeneratedImage

    pictures = again.of(GeneratedImage)
    assert (reply.picture is None) == (not pictures)
    if pictures:
        assert np.array_equal(np.asarray(reply.picture), np.asarray(pictures[0].image))


def test_programmatic_calls_through_gradio_client(served, tmp_path):
    """The README's client calls: the same answers as the page's session."""
    from gradio_client import Client, handle_file

    url, session = served
    client = Client(url, verbose=False)
    picture, sound, text, gallery, scores, status = client.predict(
        "two red circles", "picture", None, None, 1.0, 0.9, 2.0, 2, 0, api_name="/generate")
    expected = session.answer("two red circles", "picture", settings=type(session.defaults)(1.0, 0.9, 2.0, 2, 0))
    assert np.array_equal(np.asarray(Image.open(picture).convert("RGB")), np.asarray(expected.picture.convert("RGB")))
    assert status.startswith("done") and len(gallery) == 2 and len(scores["data"]) == 2
    wav = tmp_path / "caption.wav"
    _spoken_caption(wav)
    text = client.predict("", "text", None, handle_file(str(wav)), 1.0, 0.9, 2.0, 1, 0, api_name="/generate")[2]
    assert text == session.answer(None, "text", sound=str(wav)).text
    reply = client.predict("two red circles", "reply", None, None, 1.0, 0.9, 2.0, 2, 3, api_name="/generate")
    expected = session.answer("two red circles", "reply", settings=type(session.defaults)(1.0, 0.9, 2.0, 2, 3))
    assert reply[2] == expected.text and reply[5].startswith("done")
    assert (reply[0] is None) == (expected.picture is None)

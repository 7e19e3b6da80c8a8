"""How a user hands inputs to the research API and scripts/generate.py: by keyword, with clear refusals, with
warnings for inputs outside the training data, and with errors in the user's units. A tiny untrained run
(test_generation_pipeline.build_tiny_run) has every real part; its outputs are noise, which is all these need."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from test_generation_pipeline import EXAMPLES, REPO_ROOT, build_tiny_run

from anyloom.data.document import TextSegment
from anyloom.generation.config import GenerationConfig
from anyloom.generation.pipeline import (
    GeneratedAudio,
    GeneratedImage,
    GeneratedText,
    OutOfDomainWarning,
    PipelineError,
    RunNotFoundError,
    load,
)
from anyloom.tokenizers.text import TextTokenizer, words_of


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_run(tmp_path_factory.mktemp("runs") / "tiny")
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(tiny_run):
    return load(tiny_run, device="cpu", config=GenerationConfig(max_audio_seconds=0.2, max_text_tokens=4))


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    sf.write(tmp_path / "speech.wav", rng.uniform(-0.3, 0.3, (8000, 2)).astype(np.float32), 22050)  # stereo 22 kHz
    return tmp_path


def test_each_input_kind_by_keyword(pipe, files):
    pixels = np.asarray(Image.open(files / "photo.png"))
    for image in (files / "photo.png", str(files / "photo.png"), Image.open(files / "photo.png"), pixels,
                  pixels[..., 0], np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)])):
        assert isinstance(pipe.generate(image=image), GeneratedText)  # default target: text
    wave, rate = sf.read(files / "speech.wav", dtype="float32")
    for audio in (files / "speech.wav", (wave, rate), (wave[:, 0], rate)):
        assert isinstance(pipe.generate(audio=audio, to="text"), GeneratedText)
    assert isinstance(pipe.generate(text="two red circles"), GeneratedImage)  # default target: image
    assert isinstance(pipe.generate(text="one blue stars", to="audio"), GeneratedAudio)
    both = pipe.segments(text="and then", image=files / "photo.png")
    assert [type(s).__name__ for s in both] == ["ImageSegment", "TextSegment"]
    # the same prompt by keyword and as segments gives the same answer
    a = pipe.generate(image=files / "photo.png", text="two", to="text", seed=3)
    b = pipe.generate([{"image": str(files / "photo.png")}, {"text": "two"}], to="text", seed=3)
    assert a.ids == b.ids


def test_ambiguous_and_wrong_inputs_are_refused(pipe, files):
    with pytest.raises(PipelineError, match=r"looks like a file path.*pass it as image='photo.png'"):
        pipe.generate("photo.png", to="text")
    with pytest.raises(PipelineError, match="audio='clip.wav'"):
        pipe.generate(["clip.wav"], to="text")
    assert isinstance(pipe.generate(TextSegment("photo.png"), to="text"), GeneratedText)  # meant as text: allowed
    with pytest.raises(PipelineError, match="needs its sample rate"):
        pipe.generate(audio=np.zeros(1600, np.float32), to="text")
    with pytest.raises(PipelineError, match="uint8"):
        pipe.generate(image=np.zeros((16, 16, 3), np.float32), to="text")
    with pytest.raises(PipelineError, match="not both"):
        pipe.generate("two red circles", image=files / "photo.png")
    with pytest.raises(PipelineError, match="nothing to generate from"):
        pipe.generate(to="text")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        pipe.generate(image=files / "missing.png")
    with pytest.raises(RunNotFoundError, match="make train"):
        load(files / "no_run_here")


def test_out_of_domain_inputs_warn_and_say_so_in_the_result(pipe, files):
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfDomainWarning)
        assert pipe.generate(text="two red circles", to="text").warnings == []  # in domain: silent
        assert pipe.generate(image=files / "photo.png").warnings == []  # the training size: silent
    for prompt, expect in (("a purple elephant", "'purple', 'elephant'"), ("deux cercles rouges", "'deux'"),
                           ("赤い丸が二つ", "'赤い丸が二つ'")):
        with pytest.warns(OutOfDomainWarning, match="never seen in training"):
            out = pipe.generate(text=prompt)
        assert len(out.warnings) == 1 and expect in out.warnings[0], out.warnings
    Image.fromarray(np.zeros((480, 640, 3), np.uint8)).save(files / "big.png")
    with pytest.warns(OutOfDomainWarning, match="640x480, far from the 16x16"):
        out = pipe.generate(image=files / "big.png")
    assert "squashed" in out.warnings[0]
    with pytest.warns(OutOfDomainWarning, match="prompt 1: "):  # in a batch, each warning names its prompt
        outs = pipe.generate_batch(["two red circles", "a purple elephant"], to="text")
    assert [len(o.warnings) for o in outs] == [0, 1]


def test_the_training_words_travel_with_the_text_tokenizer(tmp_path):
    tok = TextTokenizer.train(["Two red circles.", "one BLUE star"], vocab_size=300)
    assert tok.known_words == {"two", "red", "circles", "one", "blue", "star"}
    again = TextTokenizer.load(tok.save(tmp_path / "t"))
    assert again.known_words == tok.known_words and again.unseen_words("two green stars, green!") == ["green", "stars"]
    (tmp_path / "t" / "words.txt").unlink()  # a tokenizer saved without its words notices nothing
    assert TextTokenizer.load(tmp_path / "t").unseen_words("anything at all") == []
    assert words_of("Deux-cercles: 2 rouges") == ["deux", "cercles", "2", "rouges"]


def test_too_long_audio_is_refused_in_seconds(pipe):
    wave = np.zeros(16000 * 300, np.float32)  # five minutes
    with pytest.raises(PipelineError) as e:
        pipe.generate(audio=(wave, 16000), to="text")
    message = str(e.value)
    assert "the prompt's audio is 300.0 s long" in message and "at most" in message and "s of audio" in message
    with pytest.raises(PipelineError, match=r"the prompt is \d+ tokens long; at most \d+ fit"):
        pipe.generate(text="two red circles " * 400, to="text")


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_generate_script_warns_checks_files_first_and_counts_right(tiny_run, files):
    out = files / "out"
    got = run_script(str(REPO_ROOT / "scripts" / "generate.py"), "--run", str(tiny_run), "--prompt",
                     "a purple elephant", "--to", "text", "--out", str(out), "--max-text-tokens", "3",
                     "--candidates", "1", cwd=files)
    assert got.returncode == 0, got.stderr
    assert "warning: prompt 'a purple elephant': 3 word(s) never seen" in got.stderr
    assert "wrote 1 output and" in got.stdout and "(1 output in the folder)" in got.stdout
    (files / "broken.png").write_bytes(b"\x89PNG broken")
    got = run_script(str(REPO_ROOT / "scripts" / "generate.py"), "--run", str(files / "no_run"), "--image",
                     str(files / "broken.png"), cwd=files)
    assert got.returncode == 2 and "broken.png: not a readable image" in got.stderr  # before the (missing) run
    got = run_script(str(REPO_ROOT / "scripts" / "generate.py"), "--run", str(files / "no_run"), "--prompt", "x",
                     cwd=files)
    assert got.returncode == 2 and "no_run does not exist" in got.stderr and "Traceback" not in got.stderr
    long_text = "two red circles " * 600
    got = run_script(str(REPO_ROOT / "scripts" / "generate.py"), "--run", str(tiny_run), "--prompt", long_text,
                     "--to", "text", "--out", str(out), cwd=files)
    assert got.returncode == 2 and "tokens long" in got.stderr and len(got.stderr) < 600, got.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_say_when_the_run_is_missing(example, tmp_path):
    got = run_script(str(example), "--run", str(tmp_path / "nothing"), cwd=tmp_path)
    assert got.returncode == 1 and "error:" in got.stderr and "make train" in got.stderr, got.stderr
    assert "Traceback" not in got.stderr

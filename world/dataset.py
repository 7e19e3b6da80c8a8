"""The world: the embedded default dataset, generated deterministically from a seed.

Each item is a scene of 1-4 shapes of one colour and one shape (``render.py``), its caption
("three yellow triangles", ``captions.py``) and, optionally, the caption spoken by espeak-ng (``speech.py``).
Splits: train / val / test sample colour x shape pairs outside the compositional hold-outs; the
``compositional`` split uses only the held-out pairs, which therefore never appear in train or val. An optional
``compositional_val`` split has hold-out pairs of its own (``holdout_val``, disjoint from ``holdout``), to choose
settings on composition without looking at the compositional test split.

Output (``build_world``) goes to ``<root>/<fingerprint>/``: PNG and WAV files and one JSONL manifest per
split in the user-data format (``{"id", "segments": [{"text"}, {"image"}, {"audio"}], "meta"}``, paths
relative to the manifest). The folder is built under a temporary name and renamed into place only when
complete, so an existing folder is a finished world and re-running with the same config does nothing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from anyloom.config import added_field, fingerprint, significant
from anyloom.progress import progress
from anyloom.world.captions import COLORS, NUMBER_WORDS, SHAPES, Caption, noun
from anyloom.world.render import render_scene

# Bump when rendering, speech or the manifest layout change: it is part of the output folder's name.
GENERATOR_VERSION = 2
# Every split a world can have, in the order that seeds their items (a new split goes last: the others keep their items)
SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional", "compositional_val")
# espeak-ng carries hidden state between utterances; it is reloaded at the start of every block of this
# many items, so the audio bytes depend only on (seed, split, index). Changing it changes the bytes.
SPEECH_BLOCK = 64
COMPLETE_MARKER = "world.json"  # written last, inside the temporary folder, before the rename


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    image_size: int = 32  # 32 (default) or 64
    supersample: int = 4  # anti-aliasing: draw this many times larger, then box-average down
    n_train: int = 8000
    n_val: int = 500
    n_test: int = 500
    n_compositional: int = 500
    colors: tuple[str, ...] = COLORS
    shapes: tuple[str, ...] = SHAPES
    max_count: int = 4  # counts are 1..max_count
    # Colour x shape pairs that never appear in train/val/test: only in the compositional split.
    holdout: tuple[tuple[str, str], ...] = (
        ("red", "star"),
        ("green", "triangle"),
        ("blue", "circle"),
        ("yellow", "square"),
    )
    with_speech: bool = True
    # espeak-ng voices, rates (words/min) and pitches (0-100); each item draws one of each. Chosen so the
    # speech judge reads the ground truth back (docs/BENCHMARKS.md "The world": WER per voice); plain
    # en-us, m3, m4 and m7, and pitches above ~60, read back worse (5-20% WER).
    voices: tuple[str, ...] = ("en-us+f2", "en-us+f5", "en-us+m2", "en-us+m1")
    rates: tuple[int, ...] = (140, 155, 170)
    pitches: tuple[int, ...] = (40, 48, 56)
    root: str = "data_cache/world"  # not part of the fingerprint: moving the cache does not change the world
    # Instruction documents in the train split: the first `replies` training items again, as `reply_prompt` (the
    # caption in place of {caption}) followed by the same picture and speech, each serving only the LM's interleaved
    # task (the document's "tasks"): what teaches a to="any" reply to open both spans. 0: none (the default world).
    replies: int = added_field(0)
    reply_prompt: str = added_field("draw {caption} and say it")
    # Colour x shape pairs held out for validation: absent from train/val/test and from the compositional split, only
    # in `compositional_val` (n_compositional_val items). Empty and 0: no such split (the default world).
    holdout_val: tuple[tuple[str, str], ...] = added_field(())
    n_compositional_val: int = added_field(0)
    # Partial captions in the train split: the first `partial_captions` training items again with their picture under a
    # caption that names the shape or the colour alone, alternately ("two stars", "two red shapes"), each serving only
    # the LM's text->image task: each word then has to draw its part of the picture on its own. 0: none.
    partial_captions: int = added_field(0)

    def __post_init__(self) -> None:
        if self.image_size not in (32, 64):
            raise ValueError(f"image_size must be 32 or 64, got {self.image_size}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")
        if not 0 <= self.replies <= self.n_train:
            raise ValueError(f"replies must be in [0, n_train={self.n_train}], got {self.replies}: instruction "
                             "documents repeat training items, so a smaller world needs fewer (replies=0 for none)")
        if not 0 <= self.partial_captions <= self.n_train:
            raise ValueError(f"partial_captions must be in [0, n_train={self.n_train}], got {self.partial_captions}")
        if "{caption}" not in self.reply_prompt:
            raise ValueError(f"reply_prompt must contain {{caption}}, got {self.reply_prompt!r}")
        for name in ("n_train", "n_val", "n_test", "n_compositional", "n_compositional_val"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        bad = [c for c in self.colors if c not in COLORS]
        if bad or not self.colors:
            raise ValueError(f"colors must be a non-empty subset of {COLORS}, got unknown {bad}")
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or not self.shapes:
            raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got unknown {bad}")
        if not 1 <= self.max_count <= len(NUMBER_WORDS):
            raise ValueError(f"max_count must be 1..{len(NUMBER_WORDS)}, got {self.max_count}")
        for key in ("holdout", "holdout_val"):
            for pair in getattr(self, key):
                if len(pair) != 2 or pair[0] not in self.colors or pair[1] not in self.shapes:
                    raise ValueError(f"{key} pair {pair!r} is not a (colour, shape) of this world")
        both = {tuple(p) for p in self.holdout} & {tuple(p) for p in self.holdout_val}
        if both:
            raise ValueError(f"holdout_val must not share pairs with holdout (the compositional test split's), got "
                             f"{sorted(both)} in both")
        if not self.seen_pairs():
            raise ValueError("the holdout covers every colour x shape pair: nothing is left for training")
        if self.n_compositional and not self.holdout:
            raise ValueError("n_compositional > 0 needs at least one holdout pair")
        if self.n_compositional_val and not self.holdout_val:
            raise ValueError("n_compositional_val > 0 needs at least one holdout_val pair")
        if self.with_speech and not (self.voices and self.rates and self.pitches):
            raise ValueError("with_speech needs at least one voice, rate and pitch")

    def seen_pairs(self) -> list[tuple[str, str]]:
        """Colour x shape pairs of train/val/test (everything but the hold-outs), in a fixed order."""
        held = {tuple(p) for p in (*self.holdout, *self.holdout_val)}
        return [(c, s) for c in self.colors for s in self.shapes if (c, s) not in held]

    def split_size(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test,
                "compositional": self.n_compositional, "compositional_val": self.n_compositional_val}[split]


@dataclass(frozen=True)
class WorldPaths:
    dir: Path  # <root>/<fingerprint>
    train: Path  # JSONL manifests, one per split
    val: Path
    test: Path
    compositional: Path
    compositional_val: Path
    counts: dict[str, int] = field(default_factory=dict)  # items per split
    judges = "world"  # evaluation reads the world's pictures and speech with its exact judges (world/evaluate.py)

    @property
    def splits(self) -> tuple[str, ...]:
        return splits_holding(self.counts)

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("text", "image", "audio") if (self.dir / "audio").is_dir() else ("text", "image")  # with_speech

    def split(self, name: str) -> Path:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        if name not in self.splits:
            raise ValueError(f"this world has no {name} split: it holds items only with world.n_compositional_val > 0 "
                             "and world.holdout_val pairs")
        return getattr(self, name)


def world_fingerprint(cfg: WorldConfig) -> str:
    d = _identity(cfg)
    d["generator_version"] = GENERATOR_VERSION
    return fingerprint(d)


def splits_holding(sizes: dict[str, int]) -> tuple[str, ...]:
    """The splits a world of these per-split sizes has: every one but ``compositional_val``, which exists only where
    it holds items (worlds made before it existed have none)."""
    return tuple(s for s in SPLITS if s != "compositional_val" or sizes.get(s, 0))


def _identity(cfg: WorldConfig) -> dict:
    """The config as the world's folder records it: without ``root`` (moving the cache does not change the world), and
    without the options added later while they hold their neutral value (worlds made before they existed keep their
    name). The reply prompt counts exactly while there are replies."""
    d = significant(cfg)
    d.pop("root")
    d.pop("reply_prompt", None)
    if cfg.replies:
        d["reply_prompt"] = cfg.reply_prompt
    return d


def reply_lines(cfg: WorldConfig, train_lines: list[str]) -> list[str]:
    """The instruction documents (``cfg.replies``): the first training items' picture and speech after the reply
    prompt, serving only the interleaved task."""
    out = []
    for line in train_lines[: cfg.replies]:
        item = json.loads(line)
        caption = item["segments"][0]["text"]
        segments = [{"text": cfg.reply_prompt.format(caption=caption)}, *item["segments"][1:]]
        out.append(json.dumps({"id": f"{item['id']}-reply", "segments": segments,
                               "meta": {**item["meta"], "reply_to": caption}, "tasks": ["interleaved"]}) + "\n")
    return out


def partial_caption_lines(cfg: WorldConfig, train_lines: list[str]) -> list[str]:
    """The partial-caption documents (``cfg.partial_captions``): the first training items' pictures under their
    shape alone (even items) or their colour alone (odd items), serving only text->image."""
    out = []
    for i, line in enumerate(train_lines[: cfg.partial_captions]):
        item = json.loads(line)
        meta = item["meta"]
        count = int(meta["count"])
        number = NUMBER_WORDS[count - 1]
        if i % 2 == 0:
            kept, text = "shape", f"{number} {noun(meta['shape'], count)}"
        else:
            kept, text = "color", f"{number} {meta['color']} {noun('shape', count)}"
        segments = [{"text": text}, item["segments"][1]]  # the picture; no speech says this caption
        out.append(json.dumps({"id": f"{item['id']}-{kept}", "segments": segments, "meta": {**meta, "names": kept},
                               "tasks": ["t2i"]}) + "\n")
    return out


def sample_caption(cfg: WorldConfig, split: str, rng: np.random.Generator) -> Caption:
    held = {"compositional": cfg.holdout, "compositional_val": cfg.holdout_val}
    pairs = [tuple(p) for p in held[split]] if split in held else cfg.seen_pairs()
    color, shape = pairs[int(rng.integers(len(pairs)))]
    return Caption(count=int(rng.integers(1, cfg.max_count + 1)), color=color, shape=shape)


def _paths(d: Path, counts: dict[str, int]) -> WorldPaths:
    return WorldPaths(dir=d, counts=counts, **{s: d / f"{s}.jsonl" for s in SPLITS})


def build_world(cfg: WorldConfig, workers: int | None = None) -> WorldPaths:
    """Generate the world into ``<cfg.root>/<fingerprint>/`` (a no-op when it is already there).

    ``workers`` processes (default: up to 2, one per core) render blocks of items; the bytes do not
    depend on it.
    """
    root = Path(cfg.root)
    final = root / world_fingerprint(cfg)
    if (final / COMPLETE_MARKER).is_file():
        return _paths(final, json.loads((final / COMPLETE_MARKER).read_text())["counts"])
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    if cfg.with_speech:
        (tmp / "audio").mkdir()
    try:
        counts = _generate(cfg, tmp, workers if workers is not None else min(2, os.cpu_count() or 1))
        config = _identity(cfg)  # the folder's bytes must not depend on where the cache lives
        info = {"fingerprint": final.name, "generator_version": GENERATOR_VERSION, "config": config,
                "counts": counts}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if final.exists() and not (final / COMPLETE_MARKER).is_file():
            shutil.rmtree(final)  # a stale folder without its marker (not made by this code)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / COMPLETE_MARKER).is_file():
                raise
            shutil.rmtree(tmp)  # a concurrent builder (another rank) finished first: same config, same bytes
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _paths(final, counts)


def _generate(cfg: WorldConfig, out: Path, workers: int) -> dict[str, int]:
    splits = splits_holding({s: cfg.split_size(s) for s in SPLITS})  # the folder's manifests
    blocks = [(split, start, min(start + SPEECH_BLOCK, cfg.split_size(split)))
              for split in splits for start in range(0, cfg.split_size(split), SPEECH_BLOCK)]
    lines: dict[str, list[str]] = {s: [] for s in splits}
    bar = progress(total=sum(cfg.split_size(s) for s in splits), desc="world", unit="item")
    jobs = [(cfg, split, start, stop, str(out)) for split, start, stop in blocks]
    if cfg.with_speech:
        import anyloom.world.speech  # noqa: F401  (imported once here, inherited by forked workers: scipy.signal is slow)
    if workers > 1 and len(blocks) > 1:
        # fork, not spawn: spawned children re-import the caller's __main__ (a training script imports torch
        # and transformers: seconds per worker). The children use only numpy, Pillow and their own espeak-ng,
        # which generate_block reloads, so nothing the parent holds leaks into the bytes.
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(workers) as pool:
            for (split, start, stop), block in zip(blocks, pool.imap(_block_job, jobs)):
                lines[split].extend(block)
                bar.update(stop - start)
    else:
        for (split, start, stop), job in zip(blocks, jobs):
            lines[split].extend(_block_job(job))
            bar.update(stop - start)
    bar.close()
    lines["train"] += reply_lines(cfg, lines["train"]) + partial_caption_lines(cfg, lines["train"])
    for split in splits:
        (out / f"{split}.jsonl").write_text("".join(lines[split]), encoding="utf-8")
    extra = {"train_replies": cfg.replies, "train_partial_captions": cfg.partial_captions}
    return {s: cfg.split_size(s) for s in splits} | {k: v for k, v in extra.items() if v}


def _block_job(job: tuple[WorldConfig, str, int, int, str]) -> list[str]:
    cfg, split, start, stop, out = job
    return generate_block(cfg, split, start, stop, Path(out))


def generate_block(cfg: WorldConfig, split: str, start: int, stop: int, out: Path) -> list[str]:
    """Write items [start, stop) of ``split`` under ``out``; returns their manifest lines.

    Every item draws from its own generator seeded by (seed, split, index); espeak-ng is reloaded at the
    block's start, so the block's bytes do not depend on which process made it or what it made before.
    """
    if start % SPEECH_BLOCK:
        raise ValueError(f"blocks start at multiples of {SPEECH_BLOCK}, got {start}")
    split_index = SPLITS.index(split)
    espeak = None
    if cfg.with_speech:
        from anyloom.world.speech import SAMPLE_RATE, Voice, get_espeak, postprocess, wav_bytes

        espeak = get_espeak()
        espeak.reset()
    lines = []
    for i in range(start, stop):
        rng = np.random.default_rng([cfg.seed, split_index, i])
        caption = sample_caption(cfg, split, rng)
        scene = render_scene(rng, caption, cfg.image_size, cfg.supersample)
        item_id = f"{split}-{i:06d}"
        image_rel = f"images/{item_id}.png"
        Image.fromarray(scene.pixels).save(out / image_rel)
        segments: list[dict[str, str]] = [{"text": caption.text}, {"image": image_rel}]
        meta = {"count": caption.count, "color": caption.color, "shape": caption.shape,
                "boxes": [list(b) for b in scene.boxes]}
        if espeak is not None:
            voice = Voice(
                name=cfg.voices[int(rng.integers(len(cfg.voices)))],
                rate=cfg.rates[int(rng.integers(len(cfg.rates)))],
                pitch=cfg.pitches[int(rng.integers(len(cfg.pitches)))],
            )
            raw = espeak.synthesize(caption.text, voice, seed=int(rng.integers(2**31)))
            audio_rel = f"audio/{item_id}.wav"
            (out / audio_rel).write_bytes(wav_bytes(postprocess(raw), SAMPLE_RATE))
            segments.append({"audio": audio_rel})
            meta.update(voice=voice.name, rate=voice.rate, pitch=voice.pitch)
        lines.append(json.dumps({"id": item_id, "segments": segments, "meta": meta}) + "\n")
    return lines


__all__ = [
    "WorldConfig", "WorldPaths", "build_world", "generate_block", "world_fingerprint", "sample_caption", "SPLITS",
]

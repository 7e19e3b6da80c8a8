"""The data stage for a user's own data: manifests read once, normalised, and written as the chain's manifests.

    prepare_data(cfg, image_size=(32, 32), sample_rate=16000) -> PreparedData

The recipe's ``data`` section names the sources: ``data.train``, ``data.val`` and ``data.test``, each a JSONL
manifest or a brace pattern of webdataset tar shards (``shards/train-{000..009}.tar``; see ``data/manifest.py``),
or ``data.train`` alone with ``val_fraction`` / ``test_fraction`` (each document goes to a split by a hash of its
id and ``split_seed``, so the assignment needs no second pass and does not depend on the order of the shards).

Every document is read once, streaming (memory does not grow with the number of documents): pictures of any size
and mode reach the tokenizer's size by ``image_fit`` (transparency over ``background``), recordings of any rate and
channel count reach its rate, and documents over the limits (``max_audio_seconds``, ``max_text_chars``) or
unreadable (``strict: false``) are skipped and counted by reason. What is kept is written losslessly (PNG pictures,
float WAV recordings) with one manifest per split, so every later stage (tokenizers, matcher, pre-tokenization,
evaluation) reads exactly what the LM is trained on.

Output: ``<root>/<key>/{train,val,test}.jsonl``, ``media/``, ``report.json`` (documents per split, skips by reason
and their first places, the modalities each split holds). The key hashes the settings and the sources' names,
sizes and modification times (and those of the files a JSONL manifest names), so editing a source re-prepares it.
A folder is complete only once ``report.json`` is written: an interrupted stage starts that preparation again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import soundfile as sf
from PIL import Image

from anyloom.config import fingerprint, to_dict
from anyloom.data.document import AudioSegment, Document, ImageSegment, TextSegment
from anyloom.data.manifest import Decoding, ManifestError, Skip, iter_manifest, manifest_files, media_stamps
from anyloom.progress import progress

SPLITS = ("train", "val", "test")
REPORT = "report.json"  # written last: the folder is complete
MAX_PLACES = 20  # skipped places kept per reason in the report (the counts cover them all)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class DataConfig:
    """The recipe section ``data``: where the documents come from and how they reach the tokenizers."""

    # world / openmoji: generated here from their own sections; manifest: the user's files below
    source: Literal["world", "openmoji", "manifest"] = "world"
    train: str = ""  # a JSONL manifest or a brace pattern of webdataset .tar shards
    val: str = ""  # empty: val_fraction of data.train
    test: str = ""  # empty: test_fraction of data.train
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    split_seed: int = 0  # which documents the fractions pick (a hash of the seed and each document's id)
    image_fit: Literal["crop", "pad", "resize"] = "crop"  # how pictures reach the image tokenizer's size
    background: tuple[int, int, int] = (255, 255, 255)  # RGB under transparency and around padded pictures
    max_audio_seconds: float = 30.0  # a document with a longer recording is skipped (counted)
    max_text_chars: int = 4000  # a document with more text is skipped (counted); 0: no limit
    strict: bool = False  # true: the first unreadable document is an error naming its place
    root: str = "data_cache/prepared"

    def __post_init__(self) -> None:
        for name in ("val", "test"):
            given, fraction = getattr(self, name), getattr(self, f"{name}_fraction")
            if not 0.0 <= fraction < 1.0:
                raise ValueError(f"{name}_fraction must be in [0, 1), got {fraction}")
            if given and fraction:
                raise ValueError(f"data.{name} and data.{name}_fraction both given: name a manifest or a fraction")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave documents for training (< 1)")
        if self.max_audio_seconds <= 0 or self.max_text_chars < 0:
            raise ValueError("max_audio_seconds must be > 0 and max_text_chars >= 0")

    def check_sources(self) -> None:
        """For ``source: manifest``: every split named, by a manifest or a fraction."""
        if not self.train:
            raise ValueError("data.source is manifest but data.train is empty: name a JSONL manifest or a shard "
                             "pattern, e.g. data.train=shards/train-{000..009}.tar")
        for name in ("val", "test"):
            if not getattr(self, name) and not getattr(self, f"{name}_fraction"):
                raise ValueError(f"data.{name} is empty and data.{name}_fraction is 0: name a manifest "
                                 f"(data.{name}=...) or hold out a share of data.train (data.{name}_fraction=0.05)")


@dataclass
class PreparedData:
    """A prepared folder: one manifest per split and what the report says about them."""

    dir: Path
    counts: dict[str, int]  # documents kept per split
    skipped: dict[str, int]  # documents skipped, by reason ("corrupt image", "too long", ...)
    modalities: tuple[str, ...]  # "text", "image", "audio": those the training split holds
    judges: str = "generic"  # evaluation uses the generic judges (the world has its own)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if self.counts.get(s))

    def split(self, name: str) -> Path:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; prepared data has {', '.join(SPLITS)}")
        return self.dir / f"{name}.jsonl"

    @property
    def train(self) -> Path:
        return self.split("train")

    @property
    def val(self) -> Path:
        return self.split("val")

    @property
    def test(self) -> Path:
        return self.split("test")

    def summary(self) -> str:
        text = ", ".join(f"{s} {self.counts.get(s, 0)}" for s in SPLITS) + " documents"
        skipped = sum(self.skipped.values())
        if skipped:
            text += f"; {skipped} skipped (" + ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items())) + ")"
        return text + f"; {'+'.join(self.modalities) or 'nothing'}"


def sources_key(pattern: str) -> list[str]:
    """What identifies the files behind a manifest path: each file's name, size and modification time, and for a
    JSONL manifest those of the pictures and recordings it names."""
    out = []
    for path in manifest_files(pattern):
        st = path.stat()
        out.append(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        if not path.name.endswith((".tar", ".tar.gz", ".tgz")):
            out.append(hashlib.sha256("".join(media_stamps(path, strict=False)).encode()).hexdigest()[:16])
    return out


def prepared_key(cfg: DataConfig, image_size: tuple[int, int], sample_rate: int) -> str:
    settings = to_dict(cfg)
    settings.pop("root")
    sources = {s: sources_key(getattr(cfg, s)) for s in SPLITS if getattr(cfg, s)}
    return fingerprint({"data": settings, "image_size": list(image_size), "sample_rate": sample_rate,
                        "sources": sources, "format": FORMAT_VERSION})


def split_of(doc_id: str, cfg: DataConfig) -> str:
    """The split a document of ``data.train`` goes to under the fractions (stable for a given id and seed)."""
    u = int.from_bytes(hashlib.sha256(f"{cfg.split_seed}:{doc_id}".encode()).digest()[:8], "big") / 2.0 ** 64
    if u < cfg.test_fraction:
        return "test"
    return "val" if u < cfg.test_fraction + cfg.val_fraction else "train"


class _Writer:
    """One split's manifest and media files, written as documents arrive."""

    def __init__(self, folder: Path, split: str) -> None:
        self.folder, self.split = folder, split
        self.media = folder / "media" / split
        self.media.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"{split}.jsonl", "w", encoding="utf-8")
        self.count = 0
        self.modalities: set[str] = set()

    def write(self, doc: Document) -> None:
        n = self.count
        segments: list[dict[str, str]] = []
        for j, seg in enumerate(doc.segments):
            if isinstance(seg, TextSegment):
                segments.append({"text": seg.text})
                self.modalities.add("text")
            elif isinstance(seg, ImageSegment):
                name = f"media/{self.split}/{n:07d}_{j}.png"
                Image.fromarray(seg.pixels).save(self.folder / name)
                segments.append({"image": name})
                self.modalities.add("image")
            else:
                name = f"media/{self.split}/{n:07d}_{j}.wav"
                sf.write(self.folder / name, seg.wave, seg.sample_rate, subtype="FLOAT")  # lossless
                segments.append({"audio": name})
                self.modalities.add("audio")
        line = {"id": doc.id, "segments": segments, **({"meta": doc.meta} if doc.meta else {}),
                **({"tasks": list(doc.tasks)} if doc.tasks is not None else {})}
        self.file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        self.file.close()


def _too_long(doc: Document, cfg: DataConfig) -> str | None:
    for seg in doc.segments:
        if isinstance(seg, AudioSegment) and len(seg.wave) > cfg.max_audio_seconds * seg.sample_rate:
            return (f"too long: a recording of {len(seg.wave) / seg.sample_rate:.1f} s (data.max_audio_seconds "
                    f"{cfg.max_audio_seconds:g})")
    chars = sum(len(s.text) for s in doc.segments if isinstance(s, TextSegment))
    if cfg.max_text_chars and chars > cfg.max_text_chars:
        return f"too long: {chars} characters of text (data.max_text_chars {cfg.max_text_chars})"
    return None


class _Report:
    def __init__(self) -> None:
        self.skipped: dict[str, int] = {}
        self.places: dict[str, list[str]] = {}

    def skip(self, source: str, reason: str) -> None:
        kind = reason.split(":")[0]
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        kept = self.places.setdefault(kind, [])
        if len(kept) < MAX_PLACES:
            kept.append(f"{source}: {reason}")


def _read(pattern: str, cfg: DataConfig, dec: Decoding, report: _Report):
    """The documents of one source, with the reader's skips and the limits' skips counted in ``report``."""
    skipped: list[Skip] = []
    for doc in iter_manifest(pattern, strict=cfg.strict, skipped=skipped, decoding=dec):
        while skipped:
            s = skipped.pop(0)
            report.skip(s.source, s.reason)
        why = _too_long(doc, cfg)
        if why is None:
            yield doc
        elif cfg.strict:
            raise ManifestError(f"{pattern}: document {doc.id}: {why}")
        else:
            report.skip(f"{pattern}: document {doc.id}", why)
    for s in skipped:
        report.skip(s.source, s.reason)


def prepare_data(cfg: DataConfig, image_size: tuple[int, int] = (32, 32), sample_rate: int = 16000,
                 log: Any = print) -> PreparedData:
    """Read the sources of ``cfg`` into ``<cfg.root>/<key>/`` (a no-op when that folder is complete)."""
    cfg.check_sources()
    key = prepared_key(cfg, tuple(image_size), sample_rate)
    final = Path(cfg.root) / key
    if (final / REPORT).is_file():
        return _load(final)
    tmp = final.parent / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dec = Decoding(image_size=tuple(image_size), sample_rate=sample_rate, image_fit=cfg.image_fit,
                   background=tuple(cfg.background))
    writers = {s: _Writer(tmp, s) for s in SPLITS}
    report = _Report()
    bar = progress(desc="data", unit="doc")
    try:
        for source_split in SPLITS:
            pattern = getattr(cfg, source_split)
            if not pattern:
                continue
            for doc in _read(pattern, cfg, dec, report):
                split = split_of(doc.id, cfg) if source_split == "train" else source_split
                writers[split].write(doc)
                bar.update(1)
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    counts = {s: w.count for s, w in writers.items()}
    if not counts["train"]:
        raise ValueError(f"data.train ({cfg.train}): no readable documents ({sum(report.skipped.values())} "
                         f"skipped: {_first_reasons(report)})")
    for s in ("val", "test"):
        if not counts[s]:
            raise ValueError(f"the {s} split is empty (data.{s}={getattr(cfg, s) or '-'}, "
                             f"{s}_fraction={getattr(cfg, f'{s}_fraction')}): give it documents")
    info = {"key": key, "counts": counts, "skipped": report.skipped, "skipped_places": report.places,
            "modalities": {s: sorted(w.modalities) for s, w in writers.items()},
            "sources": {s: getattr(cfg, s) for s in SPLITS if getattr(cfg, s)},
            "image_size": list(image_size), "sample_rate": sample_rate, "settings": to_dict(cfg)}
    (tmp / REPORT).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)  # an incomplete folder (no report)
    os.rename(tmp, final)
    for kind, places in report.places.items():
        for place in places[:3]:
            log(f"data: skipped {place}")
        if report.skipped[kind] > 3:
            log(f"data: ... {report.skipped[kind] - 3} more '{kind}' skips (all places: {final / REPORT})")
    return _load(final)


def _first_reasons(report: _Report) -> str:
    return "; ".join(places[0] for places in report.places.values()) or "none"


def _load(folder: Path) -> PreparedData:
    info = json.loads((folder / REPORT).read_text())
    order = ("text", "image", "audio")
    modalities = tuple(m for m in order if m in info["modalities"]["train"])
    return PreparedData(dir=folder, counts=info["counts"], skipped=info["skipped"], modalities=modalities)


__all__ = ["DataConfig", "PreparedData", "prepare_data", "split_of", "SPLITS"]

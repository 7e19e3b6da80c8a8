"""Reading user data: JSONL manifests and webdataset tar shards into ``Document``s, validated item by item.

``path`` is one file or a brace pattern of several (``shards/train-{000..009}.tar``), read in order.

JSONL: one document per line, ``{"id"?: str, "segments": [{"text": str} | {"image": path} | {"audio": path}],
"meta"?: {...}, "tasks"?: [str, ...]}``; paths are relative to the manifest (absolute paths work too). Blank lines
are ignored. ``tasks`` names the LM task templates the document may serve (``["interleaved"]`` for an instruction
followed by its answer); without it, any template that fits its segments.

Webdataset shards (``.tar``): members are grouped into samples by key, the file name up to its first dot,
as webdataset does (``000123.json``, ``000123.png``, ``000123.wav``). A sample with a ``json`` member
holds the document, whose image/audio values name members of the same sample by their extension
(``{"segments": [{"text": "a red circle"}, {"image": "png"}, {"audio": "wav"}]}``). A sample without one
is read in the fixed order text (``txt``), image (``png``/``jpg``/``jpeg``), audio (``wav``/``flac``).

Every problem names its place (``manifest.jsonl:12`` or ``shard.tar:000123``) and what was expected.
``strict=True`` raises ``ManifestError`` at the first one; ``strict=False`` skips the document, records a
``Skip`` and goes on: a zero-byte, truncated or unrecognised picture, a decompression bomb (more pixels than PIL's
``Image.MAX_IMAGE_PIXELS``), an empty, unreadable or NaN recording, a missing file, a malformed line. Conversions
follow :class:`Decoding`: grayscale / RGBA / palette pictures become RGB (transparency over the background),
pictures reach the wanted size by its fit policy, recordings are downmixed to mono and resampled.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from braceexpand import braceexpand
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.signal import resample_poly

from anyloom.data.document import AudioSegment, Document, ImageSegment, Segment, TextSegment

SEGMENT_KEYS = ("text", "image", "audio")
DOCUMENT_KEYS = ("id", "segments", "meta", "tasks")
IMAGE_EXTS = ("png", "jpg", "jpeg")
AUDIO_EXTS = ("wav", "flac")


class ManifestError(ValueError):
    """A document that cannot be read; the message starts with ``file:line`` (or ``shard.tar:key``)."""


@dataclass(frozen=True)
class Skip:
    source: str  # "manifest.jsonl:12" or "shard.tar:000123"
    reason: str


@dataclass
class ManifestResult:
    documents: list[Document]
    skipped: list[Skip] = field(default_factory=list)

    @property
    def summary(self) -> str:
        text = f"{len(self.documents)} documents read, {len(self.skipped)} skipped"
        if self.skipped:
            reasons: dict[str, int] = {}
            for s in self.skipped:
                kind = s.reason.split(":")[0]
                reasons[kind] = reasons.get(kind, 0) + 1
            text += " (" + ", ".join(f"{n} {k}" for k, n in sorted(reasons.items())) + ")"
        return text


class _Bad(Exception):
    """An item-level problem; turned into ManifestError or Skip with the item's location."""


IMAGE_FITS = ("resize", "crop", "pad")


@dataclass(frozen=True)
class Decoding:
    """How media reach the sizes a consumer wants.

    ``image_size`` (H, W), or None to keep each picture's own size. ``image_fit``: ``resize`` stretches to the size;
    ``crop`` scales the shorter side to it and cuts the centre; ``pad`` scales the longer side to it and pads with
    ``background``. Transparency is composited over ``background`` (RGB). Audio is downmixed to mono and resampled
    to ``sample_rate``.
    """

    image_size: tuple[int, int] | None = None
    sample_rate: int = 16000
    image_fit: str = "resize"
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.image_fit not in IMAGE_FITS:
            raise ValueError(f"image_fit must be one of {', '.join(IMAGE_FITS)}, got {self.image_fit!r}")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"background must be three values in 0..255 (RGB), got {list(self.background)}")


def read_manifest(path: str | Path, strict: bool = True, image_size: tuple[int, int] | None = None,
                  sample_rate: int = 16000, decoding: Decoding | None = None) -> ManifestResult:
    """Every document of a JSONL manifest or webdataset shard (see the module docstring)."""
    skipped: list[Skip] = []
    docs = list(iter_manifest(path, strict=strict, image_size=image_size, sample_rate=sample_rate, skipped=skipped,
                              decoding=decoding))
    return ManifestResult(documents=docs, skipped=skipped)


def manifest_files(path: str | Path) -> list[Path]:
    """The files of a manifest path: one file, or each file of a brace pattern (``shards/train-{000..009}.tar``)."""
    paths = [Path(p) for p in braceexpand(str(path))]  # as webdataset writes them
    for p in paths:
        if not p.is_file():
            raise ManifestError(f"{p}: no such manifest file")
    return paths


def media_stamps(path: str | Path, strict: bool = True) -> Iterator[str]:
    """``"<file>:<size>:<mtime_ns>;"`` for each picture and recording a JSONL manifest names, in order (-1 for a
    missing file), read line by line: what keys a cache built from the manifest besides its own bytes. A line that is
    not a document raises ``ValueError`` naming it (``strict``) or is passed over (the reader reports it)."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                segments = json.loads(raw)["segments"]
            except (ValueError, KeyError, TypeError) as e:  # malformed JSON or text, or not a document
                if strict:
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with 'segments' ({e})") from e
                continue
            for seg in segments if isinstance(segments, list) else ():
                for kind in ("image", "audio"):
                    if isinstance(seg, dict) and kind in seg:
                        media = path.parent / str(seg[kind])
                        st = media.stat() if media.exists() else None
                        yield f"{media}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1};"


def iter_manifest(path: str | Path, strict: bool = True, image_size: tuple[int, int] | None = None,
                  sample_rate: int = 16000, skipped: list[Skip] | None = None,
                  decoding: Decoding | None = None) -> Iterator[Document]:
    """Lazily yield documents; in lenient mode skips are appended to ``skipped`` (when given). ``decoding`` (when
    given) replaces ``image_size`` and ``sample_rate``."""
    dec = decoding or Decoding(image_size=None if image_size is None else tuple(image_size), sample_rate=sample_rate)
    for p in manifest_files(path):
        reader = _iter_tar if p.name.endswith((".tar", ".tar.gz", ".tgz")) else _iter_jsonl
        for source, item in reader(p, dec):
            if isinstance(item, Document):
                yield item
            elif strict:
                raise ManifestError(f"{source}: {item}")
            elif skipped is not None:
                skipped.append(Skip(source=source, reason=item))


def _iter_jsonl(path: Path, dec: Decoding) -> Iterator[tuple[str, Any]]:
    files = _FileSource(path.parent)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            source = f"{path}:{lineno}"
            try:  # decoded line by line: one bad line must not cost the lines after it
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield source, f"not UTF-8 text ({e.reason} at byte {e.start})"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield source, f"malformed JSON: {e.msg} at column {e.colno}"
                continue
            try:
                yield source, _document(obj, files, dec, default_id=source)
            except _Bad as e:
                yield source, str(e)


class _FileSource:
    """Segment values are paths relative to the manifest's folder."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def open(self, ref: str, kind: str) -> tuple[bytes, str]:
        p = Path(ref)
        p = p if p.is_absolute() else self.base / p
        if not p.is_file():
            raise _Bad(f"missing file: {kind} {ref!r} (looked for {p})")
        try:
            return p.read_bytes(), str(p)
        except OSError as e:
            raise _Bad(f"unreadable file: {kind} {ref!r}: {e.strerror}") from e


class _MemberSource:
    """Segment values name members of the same webdataset sample by extension."""

    def __init__(self, members: dict[str, bytes], where: str) -> None:
        self.members = members
        self.where = where

    def open(self, ref: str, kind: str) -> tuple[bytes, str]:
        if ref not in self.members:
            have = ", ".join(sorted(self.members)) or "nothing"
            raise _Bad(f"missing file: {kind} member {ref!r} not in the sample (it has {have})")
        return self.members[ref], f"{self.where}.{ref}"


def _iter_tar(path: Path, dec: Decoding) -> Iterator[tuple[str, Any]]:
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise ManifestError(f"{path}: not a readable tar shard ({e})") from e
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                named = _member_key(member.name)
                if named is None:
                    continue
                key, ext = named
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ManifestError(f"{path}: corrupt tar shard after {len(order)} samples ({e})") from e
    for key in order:
        source = f"{path}:{key}"
        members = samples[key]
        try:
            if "json" in members:
                try:
                    obj = json.loads(members["json"].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise _Bad(f"malformed JSON in member {key}.json: {e}") from e
            else:
                obj = {"segments": _implicit_segments(members)}
            yield source, _document(obj, _MemberSource(members, f"{path}:{key}"), dec, default_id=key)
        except _Bad as e:
            yield source, str(e)


def _member_key(name: str) -> tuple[str, str] | None:
    """A tar member's sample key (its folder and file name up to the first dot) and lower-case extension, as
    webdataset groups them; None for hidden members and members without an extension, which webdataset ignores."""
    folder, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    key, ext = base.split(".", 1)
    return (f"{folder}/{key}" if folder else key), ext.lower()


def _implicit_segments(members: dict[str, bytes]) -> list[dict[str, str]]:
    segments: list[dict[str, str]] = []
    if "txt" in members:
        try:
            segments.append({"text": members["txt"].decode("utf-8")})
        except UnicodeDecodeError as e:
            raise _Bad(f"text member is not UTF-8: {e}") from e
    segments += [{"image": ext} for ext in IMAGE_EXTS if ext in members][:1]
    segments += [{"audio": ext} for ext in AUDIO_EXTS if ext in members][:1]
    if not segments:
        raise _Bad(f"sample has no json, txt, image or audio member (members: {', '.join(sorted(members))})")
    return segments


def _document(obj: Any, files: _FileSource | _MemberSource, dec: Decoding, default_id: str) -> Document:
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object with 'segments', got {type(obj).__name__}")
    unknown = [k for k in obj if k not in DOCUMENT_KEYS]
    if unknown:
        raise _Bad(f"unknown key {unknown[0]!r} (a document has {', '.join(DOCUMENT_KEYS)})")
    segs = obj.get("segments")
    if not isinstance(segs, list) or not segs:
        raise _Bad("'segments' must be a non-empty list")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise _Bad(f"'meta' must be an object, got {type(meta).__name__}")
    doc_id = obj.get("id", default_id)
    if not isinstance(doc_id, str) or not doc_id:
        raise _Bad(f"'id' must be a non-empty string, got {doc_id!r}")
    tasks = obj.get("tasks")
    if tasks is not None and (not isinstance(tasks, list) or not tasks
                              or not all(isinstance(t, str) and t for t in tasks)):
        raise _Bad(f"'tasks' must be a non-empty list of task names (e.g. [\"interleaved\"]), got {tasks!r}")
    segments: list[Segment] = []
    for j, seg in enumerate(segs):
        where = f"segment {j}"
        if not isinstance(seg, dict) or len(seg) != 1:
            raise _Bad(f"{where}: expected an object with exactly one of {SEGMENT_KEYS}, got {seg!r}")
        (kind, value), = seg.items()
        if kind not in SEGMENT_KEYS:
            raise _Bad(f"unknown key {kind!r} in {where} (expected one of {', '.join(SEGMENT_KEYS)})")
        if not isinstance(value, str):
            raise _Bad(f"{where}: {kind} must be a string, got {type(value).__name__}")
        if kind == "text":
            if not value.strip():
                raise _Bad(f"empty text in {where}")
            segments.append(TextSegment(text=value))
        elif kind == "image":
            data, name = files.open(value, "image")
            segments.append(ImageSegment(pixels=_decode_image(data, name, dec), path=name))
        else:
            data, name = files.open(value, "audio")
            wave = _decode_audio(data, name, dec.sample_rate)
            segments.append(AudioSegment(wave=wave, sample_rate=dec.sample_rate, path=name))
    return Document(segments=segments, id=doc_id, meta=meta, tasks=tuple(tasks) if tasks is not None else None)


# ---- pictures by reference: a corpus too large to decode up front -------------------------------------------------


@dataclass(frozen=True)
class PictureRef:
    """Where one picture's bytes are: a file of its own, or ``size`` bytes at ``offset`` inside a tar shard."""

    source: str  # "manifest.jsonl:12" or "shard.tar:000123": where errors point
    file: str
    offset: int = -1  # -1: the whole file; else the member's data offset in the shard
    size: int = 0


@dataclass
class PictureIndex:
    refs: list[PictureRef]
    skipped: list[Skip] = field(default_factory=list)  # documents that name no readable picture reference


def index_pictures(path: str | Path) -> PictureIndex:
    """Every image segment of a JSONL manifest or webdataset shards, by reference: lines and tar headers are read,
    pictures are not (:func:`read_picture` decodes one). A malformed line or sample is skipped and recorded; a
    picture that turns out unreadable is reported when it is read."""
    out = PictureIndex(refs=[])
    for p in manifest_files(path):
        if p.name.endswith((".tar", ".tar.gz", ".tgz")):
            _index_tar(p, out)
        else:
            _index_jsonl(p, out)
    return out


def _index_jsonl(path: Path, out: PictureIndex) -> None:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                segments = json.loads(raw)["segments"]
                images = [seg["image"] for seg in segments if isinstance(seg, dict) and "image" in seg]
            except (ValueError, KeyError, TypeError) as e:
                out.skipped.append(Skip(source, f"malformed line: expected a JSON object with 'segments' ({e})"))
                continue
            if not images:
                out.skipped.append(Skip(source, "no image segment"))
            for ref in images:
                if not isinstance(ref, str):
                    out.skipped.append(Skip(source, f"image must be a string, got {type(ref).__name__}"))
                    continue
                file = Path(ref) if Path(ref).is_absolute() else path.parent / ref
                out.refs.append(PictureRef(source, str(file)))


def _index_tar(path: Path, out: PictureIndex) -> None:
    if path.name.endswith((".gz", ".tgz")):
        raise ManifestError(f"{path}: a compressed shard cannot be read by reference; use an uncompressed .tar")
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                named = _member_key(member.name)
                if named is not None:
                    members.setdefault(named[0], {})[named[1]] = member
            for key, exts in members.items():
                source = f"{path}:{key}"
                if "json" in exts:
                    try:
                        obj = json.loads(tar.extractfile(exts["json"]).read().decode("utf-8"))
                        wanted = [seg["image"] for seg in obj["segments"] if isinstance(seg, dict) and "image" in seg]
                    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                        out.skipped.append(Skip(source, f"malformed JSON in member {key}.json: {e}"))
                        continue
                else:
                    wanted = [ext for ext in IMAGE_EXTS if ext in exts][:1]
                for ext in wanted:
                    if ext not in exts:
                        out.skipped.append(Skip(source, f"missing file: image member {ext!r} not in the sample"))
                        continue
                    out.refs.append(PictureRef(source, str(path), exts[ext].offset_data, exts[ext].size))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ManifestError(f"{path}: not a readable tar shard ({e})") from e


def read_picture(ref: PictureRef, decoding: Decoding) -> np.ndarray:
    """The (H, W, 3) uint8 picture ``ref`` points to, converted as ``decoding`` says; ``ManifestError`` naming
    ``ref.source`` when it cannot be read."""
    try:
        if ref.offset < 0:
            data, name = _FileSource(Path(ref.file).parent).open(ref.file, "image")
        else:
            with open(ref.file, "rb") as f:
                f.seek(ref.offset)
                data, name = f.read(ref.size), ref.source
        return _decode_image(data, name, decoding)
    except _Bad as e:
        raise ManifestError(f"{ref.source}: {e}") from e
    except OSError as e:
        raise ManifestError(f"{ref.source}: unreadable image: {e}") from e


def _clean(e: Exception) -> str:
    """The library's message without the in-memory buffer's repr (which changes from run to run)."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))


def _decode_image(data: bytes, name: str, dec: Decoding) -> np.ndarray:
    if not data:
        raise _Bad(f"empty image: {name} is zero bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; both are refused here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                im2 = _to_rgb(im, dec.background)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _Bad(f"decompression bomb: {name}: {_clean(e)}") from e
    except UnidentifiedImageError as e:
        raise _Bad(f"corrupt image: {name}: not a recognised image format") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise _Bad(f"corrupt image: {name}: {_clean(e)}") from e
    if dec.image_size is not None:
        im2 = _fit(im2, dec)
    pixels = np.asarray(im2, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.size == 0:
        raise _Bad(f"corrupt image: {name}: decoded to shape {pixels.shape}")
    return pixels


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*(int(c) for c in background), 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")  # transparency over the background
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("pixels contain NaN or infinite values")
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def _fit(im: Image.Image, dec: Decoding) -> Image.Image:
    h, w = dec.image_size
    if im.size == (w, h):
        return im
    if dec.image_fit == "crop":
        return ImageOps.fit(im, (w, h), Image.Resampling.BICUBIC)
    if dec.image_fit == "pad":
        return ImageOps.pad(im, (w, h), Image.Resampling.BICUBIC, color=tuple(int(c) for c in dec.background))
    return im.resize((w, h), Image.Resampling.BICUBIC)


def _decode_audio(data: bytes, name: str, sample_rate: int) -> np.ndarray:
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (T, C)
    except sf.LibsndfileError as e:
        raise _Bad(f"corrupt audio: {name}: {e.error_string}") from e
    except (RuntimeError, TypeError, ValueError) as e:
        raise _Bad(f"corrupt audio: {name}: {_clean(e)}") from e
    if wave.shape[0] == 0:
        raise _Bad(f"empty audio: {name} has no samples")
    if not np.isfinite(wave).all():
        raise _Bad(f"corrupt audio: {name} contains NaN or infinite samples")
    mono = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]  # downmix stereo
    if rate != sample_rate:
        g = gcd(int(rate), int(sample_rate))
        mono = resample_poly(mono, sample_rate // g, int(rate) // g)
    return np.ascontiguousarray(mono, dtype=np.float32)


__all__ = ["Decoding", "IMAGE_FITS", "ManifestError", "ManifestResult", "Skip", "read_manifest", "iter_manifest",
           "manifest_files", "media_stamps", "SEGMENT_KEYS", "PictureRef", "PictureIndex", "index_pictures",
           "read_picture"]

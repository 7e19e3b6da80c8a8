"""Pre-tokenization: Documents -> token shards, with the trained text / image / audio tokenizers.

Each item's segments are tokenized separately and stored in the tokenizers' own code spaces
(``shards.py``), so task templates are assembled at load time and the LM's loader never touches pixels.

- Batched: images of a shard are encoded ``batch_size`` at a time (same-size images together). Audio is sorted
  by length and zero-padded into batches when the tokenizer's ``encode`` takes ``lengths=`` (valid samples per
  clip; it returns ``AudioCodes.lengths``, the real frames); a tokenizer without that argument gets batches of
  equal-length clips only, since padding would otherwise be encoded as frames.
- Cached: the output folder carries a key = hash(tokenizer fingerprints, data key, config, format). A folder
  built with another key is stale: it is detected, removed and rebuilt, never silently reused.
- Resumable: shards are written atomically with a completion marker, so after an interruption the next call
  skips the finished shards and continues with the first missing one.
- Serial on purpose: on a 2-core machine batching is what matters; the tokenizers themselves use torch threads.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anyloom.config import fingerprint, to_dict
from anyloom.data.document import AudioSegment, Document, ImageSegment, TextSegment
from anyloom.progress import progress
from anyloom.sequences.interleave import AudioIds, ImageIds, TextIds, TokSegment
from anyloom.sequences.shards import (
    FORMAT_VERSION,
    INDEX,
    TokenShards,
    shard_done,
    shard_name,
    write_index,
    write_shard,
)

META = "build.json"  # written first: marks the folder as a shard cache and records the key being built


@dataclass(frozen=True)
class PretokenizeConfig:
    shard_size: int = 1024  # items per shard (the unit of resumption)
    batch_size: int = 64  # images / audio clips per tokenizer call

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(f"shard_size and batch_size must be >= 1, got {self.shard_size}, {self.batch_size}")


@dataclass
class PretokenizeResult:
    shards: TokenShards
    key: str  # the cache key the shards were built (or found) with
    built: int  # shards encoded by this call
    reused: int  # shards found complete from an earlier (possibly interrupted) call
    stale_removed: bool  # an existing cache with another key was discarded
    skipped_empty: int  # documents without segments (counted in index.json, not stored)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes whenever ``tokenizer`` would produce different codes.

    Uses ``tokenizer.fingerprint`` when it has one (the text tokenizer hashes its model bytes); for a
    ``torch.nn.Module`` it hashes the class, the public scalar attributes and every parameter and buffer.
    """
    if tokenizer is None:
        return "none"
    fp = getattr(tokenizer, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    if isinstance(tokenizer, torch.nn.Module):
        h = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
        for name in ("codebook_size", "num_codebooks", "grid", "image_size", "sample_rate", "frame_rate"):
            h.update(f"{name}={getattr(tokenizer, name, None)!r};".encode())
        for name, tensor in sorted(tokenizer.state_dict().items()):
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            t = tensor.detach().to("cpu").contiguous().reshape(-1)  # (n,): 0-d tensors cannot be viewed as bytes
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()[:16]
    raise TypeError(
        f"cannot fingerprint a {type(tokenizer).__name__}: give it a 'fingerprint' string attribute or make it a "
        "torch.nn.Module, so that a changed tokenizer invalidates the token cache"
    )


def documents_key(documents: Iterable[Document]) -> str:
    """Content hash of documents (text, pixels, waves): the data key when no manifest hash is at hand."""
    h = hashlib.sha256()
    for doc in documents:
        h.update(f"doc:{doc.id};".encode())
        for seg in doc.segments:
            if isinstance(seg, TextSegment):
                h.update(b"t" + seg.text.encode())
            elif isinstance(seg, ImageSegment):
                h.update(f"i{seg.pixels.shape}".encode() + np.ascontiguousarray(seg.pixels).tobytes())
            elif isinstance(seg, AudioSegment):
                h.update(f"a{seg.sample_rate}".encode() + np.ascontiguousarray(seg.wave, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def manifest_key(path: str | Path) -> str:
    """Data key of a JSONL manifest: its bytes plus the size and mtime of every image/audio file it names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    raw = path.read_bytes()
    h = hashlib.sha256(raw)
    if path.name.endswith((".tar", ".tar.gz", ".tgz")):  # a webdataset shard holds its media: bytes are the key
        return h.hexdigest()[:16]
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            segments = json.loads(line)["segments"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with 'segments' ({e})") from e
        for seg in segments:
            for kind in ("image", "audio"):
                if isinstance(seg, dict) and kind in seg:
                    media = path.parent / str(seg[kind])
                    st = media.stat() if media.exists() else None
                    h.update(f"{media}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1};".encode())
    return h.hexdigest()[:16]


def cache_key(text: Any, image: Any, audio: Any, data_key: str, config: PretokenizeConfig) -> str:
    parts = {
        "format_version": FORMAT_VERSION,
        "text": tokenizer_fingerprint(text),
        "image": tokenizer_fingerprint(image),
        "audio": tokenizer_fingerprint(audio),
        "data": data_key,
        # shard_size decides which items share a shard; batch_size cannot change the codes of an exact tokenizer
        "shard_size": config.shard_size,
    }
    return fingerprint(parts)


def _where(doc: Document, seg: Any) -> str:
    path = getattr(seg, "path", None)
    return f"document {doc.id!r}" + (f" ({path})" if path else "")


def _accepts_lengths(audio: Any) -> bool:
    try:
        return "lengths" in inspect.signature(audio.encode).parameters
    except (TypeError, ValueError):
        return False


class _Encoder:
    """Tokenizes the segments of a list of documents, batching images and audio across documents."""

    def __init__(self, text: Any, image: Any, audio: Any, batch_size: int):
        self.text, self.image, self.audio, self.batch_size = text, image, audio, batch_size
        # a codec told the valid samples per item can batch clips of different lengths (zero-padded)
        self.pad_audio = audio is not None and _accepts_lengths(audio)

    def encode(self, docs: Sequence[Document]) -> list[list[TokSegment]]:
        out: list[list[TokSegment | None]] = [[None] * len(d.segments) for d in docs]
        images: dict[tuple[int, ...], list[tuple[int, int, np.ndarray]]] = {}
        audios: list[tuple[int, int, AudioSegment]] = []
        for i, doc in enumerate(docs):
            for j, seg in enumerate(doc.segments):
                if isinstance(seg, TextSegment):
                    if self.text is None:
                        raise ValueError(f"{_where(doc, seg)} has text but no text tokenizer was given")
                    out[i][j] = TextIds(np.asarray(self.text.encode(seg.text), dtype=np.int64))
                elif isinstance(seg, ImageSegment):
                    arr = self._image_array(doc, seg)
                    images.setdefault(arr.shape, []).append((i, j, arr))
                elif isinstance(seg, AudioSegment):
                    if self.audio is None:
                        raise ValueError(f"{_where(doc, seg)} has audio but no audio tokenizer was given")
                    if seg.wave.ndim != 1 or seg.wave.shape[0] == 0:
                        raise ValueError(f"{_where(doc, seg)}: audio must be a non-empty mono (T,) wave")
                    audios.append((i, j, seg))
                else:
                    raise TypeError(f"document {doc.id!r}: unknown segment type {type(seg).__name__}")
        for group in images.values():  # same-size images share batches; the tokenizer resizes to its own size
            for k in range(0, len(group), self.batch_size):
                chunk = group[k : k + self.batch_size]
                batch = torch.from_numpy(np.stack([a for _, _, a in chunk]))  # (B, 3, H, W)
                with torch.no_grad():
                    codes = self.image.encode(batch).codes.cpu().numpy()  # (B, h, w)
                for (i, j, _), c in zip(chunk, codes):
                    out[i][j] = ImageIds(c)
        self._encode_audio(audios, out)
        return out  # type: ignore[return-value]

    def _image_array(self, doc: Document, seg: ImageSegment) -> np.ndarray:
        if self.image is None:
            raise ValueError(f"{_where(doc, seg)} has an image but no image tokenizer was given")
        px = seg.pixels
        if px.ndim != 3 or px.shape[2] != 3 or px.dtype != np.uint8:
            raise ValueError(f"{_where(doc, seg)}: expected (H, W, 3) uint8 RGB pixels, got {px.shape} {px.dtype}")
        arr = px.astype(np.float32).transpose(2, 0, 1)  # (3, H, W)
        return arr / 127.5 - 1.0

    def _encode_audio(self, audios: list[tuple[int, int, AudioSegment]], out: list[list[Any]]) -> None:
        groups: dict[tuple[int, int], list[tuple[int, int, AudioSegment]]] = {}
        for entry in audios:
            seg = entry[2]
            # without a lengths argument only equal-length clips can share a batch (padding would become frames)
            group = (seg.sample_rate, 0 if self.pad_audio else seg.wave.shape[0])
            groups.setdefault(group, []).append(entry)
        for (rate, _), entries in groups.items():
            entries.sort(key=lambda e: e[2].wave.shape[0])  # similar lengths share a batch: little padding
            for k in range(0, len(entries), self.batch_size):
                self._audio_batch(entries[k : k + self.batch_size], rate, out)

    def _audio_batch(self, chunk: list[tuple[int, int, AudioSegment]], rate: int, out: list[list[Any]]) -> None:
        lengths = [e[2].wave.shape[0] for e in chunk]
        wave = np.zeros((len(chunk), max(lengths)), dtype=np.float32)  # (B, T) zero-padded
        for b, (_, _, seg) in enumerate(chunk):
            wave[b, : lengths[b]] = seg.wave
        with torch.no_grad():
            if self.pad_audio:
                result = self.audio.encode(torch.from_numpy(wave), rate, lengths=torch.tensor(lengths))
            else:
                result = self.audio.encode(torch.from_numpy(wave), rate)
        codes = result.codes.cpu().numpy()  # (B, Q, F)
        if self.pad_audio:
            if result.lengths is None:
                raise ValueError(f"{type(self.audio).__name__}.encode(lengths=...) returned no frame lengths")
            frames = result.lengths.cpu().numpy().tolist()
        else:
            frames = [codes.shape[2]] * len(chunk)
        for (i, j, _), c, f in zip(chunk, codes, frames):
            out[i][j] = AudioIds(c[:, : int(f)])


def _built_key(out_dir: Path) -> str | None:
    """The cache key a shard folder was (or is being) built with; None if unknown or the marker is damaged."""
    try:
        key = json.loads((out_dir / META).read_text()).get("key")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return key if isinstance(key, str) else None


def _discard_stale(out_dir: Path, key: str) -> bool:
    meta = out_dir / META
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return False
    if not meta.is_file():
        raise FileExistsError(
            f"{out_dir} exists and is not a token cache (no {META}); refusing to write shards into it"
        )
    if _built_key(out_dir) == key:
        return False
    shutil.rmtree(out_dir)  # it is ours (it has META) and it was built from something else
    return True


def pretokenize(
    documents: Sequence[Document],
    out_dir: str | Path,
    *,
    text: Any,
    image: Any = None,
    audio: Any = None,
    config: PretokenizeConfig | None = None,
    data_key: str | None = None,
    info: dict[str, Any] | None = None,
) -> PretokenizeResult:
    """Tokenize ``documents`` into ``out_dir`` (resuming or reusing what is there when the key matches).

    ``data_key`` identifies the documents (e.g. the manifest's hash or the world's fingerprint); without it
    the documents' content is hashed, which reads them all once more. ``info`` is recorded in ``index.json``.
    """
    config = config or PretokenizeConfig()
    out_dir = Path(out_dir)
    key = cache_key(text, image, audio, data_key or documents_key(documents), config)
    stale = _discard_stale(out_dir, key)
    if (out_dir / INDEX).is_file() and not stale:
        shards = TokenShards(out_dir, expected_key=key)
        n = len(shards.index["shards"])
        return PretokenizeResult(shards, key, 0, n, False, int(shards.index.get("skipped_empty", 0)))
    out_dir.mkdir(parents=True, exist_ok=True)
    build_info = {
        "key": key,
        "tokenizers": {n: tokenizer_fingerprint(t) for n, t in (("text", text), ("image", image), ("audio", audio))},
        "config": to_dict(config),
    }
    (out_dir / META).write_text(json.dumps(build_info, indent=2, sort_keys=True) + "\n")

    encoder = _Encoder(text, image, audio, config.batch_size)
    n_docs = len(documents)
    n_shards = (n_docs + config.shard_size - 1) // config.shard_size
    built = reused = skipped = 0
    shard_items: list[int] = []
    bar = progress(total=n_docs, desc="pretokenize", unit="item")
    for s in range(n_shards):
        folder = out_dir / shard_name(s)
        lo, hi = s * config.shard_size, min(n_docs, (s + 1) * config.shard_size)
        if shard_done(folder, key):
            done = json.loads((folder / "done.json").read_text())
            shard_items.append(done["items"])
            skipped += done.get("skipped_empty", 0)
            reused += 1
            bar.update(hi - lo)
            continue
        docs = [documents[i] for i in range(lo, hi)]
        kept = [d for d in docs if d.segments]
        encoded = encoder.encode(kept)
        write_shard(folder, encoded, [d.id for d in kept], key, extra={"skipped_empty": len(docs) - len(kept)})
        skipped += len(docs) - len(kept)
        shard_items.append(len(kept))
        built += 1
        bar.update(hi - lo)
    bar.close()
    extra = {**(info or {}), **build_info, "skipped_empty": skipped, "num_documents": n_docs}
    write_index(out_dir, key, shard_items, extra)
    return PretokenizeResult(TokenShards(out_dir, expected_key=key), key, built, reused, stale, skipped)


def pretokenize_manifest(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    text: Any,
    image: Any = None,
    audio: Any = None,
    config: PretokenizeConfig | None = None,
    strict: bool = True,
) -> PretokenizeResult:
    """Read a JSONL manifest or webdataset ``.tar`` (``anyloom.data.manifest``) and pre-tokenize it.

    A complete cache with the same key is reused without decoding a single image. With ``strict=False`` bad
    documents are skipped by the reader; their count is in ``index.json`` (``manifest_skipped``) and the reasons
    are printed.
    """
    from anyloom.data.manifest import read_manifest

    config = config or PretokenizeConfig()
    data_key = manifest_key(manifest)
    key = cache_key(text, image, audio, data_key, config)
    out = Path(out_dir)
    if (out / INDEX).is_file() and _built_key(out) == key:
        shards = TokenShards(out, expected_key=key)
        skipped = int(shards.index.get("skipped_empty", 0))
        return PretokenizeResult(shards, key, 0, len(shards.index["shards"]), False, skipped)
    # decode audio straight at the codec's rate (one resampling instead of two)
    rate = int(getattr(audio, "sample_rate", 16000))
    result = read_manifest(manifest, strict=strict, sample_rate=rate)
    for skip in result.skipped[:20]:
        print(f"pretokenize: skipped {skip.source}: {skip.reason}")
    if len(result.skipped) > 20:
        print(f"pretokenize: ... {len(result.skipped) - 20} more skipped ({result.summary})")
    info = {"manifest": str(manifest), "manifest_skipped": len(result.skipped)}
    return pretokenize(
        result.documents, out, text=text, image=image, audio=audio, config=config, data_key=data_key, info=info
    )


__all__ = [
    "PretokenizeConfig",
    "PretokenizeResult",
    "pretokenize",
    "pretokenize_manifest",
    "tokenizer_fingerprint",
    "documents_key",
    "cache_key",
    "manifest_key",
]

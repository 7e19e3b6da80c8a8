"""Pre-tokenization: Documents -> token shards, with the trained text / image / audio tokenizers.

Each item's segments are tokenized separately and stored in the tokenizers' own code spaces
(``shards.py``), so task templates are assembled at load time and the LM's loader never touches pixels.

- Streamed: documents are read ``shard_size`` at a time from any iterable (a list, or ``iter_manifest`` over a
  manifest of any length), so memory holds a few shards, never the whole data set.
- Batched: images of a shard are encoded ``batch_size`` at a time (same-size images together). Audio is sorted
  by length and zero-padded into batches when the tokenizer's ``encode`` takes ``lengths=`` (valid samples per
  clip; it returns ``AudioCodes.lengths``, the real frames); a tokenizer without that argument gets batches of
  equal-length clips only, since padding would otherwise be encoded as frames.
- Parallel on request: with ``num_workers > 0`` whole shards are encoded and written by worker processes (the
  tokenizers are sent to each worker once). A shard's codes depend only on its documents, so the files are the
  same for every ``num_workers``; the index lists the shards in document order.
- Cached: the output folder carries a key = hash(tokenizer fingerprints, data key, shard size, format). A folder
  built with another key is stale: it is detected, removed and rebuilt, never silently reused.
- Resumable: shards are written atomically with a completion marker, so after an interruption the next call
  skips the finished shards (reading past their documents without encoding them) and continues with the first
  missing one.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import multiprocessing
import pickle
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anyloom.config import added_field, fingerprint, to_dict
from anyloom.data.document import AudioSegment, Document, ImageSegment, TextSegment
from anyloom.progress import progress
from anyloom.sequences.interleave import AudioIds, ImageIds, TextIds, TokSegment
from anyloom.sequences.shards import (
    DONE,
    FORMAT_VERSION,
    INDEX,
    TokenShards,
    shard_done,
    shard_name,
    write_index,
    write_shard,
)

META = "build.json"  # written first: marks the folder as a shard cache and records the key being built
SKIPS_SHOWN = 20  # lenient manifest skips printed one by one; the rest as a count


@dataclass(frozen=True)
class PretokenizeConfig:
    shard_size: int = 1024  # items per shard (the unit of resumption, of streaming and of work for a worker)
    batch_size: int = 64  # images / audio clips per tokenizer call
    # worker processes encoding shards, 0: this process. The output does not depend on it, so it is in neither the
    # cache key nor build.json; an added_field so recipes written before it keep their fingerprint.
    num_workers: int = added_field(0)

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(f"shard_size and batch_size must be >= 1, got {self.shard_size}, {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0: encode in this process), got {self.num_workers}")


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
    from anyloom.data.manifest import media_stamps

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    h = hashlib.sha256(path.read_bytes())
    if path.name.endswith((".tar", ".tar.gz", ".tgz")):  # a webdataset shard holds its media: bytes are the key
        return h.hexdigest()[:16]
    for stamp in media_stamps(path):
        h.update(stamp.encode())
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


def _recorded_config(config: PretokenizeConfig) -> dict[str, Any]:
    """The config as build.json and index.json record it: without num_workers, which does not change the output."""
    out = to_dict(config)
    out.pop("num_workers")
    return out


def _write_encoded_shard(encoder: _Encoder, folder: Path, docs: list[Document], key: str) -> tuple[int, int]:
    """Encode one shard's documents and write the shard; returns (items stored, empty documents skipped)."""
    kept = [d for d in docs if d.segments]
    encoded = encoder.encode(kept)
    write_shard(folder, encoded, [d.id for d in kept], key, extra={"skipped_empty": len(docs) - len(kept)},
                tasks=[d.tasks for d in kept])
    return len(kept), len(docs) - len(kept)


# The encoder of a worker process: built once from the tokenizers the pool's initializer receives, so they are
# pickled to each worker once rather than with every shard.
_worker_encoder: _Encoder | None = None


def _start_worker(text: Any, image: Any, audio: Any, batch_size: int) -> None:
    global _worker_encoder
    torch.set_num_threads(1)  # the workers are the parallelism: torch threads in each would oversubscribe the cores
    _worker_encoder = _Encoder(text, image, audio, batch_size)


def _worker_shard(folder: Path, docs: list[Document], key: str) -> tuple[int, int]:
    if _worker_encoder is None:
        raise RuntimeError("_worker_shard runs only in a worker started by _start_worker")
    return _write_encoded_shard(_worker_encoder, folder, docs, key)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a clean server process that has imported torch and this module once (forking a
    process that has run torch can deadlock; spawning re-imports torch, seconds per worker). Spawn where there
    is no forkserver (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # only read when the server starts (once per process)
    return ctx


class _ShardWriter:
    """Encodes and writes shards in this process or in a pool of worker processes (started on first use).

    ``submit`` returns a future; at most ``2 * num_workers`` shards wait in the pool, so a stream is read only
    as fast as the workers encode it and memory holds a few shards."""

    def __init__(self, text: Any, image: Any, audio: Any, config: PretokenizeConfig):
        self.tokenizers = (text, image, audio)
        self.config = config
        self.encoder = _Encoder(text, image, audio, config.batch_size) if config.num_workers == 0 else None
        self.pool: ProcessPoolExecutor | None = None
        self.max_pending = 2 * config.num_workers

    def submit(self, folder: Path, docs: list[Document], key: str) -> Future:
        if self.encoder is not None:
            done: Future = Future()
            done.set_result(_write_encoded_shard(self.encoder, folder, docs, key))
            return done
        if self.pool is None:
            try:  # the pool would fail with a pickling traceback from deep inside multiprocessing
                pickle.dumps(self.tokenizers)
            except Exception as e:
                raise TypeError(
                    f"num_workers={self.config.num_workers} sends the tokenizers to worker processes, but they "
                    f"cannot be pickled ({e}); use num_workers=0"
                ) from e
            self.pool = ProcessPoolExecutor(
                self.config.num_workers, mp_context=_worker_context(),
                initializer=_start_worker, initargs=(*self.tokenizers, self.config.batch_size),
            )
        return self.pool.submit(_worker_shard, folder, docs, key)

    def close(self, failed: bool) -> None:
        """Wait for the workers; after a failure the shards not yet started are dropped (a rerun encodes them)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=failed)
            self.pool = None


def _shards_of(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    it = iter(documents)
    while docs := list(islice(it, size)):
        yield docs


def _build(
    documents: Iterable[Document],
    out_dir: Path,
    key: str,
    text: Any,
    image: Any,
    audio: Any,
    config: PretokenizeConfig,
    total: int | None,
    info: Callable[[], dict[str, Any]],
) -> PretokenizeResult:
    """Tokenize ``documents`` into ``out_dir`` under cache key ``key``; ``info()`` (called once every document
    has been read) is recorded in ``index.json``."""
    stale = _discard_stale(out_dir, key)
    if (out_dir / INDEX).is_file() and not stale:
        shards = TokenShards(out_dir, expected_key=key)
        n = len(shards.index["shards"])
        return PretokenizeResult(shards, key, 0, n, False, int(shards.index.get("skipped_empty", 0)))
    out_dir.mkdir(parents=True, exist_ok=True)
    build_info = {
        "key": key,
        "tokenizers": {n: tokenizer_fingerprint(t) for n, t in (("text", text), ("image", image), ("audio", audio))},
        "config": _recorded_config(config),
    }
    (out_dir / META).write_text(json.dumps(build_info, indent=2, sort_keys=True) + "\n")

    writer = _ShardWriter(text, image, audio, config)
    counts: list[tuple[int, int]] = []  # per shard, in document order: (items stored, empty documents skipped)
    pending: deque[tuple[int, int, Future]] = deque()  # (shard, documents, its future), oldest first
    built = reused = n_docs = 0
    bar = progress(total=total, desc="pretokenize", unit="item")

    def finish_oldest() -> None:
        s, n, future = pending.popleft()
        counts[s] = future.result()
        bar.update(n)

    failed = True
    try:
        for s, docs in enumerate(_shards_of(documents, config.shard_size)):
            n_docs += len(docs)
            folder = out_dir / shard_name(s)
            if shard_done(folder, key):  # finished by an earlier call: its documents are read past, not encoded
                done = json.loads((folder / DONE).read_text())
                counts.append((done["items"], done.get("skipped_empty", 0)))
                reused += 1
                bar.update(len(docs))
                continue
            counts.append((0, 0))  # set when the shard is written
            pending.append((s, len(docs), writer.submit(folder, docs, key)))
            built += 1
            while len(pending) > writer.max_pending:
                finish_oldest()
        while pending:
            finish_oldest()
        failed = False
    finally:
        writer.close(failed)
        bar.close()
    skipped = sum(c[1] for c in counts)
    extra = {**info(), **build_info, "skipped_empty": skipped, "num_documents": n_docs}
    write_index(out_dir, key, [c[0] for c in counts], extra)
    return PretokenizeResult(TokenShards(out_dir, expected_key=key), key, built, reused, stale, skipped)


def pretokenize(
    documents: Iterable[Document],
    out_dir: str | Path,
    *,
    text: Any,
    image: Any = None,
    audio: Any = None,
    config: PretokenizeConfig | None = None,
    data_key: str | None = None,
    info: dict[str, Any] | None = None,
    total: int | None = None,
) -> PretokenizeResult:
    """Tokenize ``documents`` into ``out_dir`` (resuming or reusing what is there when the key matches).

    ``documents`` is any iterable, read once, ``config.shard_size`` at a time. ``data_key`` identifies the
    documents (e.g. the manifest's hash or the world's fingerprint); a list may leave it out, and then its
    content is hashed, which reads it all once more; a stream must give it. ``info`` is recorded in
    ``index.json``; ``total`` (documents, when a stream knows it) is for the progress bar.
    """
    config = config or PretokenizeConfig()
    if data_key is None:
        if not isinstance(documents, Sequence):
            raise ValueError(
                f"pretokenize: documents is a {type(documents).__name__}, read only once, so it cannot be hashed "
                "for the cache key: pass data_key= (e.g. manifest_key(path) for a manifest, or a name that changes "
                "whenever the documents do), or pass a list"
            )
        data_key = documents_key(documents)
    if total is None and isinstance(documents, Sized):
        total = len(documents)
    key = cache_key(text, image, audio, data_key, config)
    return _build(documents, Path(out_dir), key, text, image, audio, config, total, lambda: dict(info or {}))


def _report_skips(skips: Sequence[Any]) -> None:
    for skip in skips[:SKIPS_SHOWN]:
        print(f"pretokenize: skipped {skip.source}: {skip.reason}")
    if len(skips) > SKIPS_SHOWN:
        kinds: dict[str, int] = {}
        for skip in skips:
            kind = skip.reason.split(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        by_kind = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        print(f"pretokenize: ... {len(skips) - SKIPS_SHOWN} more skipped ({len(skips)} in all: {by_kind})")


def _manifest_documents(path: Path) -> int | None:
    """Documents in a JSONL manifest (its non-blank lines; skipped lines included), None for a tar shard."""
    if path.name.endswith((".tar", ".tar.gz", ".tgz")):
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


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
    """Stream a JSONL manifest or webdataset ``.tar`` (``anyloom.data.manifest.iter_manifest``) into token shards.

    A complete cache with the same key is reused without decoding a single image. With ``strict=False`` bad
    documents are skipped by the reader; their count is in ``index.json`` (``manifest_skipped``) and the reasons
    are printed once the manifest has been read (the first 20, then a count).
    """
    from anyloom.data.manifest import Skip, iter_manifest

    config = config or PretokenizeConfig()
    key = cache_key(text, image, audio, manifest_key(manifest), config)
    skipped: list[Skip] = []
    # decode audio straight at the codec's rate (one resampling instead of two)
    rate = int(getattr(audio, "sample_rate", 16000))
    documents = iter_manifest(manifest, strict=strict, sample_rate=rate, skipped=skipped)  # lazy: read by _build

    def manifest_info() -> dict[str, Any]:
        _report_skips(skipped)
        return {"manifest": str(manifest), "manifest_skipped": len(skipped)}

    total = _manifest_documents(Path(manifest))
    return _build(documents, Path(out_dir), key, text, image, audio, config, total, manifest_info)


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

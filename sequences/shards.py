"""Token shards on disk: each item's segments, tokenized separately, as memory-mappable numpy arrays.

Codes are stored in each tokenizer's own space (text ids, image codes, audio codes), not as unified ids,
so the same shards serve any span layout (row ends, audio pattern) and every task template.

Layout of one shard folder (all ``.npy``, opened with ``mmap_mode="r"``)::

    shard_00003/
        codes.npy      (N,) int32   every segment's codes, concatenated (image: row-major h*w; audio: (Q, F) C-order)
        segments.npy   (S, 5) int64 per segment: [kind, start, dim0, dim1, item]   kind 0 text, 1 image, 2 audio
                                    text: (L, 1); image: (h, w); audio: (Q, F); start indexes codes.npy
        items.npy      (I+1,) int64 item i owns segments[items[i]:items[i+1]]
        ids.json       the items' ids (for error messages and evaluation)
        tasks.json     only when some item is restricted: per item, the task templates it may serve, or null
        done.json      completion marker: written last, with the cache key; a folder without it is incomplete

A shard is written into a temporary folder and renamed into place, so a crash never leaves a half shard under
the final name. ``index.json`` at the top lists the shards; it is written once all of them exist.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anyloom.sequences.interleave import AudioIds, ImageIds, TextIds, TokSegment

FORMAT_VERSION = 1
INDEX = "index.json"
DONE = "done.json"
KIND_TEXT, KIND_IMAGE, KIND_AUDIO = 0, 1, 2
KIND_NAMES = ("text", "image", "audio")


class ShardError(ValueError):
    """A shard folder that is missing, incomplete, or built with different tokenizers/config."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def write_shard(
    folder: str | Path,
    items: Sequence[Sequence[TokSegment]],
    item_ids: Sequence[str],
    key: str,
    extra: dict[str, Any] | None = None,
    tasks: Sequence[Sequence[str] | None] | None = None,
) -> Path:
    """Write one shard atomically (temporary folder + rename). ``items[i]`` is item i's tokenized segments.

    ``extra`` goes into the completion marker (e.g. how many input documents were skipped); ``tasks[i]``, the task
    templates item i may serve (None: any)."""
    folder = Path(folder)
    if len(items) != len(item_ids):
        raise ValueError(f"{len(items)} items but {len(item_ids)} ids")
    if tasks is not None and len(tasks) != len(items):
        raise ValueError(f"{len(items)} items but {len(tasks)} task lists")
    rows: list[tuple[int, int, int, int, int]] = []
    chunks: list[np.ndarray] = []
    offsets = [0]
    start = 0
    for i, segs in enumerate(items):
        for seg in segs:
            if isinstance(seg, TextIds):
                arr, kind, dims = seg.ids, KIND_TEXT, (seg.ids.shape[0], 1)
            elif isinstance(seg, ImageIds):
                arr, kind, dims = seg.codes, KIND_IMAGE, seg.codes.shape
            elif isinstance(seg, AudioIds):
                arr, kind, dims = seg.codes, KIND_AUDIO, seg.codes.shape
            else:
                raise TypeError(f"item {item_ids[i]!r}: unsupported segment {type(seg).__name__}")
            flat = np.ascontiguousarray(arr).reshape(-1)
            if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(np.int32).max):
                raise ValueError(f"item {item_ids[i]!r}: codes do not fit int32")
            rows.append((kind, start, int(dims[0]), int(dims[1]), i))
            chunks.append(flat.astype(np.int32))
            start += flat.size
        offsets.append(len(rows))
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np.save(tmp / "codes.npy", np.concatenate(chunks) if chunks else np.zeros(0, np.int32))
    np.save(tmp / "segments.npy", np.array(rows, dtype=np.int64).reshape(-1, 5))
    np.save(tmp / "items.npy", np.array(offsets, dtype=np.int64))
    (tmp / "ids.json").write_text(json.dumps(list(item_ids)))
    if tasks is not None and any(t is not None for t in tasks):
        (tmp / "tasks.json").write_text(json.dumps([list(t) if t is not None else None for t in tasks]))
    (tmp / DONE).write_text(json.dumps({**(extra or {}), "key": key, "items": len(items), "codes": start}) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(tmp, folder)
    return folder


def shard_done(folder: str | Path, key: str) -> bool:
    """True when ``folder`` is a complete shard built with cache key ``key``."""
    marker = Path(folder) / DONE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("key") == key
    except (json.JSONDecodeError, AttributeError):
        return False


@dataclass
class _Shard:
    codes: np.ndarray  # (N,) int32, memory-mapped
    segments: np.ndarray  # (S, 5) int64
    items: np.ndarray  # (I+1,) int64
    ids: list[str]
    tasks: list[list[str] | None] | None = None  # tasks.json: per item, the templates it may serve (None: any)
    codes_view: np.ndarray | None = None  # plain ndarray over the same mapping (memmap slicing is ~5x slower)
    rows: list[list[int]] | None = None  # segments as Python ints: item() runs per document in the loader

    def __post_init__(self) -> None:
        self.codes_view = self.codes.view(np.ndarray)
        self.rows = self.segments.tolist()
        self.item_starts = self.items.tolist()


class TokenShards:
    """Read-only view of a complete shard folder: ``len()`` items, ``item(i)`` -> tokenized segments."""

    def __init__(self, root: str | Path, expected_key: str | None = None):
        self.root = Path(root)
        index_path = self.root / INDEX
        if not index_path.is_file():
            raise ShardError(f"{self.root}: no {INDEX}; not a token shard folder, or pre-tokenization did not finish")
        try:
            self.index: dict[str, Any] = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{index_path}: not valid JSON: {e}") from e
        if not isinstance(self.index, dict) or self.index.get("format_version") != FORMAT_VERSION:
            found = self.index.get("format_version") if isinstance(self.index, dict) else None
            raise ShardError(f"{index_path}: format_version {found!r}, expected {FORMAT_VERSION}")
        for field_name in ("key", "shards"):
            if field_name not in self.index:
                raise ShardError(f"{index_path}: missing field '{field_name}'")
        self.key: str = self.index["key"]
        if expected_key is not None and self.key != expected_key:
            raise ShardError(
                f"{self.root}: built with cache key {self.key}, expected {expected_key} (tokenizers, data or "
                "config changed); re-run pre-tokenization"
            )
        self._shards: list[_Shard] = []
        counts = []
        for entry in self.index["shards"]:
            folder = self.root / entry["name"]
            if not shard_done(folder, self.key):
                raise ShardError(f"{folder}: missing or incomplete shard (no {DONE} with key {self.key})")
            shard = _Shard(
                codes=np.load(folder / "codes.npy", mmap_mode="r"),
                segments=np.load(folder / "segments.npy"),
                items=np.load(folder / "items.npy"),
                ids=json.loads((folder / "ids.json").read_text()),
                tasks=json.loads((folder / "tasks.json").read_text()) if (folder / "tasks.json").is_file() else None,
            )
            if shard.items.shape[0] - 1 != entry["items"]:
                raise ShardError(f"{folder}: holds {shard.items.shape[0] - 1} items, {INDEX} says {entry['items']}")
            self._shards.append(shard)
            counts.append(entry["items"])
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first global item per shard
        self._start_list = self._starts.tolist()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[_Shard, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range [0, {len(self)})")
        s = bisect.bisect_right(self._start_list, index) - 1
        return self._shards[s], index - self._start_list[s]

    def item_id(self, index: int) -> str:
        shard, local = self._locate(index)
        return shard.ids[local]

    def item(self, index: int) -> list[TokSegment]:
        shard, local = self._locate(index)
        out: list[TokSegment] = []
        for kind, start, d0, d1, _ in shard.rows[shard.item_starts[local] : shard.item_starts[local + 1]]:
            codes = shard.codes_view[start : start + d0 * d1].astype(np.int64)
            if kind == KIND_TEXT:
                out.append(TextIds(codes))
            elif kind == KIND_IMAGE:
                out.append(ImageIds(codes.reshape(d0, d1)))  # (h, w)
            else:
                out.append(AudioIds(codes.reshape(d0, d1)))  # (Q, F)
        return out

    def kinds(self) -> np.ndarray:
        """(items, 3) int64: how many text / image / audio segments each item has (read from the tables only)."""
        out = np.zeros((len(self), 3), dtype=np.int64)
        for shard, first in zip(self._shards, self._starts[:-1]):
            seg = shard.segments
            if seg.shape[0]:
                np.add.at(out, (first + seg[:, 4], seg[:, 0]), 1)
        return out

    def tasks(self) -> list[tuple[str, ...] | None]:
        """Per item, the task templates it may serve (a document's ``tasks``), or None where it may serve any."""
        out: list[tuple[str, ...] | None] = []
        for shard in self._shards:
            if shard.tasks is None:
                out += [None] * len(shard.ids)
            else:
                out += [tuple(t) if t is not None else None for t in shard.tasks]
        return out

    @property
    def num_codes(self) -> int:
        return int(sum(s.codes.shape[0] for s in self._shards))


def write_index(root: str | Path, key: str, shard_items: Sequence[int], info: dict[str, Any]) -> Path:
    """Write ``index.json`` (last step of a build): the shards in order, and what they were built from."""
    root = Path(root)
    index = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "num_items": int(sum(shard_items)),
        "shards": [{"name": shard_name(i), "items": int(n)} for i, n in enumerate(shard_items)],
        **info,
    }
    tmp = root / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    tmp.replace(root / INDEX)
    return root / INDEX


__all__ = [
    "TokenShards",
    "ShardError",
    "write_shard",
    "write_index",
    "shard_done",
    "shard_name",
    "KIND_TEXT",
    "KIND_IMAGE",
    "KIND_AUDIO",
    "KIND_NAMES",
]

"""Tile sizes measured on one kind of GPU, read by the kernels in place of their built-in defaults.

A JSON file maps a GPU's name (``torch.cuda.get_device_name()``) to tiles per kernel, pass and head-dim bucket:

    {"NVIDIA H200": {"flash_attention": {"fwd": {"64": [64, 64, 4, 3], "128": [64, 64, 4, 3]},
                                         "bwd": {"64": [64, 64, 4, 2]}}}}

A tile is (BM, BN, num_warps, num_stages). ``python scripts/bench_gpu.py --only tune`` measures them and writes
the file; the kernels look it up at their first launch on a device (nothing is read at import). Where the file, the
GPU, the kernel or the bucket is absent, the kernel's defaults apply. The file is ``$ANYLOOM_KERNEL_TUNING`` when
that is set, else ``~/.cache/anyloom/kernel_tuning.json``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

Tile = tuple[int, int, int, int]  # (BM, BN, num_warps, num_stages)
Tiles = dict[str, dict[int, Tile]]  # pass ("fwd" | "bwd") -> head-dim bucket -> tile

ENV = "ANYLOOM_KERNEL_TUNING"

# A sweep times candidates through the real kernel: these tiles win over the file and the defaults in its scope.
_forced: contextvars.ContextVar[dict[str, Tiles] | None] = contextvars.ContextVar("anyloom_forced_tiles", default=None)


def tuning_file() -> Path:
    """Where tuned tiles are read from and written to."""
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "anyloom" / "kernel_tuning.json")


def _parse_tiles(where: str, passes: object) -> Tiles:
    if not isinstance(passes, dict):
        raise ValueError(f"{where}: expected an object of passes, got {type(passes).__name__}")
    out: Tiles = {}
    for kind, buckets in passes.items():
        if not isinstance(buckets, dict):
            raise ValueError(f"{where}.{kind}: expected an object of head-dim buckets, got {type(buckets).__name__}")
        out[kind] = {}
        for bucket, tile in buckets.items():
            ok = isinstance(tile, list) and len(tile) == 4 and all(isinstance(x, int) and x > 0 for x in tile)
            if not str(bucket).isdigit() or not ok:
                raise ValueError(f"{where}.{kind}.{bucket}: expected a head dim and [BM, BN, num_warps, num_stages] "
                                 f"of positive ints, got {tile!r}")
            out[kind][int(bucket)] = tuple(tile)
    return out


@functools.cache
def _read(path: Path, mtime_ns: int) -> dict[str, dict[str, Tiles]]:
    """GPU name -> kernel -> tiles (cached per file version)."""
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object of GPU names")
    out: dict[str, dict[str, Tiles]] = {}
    for gpu, kernels in raw.items():
        if gpu == "measured":  # when and with what the tiles were measured: for people
            continue
        if not isinstance(kernels, dict):
            raise ValueError(f"{path}: {gpu}: expected an object of kernels, got {type(kernels).__name__}")
        out[gpu] = {kernel: _parse_tiles(f"{path}: {gpu}.{kernel}", passes) for kernel, passes in kernels.items()}
    return out


def tuned_tiles(kernel: str, gpu: str, path: Path | None = None) -> Tiles:
    """The tiles measured for ``kernel`` on ``gpu`` (forced ones first); empty where nothing was measured."""
    path = path or tuning_file()
    try:  # one stat per kernel launch: a file written by a sweep applies from the next launch on
        mtime_ns = path.stat().st_mtime_ns
    except FileNotFoundError:
        found: Tiles = {}
    else:
        found = {k: dict(v) for k, v in _read(path, mtime_ns).get(gpu, {}).get(kernel, {}).items()}
    for kind, buckets in (_forced.get() or {}).get(kernel, {}).items():
        found.setdefault(kind, {}).update(buckets)
    return found


def tile_for(defaults: dict[int, Tile], tuned: dict[int, Tile], head_dim: int) -> Tile:
    """The tile of the smallest bucket >= ``head_dim`` among the defaults' buckets, a tuned one where measured."""
    bucket = min(b for b in defaults if b >= head_dim)
    return tuned.get(bucket, defaults[bucket])


def save_tuned_tiles(kernel: str, gpu: str, tiles: Tiles, path: Path | None = None,
                     measured: dict[str, str] | None = None) -> Path:
    """Merge ``tiles`` for ``kernel`` on ``gpu`` into the file (other GPUs and kernels kept); returns its path.
    ``measured`` (date, versions) is kept beside the tiles for people; the lookup ignores it."""
    path = path or tuning_file()
    raw = json.loads(path.read_text()) if path.is_file() else {}
    entry = raw.setdefault(gpu, {}).setdefault(kernel, {})
    for kind, buckets in tiles.items():
        entry.setdefault(kind, {}).update({str(b): list(t) for b, t in buckets.items()})
    if measured:
        raw.setdefault("measured", {})[gpu] = measured
    _parse_tiles(f"{path}: {gpu}.{kernel}", entry)  # refuse to write what the lookup would refuse to read
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(raw, indent=2) + "\n")
    tmp.replace(path)
    return path


@contextlib.contextmanager
def forced_tiles(kernel: str, tiles: Tiles) -> Iterator[None]:
    """Run the kernel with ``tiles`` inside the block, whatever the file says (a tuning sweep times candidates)."""
    token = _forced.set({**(_forced.get() or {}), kernel: tiles})
    try:
        yield
    finally:
        _forced.reset(token)

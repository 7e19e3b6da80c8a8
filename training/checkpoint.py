"""Resumable, sharded training checkpoints with torch.distributed.checkpoint (DCP).

One checkpoint is one directory, ``<run>/checkpoints/step_00000200/``::

    __0_0.distcp ...      DCP shards: model and optimizer state (each rank writes its own shards)
    rank_00000.json ...   per rank: data-loader state, RNG states (Python, NumPy, torch CPU/CUDA)
    train_state.json      step, lr-scheduler state, world size
    config.json           the recipe slices the run was trained with (model, optim, train, parallel, seed)
    vocab.json            the vocabulary (when the run has one)
    .metadata             written LAST by DCP (temp file + rename)

Every JSON file is written before DCP starts, so a directory is complete exactly when ``.metadata`` exists.
A save interrupted by a crash leaves no ``.metadata``; it is ignored when resuming and removed by the next
save. Complete checkpoints beyond the last ``keep_last`` are deleted after each save.

Everything except DCP's own shards is JSON (no pickle of our state). DCP itself pickles ``.metadata``:
load checkpoints only from runs you trust; ``scripts/export.py`` produces safetensors for sharing.
The checkpoint directory must be visible to every rank (a shared file system on multi-node runs).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import re
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from anyloom.config import config_diff
from anyloom.training import faults

METADATA = ".metadata"
TRAIN_STATE = "train_state.json"
CONFIG = "config.json"
VOCAB = "vocab.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# DCP warns that it "assumes a single process" whenever no process group exists: in a single-process run that
# is exactly our intent (and async saves warn from a background thread, out of reach of catch_warnings)
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _settings_diff(saved: dict[str, Any], expect: dict[str, Any]) -> list[str]:
    """Dotted keys where the saved ``config.json`` and ``expect`` (see ``Checkpointer.resume``) differ."""
    out = []
    for section, value in expect.items():
        got = saved.get(section)
        if dataclasses.is_dataclass(value):
            out += [f"{section}.{k}" for k in config_diff(got if isinstance(got, dict) else {}, value)]
        elif isinstance(value, dict):
            got = got if isinstance(got, dict) else {}
            out += [f"{section}.{k}" for k, v in value.items() if k in got and got[k] != v]
        elif section in saved and got != value:
            out.append(section)
    return out


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class CheckpointRef:
    path: Path
    step: int

    @property
    def name(self) -> str:
        return self.path.name

    def __fspath__(self) -> str:  # usable wherever a path is: Path(ref), open(ref / ...), export(ref, ...)
        return str(self.path)


def step_dir(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / METADATA).is_file()


def _step_dirs(folder: str | Path) -> list[CheckpointRef]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    refs = [CheckpointRef(p, int(m.group(1))) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(refs, key=lambda r: r.step)


def complete_checkpoints(folder: str | Path) -> list[CheckpointRef]:
    """Complete checkpoints in ``folder``, oldest first."""
    return [r for r in _step_dirs(folder) if is_complete(r.path)]


def latest_checkpoint(folder: str | Path) -> CheckpointRef | None:
    done = complete_checkpoints(folder)
    return done[-1] if done else None


# ---- RNG state as JSON ---------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _write_json(path: Path, obj: Any, what: str) -> None:
    try:
        text = json.dumps(obj, default=_json_default)
    except TypeError as e:
        raise TypeError(f"{what} must be JSON-serialisable to be checkpointed: {e}") from e
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.parent}: checkpoint has .metadata but no {path.name}; it is corrupt") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


class _Writer(FileSystemWriter):
    """DCP's file-system writer; the fault hook sits between the last data file and ``.metadata``."""

    def __init__(self, path: Path, step: int):
        super().__init__(path)
        self._step = step

    def finish(self, metadata, results) -> None:  # noqa: ANN001 - DCP's signature
        faults.maybe_kill_during_save(self._step)
        super().finish(metadata, results)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


class Checkpointer:
    """Save and restore the whole training state; every rank calls every method."""

    def __init__(self, folder: str | Path, keep_last: int = 2, async_save: bool = False):
        if keep_last <= 0:
            raise ValueError(f"keep_last must be > 0, got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: Future | None = None
        self._pending_ref: CheckpointRef | None = None
        self.last_saved: CheckpointRef | None = None
        # async saves run collectives from a background thread: give them their own gloo group so they never
        # interleave with the training collectives on the default group
        self._group = dist.new_group(backend="gloo") if async_save and _distributed() else None

    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Stateful,
        loader: Stateful,
        config: dict[str, Any],
        vocab: dict[str, Any] | None,
    ) -> Path:
        self.wait()
        path = step_dir(self.folder, step)
        if _rank() == 0:
            if path.exists():  # a leftover of a crashed save of the same step
                shutil.rmtree(path)
            path.mkdir(parents=True)
            train_state = {"step": step, "world_size": _world(), "scheduler": scheduler.state_dict()}
            _write_json(path / TRAIN_STATE, train_state, "scheduler state")
            _write_json(path / CONFIG, config, "config")
            if vocab is not None:
                _write_json(path / VOCAB, vocab, "vocabulary")
        _barrier()
        mine = {"loader": loader.state_dict(), "rng": rng_state()}
        _write_json(path / rank_file(_rank()), mine, "loader.state_dict()")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        writer = _Writer(path, step)
        ref = CheckpointRef(path, step)
        if self.async_save:
            self._pending = dcp.async_save(state, storage_writer=writer, process_group=self._group,
                                           no_dist=not _distributed())
            self._pending_ref = ref
        else:
            dcp.save(state, storage_writer=writer, no_dist=not _distributed())
            self._finished(ref)
        return path

    def wait(self) -> None:
        """Block until a pending asynchronous save is complete (then prune old checkpoints)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
            self._finished(self._pending_ref)

    def _finished(self, ref: CheckpointRef) -> None:
        self.last_saved = ref
        if _rank() == 0:
            done = complete_checkpoints(self.folder)
            for old in done[: max(0, len(done) - self.keep_last)]:
                shutil.rmtree(old.path, ignore_errors=True)
            for r in _step_dirs(self.folder):  # incomplete leftovers of crashed saves
                if not is_complete(r.path) and r.step < ref.step:
                    shutil.rmtree(r.path, ignore_errors=True)
        _barrier()

    def resume(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Stateful,
        loader: Stateful,
        expect: dict[str, Any] | None = None,
    ) -> CheckpointRef | None:
        """Restore the latest complete checkpoint into the given objects; None when there is none.

        ``expect`` maps sections of the saved ``config.json`` to what this run would save there, and a checkpoint
        that differs is refused, naming the keys: a config dataclass is compared whole (``anyloom.config.config_diff``:
        options added since, at their neutral value, do not count), a dict only at its own keys, anything else as
        a value; a key or value the checkpoint does not record (written before it was) is not checked."""
        ref = latest_checkpoint(self.folder) if _rank() == 0 else None
        if _distributed():  # every rank must load the same one, whatever its view of the file system
            box = [ref]
            dist.broadcast_object_list(box, src=0)
            ref = box[0]
        if ref is None:
            return None
        state = _read_json(ref.path / TRAIN_STATE)
        saved_world = state.get("world_size")
        if saved_world != _world() and _rank() == 0:
            print(f"warning: {ref.path} was written by {saved_world} ranks, this run has {_world()}: model and "
                  "optimizer are resharded; every rank gets rank 0's data-loader state (exact for loaders whose "
                  "state is global, like PackedLoader, which also checks that the global batch is unchanged)")
        if expect:
            diff = _settings_diff(_read_json(ref.path / CONFIG), expect)
            if diff:
                raise RuntimeError(
                    f"{ref.path} was trained with other settings than this run's, at {diff}: resuming would carry "
                    f"its weights on under the new ones. Train under another run name (run.name=...), or move "
                    f"{self.folder} away to train this run afresh")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=ref.path, no_dist=not _distributed())
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        scheduler.load_state_dict(state["scheduler"])
        mine = _read_json(ref.path / rank_file(_rank() if saved_world == _world() else 0))
        loader.load_state_dict(mine["loader"])
        set_rng_state(mine["rng"])
        return ref

"""Checkpoints of the small-model trainers (image and audio tokenizers, matcher, diffusion decoder), and the loop
skeleton they share. The LM keeps its sharded DCP checkpoints (``training/checkpoint.py``).

One format, one helper::

    <run>/checkpoints/
        step_0000250/
            state.safetensors   models, optimizer tensors, extra tensors, RNG states (torch, numpy, generators)
            snapshot.json       step, config fingerprint, optimizer param groups, JSON parts of RNG states; the
                                completion marker: written last, inside a temporary folder renamed into place
        .tmp-step_0000500/      a save in progress (or a crashed one): never read, removed by the next save

Loading reads safetensors and JSON only: nothing in a checkpoint can execute code. A folder without its
``snapshot.json`` is ignored; one written by another config (fingerprint) is not resumed, and says so.

Usage::

    snaps = Snapshots(run.checkpoints, fp, keep_last=2, name="audio tokenizer",
                      models={"model": model}, optimizers={"optim": opt}, generators={"data": g})
    start = snaps.resume()            # the step to start from: 0 without a usable checkpoint
    loop = TrainingLoop("audio tokenizer", steps, start=start, max_seconds=600)
    for step in loop:                 # stops at ``steps`` or once the time budget is spent (and says so)
        ...                           # the trainer's own step: its random draws and float operations
        if loop.due(ckpt_every, step + 1):
            snaps.save(step + 1)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from anyloom.progress import progress

FORMAT = "anyloom.snapshot/1"
TENSORS = "state.safetensors"
MARKER = "snapshot.json"  # written last: a folder without it is incomplete
PREFIX = "step_"
TMP_PREFIX = ".tmp-"


class SnapshotError(ValueError):
    """A checkpoint folder that cannot be read into the trainer's state (the message names the file)."""


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    step: int
    fingerprint: str
    meta: dict[str, Any]  # the trainer's own JSON (e.g. counters); {} if none


def _step_of(folder: Path) -> int | None:
    try:
        return int(folder.name[len(PREFIX):]) if folder.name.startswith(PREFIX) else None
    except ValueError:
        return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_state(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors ``optim.<name>.<param id>.<key>`` and JSON (param groups, non-tensor per-parameter values)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{name}.{pid}.{key}"] = value
            else:  # e.g. a float step count or a None momentum buffer: exact in JSON
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict[str, Any],
                    where: Path) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, k = key[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[k] = value
    for key, value in saved["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = value
    try:
        opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    except (ValueError, KeyError) as e:
        raise SnapshotError(f"{where}: optimizer {name!r} does not fit the trainer's: {e}") from e


class Snapshots:
    """Save and resume one trainer's state in ``folder`` (a run's ``checkpoints/``).

    ``models`` and ``optimizers`` are saved as safetensors (optimizer param groups as JSON); ``tensors`` are extra
    tensors restored in place (e.g. EMA copies); ``generators`` are torch.Generators whose states are restored;
    ``global_rng`` also saves the process-wide torch, numpy and Python generators. ``fingerprint`` is the stage
    config's: a checkpoint with another one is not resumed. The ``keep_last`` newest complete checkpoints stay.
    """

    def __init__(self, folder: str | Path, fingerprint: str, *, keep_last: int = 2, name: str = "training",
                 models: Mapping[str, torch.nn.Module] | None = None,
                 optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
                 generators: Mapping[str, torch.Generator] | None = None,
                 tensors: Mapping[str, torch.Tensor] | None = None, global_rng: bool = True):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        for kind, names in (("models", models), ("optimizers", optimizers), ("generators", generators),
                            ("tensors", tensors)):
            for key in names or {}:
                if not key or "." in key:
                    raise ValueError(f"{kind} name {key!r}: must be non-empty and without '.'")
        self.folder, self.fingerprint, self.keep_last, self.name = Path(folder), fingerprint, keep_last, name
        self.models = dict(models or {})
        self.optimizers = dict(optimizers or {})
        self.generators = dict(generators or {})
        self.tensors = dict(tensors or {})
        self.global_rng = global_rng

    # -- finding ------------------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoint folders (any fingerprint), oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(s, p) for p in self.folder.iterdir() if p.is_dir() and (s := _step_of(p)) is not None
                 and (p / MARKER).is_file()]
        return [p for _, p in sorted(found)]

    def info(self, folder: str | Path) -> SnapshotInfo:
        """The JSON part of a complete checkpoint; SnapshotError if it is not one."""
        folder = Path(folder)
        marker = folder / MARKER
        if not marker.is_file():
            raise SnapshotError(f"{folder}: no {MARKER}: not a complete checkpoint (an interrupted save?)")
        try:
            meta = json.loads(marker.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SnapshotError(f"{marker}: not valid JSON ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise SnapshotError(f"{marker}: format {got!r}, expected {FORMAT!r}")
        return SnapshotInfo(folder, int(meta["step"]), str(meta["fingerprint"]), meta.get("meta", {}))

    def latest(self) -> SnapshotInfo | None:
        """The newest complete checkpoint of this fingerprint; others are passed over with a log line."""
        for folder in reversed(self.complete()):
            found = self.info(folder)
            if found.fingerprint == self.fingerprint:
                return found
            print(f"{self.name}: not resuming from {folder}: written by another config (fingerprint "
                  f"{found.fingerprint}, this run {self.fingerprint})")
        return None

    # -- saving -------------------------------------------------------------------------------------------
    def save(self, step: int, meta: dict[str, Any] | None = None) -> Path:
        """Write ``step_<step>`` atomically (temporary folder, then rename) and drop all but the newest K."""
        tensors: dict[str, torch.Tensor] = {}
        record: dict[str, Any] = {"format": FORMAT, "step": int(step), "fingerprint": self.fingerprint,
                                  "meta": meta or {}, "optimizers": {}, "rng": {}}
        for name, model in self.models.items():
            tensors.update({f"model.{name}.{k}": v for k, v in model.state_dict().items()})
        for name, opt in self.optimizers.items():
            opt_tensors, record["optimizers"][name] = _optimizer_state(name, opt)
            tensors.update(opt_tensors)
        tensors.update({f"tensor.{name}": t for name, t in self.tensors.items()})
        tensors.update({f"rng.generator.{name}": g.get_state() for name, g in self.generators.items()})
        if self.global_rng:
            tensors["rng.torch"] = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                for i, s in enumerate(torch.cuda.get_rng_state_all()):
                    tensors[f"rng.cuda.{i}"] = s
            kind, keys, pos, has_gauss, cached = np.random.get_state()
            tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
            record["rng"]["numpy"] = [kind, int(pos), int(has_gauss), float(cached)]
            version, internal, gauss_next = random.getstate()
            record["rng"]["python"] = [version, list(internal), gauss_next]

        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{PREFIX}{int(step):07d}"
        tmp = self.folder / f"{TMP_PREFIX}{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp / TENSORS))
        (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        for f in (tmp / TENSORS, tmp / MARKER, tmp):
            _fsync(f)
        if final.exists():  # the same step again (e.g. the final save after a periodic one): replace it
            old = self.folder / f"{TMP_PREFIX}old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync(self.folder)
        self._prune()
        return final

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.folder.glob(TMP_PREFIX + "*"):  # crashed saves
            shutil.rmtree(stale, ignore_errors=True)

    # -- loading ------------------------------------------------------------------------------------------
    def load(self, folder: str | Path) -> SnapshotInfo:
        """Restore every registered object from ``folder``; SnapshotError naming the file when it does not fit."""
        found = self.info(folder)
        if found.fingerprint != self.fingerprint:
            raise SnapshotError(f"{found.path}: written by another config (fingerprint {found.fingerprint}, "
                                f"expected {self.fingerprint})")
        path = found.path / TENSORS
        if not path.is_file():
            raise SnapshotError(f"{path}: missing (the checkpoint's {MARKER} names no tensors without it)")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise SnapshotError(f"{path}: not a readable safetensors file ({e})") from e
        record = json.loads((found.path / MARKER).read_text())

        def take(key: str) -> torch.Tensor:
            if key not in tensors:
                raise SnapshotError(f"{path}: no tensor {key!r} (saved by a trainer with other parts?)")
            return tensors[key]

        for name, model in self.models.items():
            prefix = f"model.{name}."
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                model.load_state_dict(sd)
            except RuntimeError as e:
                raise SnapshotError(f"{path}: model {name!r} does not fit: {e}") from e
        for name, opt in self.optimizers.items():
            if name not in record["optimizers"]:
                raise SnapshotError(f"{found.path / MARKER}: no optimizer {name!r}")
            _load_optimizer(name, opt, tensors, record["optimizers"][name], path)
        for name, t in self.tensors.items():
            with torch.no_grad():
                t.copy_(take(f"tensor.{name}"))
        for name, g in self.generators.items():
            g.set_state(take(f"rng.generator.{name}"))
        if self.global_rng:
            torch.set_rng_state(take("rng.torch"))
            cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
            if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
            kind, pos, has_gauss, cached = record["rng"]["numpy"]
            np.random.set_state((kind, take("rng.numpy").numpy().astype(np.uint32), pos, has_gauss, cached))
            version, internal, gauss_next = record["rng"]["python"]
            random.setstate((version, tuple(internal), gauss_next))
        return found

    def resume(self) -> int:
        """Restore the newest usable checkpoint and return its step (0, and nothing restored, without one)."""
        found = self.latest()
        if found is None:
            return 0
        self.load(found.path)
        print(f"{self.name}: resumed from {found.path} at step {found.step}")
        return found.step


class TrainingLoop:
    """The step loop of the small-model trainers: a progress bar, an optional wall-clock budget and "is it due".

    Iterating yields the step index (the steps done before it, from ``start``) until ``steps``. With
    ``max_seconds`` > 0 the budget is checked after each step: a trainer that must know before its periodic work
    (to save or sample on the last step) asks :meth:`finishing`; otherwise the loop checks once the body is done.
    Either way the loop then ends, says so and sets ``stopped_early``. It draws no random numbers and touches no
    tensors: the trainer's own step keeps its order of random draws and float operations.
    """

    def __init__(self, name: str, steps: int, *, start: int = 0, max_seconds: float = 0.0):
        if max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0 (0: no budget), got {max_seconds}")
        self.name, self.steps, self.start, self.max_seconds = name, steps, start, max_seconds
        self.done = start  # steps done so far
        self.stopped_early = False
        self.t0 = time.time()
        self.cpu0 = time.process_time()
        self.bar = None
        self._checked = -1  # the step count whose budget check has been made

    @property
    def elapsed(self) -> float:
        """Wall-clock seconds since the loop began."""
        return time.time() - self.t0

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of this process since the loop began (steadier than wall time on a shared machine)."""
        return time.process_time() - self.cpu0

    def finishing(self, done: int) -> bool:
        """After ``done`` steps: is this the last step (``steps`` reached, or the time budget spent)?"""
        if self._checked != done:
            self._checked = done
            if done < self.steps and self.max_seconds and self.elapsed >= self.max_seconds:
                self.stopped_early = True
                print(f"{self.name}: stopping after step {done}/{self.steps}: the {self.max_seconds:g} s budget is "
                      "spent")
        return done >= self.steps or self.stopped_early

    def __iter__(self) -> Iterator[int]:
        self.t0, self.cpu0 = time.time(), time.process_time()
        self.bar = progress(range(self.start, self.steps), total=self.steps, initial=self.start, desc=self.name)
        try:
            for step in self.bar:
                yield step
                self.done = step + 1
                if self.finishing(self.done):
                    return
        finally:
            self.bar.close()

    def set_postfix(self, **values: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def due(self, every: int, done: int) -> bool:
        """Whether something done every ``every`` steps (0: never) falls after ``done`` steps."""
        return bool(every) and done % every == 0


__all__ = ["SnapshotError", "SnapshotInfo", "Snapshots", "TrainingLoop"]

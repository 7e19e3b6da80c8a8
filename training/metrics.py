"""Metrics logging: ``metrics.jsonl`` (one object per logged step) and tensorboard, from rank 0 only."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from anyloom.training.distributed import is_main
from anyloom.training.run import RunDir


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact visible
    return v


class MetricsLogger:
    """``log(step, loss=..., lr=...)`` appends to metrics.jsonl and writes tensorboard scalars."""

    def __init__(self, run: RunDir, tensorboard: bool = True):
        self.run = run
        self.enabled = is_main()
        self._tb = None
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run.tensorboard))
        self._t0 = time.time()

    def log(self, step: int, **values: Any) -> dict[str, Any]:
        record = {"step": step, "time": round(time.time() - self._t0, 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        if not self.enabled:
            return record
        with open(self.run.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        return record

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """``image``: (H, W, 3) uint8."""
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def audio(self, tag: str, step: int, wave: np.ndarray, sample_rate: int) -> None:
        """``wave``: (T,) float in [-1, 1]."""
        if self._tb is not None:
            self._tb.add_audio(tag, np.asarray(wave, dtype=np.float32)[None], step, sample_rate=sample_rate)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from e
    return records

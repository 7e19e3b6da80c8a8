"""Run directories: ``runs/<name>/`` holds everything one job produced.

Layout (the contract other parts rely on)::

    runs/<name>/
        recipe.yaml          the resolved recipe (after bases and overrides)
        metrics.jsonl        one JSON object per logged step
        tb/                  tensorboard events
        checkpoints/         training state (DCP directories or safetensors)
        samples/             PNG, WAV, TXT written during training and evaluation
        eval.json            written by evaluation
        stages/<stage>/      the same layout for each stage of a multi-stage recipe
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from anyloom.config import to_dict
from anyloom.training.distributed import is_main


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"  # the run directory is <out_dir>/<name>
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N


def write_json(out: Path, obj: Any) -> Path:
    """``obj`` as indented JSON with sorted keys, written atomically (on rank 0 only)."""
    if is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        tmp.replace(out)
    return out


class RunDir:
    """A run directory; creating one makes its sub-folders (on rank 0 only)."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if create and is_main():
            for sub in ("checkpoints", "samples", "tb"):
                (self.path / sub).mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> RunDir:
        return cls(Path(cfg.out_dir) / cfg.name)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    def stage(self, name: str) -> RunDir:
        """The run directory of one stage of a multi-stage recipe."""
        return RunDir(self.path / "stages" / name)

    def write_recipe(self, recipe: Any) -> Path:
        """Write the resolved recipe (a dataclass tree or dict) as YAML."""
        if is_main():
            self.recipe_file.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
        return self.recipe_file

    def read_recipe(self) -> dict[str, Any]:
        if not self.recipe_file.exists():
            raise FileNotFoundError(f"{self.path} is not a run directory: {self.recipe_file.name} is missing")
        return yaml.safe_load(self.recipe_file.read_text())

    def write_json(self, name: str, obj: Any) -> Path:
        return write_json(self.path / name, obj)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

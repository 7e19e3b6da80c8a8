"""Put runs side by side: resolved-recipe differences, final eval numbers, metric curves.

An ablation made with recipe overrides should be readable at a glance: only the keys that differ between the
runs are listed, every ``eval.json`` number appears in one table, and the logged curves share one plot each.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from anyloom.training.metrics import read_metrics


@dataclass
class RunSummary:
    name: str
    path: Path
    recipe: dict[str, Any]  # flattened: "optim.lr" -> 0.003
    eval: dict[str, Any]  # flattened eval.json
    metrics: list[dict[str, Any]]  # metrics.jsonl records


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def load_run(path: str | Path) -> RunSummary:
    """Read a run directory; a folder without recipe.yaml is not a run and says so."""
    path = Path(path)
    recipe_file = path / "recipe.yaml"
    if not recipe_file.is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no recipe.yaml)")
    recipe = flatten(yaml.safe_load(recipe_file.read_text()) or {})
    eval_file = path / "eval.json"
    evals = flatten(json.loads(eval_file.read_text())) if eval_file.is_file() else {}
    metrics = read_metrics(path) if (path / "metrics.jsonl").is_file() else []
    return RunSummary(path.name, path, recipe, evals, metrics)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def recipe_differences(runs: list[RunSummary]) -> list[list[Any]]:
    keys = sorted(set().union(*(r.recipe for r in runs)))
    rows = []
    for k in keys:
        values = [r.recipe.get(k) for r in runs]
        if any(json.dumps(v, default=str) != json.dumps(values[0], default=str) for v in values):
            rows.append([k, *values])
    return rows


def final_metrics(run: RunSummary) -> dict[str, float]:
    """The last logged value of every numeric metric."""
    last: dict[str, float] = {}
    for record in run.metrics:
        for k, v in record.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                last[k] = float(v)
    return last


def compare_markdown(runs: list[RunSummary]) -> str:
    names = [r.name for r in runs]
    parts = ["# Run comparison", "", "Runs: " + ", ".join(f"`{r.path}`" for r in runs), ""]
    diff = recipe_differences(runs)
    parts += ["## Recipe differences", ""]
    parts += [_table(["key", *names], diff) if diff else "The resolved recipes are identical.", ""]
    eval_keys = sorted(set().union(*(r.eval for r in runs)))
    parts += ["## Evaluation (eval.json)", ""]
    parts += [_table(["metric", *names], [[k, *(r.eval.get(k) for r in runs)] for k in eval_keys])
              if eval_keys else "No run has an eval.json yet (run `make eval RUN=...`).", ""]
    finals = [final_metrics(r) for r in runs]
    metric_keys = sorted(set().union(*finals))
    parts += ["## Last logged training metrics", ""]
    parts += [_table(["metric", *names], [[k, *(f.get(k) for f in finals)] for k in metric_keys])
              if metric_keys else "No metrics.jsonl records.", ""]
    return "\n".join(parts)


def plot_curves(runs: list[RunSummary], out_dir: Path, keys: list[str] | None = None) -> list[Path]:
    """One PNG per metric key, every run a line, x = step. Returns the written files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if keys is None:
        keys = sorted(set().union(*(final_metrics(r) for r in runs)))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key in keys:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for run in runs:
            pts = [(m["step"], m[key]) for m in run.metrics
                   if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
            if pts:
                ax.plot(*zip(*pts), label=run.name)
                drawn = True
        if drawn:
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            path = out_dir / f"{key.replace('/', '_')}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written

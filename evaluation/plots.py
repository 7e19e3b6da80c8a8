"""Figures of a run and of the benchmarks (matplotlib, Agg backend: no display needed).

- ``plot_losses``: the LM loss and, when logged, its per-modality parts (``loss_text``, ``loss_image``,
  ``loss_audio``) against the step, from a run's ``metrics.jsonl``;
- ``plot_metrics``: one panel per other logged metric (accuracies, grad norm, lr, tokens/s, ...) against the step;
- ``plot_throughput``: the same-run speed/memory ratios of ``runs/bench/bench.json`` as bars (1.0 = parity);
- ``plot_run``: both run figures into ``<run>/plots/`` (``make eval`` calls it), with the title saying when the
  run stopped before its recipe's ``train.steps``.

    python -m anyloom.evaluation.plots --run runs/world [--out docs/img] [--bench runs/bench/bench.json]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOSS_KEYS = ("loss", "loss_text", "loss_image", "loss_audio")
# one colour per modality in every figure (the total in blue)
COLORS = {"loss": "C0", "text": "C1", "image": "C2", "audio": "C3"}
# logged for bookkeeping, not worth a panel
SKIP_KEYS = frozenset({"step", "time", "skipped", "reason", "loss_spike", *LOSS_KEYS})


@dataclass
class Figure:
    path: Path
    curves: list[str]  # the series drawn (bar labels for a bar chart), in drawing order


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(metrics: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the records that hold a finite number for it."""
    pts = [(int(r["step"]), float(r[key])) for r in metrics if "step" in r and _number(r.get(key))]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_losses(metrics: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Figure:
    """The total loss and every per-modality loss present, one line each, on one axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    drawn = []
    for key in LOSS_KEYS:
        steps, values = series(metrics, key)
        if steps:
            name = key.removeprefix("loss_")
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, color=COLORS[name],
                    lw=2.2 if key == "loss" else 1.3, label="all targets" if key == "loss" else name)
            drawn.append(key)
    if not drawn:
        plt.close(fig)
        raise ValueError(f"no loss values to plot (none of {', '.join(LOSS_KEYS)} in the metrics records)")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token cross-entropy (nats)")
    ax.set_title(title or "LM training loss", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, drawn)


def plot_metrics(metrics: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Figure:
    """One small panel per logged numeric metric other than the losses (accuracies share a panel)."""
    plt = _pyplot()
    keys = sorted({k for r in metrics for k, v in r.items() if k not in SKIP_KEYS and _number(v)})
    panels: dict[str, list[str]] = {}
    for key in keys:
        panels.setdefault("accuracy" if key.startswith("acc_") else key, []).append(key)
    if not panels:
        raise ValueError("no metrics other than the losses to plot")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    drawn = []
    for ax, (panel, members) in zip(axes.flat, panels.items()):
        for key in members:
            steps, values = series(metrics, key)
            name = key.removeprefix("acc_")
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, color=COLORS.get(name, "C0"),
                    label=name if panel == "accuracy" else None)
            drawn.append(key)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if panel == "accuracy":
            ax.legend(fontsize=7)
        if panel == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, drawn)


def plot_throughput(bench: dict[str, Any], path: str | Path) -> Figure:
    """Bars of bench.json's ratios (keys with ``_vs_`` or ending in ``ratio``); 1.0 = the reference."""
    plt = _pyplot()
    bars = {k: float(v) for k, v in bench.items() if _number(v) and ("_vs_" in k or k.endswith("ratio"))}
    if not bars:
        raise ValueError("bench.json holds no ratio (keys with '_vs_' or ending in 'ratio') to plot")
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.45 * len(bars)))
    ax.barh(list(bars), list(bars.values()), color="#4a7")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("ratio (ours / reference; > 1 is better)")
    for i, v in enumerate(bars.values()):
        ax.text(v, i, f" {v:.2f}x", va="center")
    subtitle = ", ".join(str(bench[k]) for k in ("date", "machine") if bench.get(k))
    if subtitle:
        ax.set_title(subtitle + (" (quick)" if bench.get("quick") else ""), fontsize=9)
    return _save(fig, path, list(bars))


def _save(fig: Any, path: str | Path, drawn: list[str]) -> Figure:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Figure(path, drawn)


def run_title(run: Path, metrics: Sequence[dict[str, Any]]) -> str:
    """``<name>: step N of M`` plus ``(stopped early)`` when the recipe asked for more steps than were logged."""
    import yaml

    last = max((int(r["step"]) for r in metrics if "step" in r), default=0)
    planned = None
    recipe = run / "recipe.yaml"
    if recipe.is_file():
        planned = ((yaml.safe_load(recipe.read_text()) or {}).get("train") or {}).get("steps")
    if isinstance(planned, int) and last < planned:
        return f"{run.name}: stopped early, last logged step {last} of {planned}"
    return f"{run.name}: {last} steps"


def plot_run(run: str | Path, out_dir: str | Path | None = None, title: str = "") -> list[Figure]:
    """``loss.png`` and ``metrics.png`` of a run's metrics.jsonl into ``out_dir`` (default ``<run>/plots``)."""
    from anyloom.training.metrics import read_metrics

    run = Path(run)
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run}/metrics.jsonl not found: not a run directory, or nothing logged yet")
    metrics = read_metrics(run)
    out = Path(out_dir) if out_dir is not None else run / "plots"
    title = title or run_title(run, metrics)
    figures = [plot_losses(metrics, out / "loss.png", title)]
    if any(k not in SKIP_KEYS and _number(v) for r in metrics for k, v in r.items()):
        figures.append(plot_metrics(metrics, out / "metrics.png", title))
    return figures


def main(argv: list[str] | None = None) -> int:
    import json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a run directory with metrics.jsonl")
    p.add_argument("--bench", help="a bench.json written by `make bench`")
    p.add_argument("--out", help="output folder (default: <run>/plots; for --bench: next to bench.json)")
    p.add_argument("--prefix", default="", help="prefix of the written file names (e.g. the run name)")
    p.add_argument("--title", default="", help="title of the run figures (default: run name and steps)")
    a = p.parse_args(argv)
    if not (a.run or a.bench):
        p.error("give --run and/or --bench")
    written = []
    try:
        if a.run:
            for fig in plot_run(a.run, a.out, a.title):
                if a.prefix:
                    fig.path = fig.path.replace(fig.path.with_name(a.prefix + fig.path.name))
                written.append(fig)
        if a.bench:
            bench = Path(a.bench)
            out = Path(a.out) if a.out else bench.parent
            written.append(plot_throughput(json.loads(bench.read_text()), out / f"{a.prefix}throughput.png"))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for fig in written:
        print(f"wrote {fig.path} ({len(fig.curves)} series)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

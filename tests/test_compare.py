"""The run-comparison harness: differences only, eval table, curves."""

from __future__ import annotations

import json

from anyloom.evaluation.compare import compare_markdown, load_run, plot_curves, recipe_differences
from anyloom.recipes import load_recipe
from anyloom.training.metrics import MetricsLogger
from anyloom.training.run import RunDir


def make_run(tmp_path, name, lr, losses, acc):
    recipe = load_recipe("world", [f"run.out_dir={tmp_path}", f"run.name={name}", f"optim.lr={lr}"])
    run = RunDir.from_config(recipe.run)
    run.write_recipe(recipe)
    log = MetricsLogger(run, tensorboard=False)
    for i, loss in enumerate(losses):
        log.log(i, loss=loss)
    run.write_json("eval.json", {"t2i": {"attr_acc": acc}})
    return run.path


def test_compare_lists_only_differences_and_evals(tmp_path):
    a = load_run(make_run(tmp_path, "a", 0.001, [3.0, 2.0], 0.5))
    b = load_run(make_run(tmp_path, "b", 0.002, [3.0, 1.0], 0.75))
    diff = recipe_differences([a, b])
    assert [row[0] for row in diff] == ["optim.lr", "run.name"]
    md = compare_markdown([a, b])
    assert "| t2i.attr_acc | 0.5 | 0.75 |" in md and "| loss | 2 | 1 |" in md
    plots = plot_curves([a, b], tmp_path / "plots")
    assert [p.name for p in plots] == ["loss.png"] and plots[0].stat().st_size > 1000
    json.dumps(md)


def test_compare_rejects_non_run(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_run(tmp_path)

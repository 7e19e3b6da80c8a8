"""Run and benchmark figures: the expected series are drawn, the PNGs are real images, bad input is named."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from PIL import Image

from anyloom.evaluation.plots import plot_losses, plot_metrics, plot_run, plot_throughput, series


def _records(steps: int = 6, modalities: tuple[str, ...] = ("text", "image", "audio")) -> list[dict]:
    out = []
    for s in range(1, steps + 1):
        r = {"step": 10 * s, "time": 1.0 * s, "loss": 8.0 / s, "z_loss": 70.0, "grad_norm": 1.0, "lr": 1e-3 * s,
             "tokens_per_s": 1000.0}
        for m in modalities:
            r[f"loss_{m}"] = 8.0 / s + 0.1
            r[f"acc_{m}"] = 0.01 * s
        out.append(r)
    out.append({"step": 35, "time": 3.5, "loss_spike": 9.0, "reason": "spike"})  # an event record, not a point
    return out


def _png(path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_series_skips_missing_and_non_finite():
    recs = [{"step": 1, "loss": 2.0}, {"step": 2}, {"step": 3, "loss": "nan"}, {"step": 4, "loss": math.inf},
            {"step": 5, "loss": 1.5}, {"step": 6, "loss": True}]
    assert series(recs, "loss") == ([1, 5], [2.0, 1.5])


def test_loss_plot_draws_total_and_each_modality(tmp_path):
    fig = plot_losses(_records(), tmp_path / "loss.png", "a title")
    assert fig.curves == ["loss", "loss_text", "loss_image", "loss_audio"]
    pixels = _png(fig.path)
    assert pixels.std() > 10  # not a blank canvas
    only_text = plot_losses(_records(modalities=("text",)), tmp_path / "loss_text.png")
    assert only_text.curves == ["loss", "loss_text"]
    with pytest.raises(ValueError, match="no loss values"):
        plot_losses([{"step": 1, "lr": 0.1}], tmp_path / "none.png")


def test_metrics_plot_has_one_series_per_logged_metric(tmp_path):
    fig = plot_metrics(_records(), tmp_path / "metrics.png")
    assert sorted(fig.curves) == sorted(["acc_text", "acc_image", "acc_audio", "grad_norm", "lr", "tokens_per_s",
                                         "z_loss"])
    _png(fig.path)


def test_plot_run_writes_into_run_plots_and_says_when_stopped_early(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"train": {"steps": 150}}))
    from anyloom.evaluation.plots import run_title
    from anyloom.training.metrics import read_metrics

    assert run_title(run, read_metrics(run)) == "run: stopped early, last logged step 60 of 150"
    figs = plot_run(run)
    assert [f.path.name for f in figs] == ["loss.png", "metrics.png"]
    assert all(f.path.parent == run / "plots" for f in figs)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"train": {"steps": 60}}))
    assert run_title(run, read_metrics(run)) == "run: 60 steps"
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "empty")


def test_throughput_bars_are_the_ratios_of_bench_json(tmp_path):
    bench = {"date": "2026-11-25", "machine": "x86_64, 1 threads, CPU", "quick": True,
             "train_tokens_per_s_vs_hf_llama": 1.2, "fused_ce_peak_memory_ratio": 5.0,
             "decode_tokens_per_s_vs_hf_generate": {"1": 2.0}, "decode_tokens_per_s_vs_hf_generate_b1": 2.0,
             "packing_loader_tokens_per_s": 1e6, "failed_parts": {}}
    fig = plot_throughput(bench, tmp_path / "throughput.png")
    assert fig.curves == ["train_tokens_per_s_vs_hf_llama", "fused_ce_peak_memory_ratio",
                          "decode_tokens_per_s_vs_hf_generate_b1"]
    _png(fig.path)
    with pytest.raises(ValueError, match="no ratio"):
        plot_throughput({"packing_loader_tokens_per_s": 1.0}, tmp_path / "none.png")


def test_bench_aggregator_writes_the_contract_keys(tmp_path, monkeypatch):
    """scripts/bench.py gathers the parts' outputs (their real formats, faked here) into bench.json + a PNG."""
    from pathlib import Path

    import bench

    def fake_run(cmd: list[str]) -> str:
        script = Path(cmd[1]).name
        if script == "bench_transformer.py":
            assert cmd[cmd.index("--threads") + 1] == "1" and "--no-compile" in cmd  # --quick: eager only
            (tmp_path / "transformer.json").write_text(json.dumps({
                "fused_ce": {"tokens": 1024, "fused_ce_peak_memory_ratio": 6.5},
                "train": {"ours_eager_tokens_per_s": 640.0, "hf_llama_tokens_per_s": 800.0,
                          "train_tokens_per_s_vs_hf_llama_eager": 0.8, "compile_seconds": {}}}))
            return ""
        if script == "bench_generation.py":
            assert "--compile" in cmd  # the headline decode ratio is the compiled step's
            row = lambda b, c, e, tok: {"batch": b, "engine_compiled_vs_hf": c, "engine_vs_hf": e,
                                        "engine_compiled_tokens_per_s": tok, "compile_s": 9.0}
            Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({
                "decode_tokens_per_s_vs_hf_generate": {"1": 1.3, "16": 1.0},
                "rows": [row(1, 2.2, 1.3, 60.0), row(16, 2.1, 1.0, 370.0)]}))
            return ""
        if script == "bench_sequences.py":
            return "progress line\n" + json.dumps({"mixture_from_shards_tokens_per_s": {"wall": 2500, "cpu": 5000}})
        raise AssertionError(script)

    monkeypatch.setattr(bench, "OUT", tmp_path)
    monkeypatch.setattr(bench, "_run", fake_run)
    assert bench.main(["--quick", "--threads", "1", "--only", "transformer", "generation", "sequences"]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["quick"] is True and data["failed_parts"] == {} and data["machine"].split(", ")[1] == "1 threads"
    assert data["train_tokens_per_s_vs_hf_llama"] == 0.8 and data["train_ours_variant"] == "eager"
    assert "train_tokens_per_s_vs_hf_llama_eager" not in data  # the same number: no second bar
    assert data["fused_ce_peak_memory_ratio"] == 6.5 and data["fused_ce_tokens"] == 1024
    assert data["decode_tokens_per_s_vs_hf_generate"] == {"1": 2.2, "16": 2.1}
    assert data["decode_tokens_per_s_vs_hf_generate_eager"] == {"1": 1.3, "16": 1.0}
    assert data["decode_tokens_per_s_vs_hf_generate_b16"] == 2.1 and data["decode_compile_s_b1"] == 9.0
    assert data["decode_tokens_per_s_b16"] == 370.0
    assert data["packing_loader_tokens_per_s"] == 2500 and data["packing_loader_tokens_per_cpu_s"] == 5000
    _png(tmp_path / "throughput.png")

    def broken(cmd: list[str]) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(bench, "_run", broken)
    assert bench.main(["--only", "sequences"]) == 1  # a failed part fails the run and is named in bench.json
    assert json.loads((tmp_path / "bench.json").read_text())["failed_parts"] == {"sequences": "boom"}

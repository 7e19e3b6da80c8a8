"""scripts/bench_gpu.py's CPU parts: argument parsing, the dry run, the JSON it writes and the table it prints."""

from __future__ import annotations

import json

import bench_gpu

FAKE = {
    "date": "2026-12-06", "torch": "2.11.0", "triton": "3.6.0", "device": "NVIDIA H200", "seconds": {"ce": 1.0},
    "ceilings": {"matmul_bf16_8192_tflops": 787.0, "copy_tb_per_s": 4.26},
    "tune": {"chosen": {"fwd_d64": [64, 64, 4, 3]}, "written_to": "/tmp/tiles.json"},
    "attention": [{"impl": "triton", "head_dim": 64, "seq": 4096, "layout": "packed", "fwd_tflops": 137.0,
                   "fwd_bwd_tflops": 113.0}],
    "ce": [{"backend": "triton", "vocab": 32768, "fwd_ms": 6.4, "fwd_bwd_ms": 23.9, "fwd_bwd_tflops": 370.0,
            "peak_extra_mib": 1700.0},
           {"backend": "naive", "vocab": 131072, "error": "OutOfMemoryError: CUDA out of memory"}],
    "train": [{"size": "1B", "attention": "triton", "compile": False, "tokens_per_s": 44363.0,
               "mfu_datasheet": 0.28, "mfu_measured_ceiling": 0.352, "peak_mem_gib": 52.0},
              {"size": "150M", "attention": "sdpa", "compile": True, "error": "Traceback ...\nRuntimeError: boom"}],
    "generation": {"throughput": [{"prompts": 32, "samples": 16, "compile": "always", "autocast": "None",
                                   "images_per_s": 2319.0, "image_tokens_per_s": 150000.0}]},
    "errors": {"tune": "Traceback (most recent call last):\nValueError: no candidate fits\n"},
}


def test_summary_shows_every_part():
    text = "\n".join(bench_gpu.summary_lines(FAKE))
    for expected in ("NVIDIA H200, torch 2.11.0, triton 3.6.0, 2026-12-06", "matmul bf16 787 TFLOP/s",
                     "copy 4.26 TB/s", "fwd_d64", "fwd  137.0  fwd+bwd  113.0", "fwd 6.40 ms", "+1700 MiB",
                     "OutOfMemoryError", "44363 tok/s MFU 28.0% (vs measured matmul 35.2%)", "RuntimeError: boom",
                     "2319 images/s", "tune: ValueError: no candidate fits"):
        assert expected in text, expected


def test_summary_of_a_partial_run():
    assert bench_gpu.summary_lines({"device": "x"}) == ["x, torch ?, triton ?, ?"]


def test_save_writes_json_and_a_copy_under_out(tmp_path, monkeypatch):
    copies = tmp_path / "out"
    copies.mkdir()
    monkeypatch.setenv("OUT", str(copies))
    path = tmp_path / "bench" / "gpu.json"
    bench_gpu.save(FAKE, path)
    assert json.loads(path.read_text()) == FAKE
    assert json.loads((copies / "gpu.json").read_text()) == FAKE


def test_arguments_and_dry_run(tmp_path, capsys):
    a = bench_gpu.parse_args(["--only", "ce", "--only", "train", "--quick"])
    assert a.only == ["ce", "train"] and a.quick and a.out == bench_gpu.OUT
    out = tmp_path / "gpu.json"
    tiles = tmp_path / "t.json"
    assert bench_gpu.main(["--dry-run", "--only", "tune", "--out", str(out), "--tuning-file", str(tiles)]) == 0
    printed = capsys.readouterr().out
    assert "parts: tune" in printed and str(out) in printed and "t.json" in printed
    assert not out.exists()  # a dry run measures and writes nothing

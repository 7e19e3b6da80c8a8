"""The attention kernel's tile lookup: built-in defaults, a tuning file's tiles for the GPU at hand, forced tiles,
and loud errors for a malformed file. No GPU needed: the lookup is plain Python."""

from __future__ import annotations

import json

import pytest

from anyloom.transformer.kernels.flash_attention import CONFIGS
from anyloom.transformer.kernels.tuning import (
    ENV,
    forced_tiles,
    save_tuned_tiles,
    tile_for,
    tuned_tiles,
    tuning_file,
)


def test_defaults_apply_without_a_file(tmp_path):
    missing = tmp_path / "none.json"
    assert tuned_tiles("flash_attention", "NVIDIA H200", missing) == {}
    assert tile_for(CONFIGS["fwd"], {}, 64) == CONFIGS["fwd"][64]
    assert tile_for(CONFIGS["bwd"], {}, 32) == CONFIGS["bwd"][64]  # the smallest bucket >= the head dim
    assert tile_for(CONFIGS["fwd"], {}, 256) == CONFIGS["fwd"][256]


def test_saved_tiles_are_read_back_for_their_gpu_only(tmp_path):
    path = tmp_path / "tiles.json"
    save_tuned_tiles("flash_attention", "GPU A", {"fwd": {128: (128, 64, 8, 3)}}, path,
                     measured={"date": "2026-12-06"})
    save_tuned_tiles("flash_attention", "GPU B", {"bwd": {64: (32, 64, 4, 2)}}, path)
    save_tuned_tiles("flash_attention", "GPU A", {"bwd": {64: (64, 64, 8, 2)}}, path)  # merged, not replaced
    a = tuned_tiles("flash_attention", "GPU A", path)
    assert a == {"fwd": {128: (128, 64, 8, 3)}, "bwd": {64: (64, 64, 8, 2)}}
    assert tuned_tiles("flash_attention", "GPU B", path) == {"bwd": {64: (32, 64, 4, 2)}}
    assert tuned_tiles("flash_attention", "GPU C", path) == {}
    assert tuned_tiles("rmsnorm", "GPU A", path) == {}
    assert tile_for(CONFIGS["fwd"], a["fwd"], 128) == (128, 64, 8, 3)
    assert tile_for(CONFIGS["fwd"], a["fwd"], 64) == CONFIGS["fwd"][64]  # not measured: the default
    assert json.loads(path.read_text())["measured"] == {"GPU A": {"date": "2026-12-06"}}


def test_forced_tiles_win_inside_their_scope(tmp_path):
    path = tmp_path / "tiles.json"
    save_tuned_tiles("flash_attention", "GPU A", {"fwd": {64: (128, 64, 8, 3)}}, path)
    with forced_tiles("flash_attention", {"fwd": {64: (32, 32, 2, 1)}}):
        assert tuned_tiles("flash_attention", "GPU A", path)["fwd"][64] == (32, 32, 2, 1)
        assert tuned_tiles("flash_attention", "GPU Z", path) == {"fwd": {64: (32, 32, 2, 1)}}
    assert tuned_tiles("flash_attention", "GPU A", path)["fwd"][64] == (128, 64, 8, 3)


def test_file_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "x.json"))
    assert tuning_file() == tmp_path / "x.json"
    monkeypatch.delenv(ENV)
    assert tuning_file().name == "kernel_tuning.json"


@pytest.mark.parametrize("bad, where", [
    ({"GPU A": {"flash_attention": {"fwd": {"64": [64, 64, 4]}}}}, "GPU A.flash_attention.fwd.64"),
    ({"GPU A": {"flash_attention": {"fwd": {"d64": [64, 64, 4, 3]}}}}, "GPU A.flash_attention.fwd.d64"),
    ({"GPU A": {"flash_attention": {"fwd": {"64": [64, 64, 4, "3"]}}}}, "GPU A.flash_attention.fwd.64"),
    ({"GPU A": {"flash_attention": [64, 64, 4, 3]}}, "GPU A.flash_attention"),
])
def test_malformed_files_fail_with_the_key(tmp_path, bad, where):
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=where.replace(".", r"\.")):
        tuned_tiles("flash_attention", "GPU A", path)


def test_attention_kernel_launches_with_the_file_tiles_of_its_gpu(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    import torch

    import anyloom.transformer.kernels.flash_attention as fa

    if fa.INTERPRET:
        pytest.skip("the interpreter always runs 16 x 16 tiles")
    path = tmp_path / "tiles.json"
    save_tuned_tiles("flash_attention", "GPU A", {"fwd": {128: (128, 32, 8, 4)}}, path)
    monkeypatch.setenv(ENV, str(path))
    monkeypatch.setattr(fa, "_gpu_name", lambda device: "GPU A")
    cuda = torch.device("cuda")
    assert fa._config("fwd", 100, False, cuda) == (128, 32, 128, 8, 4)  # head dim 100 -> bucket 128
    assert fa._config("fwd", 100, True, cuda) == (128, 32, 128, 8, 1)  # fp32 runs unpipelined
    assert fa._config("bwd", 100, False, cuda) == (*CONFIGS["bwd"][128][:2], 128, *CONFIGS["bwd"][128][2:])
    monkeypatch.setattr(fa, "_gpu_name", lambda device: "GPU B")
    assert fa._config("fwd", 64, False, cuda) == (*CONFIGS["fwd"][64][:2], 64, *CONFIGS["fwd"][64][2:])

"""The small-model checkpoint format (training/snapshots.py): round trip, atomicity, fingerprints, keep-last-K,
clear errors; and the shared step loop."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from anyloom.training.snapshots import MARKER, TENSORS, SnapshotError, Snapshots, TrainingLoop


def _trainer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed + 1)
    ema = torch.zeros(3)
    return model, opt, g, ema


def _steps(model, opt, g, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        x = torch.randn(5, 4, generator=g)
        noise = torch.randn(5, 2)  # the global generator: restored too
        loss = (model(x) - noise).pow(2).mean() + float(np.random.rand()) + random.random()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _snaps(folder, model, opt, g, ema, fp="fp1", keep_last=2) -> Snapshots:
    return Snapshots(folder, fp, keep_last=keep_last, name="test", models={"net": model}, optimizers={"opt": opt},
                     generators={"data": g}, tensors={"ema": ema})


def test_resume_equals_uninterrupted(tmp_path):
    model, opt, g, ema = _trainer()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    full = _steps(model, opt, g, 6)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, g, ema = _trainer()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    first = _steps(model, opt, g, 3)
    ema += 7.0
    _snaps(tmp_path, model, opt, g, ema).save(3, meta={"note": "x"})
    # a fresh process: other weights, other generator states
    model, opt, g, ema = _trainer(seed=9)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    snaps = _snaps(tmp_path, model, opt, g, ema)
    assert snaps.resume() == 3
    assert snaps.latest().meta == {"note": "x"}
    assert torch.equal(ema, torch.full((3,), 7.0))
    rest = _steps(model, opt, g, 3)
    assert first + rest == full
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_incomplete_folder_is_ignored(tmp_path):
    model, opt, g, ema = _trainer()
    snaps = _snaps(tmp_path, model, opt, g, ema)
    snaps.save(2)
    snaps.save(4)
    (tmp_path / "step_0000004" / MARKER).unlink()  # a save that died before its marker
    (tmp_path / ".tmp-step_0000006").mkdir()  # a save that died before its rename
    assert snaps.latest().step == 2
    assert [p.name for p in snaps.complete()] == ["step_0000002"]
    assert snaps.resume() == 2


def test_other_fingerprint_not_resumed(tmp_path, capsys):
    model, opt, g, ema = _trainer()
    _snaps(tmp_path, model, opt, g, ema, fp="old").save(5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snaps = _snaps(tmp_path, model, opt, g, ema, fp="new")
    assert snaps.resume() == 0
    assert "another config" in capsys.readouterr().out
    with pytest.raises(SnapshotError, match="another config"):
        snaps.load(tmp_path / "step_0000005")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_keeps_last_k(tmp_path):
    model, opt, g, ema = _trainer()
    snaps = _snaps(tmp_path, model, opt, g, ema, keep_last=2)
    for step in (1, 2, 3, 10, 10):  # the same step twice: replaced, not duplicated
        snaps.save(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000003", "step_0000010"]


def test_bad_files_give_clear_errors(tmp_path):
    model, opt, g, ema = _trainer()
    snaps = _snaps(tmp_path, model, opt, g, ema)
    folder = snaps.save(1)
    (folder / TENSORS).write_bytes(b"not safetensors")
    with pytest.raises(SnapshotError, match="not a readable safetensors"):
        snaps.load(folder)
    (folder / MARKER).write_text("{")
    with pytest.raises(SnapshotError, match="not valid JSON"):
        snaps.load(folder)
    (folder / MARKER).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(SnapshotError, match="format"):
        snaps.load(folder)
    other = torch.nn.Linear(3, 3)
    good = snaps.save(2)
    wrong = Snapshots(tmp_path, "fp1", models={"net": other}, optimizers={})
    with pytest.raises(SnapshotError, match="model 'net' does not fit"):
        wrong.load(good)
    missing = Snapshots(tmp_path, "fp1", generators={"noise": torch.Generator()})
    with pytest.raises(SnapshotError, match="rng.generator.noise"):
        missing.load(good)


def test_loading_never_unpickles(tmp_path):
    model, opt, g, ema = _trainer()
    folder = _snaps(tmp_path, model, opt, g, ema).save(1)
    assert sorted(p.name for p in folder.iterdir()) == sorted([TENSORS, MARKER])


def test_loop_counts_steps_and_stops_on_budget(capsys):
    loop = TrainingLoop("t", 5, start=2)
    assert list(loop) == [2, 3, 4] and loop.done == 5 and not loop.stopped_early
    loop = TrainingLoop("t", 1000, max_seconds=1e-9)  # the budget is checked after a step: one step runs
    assert list(loop) == [0] and loop.stopped_early and loop.done == 1
    assert "budget is spent" in capsys.readouterr().out
    asked = TrainingLoop("t", 1000, max_seconds=1e-9)
    lasts = [asked.finishing(step + 1) for step in asked]  # a trainer asking before its periodic work
    assert lasts == [True] and asked.done == 1 and capsys.readouterr().out.count("budget") == 1
    assert [d for d in range(1, 8) if loop.due(3, d)] == [3, 6] and not loop.due(0, 3)
    assert [TrainingLoop("t", 3).finishing(d) for d in (1, 3)] == [False, True]

"""LM training loop in one process: resume after Ctrl-C equals an uninterrupted run (bit for bit), a NaN step
is skipped, a save killed half-way is ignored on resume, export round-trips, activation checkpointing keeps
gradients. The tiny model, documents and loader factory are in ``tests/lm_worker.py``."""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lm_worker import VOCAB, run_training, tiny_model  # tests/ is on pytest's pythonpath (pyproject.toml)

from anyloom.config import build
from anyloom.training import faults
from anyloom.training.checkpoint import complete_checkpoints, is_complete, step_dir
from anyloom.training.export import export
from anyloom.training.metrics import read_metrics
from anyloom.training.parallel import apply_activation_checkpointing
from anyloom.training.stability import StabilityGuard, TrainingDiverged
from anyloom.transformer.model import ModelConfig, Transformer
from anyloom.weights import load_weights

REPO = Path(__file__).resolve().parent.parent


# training/checkpoint.py silences DCP's "assuming a single process" warning at import; pytest resets filters
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def test_resume_after_sigint_is_bit_identical(tmp_path):
    full = run_training(str(tmp_path / "full"), steps=10, batch=4)

    def ctrl_c_during_step_5(model, step, run):  # the sample hook runs at the end of each step
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    # the interrupted run writes its checkpoint in the background (async DCP); the resumed one synchronously
    first = run_training(str(tmp_path / "split"), steps=10, batch=4, sample_fn=ctrl_c_during_step_5,
                         async_checkpoint=True)
    assert first.interrupted and first.step == 5
    assert first.checkpoint == step_dir(tmp_path / "split" / "checkpoints", 5) and is_complete(first.checkpoint)
    second = run_training(str(tmp_path / "split"), steps=10, batch=4)
    assert second.resumed_from == 5 and second.step == 10 and not second.interrupted
    assert sorted(second.losses) == list(range(6, 11))
    # bit-identical losses, data order included (the loader state is part of the checkpoint)
    assert {**first.losses, **second.losses} == full.losses
    assert full.losses[10] < full.losses[1] - 0.5  # it does learn the "+1" documents
    logged = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split") if "lr" in r}
    assert logged == full.losses

    # export both final checkpoints: identical weights, loadable into the model, config and vocab carried
    a = load_weights(export(full.checkpoint, tmp_path / "export_full"))
    b = load_weights(export(second.checkpoint, tmp_path / "export_split"))
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    cfg = build(ModelConfig, a.config)
    assert cfg == tiny_model() and a.vocab == {"size": VOCAB}
    model = Transformer(cfg)
    model.load_state_dict(a.state_dict, strict=True)


def test_nan_step_is_skipped_and_training_continues(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.NAN_STEPS, "3")
    snapshots = {}

    def snapshot(model, step, run):
        snapshots[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    res = run_training(str(tmp_path / "run"), steps=6, batch=4, sample_fn=snapshot)
    assert res.step == 6 and res.skipped_steps == [3]
    assert math.isnan(res.losses[3]) and all(math.isfinite(res.losses[s]) for s in (1, 2, 4, 5, 6))
    same = [torch.equal(snapshots[2][k], snapshots[3][k]) for k in snapshots[2]]
    assert all(same)  # the NaN step changed no weight ...
    assert all(torch.isfinite(v).all() for v in snapshots[6].values())
    assert not torch.equal(snapshots[3]["output.weight"], snapshots[4]["output.weight"])  # ... the next one did
    skipped = [r for r in read_metrics(tmp_path / "run") if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3] and skipped[0]["loss"] == "nan"


def test_time_budget_stops_annealed_and_resume_keeps_the_clock(tmp_path, monkeypatch):
    # a fake clock: every perf_counter() call is 10 ms later, so the budget is spent after a fixed number of steps
    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks) * 0.01)
    run = str(tmp_path / "run")
    first = run_training(run, steps=500, batch=4, max_seconds=0.5)
    assert first.budget_spent and 5 < first.step < 100
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r}
    assert lrs[3] == pytest.approx(3e-3, rel=0.05)  # warm-up done: peak lr
    assert lrs[first.step] < 3e-3 * 0.2  # ... and annealed at the end, far before step 500
    assert first.checkpoint == step_dir(tmp_path / "run" / "checkpoints", first.step)
    # the spent budget is part of the checkpoint: the same command trains no further
    again = run_training(run, steps=500, batch=4, max_seconds=0.5)
    assert again.resumed_from == first.step == again.step and again.budget_spent and not again.losses
    # a larger budget continues from there
    more = run_training(run, steps=500, batch=4, max_seconds=1.0)
    assert more.resumed_from == first.step < more.step < 500 and more.budget_spent


def test_consecutive_nan_steps_abort(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.NAN_STEPS, "2,3")
    with pytest.raises(TrainingDiverged, match="2 non-finite steps in a row"):
        run_training(str(tmp_path / "run"), steps=5, batch=2, max_bad_steps=2)


def test_resume_refuses_a_checkpoint_trained_with_other_settings(tmp_path):
    # the same run directory with another lr (or batch) must not silently carry on the old weights, or pass a
    # finished run off as up to date; more steps (extending the run) still continue it, and nothing is deleted
    run = str(tmp_path / "run")
    first = run_training(run, steps=3, batch=4, data_key="tokens-a")
    with pytest.raises(RuntimeError, match=r"at \['optim.lr'\].*run.name=.*move .*checkpoints away"):
        run_training(run, steps=3, batch=4, lr=1e-3, data_key="tokens-a")
    with pytest.raises(RuntimeError, match=r"at \['train.batch_size'\]"):
        run_training(run, steps=3, batch=8, data_key="tokens-a")
    with pytest.raises(RuntimeError, match=r"at \['data'\]"):  # e.g. re-tokenized by a retrained tokenizer
        run_training(run, steps=3, batch=4, data_key="tokens-b")
    assert is_complete(first.checkpoint)
    longer = run_training(run, steps=5, batch=4, data_key="tokens-a")
    assert longer.resumed_from == 3 and longer.step == 5


def test_stability_guard_spikes_and_resets():
    guard = StabilityGuard(max_bad_steps=2, spike_factor=2.0, spike_window=3)
    assert [guard.check(s, 1.0, 1.0).spike for s in range(3)] == [False] * 3
    assert guard.check(3, 2.5, 1.0).spike  # 2.5 > 2 x mean(1, 1, 1)
    assert not guard.check(4, 1.0, 1.0).spike
    assert guard.check(5, 1.0, float("inf")).skip  # non-finite grad norm
    assert not guard.check(6, 1.0, 1.0).skip  # a finite step resets the count ...
    guard.check(7, float("nan"), 1.0)
    with pytest.raises(TrainingDiverged):  # ... so only now are two in a row reached
        guard.check(8, float("nan"), 1.0)


def test_killed_during_save_resumes_from_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, faults.KILL_SAVE_STEP: "4", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "tests/lm_worker.py", "--dir", str(run), "--steps", "5", "--ckpt-every", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = run / "checkpoints"
    assert is_complete(step_dir(ckpts, 2))
    partial = step_dir(ckpts, 4)
    assert partial.is_dir() and not is_complete(partial) and any(partial.glob("*.distcp"))
    killed = {r["step"]: r["loss"] for r in read_metrics(run) if "lr" in r}
    assert sorted(killed) == list(range(1, 5))

    res = run_training(str(run), steps=5, batch=4, ckpt_every=2)
    assert res.resumed_from == 2 and res.step == 5
    assert {s: res.losses[s] for s in (3, 4)} == {s: killed[s] for s in (3, 4)}
    # the crashed save was rewritten at step 4; keep_last=2 pruned step 2
    assert [c.step for c in complete_checkpoints(ckpts)] == [4, 5]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004", "step_00000005"]


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_keeps_gradients_and_names(mode):
    torch.manual_seed(0)
    ref = Transformer(tiny_model())
    ac = Transformer(tiny_model())
    ac.load_state_dict(ref.state_dict())
    apply_activation_checkpointing(ac, mode)
    assert ac.state_dict().keys() == ref.state_dict().keys()  # plain names: checkpoints do not depend on AC
    tokens = torch.randint(0, VOCAB, (2, 16))
    grads = []
    for m in (ref, ac):
        out = m.loss(m(tokens), torch.roll(tokens, -1, 1), torch.ones(2, 16, dtype=torch.bool))
        out.loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    names = {n.replace("._checkpoint_wrapped_module", "") for n in grads[1]}
    assert names == set(grads[0])
    for n, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][n.replace("._checkpoint_wrapped_module", "")], rtol=1e-6, atol=1e-7)


def test_export_refuses_incomplete_or_missing_checkpoints(tmp_path, capsys):
    from anyloom.training.export import main

    partial = step_dir(tmp_path / "run" / "checkpoints", 4)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text('{"model": {}}')
    assert main(["--checkpoint", str(partial)]) == 2
    assert "not a complete DCP checkpoint" in capsys.readouterr().err
    assert main(["--run", str(tmp_path / "run")]) == 2  # the only checkpoint is incomplete
    assert "no complete checkpoint" in capsys.readouterr().err


def test_amx_precision_trains_in_bf16_autocast_with_fp32_master_weights(tmp_path, monkeypatch):
    # `mixed_precision: amx` means bf16 autocast on a CPU with AMX tiles and fp32 elsewhere; both branches are
    # forced here, so the test does not depend on the CPU it runs on
    from anyloom import device as devices
    from anyloom.training import parallel as par

    cpu = torch.device("cpu")

    def dtype(mode: str, amx: bool, avx512_bf16: bool) -> torch.dtype:
        monkeypatch.setattr(devices, "cpu_has_amx", lambda: amx)
        monkeypatch.setattr(devices, "cpu_has_avx512_bf16", lambda: avx512_bf16)
        return par.param_dtype(par.ParallelConfig(mixed_precision=mode), cpu)

    assert dtype("amx", False, True) == torch.float32  # amx: AMX tiles only
    assert dtype("amx", True, False) == torch.bfloat16
    assert dtype("native_bf16", False, True) == torch.bfloat16  # native_bf16: AMX tiles or AVX-512 BF16
    assert dtype("native_bf16", True, False) == torch.bfloat16
    assert dtype("native_bf16", False, False) == torch.float32
    assert dtype("auto", True, True) == torch.float32
    assert par.param_dtype(par.ParallelConfig(mixed_precision="native_bf16"), torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_amx", lambda: True)
    seen = []

    def snapshot(model, step, run):
        seen.append({p.dtype for p in model.parameters()})

    amx = run_training(str(tmp_path / "amx"), steps=30, batch=4, parallel=par.ParallelConfig(mixed_precision="amx"),
                       sample_fn=snapshot)
    fp32 = run_training(str(tmp_path / "fp32"), steps=30, batch=4, parallel=par.ParallelConfig(mixed_precision="fp32"))
    assert seen and all(dtypes == {torch.float32} for dtypes in seen)  # master weights stay fp32
    # bf16 matmuls: not bit-identical to fp32, but the same training curve (the model learns the +1 rule)
    assert amx.losses[1] != fp32.losses[1]
    assert amx.losses[1] == pytest.approx(fp32.losses[1], rel=1e-2)
    assert amx.losses[30] == pytest.approx(fp32.losses[30], rel=0.1)
    assert amx.losses[30] < 0.6 * amx.losses[1]


def test_compiled_blocks_and_loss_train_like_eager_ones(tmp_path):
    # parallel.compile and compile_loss (the world recipe's): each block and model.loss under torch.compile train
    # the same losses as eager ones, up to the rounding of fused elementwise kernels, and the run still
    # checkpoints and exports its weights
    from anyloom.training.parallel import ParallelConfig

    eager = run_training(str(tmp_path / "eager"), steps=4, batch=4, code_factors=True)
    compiled = run_training(str(tmp_path / "compiled"), steps=4, batch=4, code_factors=True,
                            parallel=ParallelConfig(compile=True, compile_loss=True))
    losses = [[r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("eager", "compiled")]
    assert len(losses[0]) == len(losses[1]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert compiled.checkpoint is not None and is_complete(compiled.checkpoint)
    assert eager.step == compiled.step == 4

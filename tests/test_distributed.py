"""FSDP2 on CPU (gloo) through torchrun: 2 ranks (each with gradient accumulation and selective activation
checkpointing) match 1 plain process with the same global batch, and a checkpoint written by 2 sharded ranks
resumes in 1 process. The worker script is ``tests/lm_worker.py``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from lm_worker import run_training  # tests/ is on pytest's pythonpath (pyproject.toml)

from anyloom.training.checkpoint import complete_checkpoints, step_dir
from anyloom.training.parallel import ParallelConfig

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "tests/lm_worker.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_match_one_rank_and_reshard_on_resume(tmp_path):
    result = tmp_path / "two.json"
    # with factorised code embeddings: their tables are root parameters that FSDP shards like the embedding's
    proc = torchrun(2, "--dir", str(tmp_path / "two"), "--steps", "20", "--batch", "4", "--grad-accum", "2",
                    "--ac", "selective", "--ckpt-every", "10", "--code-factors", "--result", str(result))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = {int(k): v for k, v in json.loads(result.read_text())["losses"].items()}
    one = run_training(str(tmp_path / "one"), steps=20, batch=4, parallel=ParallelConfig(strategy="none"),
                       code_factors=True)
    assert sorted(two) == sorted(one.losses) == list(range(1, 21))
    for step, loss in one.losses.items():
        assert abs(two[step] - loss) <= 1e-5 * abs(loss), (step, two[step], loss)
    assert one.losses[20] < one.losses[1] - 0.5  # parity of a model that actually trains

    # the sharded checkpoint of step 10 (2 ranks) resumes in one plain process and continues the same run
    assert [c.step for c in complete_checkpoints(tmp_path / "two" / "checkpoints")] == [10, 20]
    shutil.rmtree(step_dir(tmp_path / "two" / "checkpoints", 20))
    # same global batch, same split into micro-batches of 2 rows (the loader checks its global batch size)
    resumed = run_training(str(tmp_path / "two"), steps=20, batch=4, grad_accum=2,
                           parallel=ParallelConfig(strategy="none"), code_factors=True)
    assert resumed.resumed_from == 10
    for step in range(11, 21):
        assert abs(resumed.losses[step] - one.losses[step]) <= 1e-5 * abs(one.losses[step])


@pytest.mark.parametrize("shard_group", [1, 2])  # 2 replicas of an unsharded model; 1 replica sharded over 2
def test_hybrid_sharding_matches_one_rank(tmp_path, shard_group):
    result = tmp_path / "hsdp.json"
    proc = torchrun(2, "--dir", str(tmp_path / "hsdp"), "--steps", "6", "--batch", "4", "--strategy", "hsdp",
                    "--shard-group", str(shard_group), "--result", str(result))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = {int(k): v for k, v in json.loads(result.read_text())["losses"].items()}
    one = run_training(str(tmp_path / "one"), steps=6, batch=4, parallel=ParallelConfig(strategy="none"))
    for step, loss in one.losses.items():
        assert abs(two[step] - loss) <= 1e-5 * abs(loss), (step, two[step], loss)


def test_hybrid_sharding_groups_must_divide_the_ranks():
    from anyloom.training.parallel import mesh_shape

    assert mesh_shape(ParallelConfig(strategy="hsdp", shard_group=4), 16) == (4, 4)
    assert mesh_shape(ParallelConfig(), 16) == (16,)
    with pytest.raises(ValueError, match="shard_group=3 must divide the 8 ranks"):
        mesh_shape(ParallelConfig(strategy="hsdp", shard_group=3), 8)

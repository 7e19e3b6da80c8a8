"""The GPU-scale recipes (recipes/scale/) do not rot: each resolves, and each trains two LM steps on 2 gloo ranks
through `scripts/train.py` with its own parallel settings (FSDP or HSDP, activation checkpointing, compile) and
tiny sizes (the manifest_tiny recipe's models, 256-token rows) on a small own-data manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from own_data import write_own_data
from test_distributed import free_port

from anyloom.recipes import available, load_recipe

REPO = Path(__file__).resolve().parents[1]
SCALE = sorted(name for name in available() if name.startswith("scale/"))
TINY = ["train.steps=2", "train.seq_len=256", "train.batch_size=4", "train.ckpt_every=0", "train.log_every=1",
        "train.async_checkpoint=false",
        "pipeline.stages=[data,text_tokenizer,image_tokenizer,audio_tokenizer,pretokenize,lm]"]


def test_the_scale_recipes_exist_and_resolve():
    assert {"scale/lm_150m", "scale/lm_1b"} <= set(SCALE)
    for name in SCALE:
        recipe = load_recipe(name, ["data.train=x.jsonl", "data.val_fraction=0.1", "data.test_fraction=0.1"])
        assert recipe.data.source == "manifest" and recipe.train.seq_len == 4096
        assert recipe.parallel.activation_checkpointing != "none" and recipe.parallel.compile


@pytest.mark.slow
@pytest.mark.parametrize("name", SCALE)
def test_two_steps_on_two_ranks(name, tmp_path):
    own = write_own_data(tmp_path / "own", n=12)
    tiny = tmp_path / "tiny.yaml"  # the scale recipe with manifest_tiny's sizes merged over it
    tiny.write_text(f"base: [{REPO / 'recipes' / (name + '.yaml')}, {REPO / 'recipes' / 'manifest_tiny.yaml'}]\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "scripts/train.py", "--recipe", str(tiny), *TINY,
           f"data.train={own['manifest']}", "data.val_fraction=0.2", "data.test_fraction=0.2",
           f"data.root={tmp_path / 'prepared'}", f"run.out_dir={tmp_path / 'runs'}", "run.name=scale",
           "parallel.shard_group=1"]  # hsdp: 2 replicas of 1 rank each (fsdp ignores it)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "runs" / "scale" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and all(0 < x < 20 for x in losses)
    resolved = (tmp_path / "runs" / "scale" / "recipe.yaml").read_text()
    assert f"strategy: {load_recipe(name, ['data.train=x']).parallel.strategy}" in resolved

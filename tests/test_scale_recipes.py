"""The GPU-scale recipes (recipes/scale/) do not rot: each resolves, and each trains two LM steps on 2 gloo ranks
through `scripts/train.py` with its own parallel settings (FSDP or HSDP, activation checkpointing, compile) and
tiny sizes and lengths (every other setting the recipe's own) on a small own-data manifest; a tokenizer recipe
trains its stage for two steps."""

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
SCALE = sorted(name for name in available() if name.startswith("scale/") and "finetune" not in name)
# the fine-tuning recipes need a model to start from: tests/test_finetune_pretrained.py runs them on 2 ranks
TINY = [  # every stage's size and length shrunk; the recipe's own parallel, precision and layout settings kept
    "image_tokenizer.steps=2", "image_tokenizer.batch_size=8", "image_tokenizer.log_every=1",
    "image_tokenizer.eval_every=2", "image_tokenizer.val_images=8", "image_tokenizer.sample_every=2",
    "image_tokenizer.ckpt_every=0", "audio_tokenizer.train.steps=2", "audio_tokenizer.train.batch_size=4",
    "audio_tokenizer.train.log_every=1", "audio_tokenizer.train.ckpt_every=0", "audio_tokenizer.train.eval_items=0",
    "audio_tokenizer.train.num_samples=1", "vocoder.train.steps=2", "vocoder.train.batch_size=2",
    "vocoder.train.log_every=1", "vocoder.train.ckpt_every=0", "vocoder.train.eval_items=0",
    "vocoder.train.num_samples=1", "text_tokenizer.vocab_size=300", "model.dim=64", "model.n_layers=2",
    "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_dim=128", "model.max_seq_len=512", "train.steps=2",
    "train.seq_len=256", "train.batch_size=4", "train.ckpt_every=0", "train.log_every=1",
    "train.async_checkpoint=false"]
LM_STAGES = "pipeline.stages=[data,text_tokenizer,image_tokenizer,audio_tokenizer,pretokenize,lm]"
# a recipe whose own model is too large for two CPU steps: its layout kept (levels, attention, codebook), widths cut
SHRUNK = {"scale/image_tokenizer_256": [
    "image_tokenizer.model.image_size=[64,64]", "image_tokenizer.model.channels=[8,16,16,32]",
    "image_tokenizer.model.norm_groups=4", "image_tokenizer.model.latent_dim=16", "image_tokenizer.workers=2",
    "image_tokenizer.threads=1"]}


def test_the_scale_recipes_exist_and_resolve():
    assert {"scale/lm_150m", "scale/lm_1b", "scale/speech_tokenizer_24k"} <= set(SCALE)
    for name in SCALE:
        recipe = load_recipe(name, ["data.train=x.jsonl", "data.val_fraction=0.1", "data.test_fraction=0.1"])
        assert recipe.data.source == "manifest"
        if "lm" in recipe.pipeline.stages:
            assert recipe.train.seq_len == 4096
            assert recipe.parallel.activation_checkpointing != "none" and recipe.parallel.compile
    speech = load_recipe("scale/speech_tokenizer_24k").audio_tokenizer
    assert speech.sample_rate == 24000 and speech.mel.tokens_per_second == 200
    image = load_recipe("scale/image_tokenizer_256", ["data.train=x.jsonl"]).image_tokenizer
    assert image.model.grid == (16, 16) and image.model.quantizer.codebook_size == 16384
    assert image.loader == "stream" and image.device == "auto" and image.mixed_precision == "bf16"


@pytest.mark.slow
@pytest.mark.parametrize("name", SCALE)
def test_two_steps_on_two_ranks(name, tmp_path):
    own = write_own_data(tmp_path / "own", n=12)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "scripts/train.py", "--recipe", name, *TINY, *SHRUNK.get(name, []),
           *([LM_STAGES] if "lm" in load_recipe(name, ["data.train=x"]).pipeline.stages else []),
           f"data.train={own['manifest']}", "data.val_fraction=0.2", "data.test_fraction=0.2",
           f"data.root={tmp_path / 'prepared'}", f"run.out_dir={tmp_path / 'runs'}", "run.name=scale",
           "parallel.shard_group=1"]  # hsdp: 2 replicas of 1 rank each (fsdp ignores it)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "scale"
    stages = load_recipe(name, ["data.train=x"]).pipeline.stages
    if "lm" not in stages:  # a tokenizer recipe: its stage's output
        for stage in {"image_tokenizer", "audio_tokenizer"} & set(stages):
            assert (run / "stages" / stage / "tokenizer" / "config.json").is_file(), stage
        if "vocoder" in stages:
            assert (run / "stages" / "vocoder" / "vocoder" / "config.json").is_file()
        return
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and all(0 < x < 20 for x in losses)
    resolved = (run / "recipe.yaml").read_text()
    assert f"strategy: {load_recipe(name, ['data.train=x']).parallel.strategy}" in resolved


def test_bench_recipe_measures_a_short_piece_of_a_recipe(tmp_path):
    """scripts/bench_recipe.py (the GPU check of a scale recipe) runs on the CPU with tiny sizes and writes its
    numbers with the device named."""
    from bench_recipe import main as bench_main

    out = tmp_path / "bench.json"
    assert bench_main(["--recipe", "scale/lm_150m", "--steps", "3", "--warmup", "1", "--vocab", "300", "--out",
                       str(out), "model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2",
                       "model.ffn_dim=128", "model.max_seq_len=256", "train.seq_len=128", "train.batch_size=2",
                       "parallel.compile=false"]) == 0
    report = json.loads(out.read_text())
    assert report["recipe"] == "scale/lm_150m" and report["device"].startswith("CPU")
    assert report["steps"] == 3 and report["steps_timed"] == 2 and report["tokens_per_s"] > 0
    assert report["seq_len"] == 128 and report["global_batch"] == 2 and report["peak_memory_gib"] > 0
    assert report["parallel"]["activation_checkpointing"] == "selective"  # the recipe's own settings


def test_bench_tokenizer_recipe_counts_flops_and_activation_memory(tmp_path):
    """scripts/bench_tokenizer_recipe.py (the GPU check of a tokenizer recipe) runs on the CPU with tiny widths; its
    FLOP count is the convolution arithmetic of the step, so a wider model counts more."""
    from bench_tokenizer_recipe import main as bench_main

    reports = []
    for width in (8, 16):
        out = tmp_path / f"bench{width}.json"
        assert bench_main(["--recipe", "scale/image_tokenizer_256", "--steps", "3", "--warmup", "1", "--gan", "--out",
                           str(out), *SHRUNK["scale/image_tokenizer_256"], "image_tokenizer.batch_size=2",
                           f"image_tokenizer.model.channels=[{width},16,16,32]", "image_tokenizer.device=cpu",
                           "image_tokenizer.mixed_precision=fp32"]) == 0
        reports.append(json.loads(out.read_text()))
    small, wide = reports
    assert small["device"].startswith("CPU") and small["grid"] == [4, 4] and small["codebook_size"] == 16384
    assert small["gan_on"] and small["disc_params"] > 0 and small["pictures_per_s"] > 0 and small["mfu"] is None
    assert 0 < small["gflops_per_picture"] < wide["gflops_per_picture"]
    assert 0 < small["activation_gib_per_picture"] < wide["activation_gib_per_picture"]
    # a speech tokenizer recipe: seconds of audio a second, per second of audio
    out = tmp_path / "speech.json"
    assert bench_main(["--recipe", "scale/speech_tokenizer_24k", "--steps", "3", "--warmup", "1", "--out", str(out),
                       "audio_tokenizer.mel.channels=32", "audio_tokenizer.mel.res_blocks=1",
                       "audio_tokenizer.train.batch_size=2", "audio_tokenizer.train.crop_seconds=0.5"]) == 0
    speech = json.loads(out.read_text())
    assert speech["sample_rate"] == 24000 and speech["tokens_per_second"] == 200
    assert speech["audio_seconds_per_step"] == 1
    assert speech["audio_seconds_per_s"] > 0 and speech["gflops_per_audio_second"] > 0
    assert speech["activation_gib_per_audio_second"] > 0

"""Fine-tuning an imported checkpoint through `make train` (``init.from``): the loss falls from the imported model's,
only the named parts move, an interrupted run resumes, and the fine-tuned run exports and generates."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import anyloom
from anyloom.pretrained.importer import import_checkpoint

pytest.importorskip("transformers")
import pretrained_fixtures as fx  # noqa: E402
from train import main as train_main  # noqa: E402  (scripts/train.py)

TINY = ["train.seq_len=160", "train.batch_size=4", "train.log_every=5", "optim.lr=3e-3", "optim.warmup_steps=2",
        "data.val_fraction=0.1", "data.test_fraction=0.1"]


def _captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(['one', 'two', 'three'])} {rng.choice(['red', 'blue', 'green'])} "
            f"{rng.choice(['circles', 'star', 'square'])}" for _ in range(n)]


def _manifest(folder, pictures: bool) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(_captions(40)):
        segments = [{"text": caption}]
        if pictures:
            colour = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}[caption.split()[1]]
            pixels = np.full((fx.IMAGE, fx.IMAGE, 3), 255, np.uint8)
            x, y = rng.integers(0, 8, size=2)
            pixels[y:y + 8, x:x + 8] = colour
            Image.fromarray(pixels).save(folder / f"{i}.png")
            segments = [{"text": caption}, {"image": f"{i}.png"}]
        lines.append(json.dumps({"id": f"d{i}", "segments": segments}))
    (folder / "all.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "all.jsonl")


def _losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "skipped" not in r]


def test_finetune_llama_text_loss_falls_and_resumes(tmp_path):
    fx.llama(tmp_path / "src")
    import_checkpoint("llama", tmp_path / "src", tmp_path / "llama")
    common = ["--recipe", "finetune", f"init.from={tmp_path / 'llama'}",
              f"data.train={_manifest(tmp_path / 'm', False)}", f"run.out_dir={tmp_path}", "run.name=ft",
              f"data.root={tmp_path / 'data'}", *TINY]
    assert train_main([*common, "train.steps=10", "train.ckpt_every=5"]) == 0
    assert train_main([*common, "train.steps=20", "train.ckpt_every=5"]) == 0  # continues from step 10
    run = tmp_path / "ft"
    assert "resumed from step 10" in (run / "summary.md").read_text()
    losses = _losses(run)
    assert losses[-1] < losses[0] - 0.3, losses
    out = anyloom.load(run, device="cpu").generate(text="two red", to="text", max_new_tokens=6)
    assert out.text and set(out.text.split()) <= set(fx.WORDS) | {"circles", "star", "square", "red", "blue"}


def test_finetune_emu3_image_rows_only(tmp_path):
    fx.emu3(tmp_path / "src")
    import_checkpoint("emu3", tmp_path / "src", tmp_path / "emu3", image_size=fx.IMAGE)
    assert train_main(["--recipe", "finetune", f"init.from={tmp_path / 'emu3'}",
                       f"data.train={_manifest(tmp_path / 'm', True)}", f"run.out_dir={tmp_path}", "run.name=ft",
                       f"data.root={tmp_path / 'data'}", "init.train=[output.weight]", "init.output_rows=image",
                       "train.steps=12", "sequences.mixture.tasks={t2i: 1.0}", *TINY]) == 0
    run = tmp_path / "ft"
    before = load_file(str(tmp_path / "emu3" / "export" / "model.safetensors"))
    after = load_file(str(run / "export" / "model.safetensors"))
    vocab = anyloom.load(run, device="cpu").vocab
    lo, hi = vocab.image_range
    moved = [k for k in before if not (before[k] == after[k]).all()]
    assert moved == ["output.weight"]
    head_before, head_after = before["output.weight"], after["output.weight"]
    assert (head_before[:lo] == head_after[:lo]).all() and (head_before[hi:] == head_after[hi:]).all()
    assert not (head_before[lo:hi] == head_after[lo:hi]).all()
    losses = _losses(run)
    assert losses[-1] < losses[0], losses
    picture = anyloom.load(run, device="cpu").generate(text="two red circles", to="image", seed=0)
    assert picture.image.size == (fx.IMAGE, fx.IMAGE)


@pytest.mark.slow
def test_scale_finetune_recipe_on_two_ranks_moves_only_image_rows(tmp_path):
    """recipes/scale/finetune_7b on 2 gloo ranks (FSDP2 over a meta-initialised model that rank 0 fills by broadcast,
    activation checkpointing, compile), tiny lengths: only the image rows of the head move."""
    import os
    import subprocess
    import sys

    from test_distributed import free_port

    fx.emu3(tmp_path / "src")
    import_checkpoint("emu3", tmp_path / "src", tmp_path / "emu3", image_size=fx.IMAGE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "scripts/train.py", "--recipe", "scale/finetune_7b",
           f"init.from={tmp_path / 'emu3'}", f"data.train={_manifest(tmp_path / 'm', True)}",
           f"run.out_dir={tmp_path}", "run.name=ft", f"data.root={tmp_path / 'data'}", "init.train=[output.weight]",
           "init.output_rows=image", "train.steps=3", "train.ckpt_every=0", "train.async_checkpoint=false",
           "sequences.mixture.tasks={t2i: 1.0}", *TINY]
    proc = subprocess.run(cmd, cwd=fx.REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before = load_file(str(tmp_path / "emu3" / "export" / "model.safetensors"))
    after = load_file(str(tmp_path / "ft" / "export" / "model.safetensors"))
    lo, hi = anyloom.load(tmp_path / "ft", device="cpu").vocab.image_range
    assert [k for k in before if not (before[k] == after[k]).all()] == ["output.weight"]
    head_before, head_after = before["output.weight"], after["output.weight"]
    assert (head_before[:lo] == head_after[:lo]).all() and (head_before[hi:] == head_after[hi:]).all()
    assert not (head_before[lo:hi] == head_after[lo:hi]).all()


def test_finetune_chameleon_on_pictures_and_text(tmp_path):
    """A tiny Chameleon (Hugging Face layout) fine-tuned on captioned pictures: its VQ encodes them into its own
    image codes, the loss falls, and the run answers a picture with text."""
    fx.chameleon(tmp_path / "src")
    import_checkpoint("chameleon", tmp_path / "src", tmp_path / "chameleon")
    assert train_main(["--recipe", "finetune", f"init.from={tmp_path / 'chameleon'}",
                       f"data.train={_manifest(tmp_path / 'm', True)}", f"run.out_dir={tmp_path}", "run.name=ft",
                       f"data.root={tmp_path / 'data'}", "train.steps=12", *TINY]) == 0
    losses = _losses(tmp_path / "ft")
    assert losses[-1] < losses[0], losses
    pipe = anyloom.load(tmp_path / "ft", device="cpu")
    picture = np.full((fx.IMAGE, fx.IMAGE, 3), 255, np.uint8)
    picture[4:12, 4:12] = (220, 40, 40)
    out = pipe.generate(image=picture, to="text", max_new_tokens=4)
    assert 1 <= len(out.ids) <= 4 and isinstance(out.text, str)

"""Training loop of the diffusion image decoder (``anyloom.decoders.diffusion``) on a frozen image tokenizer.

Reads top to bottom: images from manifests -> each image's VQ reconstruction, computed once up front
(the tokenizer is frozen, so this is the "tokenize offline" step) -> DDPM loss, backward, clip, step, log;
periodic checkpoints (``training/snapshots.py``: model, optimizer, step and the data/noise RNG) and sample
PNG grids (original | VQ decoder | diffusion decoder) with held-out PSNR of both decoders.

Entry: :func:`train_diffusion_decoder` (manifests) or :func:`train_diffusion_decoder_on_images` (arrays).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anyloom.config import fingerprint
from anyloom.data.images import load_images
from anyloom.decoders.diffusion import DiffusionDecoder, DiffusionDecoderConfig
from anyloom.device import pick_device
from anyloom.evaluation.decoders import compare_decoders
from anyloom.evaluation.image_metrics import psnr
from anyloom.tokenizers.base import ImageTokenizer, reconstruct
from anyloom.tokenizers.image_vq import float_to_uint8, uint8_to_float
from anyloom.training.metrics import MetricsLogger
from anyloom.training.optim import OptimConfig, build_optimizer, build_scheduler, lr_factor
from anyloom.training.run import RunDir
from anyloom.training.seed import seed_everything
from anyloom.training.snapshots import Snapshots, TrainingLoop


@dataclass(frozen=True)
class DiffusionDecoderStageConfig:
    model: DiffusionDecoderConfig = field(default_factory=DiffusionDecoderConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0, schedule="cosine")
    )
    steps: int = 600  # optimizer steps
    batch_size: int = 32
    log_every: int = 10
    ckpt_every: int = 100  # 0: only the final weights
    keep_last: int = 2  # complete checkpoints kept on disk
    sample_every: int = 200  # 0: samples only at the end
    sample_images: int = 8  # rows in each sample grid (from the validation set)
    val_images: int = 64  # held-out images for the PSNR logged with samples
    max_train_images: int = 0  # 0: every image of the training manifest
    encode_batch_size: int = 256  # images per tokenizer call when precomputing reconstructions
    max_seconds: float = 0  # > 0: stop after this much training time (shared CPUs); the schedule keeps `steps`
    image_tokenizer: str = ""  # folder of the frozen image tokenizer's weights (read by the entry point)
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "sample_images", "val_images", "encode_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("ckpt_every", "sample_every", "max_train_images", "max_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")


def freeze(tokenizer: ImageTokenizer) -> ImageTokenizer:
    """Eval mode and no gradients: an EMA codebook in training mode would update itself on every encode."""
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer.eval().requires_grad_(False)
    return tokenizer


def _grid(rows: list[np.ndarray]) -> Image.Image:
    """Rows of (H, W, 3) uint8 columns -> one image, 2-pixel gaps."""
    h, w = rows[0][0].shape[:2]
    cols = len(rows[0])
    canvas = Image.new("RGB", (cols * (w + 2), len(rows) * (h + 2)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, px in enumerate(row):
            canvas.paste(Image.fromarray(px), (c * (w + 2), r * (h + 2)))
    return canvas


def decoder_fingerprint(cfg: DiffusionDecoderStageConfig, images: torch.Tensor, cond: torch.Tensor) -> str:
    """The stage config (not where it runs) and a digest of the training pairs: a checkpoint resumes only on the
    same images and the same frozen tokenizer's reconstructions of them."""
    digest = hashlib.sha256()
    for t in (images, cond):
        digest.update(t.contiguous().numpy().tobytes())
    return fingerprint({"config": replace(cfg, device=""), "data": digest.hexdigest()[:16]})


def train_diffusion_decoder_on_images(
    cfg: DiffusionDecoderStageConfig,
    image_tokenizer: ImageTokenizer,
    train_pixels: np.ndarray,
    val_pixels: np.ndarray,
    run: RunDir,
) -> Path:
    """Train on (N, H, W, 3) uint8 arrays; resumes from the run's latest checkpoint. Returns the folder of
    the final weights (``run/decoder``: model.safetensors + config.json, load with DiffusionDecoder.load)."""
    mcfg = cfg.model
    if tuple(image_tokenizer.image_size) != tuple(mcfg.image_size):
        raise ValueError(
            f"diffusion_decoder.model.image_size {tuple(mcfg.image_size)} != the tokenizer's image_size "
            f"{tuple(image_tokenizer.image_size)}"
        )
    freeze(image_tokenizer)
    seed_everything(cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed)  # batches, timesteps and noise: saved with checkpoints
    device = pick_device(cfg.device)

    images = uint8_to_float(train_pixels)  # (N, 3, H, W)
    val = uint8_to_float(val_pixels[: cfg.val_images])
    cond = reconstruct(image_tokenizer, images, cfg.encode_batch_size, "VQ reconstructions (train)").images
    val_cond = reconstruct(image_tokenizer, val, cfg.encode_batch_size, "VQ reconstructions (val)").images

    model = DiffusionDecoder(mcfg).to(device)
    model.residual_std.fill_(float((images - cond).std().clamp_min(1e-3)))
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.steps, cfg.optim)
    snapshots = Snapshots(run.checkpoints, decoder_fingerprint(cfg, images, cond), keep_last=cfg.keep_last,
                          name="diffusion decoder", models={"model": model}, optimizers={"optim": opt},
                          generators={"data": rng})
    start = snapshots.resume()
    if start:  # put the schedule at step `start` exactly as an uninterrupted run has it (LambdaLR: base * factor)
        sched.last_epoch = start
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * lr_factor(start, cfg.steps, cfg.optim)
    logger = MetricsLogger(run)
    n = len(images)
    bs = min(cfg.batch_size, n)

    model.train()
    loop = TrainingLoop("diffusion decoder", cfg.steps, start=start, max_seconds=cfg.max_seconds)
    for step in loop:
        idx = torch.randint(0, n, (bs,), generator=rng)
        x, c = images[idx].to(device), cond[idx].to(device)
        out = model.loss(x, c, generator=rng)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        last = loop.finishing(done)  # the last step (or the time budget is spent): log, save and sample now
        if loop.due(cfg.log_every, done) or last:
            logger.log(done, loss=out.loss.item(), grad_norm=float(grad_norm), lr=sched.get_last_lr()[0])
        if cfg.ckpt_every and (loop.due(cfg.ckpt_every, done) or last):
            snapshots.save(done)
        if loop.due(cfg.sample_every, done) or last:
            model.eval()
            write_samples(model, val, val_cond, run, done, logger, cfg.sample_images)
            model.train()
    if loop.stopped_early:
        logger.log(loop.done, stopped_early=True, train_seconds=round(loop.elapsed, 1))
    logger.close()
    final = model.save(run.path / "decoder")
    return final


@torch.no_grad()
def write_samples(
    model: DiffusionDecoder,
    val: torch.Tensor,
    val_cond: torch.Tensor,
    run: RunDir,
    step: int,
    logger: MetricsLogger,
    rows: int,
) -> dict[str, float]:
    """Held-out PSNR of the VQ decoder and the diffusion decoder, and a PNG grid original | VQ | diffusion."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)  # the same noise at every sample step: curves compare like with like
    sampled = torch.cat([model.sample(c.to(device), generator=gen).cpu() for c in val_cond.split(64)])
    originals = float_to_uint8(val)
    scores = {
        "val_psnr_vq": float(psnr(originals, float_to_uint8(val_cond)).mean()),
        "val_psnr_diffusion": float(psnr(originals, float_to_uint8(sampled)).mean()),
    }
    logger.log(step, **scores)
    k = min(rows, len(val))
    grid = _grid([[float_to_uint8(t[i : i + 1])[0] for t in (val, val_cond, sampled)] for i in range(k)])
    grid.save(run.samples / f"diffusion_step_{step:07d}.png")
    logger.image("samples/original_vq_diffusion", step, np.asarray(grid))
    return scores


def train_diffusion_decoder(
    cfg: DiffusionDecoderStageConfig,
    image_tokenizer: ImageTokenizer,
    train_manifest: str | Path,
    val_manifest: str | Path,
    run: RunDir,
) -> Path:
    """Train on the images of two JSONL manifests (see :func:`train_diffusion_decoder_on_images`)."""
    size = tuple(cfg.model.image_size)
    train = load_images(train_manifest, size, limit=cfg.max_train_images)
    val = load_images(val_manifest, size, limit=cfg.val_images)
    for path, split in ((train_manifest, train), (val_manifest, val)):
        if not len(split.pixels):
            raise ValueError(f"{path}: no image segments ({split.skipped} documents without images)")
    if train.skipped or val.skipped:
        print(f"diffusion decoder: skipped {train.skipped} train / {val.skipped} val documents without images")
    return train_diffusion_decoder_on_images(cfg, image_tokenizer, train.pixels, val.pixels, run)


def main(argv: list[str] | None = None) -> int:
    """Build the world, train the recipe's diffusion decoder on a trained image tokenizer, and compare it with
    the plain VQ decoder on a split (PSNR, judge agreement, seconds per image)."""
    import argparse

    from anyloom.config import to_dict
    from anyloom.recipes import load_recipe
    from anyloom.tokenizers.image_vq import ImageVQTokenizer
    from anyloom.world.dataset import WorldConfig, build_world

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--recipe", default="diffusion_decoder")
    p.add_argument(
        "--tokenizer", default="", help="image tokenizer folder (default: diffusion_decoder.image_tokenizer)"
    )
    p.add_argument("--eval-split", default="test", choices=["val", "test", "compositional", "none"])
    p.add_argument("--eval-items", type=int, default=500)
    p.add_argument(
        "--eval-steps", default="", help="comma-separated DDIM step counts, e.g. 10,25 (default: the model's)"
    )
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    recipe = load_recipe(args.recipe, args.overrides)
    cfg = recipe.diffusion_decoder
    folder = args.tokenizer or cfg.image_tokenizer
    if not folder:
        raise SystemExit("no image tokenizer: pass --tokenizer <folder> or set diffusion_decoder.image_tokenizer")
    if not Path(folder).is_dir():
        raise SystemExit(f"image tokenizer folder {folder!r} does not exist (train one: make train RECIPE=...)")
    tokenizer = ImageVQTokenizer.load(folder).eval()
    world = build_world(getattr(recipe, "world", None) or WorldConfig())
    run = RunDir.from_config(recipe.run)
    run.write_recipe(recipe)
    weights = train_diffusion_decoder(cfg, tokenizer, world.train, world.val, run)
    if args.eval_split != "none":
        model = DiffusionDecoder.load(weights, device=pick_device(cfg.device))
        pixels = load_images(world.split(args.eval_split), tuple(cfg.model.image_size), limit=args.eval_items)
        results = {}
        try:
            step_counts = [int(v) for v in args.eval_steps.split(",") if v.strip()] or [model.cfg.inference_steps]
        except ValueError:
            raise SystemExit(
                f"--eval-steps {args.eval_steps!r}: expected comma-separated integers, e.g. 10,25"
            ) from None
        for steps in step_counts:
            cmp = compare_decoders(tokenizer, model, pixels.pixels, steps, seed=cfg.seed)
            results[f"diffusion_decoder.{args.eval_split}.ddim{steps}"] = to_dict(cmp)
        run.write_json(f"eval_{args.eval_split}.json", {**results, "config": to_dict(cfg), "tokenizer": str(folder)})
        print(json.dumps(results, indent=2))
    return 0


__all__ = [
    "DiffusionDecoderStageConfig",
    "freeze",
    "train_diffusion_decoder",
    "train_diffusion_decoder_on_images",
    "write_samples",
]


if __name__ == "__main__":
    raise SystemExit(main())

"""Training the image-text matcher (``anyloom.matcher.model``) that reranks text->image candidates.

    train_matcher(cfg, image_tokenizer, text_tokenizer, train_manifest, val_manifest, run) -> folder of the matcher

Reads top to bottom: (caption, picture) pairs from the manifests (the first text and image segment of each
document; documents without one are counted and reported) -> each picture as the frozen image tokenizer
reconstructs it (what generation decodes; ``reconstructions: false`` keeps the originals) -> contrastive steps:
a batch of pictures against the distinct captions in it (two pictures of one caption are not each other's
negatives), cross-entropy over the scaled cosines, AdamW with warmup + cosine -> the validation split's top-1:
each held-out picture against every distinct caption of the train and val splits.
With a ``head`` (a plug-in's ``MatcherHead``, e.g. the world's region head) its ``HeadTrainer`` adds its loss on
the same pictures in the same steps (its own parameters, so the global matcher is the same with or without it) and
reports on the validation pictures.

The stage takes ~half a minute on two cores, so it has no mid-run checkpoints (an interrupted run starts over) and
runs on the CPU whatever the LM uses.
It is skipped when ``<run>/matcher`` holds a matcher trained with the same config, tokenizers and data
(the fingerprint in its safetensors metadata).

Axis legend: B batch of pictures, U distinct captions in a batch, N pictures in a split.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from anyloom.config import added_field, fingerprint, to_dict
from anyloom.data.images import ImageSet, load_images
from anyloom.matcher.model import (
    HeadSpec,
    ImageTextMatcher,
    MatcherConfig,
    MatcherHead,
    head_class,
    head_spec,
    to_unit,
)
from anyloom.progress import progress
from anyloom.tokenizers.base import reconstruct
from anyloom.training.metrics import MetricsLogger
from anyloom.training.optim import OptimConfig, build_optimizer, build_scheduler
from anyloom.training.run import RunDir
from anyloom.training.seed import seed_everything
from anyloom.weights import read_metadata


class HeadTrainer(Protocol):
    """The training side of a matcher head, made by its ``trainer(config, train, val, seed, (train_where,
    val_where))`` classmethod from the two splits (``ImageSet``s with captions, meta and ids). It draws random
    numbers only from its own generators, so the global matcher's batches are the same with or without it."""

    config: Any  # the head's options, completed from the training data: the head is built from them

    def prepare(self, as_trained: Callable[[np.ndarray, str], torch.Tensor]) -> None:
        """Turn pictures of its own ((N, H, W, 3) uint8) into what the matcher trains on: ``as_trained(pixels,
        desc)``."""

    def loss(self, head: MatcherHead, x: torch.Tensor, idx: torch.Tensor, flip: torch.Tensor | None
             ) -> torch.Tensor:
        """Its loss on the step's pictures ``x`` (B, 3, H, W): the train split's items ``idx`` (B,), mirrored
        left-right where ``flip`` (B,) is set (None: no mirroring)."""

    def report(self, head: MatcherHead, val_images: torch.Tensor) -> dict[str, float]:
        """What it measures on the validation pictures (as trained on)."""


@dataclass(frozen=True)
class MatcherStageConfig:
    # image_size and text_vocab are taken from the tokenizers at training time
    model: MatcherConfig = field(default_factory=MatcherConfig)
    # a plug-in's extra reader of the pictures, trained in the same steps: {name: <anyloom.matcher_heads entry>,
    # <its options>...}; stored complete (its options typed, defaults filled in) when the recipe is read
    head: dict[str, Any] | None = added_field(None)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=50, weight_decay=0.01, schedule="cosine",
                                            min_lr_ratio=0.0)
    )
    steps: int = 1000
    batch_size: int = 128
    reconstructions: bool = True  # train on the tokenizer's reconstructions (what generation decodes)
    # mirror pictures left-right half of the time: only for data whose texts never name a direction (the world)
    hflip: bool = False
    # add the text -> picture direction to the loss (each caption against the batch's pictures, its own pictures
    # the positives): the direction reranking uses, one prompt against its candidates
    symmetric: bool = True
    log_every: int = 50
    max_seconds: float = 0  # > 0: stop after this much training time (shared CPUs)
    encode_batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "encode_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0, got {self.max_seconds}")
        spec = self.head_spec
        if spec is not None:
            object.__setattr__(self, "head", {"name": spec.name, **to_dict(spec.config)})

    @property
    def head_spec(self) -> HeadSpec | None:
        return head_spec(self.head, where="head")


def load_pairs(path: str | Path, image_size: tuple[int, int]) -> ImageSet:
    """The first (text, image) pair of every document of a JSONL manifest, with its meta and id; documents without
    one are counted as skipped, and a manifest without any is an error."""
    data = load_images(path, image_size, captioned=True)
    if not len(data.pixels):
        raise ValueError(f"{path}: no document with both a text and an image segment ({data.skipped} without)")
    return data


def _file_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class MatcherResult:
    folder: Path
    val_top1: float  # held-out pictures whose best caption (of every distinct train/val caption) is their own
    steps: int
    up_to_date: bool = False


@torch.no_grad()
def retrieval_top1(model: ImageTextMatcher, images: torch.Tensor, texts: list[str], pool: list[str],
                   encode) -> tuple[float, Counter]:
    """Share of ``images`` whose highest-scoring caption among ``pool`` is their own; the (own, chosen) confusions."""
    model.eval()
    ids, mask = model.text_batch([encode(t) for t in pool])
    t = model.encode_texts(ids, mask)
    best = torch.cat([(model.encode_images(images[s:s + 512]) @ t.T).argmax(1) for s in range(0, len(images), 512)])
    chosen = [pool[j] for j in best.tolist()]
    confusions = Counter((a, b) for a, b in zip(texts, chosen) if a != b)
    return sum(a == b for a, b in zip(texts, chosen)) / max(1, len(texts)), confusions


def contrastive_loss(model: ImageTextMatcher, x: torch.Tensor, captions: torch.Tensor, ids: torch.Tensor,
                     mask: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pictures ``x`` (B, 3, H, W) against the distinct captions among their ``captions`` (B,) (indices into the
    tokenized ``ids``/``mask``): cross-entropy over the scaled cosines (averaged with the caption -> pictures
    direction when ``symmetric``). Returns the loss, the logits (B, U) and each picture's caption among the U."""
    present, target = torch.unique(captions, return_inverse=True)  # (U,), (B,)
    logits = model.logits(model.encode_images(x), model.encode_texts(ids[present], mask[present]))  # (B, U)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        own = F.one_hot(target, len(present)).T.bool()  # (U, B): caption u is picture b's
        by_text = logits.T  # (U, B)
        loss = 0.5 * loss + 0.5 * (by_text.logsumexp(1) - by_text.masked_fill(~own, -torch.inf).logsumexp(1)).mean()
    return loss, logits, target


def _train_steps(cfg: MatcherStageConfig, model: ImageTextMatcher, images: torch.Tensor, captions: torch.Tensor,
                 vocab: list[str], encode, head_trainer: HeadTrainer | None, logger: MetricsLogger
                 ) -> tuple[int, float]:
    """The contrastive steps (+ the head's loss): returns the steps taken and their seconds."""
    rng = torch.Generator().manual_seed(cfg.seed)
    ids, mask = model.text_batch([encode(t) for t in vocab])  # every distinct training caption, tokenized once
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.steps, cfg.optim)
    n, bs = len(images), min(cfg.batch_size, len(images))
    t0 = time.perf_counter()
    step = 0
    model.train()
    for step in progress(range(1, cfg.steps + 1), desc="image matcher"):
        idx = torch.randint(0, n, (bs,), generator=rng)
        x, flip = images[idx], None
        if cfg.hflip:
            flip = torch.rand(bs, generator=rng) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        loss, logits, target = contrastive_loss(model, x, captions[idx], ids, mask, cfg.symmetric)
        if head_trainer is not None:  # the head has its own parameters: its loss leaves the matcher's gradients alone
            loss = loss + head_trainer.loss(model.head, x, idx, flip)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        out_of_time = cfg.max_seconds > 0 and time.perf_counter() - t0 >= cfg.max_seconds
        if step % cfg.log_every == 0 or step == cfg.steps or out_of_time:
            acc = (logits.argmax(1) == target).float().mean().item()
            logger.log(step, loss=loss.item(), batch_top1=acc, lr=sched.get_last_lr()[0],
                       scale=model.log_scale.exp().item())
        if out_of_time:
            print(f"image matcher: max_seconds={cfg.max_seconds:g} reached after {step}/{cfg.steps} steps")
            break
    return step, time.perf_counter() - t0


def train_matcher(
    cfg: MatcherStageConfig,
    image_tokenizer,
    text_tokenizer,
    train_manifest: str | Path,
    val_manifest: str | Path,
    run: RunDir,
    image_tokenizer_folder: str | Path | None = None,
) -> MatcherResult:
    """Train (or find up to date) the matcher of ``run`` (``run/matcher``); see the module docstring."""
    size = tuple(int(v) for v in image_tokenizer.image_size)
    mcfg = replace(cfg.model, image_size=size, text_vocab=int(text_tokenizer.vocab_size))
    out = run.path / "matcher"
    key = fingerprint({
        "config": replace(cfg, model=mcfg), "text_tokenizer": text_tokenizer.fingerprint,
        "image_tokenizer": _file_digest(Path(image_tokenizer_folder)) if image_tokenizer_folder else "",
        "train": str(train_manifest), "val": str(val_manifest),
    })
    report = run.path / "matcher_val.json"
    if report.is_file() and read_metadata(out).get("fingerprint") == key:
        done = json.loads(report.read_text())
        return MatcherResult(out, done["val_top1"], done["steps"], up_to_date=True)

    train, val = load_pairs(train_manifest, size), load_pairs(val_manifest, size)
    spec = cfg.head_spec
    head_trainer: HeadTrainer | None = None
    if spec is not None:  # the head's targets are checked (naming a bad document) before any training
        head_trainer = head_class(spec.name).trainer(spec.config, train, val, cfg.seed,
                                                     (str(train_manifest), str(val_manifest)))
        spec = HeadSpec(spec.name, head_trainer.config)
    if train.skipped or val.skipped:
        print(f"image matcher: skipped {train.skipped} train / {val.skipped} val documents that are no caption "
              "pair (no text and image segment, or tasks that exclude text->image and image->text)")
    seed_everything(cfg.seed)

    def as_trained(pixels: np.ndarray, desc: str) -> torch.Tensor:  # what the matcher trains on and is scored on
        x = to_unit(pixels)
        if not cfg.reconstructions:
            return x
        return reconstruct(image_tokenizer, x, cfg.encode_batch_size, f"matcher: {desc}").images

    images = as_trained(train.pixels, "reconstructions (train)")
    val_images = as_trained(val.pixels, "reconstructions (val)")
    if head_trainer is not None:
        head_trainer.prepare(as_trained)
    vocab = sorted(set(train.captions))
    caption_index = {t: i for i, t in enumerate(vocab)}
    captions = torch.tensor([caption_index[t] for t in train.captions])  # (N,)

    model = ImageTextMatcher(mcfg, spec)
    logger = MetricsLogger(run, tensorboard=False)
    step, seconds = _train_steps(cfg, model, images, captions, vocab, text_tokenizer.encode, head_trainer, logger)
    pool = sorted(set(train.captions) | set(val.captions))
    top1, confusions = retrieval_top1(model, val_images, val.captions, pool, text_tokenizer.encode)
    logger.log(step, val_top1=top1, train_seconds=round(seconds, 1))
    head_report = {}
    if head_trainer is not None:
        head_report = head_trainer.report(model.head, val_images)
        print(f"image matcher head {spec.name} (val): " + ", ".join(f"{k} {v:.3f}" for k, v in head_report.items()))
    logger.close()
    model.save(out, metadata={"fingerprint": key, "steps": str(step)})
    report.write_text(json.dumps({
        "val_top1": top1, "steps": step, "train_seconds": round(seconds, 1), "val_items": len(val.captions),
        "captions": len(pool), "skipped_documents": {"train": train.skipped, "val": val.skipped},
        "most_confused": [{"caption": a, "read_as": b, "count": c} for (a, b), c in confusions.most_common(10)],
        "head": head_report,
    }, indent=2) + "\n")
    return MatcherResult(out, top1, step)


__all__ = ["HeadTrainer", "MatcherResult", "MatcherStageConfig", "contrastive_loss", "load_pairs", "retrieval_top1",
           "train_matcher"]

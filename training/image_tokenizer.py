"""Training loop of the image tokenizer (VQGAN family): reconstruction + quantizer losses, optional patch-GAN.

    train_image_tokenizer(cfg, train_manifest, val_manifest, run) -> folder with the exported tokenizer

The loop: ``load_data`` (both splits in memory; or, with ``loader: stream``, the training pictures decoded batch
by batch in loader processes), ``build_state`` (model, optimizers [, discriminator, EMA]), then
``train_step`` per batch, with validation scores, sample grids and checkpoints every so many steps, and ``export``.
One step reads top to bottom: forward, loss (L1 + L2, optionally weighted per pixel towards the original's outlines
and by a dataset's pixel-weight plug-ins, see ``PixelWeights`` [+ gradient-difference L1] + quantizer aux [+
adaptive-weighted hinge GAN after ``gan_start``]; forward and losses under bf16 autocast with ``mixed_precision:
amx`` on an AMX CPU or ``bf16`` on a GPU, ``device``), backward, clip, step, EMA update. Checkpoints are the
small-model trainers' format (``training/snapshots.py``); a run with a checkpoint of its config resumes from it and,
because every batch is drawn from a generator seeded by (seed, step), continues exactly as an uninterrupted run would.
The export is skipped when ``<run>/tokenizer`` already holds a tokenizer trained with the same config fingerprint.

Axis legend: B batch, H/W image size, h/w code grid, N images in a split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from anyloom.config import added_field, build, fingerprint, to_dict
from anyloom.data.images import MAX_REASONS, PictureStream, collate_pictures, load_images
from anyloom.device import pick_device
from anyloom.plugins import load_plugin
from anyloom.tokenizers.base import reconstruct
from anyloom.tokenizers.image_vq import ImageVQConfig, ImageVQTokenizer, float_to_uint8, uint8_to_float
from anyloom.training.metrics import MetricsLogger
from anyloom.training.optim import OptimConfig, budget_position, build_optimizer, lr_factor
from anyloom.training.parallel import cpu_runs_bf16
from anyloom.training.run import RunDir
from anyloom.training.seed import seed_everything, step_generator
from anyloom.training.snapshots import Snapshots, TrainingLoop
from anyloom.weights import read_metadata

EXPORT_DIR = "tokenizer"  # <run>/tokenizer: the exported ImageVQTokenizer (model.safetensors + config.json)


PIXEL_WEIGHTS = "anyloom.pixel_weights"  # the plug-in group of per-pixel loss weights (anyloom.plugins)


class PixelWeights(Protocol):
    """A per-pixel weight map of the reconstruction loss that a dataset brings as a plug-in (``PIXEL_WEIGHTS``).

    Built once with its ``Options`` (a frozen dataclass of its settings: the recipe entry's keys besides ``name`` and
    ``weight``); called with the target batch (B, C, H, W) in [-1, 1], it returns (B, 1, H, W) weights.
    """

    Options: ClassVar[type]

    def __init__(self, options: Any) -> None: ...

    def __call__(self, target: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class PixelWeightTerm:
    """One entry of ``pixel_weights``, checked: the plug-in's name, its weight and its typed options."""

    name: str
    weight: float
    options: Any  # the plug-in's Options

    def entry(self) -> dict[str, Any]:
        """The recipe entry, flat and complete: name, weight and every option."""
        return {"name": self.name, "weight": self.weight, **to_dict(self.options)}

    def build(self) -> PixelWeights:
        return load_plugin(PIXEL_WEIGHTS, self.name)(self.options)


def pixel_weight_term(entry: dict[str, Any], index: int) -> PixelWeightTerm:
    """Entry ``index`` of a recipe's ``pixel_weights`` ({name, weight = 1.0, the plug-in's options}), typed; an unknown
    plug-in, option or type fails naming the entry and the nearest valid name."""
    where = f"pixel_weights[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"{where}: expected a mapping with a plug-in name, like {{name: world_gaps, weight: 8.0}}, "
                         f"got {entry!r}")
    options = dict(entry)
    name, weight = options.pop("name"), options.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
        raise ValueError(f"{where}.weight: expected a finite number >= 0, got {weight!r}")
    plugin = load_plugin(PIXEL_WEIGHTS, name, where=where)
    known = ["name", "weight", *(f.name for f in dataclasses.fields(plugin.Options))]
    for key in options:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"; did you mean '{where}.{near[0]}'?" if near else f"; valid keys: {', '.join(known)}"
            raise ValueError(f"unknown key '{where}.{key}' ({name}){hint}")
    return PixelWeightTerm(name=name, weight=float(weight), options=build(plugin.Options, options, prefix=where))


@dataclass(frozen=True)
class GANConfig:
    enabled: bool = False
    start_step: int = 2000  # the discriminator joins only once reconstructions are reasonable (VQGAN)
    weight: float = 0.1  # times the adaptive weight ||grad rec|| / ||grad gan|| at the decoder's last layer
    channels: int = 32  # patch discriminator width (first layer); doubles per stride-2 layer
    layers: int = 2  # stride-2 layers: 2 on 32x32 images gives 8x8 patch logits
    lr: float = 2e-4


@dataclass(frozen=True)
class ImageTokenizerStageConfig:
    model: ImageVQConfig = field(default_factory=ImageVQConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=100,
                                            min_lr_ratio=0.05)
    )
    steps: int = 1500
    batch_size: int = 32
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    # Weight of the gradient-difference loss (see gradient_l1): per-pixel L1/L2 barely punish a blurred edge,
    # which is what turns the world's small stars and triangles into blobs; 0 turns it off.
    edge_weight: float = 0.0
    # Edge-focused reconstruction: L1 and L2 are weighted per pixel by 1 + edge_focus * (how much the original
    # changes within one pixel, saturating at edge_scale): the pixels within one pixel of an object outline (~40%
    # of a world image) count 1 + edge_focus times. 0: plain means.
    edge_focus: float = 0.0
    edge_scale: float = 0.25  # neighbour difference (in [-1, 1] units) counted as a full edge
    # Per-pixel loss weights that a dataset brings as plug-ins (group anyloom.pixel_weights), added on top of the
    # edge focus in the listed order: [{name: world_gaps, weight: 8.0, radius: 2}] weighs L1/L2 per pixel by
    # 1 + edge_focus * edge_map + 8.0 * (the plug-in's map); keys besides name and weight are the plug-in's options.
    pixel_weights: tuple[dict[str, Any], ...] = added_field(())
    # Code smoothness (FSQ only): weight of the mean |level difference| between neighbouring code cells (straight-
    # through to the encoder), so a flat background gets one code instead of several near-identical ones (fewer
    # code changes for the LM to predict). Measured on the world at 0.03: the LM's image loss fell, its
    # text->image accuracy fell too (docs/experiments/2026-11-26-image-tokenizer-fixed-steps.md). 0: off.
    code_smoothness: float = 0.0
    # Hue swap (FSQ only): weight of a second reconstruction that asks the codes to carry hue apart from layout.
    # Each picture is also encoded hue-rotated (a random angle in YIQ space: luma kept); the decoder then reads the
    # rotated picture's first FSQ digit with the original's other digits and must draw the rotated picture. So the
    # first digit has to carry the hue, and the others what stays when the hue turns (layout, luma). 0: off.
    hue_swap: float = added_field(0.0)
    gan: GANConfig = field(default_factory=GANConfig)
    ema_decay: float = 0.0  # > 0: keep an EMA of the parameters and export it instead of the raw ones
    channels_last: bool = True  # faster convs on CPU
    # "amx": the forward pass and the losses under CPU bf16 autocast when the CPU has AMX tiles (oneDNN runs the
    # convs on them; fp32 master weights and AdamW state, FSQ rounds in fp32, the export is fp32); "fp32"
    # everywhere else and on a CPU without AMX (docs/experiments/2026-11-27-image-tokenizer-bf16-and-gap-focus.md).
    # "native_bf16": as amx, and also on a CPU with AVX-512 BF16 (a step ~1.35x faster there: docs/BENCHMARKS.md).
    # "bf16": bf16 autocast on whatever device the loop runs on (a GPU; fp32 master weights, fp32 losses).
    mixed_precision: Literal["fp32", "amx", "native_bf16", "bf16"] = "fp32"
    threads: int = 2  # torch.set_num_threads for the loop
    # where the loop runs: "cpu", "cuda" (this rank's GPU), "cuda:1", or "auto" (a GPU when there is one)
    device: str = added_field("cpu")
    # where the training pictures come from: "memory" decodes every picture up front (the 32x32 world's 8,000 are
    # 25 MB); "stream" decodes each batch's pictures in `workers` loader processes (data/images.py, PictureStream),
    # for corpora that do not fit in memory. Both draw the same batches (a function of seed and step).
    loader: Literal["memory", "stream"] = added_field("memory")
    workers: int = added_field(4)  # stream: DataLoader processes decoding pictures (0: in the loop's process)
    seed: int = 0
    log_every: int = 25
    eval_every: int = 250  # PSNR / codebook usage on val_images validation images
    val_images: int = 256
    sample_every: int = 250  # reconstruction grid PNG (and tensorboard image); 0: only at the end
    ckpt_every: int = 250  # 0: only at the end
    # Wall-clock budget in seconds (0: none). The lr schedule then follows whichever of steps and time runs
    # out first, so a budget-limited run still ends annealed; batches stay a function of the step, but the
    # number of steps (and so the result) depends on the machine's speed.
    max_seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "eval_every", "val_images", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0, got {self.max_seconds}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in ("fp32", "amx", "native_bf16", "bf16"):
            raise ValueError(f"mixed_precision must be 'fp32', 'amx', 'native_bf16' or 'bf16', "
                             f"got {self.mixed_precision!r}")
        if self.loader not in ("memory", "stream"):
            raise ValueError(f"loader must be 'memory' or 'stream', got {self.loader!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.l1_weight < 0 or self.l2_weight < 0 or self.l1_weight + self.l2_weight == 0:
            raise ValueError("l1_weight and l2_weight must be >= 0 and not both 0")
        if self.edge_weight < 0:
            raise ValueError(f"edge_weight must be >= 0, got {self.edge_weight}")
        if self.edge_focus < 0 or self.edge_scale <= 0:
            raise ValueError(f"edge_focus must be >= 0 and edge_scale > 0, got {self.edge_focus}, {self.edge_scale}")
        for name in ("code_smoothness", "hue_swap"):  # weights of terms on the FSQ levels
            weight = getattr(self, name)
            if weight < 0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
            if weight and self.model.quantizer.kind != "fsq":
                raise ValueError(f"{name} acts on FSQ levels; model.quantizer.kind is "
                                 f"{self.model.quantizer.kind!r} (set it to fsq or {name} to 0)")
        # each entry typed and complete (the plug-in's options typed, defaults filled in): typos fail here, and
        # two spellings of one setting have one fingerprint
        object.__setattr__(self, "pixel_weights",
                           tuple(pixel_weight_term(entry, i).entry() for i, entry in enumerate(self.pixel_weights)))

    @property
    def bf16_autocast(self) -> bool:
        """Whether the loop runs under bf16 autocast (``bf16``; ``amx`` on a CPU with AMX tiles; ``native_bf16`` on a
        CPU with AMX tiles or AVX-512 BF16)."""
        return cpu_runs_bf16(self.mixed_precision)

    def autocast(self, device: torch.device | str = "cpu") -> Callable[[], contextlib.AbstractContextManager]:
        """A factory of the loop's autocast context on ``device``: bf16 when ``bf16_autocast``, else a no-op. Whether
        the CPU has AMX tiles is asked here, once per loop, not every step."""
        kind = torch.device(device).type
        return functools.partial(torch.autocast, kind, dtype=torch.bfloat16, enabled=self.bf16_autocast)

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout the loop keeps the model and batches in (``channels_last``)."""
        return torch.channels_last if self.channels_last else torch.contiguous_format


# ---------------------------------------------------------------------------------------------- data


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The batch of ``step``: a pure function of (seed, step), so resumed runs see the same batches."""
    return torch.randint(0, n, (batch_size,), generator=step_generator(seed, step))


# ------------------------------------------------------------------------------------------- losses


def neighbour_differences(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal (B, C, H, W-1) and vertical (B, C, H-1, W) differences between neighbouring pixels."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def gradient_l1(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |d recon - d target| over horizontal and vertical neighbour differences of (B, C, H, W) images.

    Zero exactly when the two images differ by a constant; a blurred or shifted edge changes the differences
    on both sides of it, so the loss concentrates on object outlines, which cover few pixels.
    """
    (rx, ry), (tx, ty) = neighbour_differences(recon), neighbour_differences(target)
    return 0.5 * ((rx - tx).abs().mean() + (ry - ty).abs().mean())


def edge_map(target: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1]: the largest neighbour difference of (B, C, H, W) ``target`` within one pixel.

    A pixel is on an edge when any channel changes by ``scale`` or more to a horizontal or vertical neighbour;
    a 3x3 max spreads that to both sides of the outline, so a blur on either side is weighted.
    """
    # (B, 1, H, W-1) and (B, 1, H-1, W): the largest change over the channels
    dx, dy = (d.abs().amax(dim=1, keepdim=True) for d in neighbour_differences(target))
    g = torch.maximum(F.pad(dx, (0, 1)), F.pad(dx, (1, 0)))
    g = torch.maximum(g, torch.maximum(F.pad(dy, (0, 0, 0, 1)), F.pad(dy, (0, 0, 1, 0))))  # (B, 1, H, W)
    return (F.max_pool2d(g, 3, stride=1, padding=1) / scale).clamp(max=1.0)


def reconstruction_losses(recon: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, L2) means over pixels and channels, weighted per pixel by (B, 1, H, W) ``weights`` if given."""
    diff = recon - target
    if weights is None:
        return diff.abs().mean(), diff.pow(2).mean()
    norm = weights.sum() * diff.shape[1]
    return (weights * diff.abs()).sum() / norm, (weights * diff.pow(2)).sum() / norm


def code_smoothness_loss(levels: torch.Tensor) -> torch.Tensor:
    """Mean |difference| of (B, C, h, w) FSQ levels between horizontally and vertically neighbouring cells:
    zero where neighbours share a code, so it only acts on code changes (an L1 on where the code map jumps)."""
    dx, dy = neighbour_differences(levels)
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


# RGB -> YIQ (Y luma, I/Q the chroma plane a hue rotation turns)
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def rotate_hue(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Pictures (B, 3, H, W) in [-1, 1] with each one's hue turned by ``angles`` (B,) radians in YIQ space (luma
    kept), clipped to the RGB cube."""
    b = x.shape[0]
    rot = torch.zeros(b, 3, 3)
    c, s = angles.cos(), angles.sin()
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = (torch.linalg.inv(_YIQ) @ rot @ _YIQ).to(x.device, x.dtype)  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, (x + 1) / 2).clamp(0, 1) * 2 - 1


def hue_swap_reconstruction(model: ImageVQTokenizer, x: torch.Tensor, levels: torch.Tensor, angles: torch.Tensor,
                            objective: ReconstructionObjective) -> torch.Tensor:
    """The hue-swap term (``ImageTokenizerStageConfig.hue_swap``): the rotated pictures drawn from their own first
    FSQ digit and the originals' other digits (``levels``, (B, C, h, w) with straight-through gradients)."""
    turned = rotate_hue(x, angles)
    own = model.quantizer(model.encoder(turned)).levels
    mixed = torch.cat([own[:, :1], levels[:, 1:]], dim=1)
    recon = model.decoder(model.quantizer.from_levels(mixed)).float()
    return objective(recon, turned).total


@dataclass
class Reconstruction:
    """The reconstruction terms of one training step (the objective is ``total`` + the quantizer's loss)."""

    total: torch.Tensor  # l1_weight * l1 + l2_weight * l2 + edge_weight * edge
    l1: torch.Tensor
    l2: torch.Tensor
    edge: torch.Tensor  # gradient-difference L1 (zero when edge_weight is 0)


class ReconstructionObjective:
    """The stage's reconstruction loss of ``recon`` against ``target`` (B, 3, H, W): L1 and L2 weighted per pixel by
    the edge focus and the recipe's pixel-weight plug-ins [+ gradient-difference L1]. Built once per loop."""

    def __init__(self, cfg: ImageTokenizerStageConfig) -> None:
        self.cfg = cfg
        terms = [pixel_weight_term(entry, i) for i, entry in enumerate(cfg.pixel_weights)]
        self.terms = [(t.weight, t.build()) for t in terms if t.weight]  # weight 0: the term is off

    def pixel_weights(self, target: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, H, W): 1 + edge_focus * edge_map, plus each plug-in's weight times its map in the listed order;
        None (plain means) without edge focus and plug-ins."""
        if not self.cfg.edge_focus and not self.terms:
            return None
        weights = 1.0 + self.cfg.edge_focus * edge_map(target, self.cfg.edge_scale)
        for weight, term in self.terms:
            weights = weights + weight * term(target)
        return weights

    def __call__(self, recon: torch.Tensor, target: torch.Tensor) -> Reconstruction:
        cfg = self.cfg
        l1, l2 = reconstruction_losses(recon, target, self.pixel_weights(target))
        edge = gradient_l1(recon, target) if cfg.edge_weight else torch.zeros(())
        total = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.edge_weight * edge
        return Reconstruction(total=total, l1=l1, l2=l2, edge=edge)


# ------------------------------------------------------------------------------------ discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN): stride-2 conv layers, then one logit per patch."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = cfg.channels
        for _ in range(cfg.layers - 1):
            layers += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        layers += [nn.Conv2d(c, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, H / 2**layers, W / 2**layers) logits


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: make the GAN gradient at the decoder's last layer as large as the reconstruction's."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# -------------------------------------------------------------------------------------- evaluation


@dataclass
class ReconstructionScores:
    psnr: float  # dB, mean over images, pixels in [0, 1]
    codebook_usage: float  # fraction of codes used at least once
    perplexity: float  # exp(entropy of the code histogram)
    code_change_rate: float  # neighbouring cells with different codes (evaluation.image_metrics.code_change_rate)


def quick_scores(model: ImageVQTokenizer, pixels: np.ndarray) -> ReconstructionScores:
    from anyloom.evaluation.image_metrics import code_change_rate, codebook_stats, psnr

    rec = reconstruct(model, uint8_to_float(pixels))
    stats = codebook_stats(rec.codes, model.codebook_size)
    return ReconstructionScores(psnr=float(psnr(pixels, float_to_uint8(rec.images)).mean()),
                                codebook_usage=stats.usage, perplexity=stats.perplexity,
                                code_change_rate=code_change_rate(rec.codes))


def save_grid(originals: np.ndarray, recons: np.ndarray, path: Path, scale: int = 2) -> np.ndarray:
    """Rows of originals over their reconstructions, upscaled ``scale``x (nearest); returns the grid."""
    top = np.concatenate(list(originals), axis=1)  # (H, n*W, 3)
    bottom = np.concatenate(list(recons), axis=1)
    grid = np.concatenate([top, bottom], axis=0)  # (2H, n*W, 3)
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid


# ------------------------------------------------------------------------------------ training state


@dataclass
class TrainState:
    model: ImageVQTokenizer
    optimizer: torch.optim.Optimizer
    disc: PatchDiscriminator | None
    disc_optimizer: torch.optim.Optimizer | None
    ema: dict[str, torch.Tensor] | None  # parameter name -> its EMA copy (buffers are not averaged)
    step: int = 0  # optimizer steps done


def snapshots(state: TrainState, folder: Path, config_fp: str) -> Snapshots:
    """The trainer's checkpoints (``training/snapshots.py``): model, optimizer [, discriminator and its optimizer]
    [, EMA copies], with the global generator that VQ dead-code re-seeding draws from."""
    models: dict[str, nn.Module] = {"tokenizer": state.model}
    optimizers = {"tokenizer": state.optimizer}
    if state.disc is not None and state.disc_optimizer is not None:
        models["discriminator"], optimizers["discriminator"] = state.disc, state.disc_optimizer
    # parameter names hold dots, which separate a checkpoint's key parts: "ema/decoder/conv_out/weight"
    ema = {"ema/" + k.replace(".", "/"): v for k, v in (state.ema or {}).items()}
    return Snapshots(folder, config_fp, keep_last=1, name="image tokenizer", models=models, optimizers=optimizers,
                     tensors=ema)


# -------------------------------------------------------------------------------------------- loop


def _ema_init(model: nn.Module) -> dict[str, torch.Tensor]:
    # Parameters only. The VQ codebook is a buffer that is already an EMA of the encoder outputs, and dead
    # codes are re-seeded in it by jumps: averaging it again blends old and new entries into vectors no
    # encoder output is near (measured on the world: test codebook usage 100% -> 31%, PSNR -1 dB).
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@torch.no_grad()
def _ema_update(ema: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    for k, v in model.named_parameters():
        ema[k].lerp_(v, 1.0 - decay)


def _exported_model(state: TrainState) -> ImageVQTokenizer:
    """The model to export: EMA parameters when enabled, with the raw model's buffers (the VQ codebook)."""
    if state.ema is None:
        return state.model
    model = ImageVQTokenizer(state.model.cfg)
    sd = state.model.state_dict()
    sd.update({k: v.to(sd[k].device) for k, v in state.ema.items()})
    model.load_state_dict(sd)
    return model


def export_matches(folder: Path, config_fp: str) -> bool:
    return read_metadata(folder).get("fingerprint") == config_fp


@dataclass
class StageData:
    # (N, 3, H, W) float in [-1, 1], all in memory (loader "memory"), or a PictureStream decoding on demand
    train: torch.Tensor | PictureStream
    val: np.ndarray  # (N_val, H, W, 3) uint8, the first val_images of the validation split
    fixed: np.ndarray  # (8, H, W, 3) uint8: the validation pictures of every sample grid


def load_data(cfg: ImageTokenizerStageConfig, train_manifest: str | Path, val_manifest: str | Path,
              logger: MetricsLogger) -> StageData:
    """Both splits' pictures, resized to the model's size; unreadable documents are skipped, counted and named
    (with ``loader: stream`` the training pictures are indexed now and read batch by batch)."""
    image_size = tuple(cfg.model.image_size)
    val = load_images(val_manifest, image_size, limit=cfg.val_images, strict=False)
    if cfg.loader == "stream":
        stream = PictureStream(train_manifest, image_size)
        n, skipped, reasons, train = len(stream), len(stream.skipped), [str(s) for s in stream.skipped], stream
        repeated = stream.repeated
    else:
        pictures = load_images(train_manifest, image_size, strict=False)
        n, skipped, reasons = len(pictures.pixels), pictures.skipped, pictures.reasons
        train, repeated = uint8_to_float(pictures.pixels), pictures.repeated
    logger.log(0, train_images=n, train_skipped=skipped, val_images=len(val.pixels), val_skipped=val.skipped,
               **({"train_repeated": repeated} if repeated else {}))
    again = f", {repeated} repeated picture{'s' * (repeated != 1)} read once" if repeated else ""
    print(f"image tokenizer: {n} training images ({skipped} documents skipped{again}), {len(val.pixels)} validation "
          f"images ({val.skipped} skipped)")
    for reason in reasons[:MAX_REASONS] + val.reasons:
        print(f"  skipped {reason}")
    return StageData(train=train, val=val.pixels, fixed=val.pixels[:8])


class StepBatches:
    """The batch sampler of the streaming loader: step ``start``'s batch indices, then the next step's..."""

    def __init__(self, n: int, cfg: ImageTokenizerStageConfig, start: int):
        self.n, self.cfg, self.start = n, cfg, start

    def __len__(self) -> int:
        return max(0, self.cfg.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.cfg.steps):
            yield batch_indices(self.n, self.cfg.batch_size, self.cfg.seed, step).tolist()


def training_batches(cfg: ImageTokenizerStageConfig, data: StageData, start: int, device: torch.device,
                     logger: MetricsLogger) -> Iterator[torch.Tensor]:
    """Each step's batch from step ``start`` on, on ``device`` in the loop's memory layout. Streamed pictures that
    cannot be read are left out of their batch, counted (``train_unreadable`` in metrics.jsonl) and the first few
    named; a batch with none readable stops training with the reasons."""
    if isinstance(data.train, torch.Tensor):
        for step in range(start, cfg.steps):
            x = data.train[batch_indices(len(data.train), cfg.batch_size, cfg.seed, step)]
            yield x.to(device).contiguous(memory_format=cfg.memory_format)
        return
    loader = torch.utils.data.DataLoader(
        data.train, batch_sampler=StepBatches(len(data.train), cfg, start), num_workers=cfg.workers,
        collate_fn=collate_pictures, pin_memory=device.type == "cuda", prefetch_factor=4 if cfg.workers else None,
        generator=torch.Generator().manual_seed(cfg.seed))  # its own: the global one feeds the VQ's draws
    unreadable = 0
    for step, batch in enumerate(loader, start):
        if batch.unreadable:
            for reason in batch.unreadable[:max(0, MAX_REASONS - unreadable)]:
                print(f"  unreadable training picture (left out of step {step}'s batch): {reason}")
            unreadable += len(batch.unreadable)
            logger.log(step, train_unreadable=unreadable)
        if not len(batch.pixels):
            raise ValueError(f"image tokenizer: no picture of step {step}'s batch could be read: "
                             f"{'; '.join(batch.unreadable[:3])}")
        yield batch.pixels.to(device, non_blocking=True).contiguous(memory_format=cfg.memory_format)


def build_state(cfg: ImageTokenizerStageConfig, device: torch.device | str = "cpu") -> TrainState:
    """A fresh model (and discriminator) with their optimizers, on ``device`` in the loop's memory layout."""
    model = ImageVQTokenizer(cfg.model).to(device, memory_format=cfg.memory_format)
    disc = disc_opt = None
    if cfg.gan.enabled:
        disc = PatchDiscriminator(cfg.gan).to(device, memory_format=cfg.memory_format)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.gan.lr, betas=(0.5, 0.9), weight_decay=0.0)
    return TrainState(model=model, optimizer=build_optimizer(model, cfg.optim), disc=disc, disc_optimizer=disc_opt,
                      ema=_ema_init(model) if cfg.ema_decay > 0 else None)


@dataclass
class StepOutput:
    """What one step logs."""

    loss: torch.Tensor  # the generator's objective
    terms: Reconstruction
    quant_loss: torch.Tensor
    code_smoothness: torch.Tensor
    grad_norm: torch.Tensor  # before clipping
    hue_swap: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    gan: dict[str, float] | None = None  # g_loss, d_loss, gan_weight once the discriminator has joined

    def record(self, lr: float, elapsed_s: float) -> dict[str, float]:
        out = dict(loss=self.loss.item(), l1=self.terms.l1.item(), l2=self.terms.l2.item(),
                   edge=self.terms.edge.item(), quant_loss=self.quant_loss.item(),
                   code_smoothness=self.code_smoothness.item(), hue_swap=self.hue_swap.item(), lr=lr,
                   grad_norm=float(self.grad_norm), elapsed_s=round(elapsed_s, 2))
        return {**out, **(self.gan or {})}


def train_step(state: TrainState, x: torch.Tensor, cfg: ImageTokenizerStageConfig,
               objective: ReconstructionObjective, autocast: Callable[[], contextlib.AbstractContextManager]
               ) -> StepOutput:
    """One optimizer step on batch ``x`` (B, 3, H, W): forward, losses, backward, clip, step [, discriminator step],
    EMA update."""
    model, disc = state.model, state.disc
    with autocast():
        fwd = model(x)
        recon = fwd.recon.float()  # the losses in fp32 whatever the convs ran in
        terms = objective(recon, x)
        loss = terms.total + fwd.quant_loss
        smooth = torch.zeros(())
        if cfg.code_smoothness:
            smooth = code_smoothness_loss(fwd.levels)
            loss = loss + cfg.code_smoothness * smooth
        swap = torch.zeros(())
        if cfg.hue_swap:
            angles = torch.rand(x.shape[0], generator=step_generator(cfg.seed, state.step)) * (2 * math.pi)
            swap = hue_swap_reconstruction(model, x, fwd.levels, angles, objective)
            loss = loss + cfg.hue_swap * swap
        gan_on = disc is not None and state.step >= cfg.gan.start_step
        if gan_on:
            g_loss = -disc(recon).float().mean()
            d_weight = cfg.gan.weight * adaptive_gan_weight(terms.total, g_loss, model.decoder.conv_out.weight)
            loss = loss + d_weight * g_loss
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
    state.optimizer.step()

    gan = None
    if gan_on:
        with autocast():
            d_loss = hinge_d_loss(disc(x).float(), disc(recon.detach()).float())
        state.disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        state.disc_optimizer.step()
        gan = dict(g_loss=g_loss.item(), d_loss=d_loss.item(), gan_weight=float(d_weight))
    if state.ema is not None:
        _ema_update(state.ema, model, cfg.ema_decay)
    state.step += 1
    return StepOutput(loss=loss, terms=terms, quant_loss=fwd.quant_loss, code_smoothness=smooth, grad_norm=grad_norm,
                      gan=gan, hue_swap=swap.detach())


def log_scores(logger: MetricsLogger, step: int, model: ImageVQTokenizer, pixels: np.ndarray, prefix: str) -> None:
    """PSNR and code statistics of ``model`` on ``pixels``, logged as ``<prefix>_psnr`` etc."""
    s = quick_scores(model, pixels)
    logger.log(step, **{f"{prefix}_psnr": s.psnr, f"{prefix}_codebook_usage": s.codebook_usage,
                        f"{prefix}_perplexity": s.perplexity, f"{prefix}_code_change_rate": s.code_change_rate})


def save_samples(model: ImageVQTokenizer, pixels: np.ndarray, path: Path) -> np.ndarray:
    """A grid of ``pixels`` over their reconstructions, saved to ``path``; returns the grid."""
    recon = reconstruct(model, uint8_to_float(pixels)).images
    return save_grid(pixels, float_to_uint8(recon), path)


def export(state: TrainState, cfg: ImageTokenizerStageConfig, data: StageData, run: RunDir, logger: MetricsLogger,
           config_fp: str, train_seconds: float) -> Path:
    """Score and save the final model (the EMA one when enabled) to ``<run>/tokenizer``."""
    final = _exported_model(state).to(memory_format=torch.contiguous_format).eval()
    save_samples(final, data.fixed, run.samples / "recon_final.png")
    s = quick_scores(final, data.val)
    logger.log(state.step, final_val_psnr=s.psnr, final_val_codebook_usage=s.codebook_usage,
               final_val_perplexity=s.perplexity, final_val_code_change_rate=s.code_change_rate,
               train_seconds=round(train_seconds, 1))
    logger.close()
    out = run.path / EXPORT_DIR
    final.save(out, metadata={"fingerprint": config_fp, "steps": str(state.step), "config": json.dumps(to_dict(cfg))})
    return out


def train_image_tokenizer(
    cfg: ImageTokenizerStageConfig, train_manifest: str | Path, val_manifest: str | Path, run: RunDir
) -> Path:
    """Train (or resume) the image tokenizer; returns ``<run>/tokenizer`` (load with ImageVQTokenizer.load)."""
    out = run.path / EXPORT_DIR
    config_fp = fingerprint(cfg)
    if export_matches(out, config_fp):
        print(f"image tokenizer: {out} already trained with this config ({config_fp}); skipping")
        return out
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    logger = MetricsLogger(run)
    data = load_data(cfg, train_manifest, val_manifest, logger)
    state = build_state(cfg, device)
    snaps = snapshots(state, run.checkpoints, config_fp)
    state.step = snaps.resume()
    objective = ReconstructionObjective(cfg)
    autocast = cfg.autocast(device)  # the forward pass and the losses (the generator's and the discriminator's)
    batches = training_batches(cfg, data, state.step, device, logger)

    loop = TrainingLoop("image tokenizer", cfg.steps, start=state.step, max_seconds=cfg.max_seconds)
    for step in loop:  # stops early once the max_seconds budget is spent
        # with a time budget, the schedule follows the larger of the step and time fractions (see max_seconds)
        position = budget_position(step, loop.elapsed, cfg.steps, cfg.max_seconds)
        lr = cfg.optim.lr * lr_factor(position, cfg.steps, cfg.optim)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        result = train_step(state, next(batches), cfg, objective, autocast)

        done = state.step
        if loop.due(cfg.log_every, done) or done == cfg.steps:
            logger.log(done, **result.record(lr, loop.elapsed))
            loop.set_postfix(loss=f"{result.loss.item():.4f}")
        if loop.due(cfg.eval_every, done) or done == cfg.steps:
            log_scores(logger, done, state.model, data.val, "val")
        if loop.due(cfg.sample_every, done) or done == cfg.steps:
            grid = save_samples(state.model, data.fixed, run.samples / f"recon_{done:06d}.png")
            logger.image("image_tokenizer/reconstructions", done, grid)
        if loop.due(cfg.ckpt_every, done) or done == cfg.steps:
            snaps.save(done)
    if loop.stopped_early:  # by the time budget: keep the last state resumable
        snaps.save(state.step)
    return export(state, cfg, data, run, logger, config_fp, loop.elapsed)


def main(argv: list[str] | None = None) -> int:
    """Build the world, train the recipe's image tokenizer on it, and score it on a split (default: test)."""
    import argparse

    from anyloom.evaluation.image_metrics import evaluate_reconstructions
    from anyloom.recipes import load_recipe
    from anyloom.world.dataset import WorldConfig, build_world

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--recipe", default="image_tokenizer")
    p.add_argument("--eval-split", default="test", choices=["val", "test", "compositional", "none"])
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. image_tokenizer.steps=500")
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    world = build_world(getattr(recipe, "world", None) or WorldConfig())
    run = RunDir.from_config(recipe.run)
    run.write_recipe(recipe)
    t0 = time.time()
    folder = train_image_tokenizer(recipe.image_tokenizer, world.train, world.val, run)
    minutes = (time.time() - t0) / 60
    if args.eval_split != "none":
        model = ImageVQTokenizer.load(folder)
        images = load_images(world.split(args.eval_split), model.image_size, strict=False).pixels
        rec = reconstruct(model, uint8_to_float(images), desc=f"reconstructions ({args.eval_split})")
        recon = float_to_uint8(rec.images)
        report = evaluate_reconstructions(images, recon, rec.codes, model.codebook_size)
        scores = report.as_eval()
        run.write_json(f"eval_{args.eval_split}.json", {**scores, "split": args.eval_split, "images": report.images,
                                                         "train_minutes": round(minutes, 2)})
        save_grid(images[:16], recon[:16], run.samples / f"recon_{args.eval_split}.png")
        print(json.dumps({**scores, "train_minutes": round(minutes, 2)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The world's image tokenizer: a VQGAN-family conv autoencoder with a VQ / FSQ / LFQ bottleneck.

    images (B, 3, H, W) in [-1, 1] ──Encoder──▶ z (B, D, h, w) ──quantizer──▶ codes (B, h, w) int64
    codes ──dequantize──▶ (B, D, h, w) ──Decoder──▶ images (B, 3, H, W) in [-1, 1]

The encoder and decoder are stacks of ResNet blocks, one level per resolution, with a stride-2 conv between
levels on the way down and nearest-neighbour upsampling + conv on the way up (VQGAN / LDM layout). Each level
has its own width, so compute can sit where it pays: on 32x32 world images, width at the 16x16 level (where
the shapes' outlines are drawn) bought more than width at the 8x8 code level (docs/IMAGE_TOKENIZER.md).
Optional self-attention runs at the code resolution only.

Axis legend: B batch, C channels, H/W image height/width, h/w code grid (H / 2**levels), D latent channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from anyloom.config import build, to_dict
from anyloom.tokenizers.base import ImageCodes
from anyloom.tokenizers.image_quantizers import ImageQuantizer, QuantizerConfig


@dataclass(frozen=True)
class ImageVQConfig:
    image_size: tuple[int, int] = (32, 32)  # (H, W) the tokenizer expects; other sizes are resized in encode
    # Space-to-depth factor before the first conv (pixel-unshuffle in, pixel-shuffle out, as ViT patches):
    # full-resolution convs are the most expensive per useful channel, so the world default starts at H/2.
    patch: int = 2
    # Width of each resolution level, from H/patch down; len(channels) - 1 stride-2 steps, so patch 2 with
    # (32, 128) or patch 1 with (32, 64, 128) maps 32x32 images to an 8x8 grid (downsample 4).
    channels: tuple[int, ...] = (32, 128)
    # ResNet blocks per encoder level: one number for every level, or one per level in the order of channels
    enc_blocks: int | tuple[int, ...] = 1
    dec_blocks: tuple[int, ...] = (1, 2)  # ResNet blocks per decoder level, same order as channels
    attention: bool = False  # self-attention block at the code resolution (encoder and decoder)
    latent_dim: int = 64  # D: channels the quantizer sees
    norm_groups: int = 8  # GroupNorm groups; every level width must be divisible by it
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self) -> None:
        if len(self.channels) < 1:
            raise ValueError("channels needs at least one level")
        if self.patch < 1:
            raise ValueError(f"patch must be >= 1, got {self.patch}")
        if len(self.dec_blocks) != len(self.channels):
            raise ValueError(f"dec_blocks has {len(self.dec_blocks)} entries, channels has {len(self.channels)}")
        if len(self.encoder_blocks) != len(self.channels):
            raise ValueError(f"enc_blocks has {len(self.encoder_blocks)} entries, channels has {len(self.channels)}")
        if min(self.encoder_blocks) < 1:
            raise ValueError(f"enc_blocks must be >= 1 at every level (a level's first block sets its width), "
                             f"got {self.enc_blocks}")
        for c in self.channels:
            if c % self.norm_groups:
                raise ValueError(f"channel width {c} is not divisible by norm_groups={self.norm_groups}")
        factor = self.downsample
        for s in self.image_size:
            if s % factor:
                raise ValueError(f"image_size {list(self.image_size)} is not divisible by the downsample {factor}")

    @property
    def encoder_blocks(self) -> tuple[int, ...]:
        """ResNet blocks of each encoder level, same order as channels."""
        if isinstance(self.enc_blocks, int):
            return (self.enc_blocks,) * len(self.channels)
        return tuple(self.enc_blocks)

    @property
    def downsample(self) -> int:
        return self.patch * 2 ** (len(self.channels) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.downsample, self.image_size[1] // self.downsample)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a (1x1-projected when widths differ) skip."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (VQGAN's mid-block attention)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (t c) h w -> t b 1 (h w) c", t=3)  # 3 x (B, 1, N, C)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(o, "b 1 (h w) c -> b c h w", h=h, w=w))


class Encoder(nn.Module):
    def __init__(self, cfg: ImageVQConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.unshuffle = nn.PixelUnshuffle(cfg.patch)
        self.conv_in = nn.Conv2d(3 * cfg.patch**2, ch[0], 3, padding=1)
        levels = []
        for i, c in enumerate(ch):
            c_prev = ch[max(i - 1, 0)]
            blocks: list[nn.Module] = []
            if i > 0:
                blocks.append(nn.Conv2d(c_prev, c_prev, 3, stride=2, padding=1))  # H/2**i
            blocks += [ResBlock(c_prev if j == 0 else c, c, g) for j in range(cfg.encoder_blocks[i])]
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.Sequential(*levels)
        self.mid = nn.Sequential(AttnBlock(ch[-1], g), ResBlock(ch[-1], ch[-1], g)) if cfg.attention else nn.Identity()
        self.norm_out = nn.GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.levels(self.conv_in(self.unshuffle(x))))  # (B, 3*p*p, H/p, W/p) into conv_in
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, D, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: ImageVQConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_dim, ch[-1], 3, padding=1)
        self.mid = nn.Sequential(ResBlock(ch[-1], ch[-1], g), AttnBlock(ch[-1], g)) if cfg.attention else nn.Identity()
        levels = []
        for i in reversed(range(len(ch))):
            c_prev = ch[min(i + 1, len(ch) - 1)]
            blocks: list[nn.Module] = []
            if i < len(ch) - 1:
                # the conv after upsampling already narrows to this level's width: at 4x the positions, a
                # conv at the coarser width would cost more than the whole coarser level
                blocks += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c_prev, ch[i], 3, padding=1)]
                c_prev = ch[i]
            blocks += [ResBlock(c_prev if j == 0 else ch[i], ch[i], g) for j in range(cfg.dec_blocks[i])]
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.Sequential(*levels)
        self.norm_out = nn.GroupNorm(g, ch[0])
        self.conv_out = nn.Conv2d(ch[0], 3 * cfg.patch**2, 3, padding=1)
        self.shuffle = nn.PixelShuffle(cfg.patch)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        h = self.levels(self.mid(self.conv_in(q)))
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, 3*p*p, H/p, W/p)
        return self.shuffle(out)  # (B, 3, H, W), unbounded: clamp at inference


@dataclass
class VQForward:
    """What one training forward pass produces."""

    recon: torch.Tensor  # (B, 3, H, W) unclamped
    codes: torch.Tensor  # (B, h, w) int64
    quant_loss: torch.Tensor  # scalar auxiliary quantizer loss
    levels: torch.Tensor | None = None  # fsq: (B, C, h, w) rounded levels with straight-through gradient


def check_images(images: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Validate a float batch in [-1, 1] and resize it (antialiased bilinear) to ``image_size`` if needed."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) float tensor in [-1, 1], got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"images must be float in [-1, 1], got {images.dtype} (use encode_uint8 for uint8 pixels)")
    if images.numel() and (images.min() < -1.01 or images.max() > 1.01):
        lo, hi = float(images.min()), float(images.max())
        raise ValueError(f"images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] (scale x/127.5 - 1)")
    if tuple(images.shape[-2:]) != tuple(image_size):
        images = F.interpolate(images, size=tuple(image_size), mode="bilinear", antialias=True, align_corners=False)
    return images


def uint8_to_float(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W[, C]) or (B, H, W, C) uint8, C in {1 (gray), 3 (RGB), 4 (RGBA: composited on white)} -> (B, 3, H, W)."""
    x = torch.as_tensor(np.array(pixels, copy=True)) if not torch.is_tensor(pixels) else pixels
    if x.dtype != torch.uint8:
        raise TypeError(f"pixels must be uint8, got {x.dtype}")
    if x.ndim == 2:
        x = x[..., None]  # (H, W, 1)
    if x.ndim == 3:
        x = x[None]  # (1, H, W, C)
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"pixels must be (H, W), (H, W, C) or (B, H, W, C) with C in 1/3/4, got {tuple(x.shape)}")
    f = x.float() / 255.0
    if f.shape[-1] == 1:
        f = f.expand(*f.shape[:-1], 3)
    elif f.shape[-1] == 4:
        alpha = f[..., 3:]
        f = f[..., :3] * alpha + (1.0 - alpha)  # transparent areas become white
    return rearrange(f * 2.0 - 1.0, "b h w c -> b c h w").contiguous()


def float_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return rearrange(x, "b c h w -> b h w c").cpu().numpy()


class ImageVQTokenizer(nn.Module):
    """The trainable world tokenizer; satisfies :class:`anyloom.tokenizers.base.ImageTokenizer`."""

    def __init__(self, cfg: ImageVQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = ImageQuantizer(cfg.latent_dim, cfg.quantizer)
        self.decoder = Decoder(cfg)
        self.codebook_size: int = self.quantizer.codebook_size
        self.grid: tuple[int, int] = cfg.grid
        self.image_size: tuple[int, int] = tuple(cfg.image_size)

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images: torch.Tensor) -> VQForward:
        """Training pass: images (B, 3, H, W) in [-1, 1] at ``image_size``."""
        qo = self.quantizer(self.encoder(images))
        return VQForward(recon=self.decoder(qo.quantized), codes=qo.codes, quant_loss=qo.loss, levels=qo.levels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> ImageCodes:
        images = check_images(images, self.image_size)
        return ImageCodes(codes=self.quantizer(self.encoder(images)).codes)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.ndim != 3 or tuple(codes.shape[1:]) != self.grid:
            raise ValueError(f"codes must be (B, {self.grid[0]}, {self.grid[1]}), got {tuple(codes.shape)}")
        return self.decoder(self.quantizer.dequantize(codes)).clamp(-1.0, 1.0)

    def encode_uint8(self, pixels: np.ndarray | torch.Tensor) -> ImageCodes:
        """Convenience for users: uint8 gray / RGB / RGBA pixels (see :func:`uint8_to_float`), any size."""
        return self.encode(uint8_to_float(pixels).to(next(self.parameters()).device))

    def encode_pil(self, images: Any) -> ImageCodes:
        """One PIL image or a list of them, any mode (palette, gray, RGBA, ...) and size."""
        from PIL import Image

        items = images if isinstance(images, (list, tuple)) else [images]
        batch = []
        for i, im in enumerate(items):
            if not isinstance(im, Image.Image):
                raise TypeError(f"item {i}: expected a PIL image, got {type(im).__name__}")
            im = im.convert("RGBA") if im.mode in ("P", "LA", "PA", "RGBA") else im.convert("RGB")
            rgb = uint8_to_float(np.asarray(im))
            batch.append(check_images(rgb, self.image_size))
        return self.encode(torch.cat(batch).to(next(self.parameters()).device))

    def save(self, folder: str | Path, metadata: dict[str, str] | None = None) -> Path:
        from anyloom.weights import save_weights

        return save_weights(folder, self.state_dict(), {"kind": "image_vq", **to_dict(self.cfg)}, metadata=metadata)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> ImageVQTokenizer:
        from anyloom.weights import load_weights

        saved = load_weights(folder, device=device)
        config = dict(saved.config)
        kind = config.pop("kind", None)
        if kind != "image_vq":
            raise ValueError(f"{folder}: config.json has kind={kind!r}, expected 'image_vq'")
        model = cls(build(ImageVQConfig, config, prefix="config.json"))
        missing, unexpected = model.load_state_dict(saved.state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{folder}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model.to(device).eval()

"""Emu3's vision tokenizer (a MoVQGAN-style VQ with temporal layers), ported from the Hugging Face layout.

Emu3 tokenizes video; an image is a clip of ``temporal_downsample_factor`` identical frames that the
temporal convs fold into one latent frame, and decoding unfolds it and keeps frame 0:

    encode: images (B, 3, H, W) ─CLIP-normalise─▶ repeat T frames ─2-D encoder per frame─▶ (B, C, T, h, w)
            ─temporal downsample convs + temporal ResNet─▶ (B, C, 1, h, w) ─quant_conv (causal 3-D)─▶
            nearest codebook ─▶ codes (B, h, w)
    decode: codes ─embedding─▶ quant (B, E, 1, h, w) ─post_quant_conv─▶ latent; [latent; quant] through the
            temporal ResNet + upsample ─▶ per frame: 2-D decoder whose norms are SpatialNorm(quant)
            (MoVQ: every norm is modulated by the codes) ─▶ frame 0 ─un-normalise─▶ images in [-1, 1]

Emu3's processor normalises pixels with CLIP's mean/std (read from ``preprocessor_config.json`` when the
folder has one); ``encode`` / ``decode`` speak the contract's [-1, 1] and convert. ``decode_raw`` returns the
network output in the normalised space (what the reference ``Emu3VQVAE.decode`` returns).

Axis legend: B batch, C latent channels, E embed dim, T frames, H/W image size, h/w code grid, N = h*w.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from anyloom.tokenizers.base import ImageCodes
from anyloom.tokenizers.image_importers import (
    AsymDownsample,
    CondGroupNorm,
    NearestCodebook,
    VQGANResnetBlock,
    group_norm,
    load_checked,
    load_imported,
    need,
    read_hf_vq,
    save_imported,
)
from anyloom.tokenizers.image_vq import check_images

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Emu3VQConfig:
    codebook_size: int = 32768
    embed_dim: int = 4
    latent_channels: int = 4
    double_latent: bool = False
    in_channels: int = 3
    out_channels: int = 3
    temporal_downsample_factor: int = 4
    base_channels: int = 256
    channel_multiplier: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (3,)  # level indices (not pixels) whose blocks get attention
    hidden_size: int = 1024  # attention width: must equal the channels of the levels that attend
    num_attention_heads: int = 1
    image_size: tuple[int, int] = (512, 512)  # not in Emu3's config (it takes any multiple of 8): our choice
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.embed_dim != self.latent_channels:
            raise ValueError(f"embed_dim {self.embed_dim} != latent_channels {self.latent_channels}: Emu3's decoder "
                             "runs codes and latents through the same temporal layers")
        t = self.temporal_downsample_factor
        if t < 1 or t & (t - 1):
            raise ValueError(f"temporal_downsample_factor must be a power of two, got {t}")
        factor = 2 ** (len(self.channel_multiplier) - 1)
        if any(s % factor for s in self.image_size):
            raise ValueError(f"image_size {list(self.image_size)} is not divisible by the downsample {factor}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str | Path, image_size: tuple[int, int],
                pre: dict[str, Any]) -> Emu3VQConfig:
        return cls(
            codebook_size=need(hf, "codebook_size", source),
            embed_dim=need(hf, "embed_dim", source),
            latent_channels=need(hf, "latent_channels", source),
            double_latent=bool(hf.get("double_latent", False)),
            in_channels=int(hf.get("in_channels", 3)),
            out_channels=int(hf.get("out_channels", 3)),
            temporal_downsample_factor=need(hf, "temporal_downsample_factor", source),
            base_channels=need(hf, "base_channels", source),
            channel_multiplier=tuple(need(hf, "channel_multiplier", source, (list, tuple))),
            num_res_blocks=need(hf, "num_res_blocks", source),
            attn_resolutions=tuple(hf.get("attn_resolutions") or ()),
            hidden_size=need(hf, "hidden_size", source),
            num_attention_heads=need(hf, "num_attention_heads", source),
            image_size=tuple(image_size),
            image_mean=tuple(pre.get("image_mean", CLIP_MEAN)),
            image_std=tuple(pre.get("image_std", CLIP_STD)),
        )


# ------------------------------------------------------------------------------------------ blocks


class CausalConv3d(nn.Module):
    """Conv3d with 'same' spatial padding and causal temporal padding (2 frames in front, none behind)."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        pad: tuple[int, ...] = ()
        for k, s in reversed(list(zip(kernel[1:], stride[1:]))):  # F.pad order: W then H
            p = k - s
            pad += (p // 2 + p % 2, p // 2)
        self.padding = pad + (2, 0)
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))  # (B, C, T, H, W)


class TemporalResnetBlock(nn.Module):
    """BatchNorm3d-SiLU-causal conv twice, residual; runs on (B, C, T, h, w)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = nn.BatchNorm3d(c_in)
        self.conv1 = CausalConv3d(c_in, c_out, (3, 3, 3), (1, 1, 1))
        self.norm2 = nn.BatchNorm3d(c_out)
        self.conv2 = CausalConv3d(c_out, c_out, (3, 3, 3), (1, 1, 1))
        self.nin_shortcut = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class TemporalDownsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = CausalConv3d(c, c, (4, 3, 3), (2, 1, 1))  # T -> T / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TemporalUpsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = CausalConv3d(c, c, (3, 3, 3), (1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = repeat(x, "b c t h w -> b c (t r) h w", r=2)  # nearest x2 in time
        return self.conv(x)


class SpatialNorm(nn.Module):
    """MoVQ's norm: GroupNorm(x) * conv_y(q) + conv_b(q), q the codes' embedding resized to x (nearest)."""

    def __init__(self, quant_channels: int, channels: int):
        super().__init__()
        self.norm_layer = group_norm(channels)
        self.conv_y = nn.Conv2d(quant_channels, channels, 1)
        self.conv_b = nn.Conv2d(quant_channels, channels, 1)

    def forward(self, x: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
        q = F.interpolate(quant, size=x.shape[-2:], mode="nearest")
        return self.norm_layer(x) * self.conv_y(q) + self.conv_b(q)


class MultiHeadAttention(nn.Module):
    """Non-causal multi-head self-attention with linear q/k/v/out projections, on (B, N, C)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_attention_heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (rearrange(p(x), "b n (a d) -> b a n d", a=self.heads) for p in projections)  # (B, a, N, d)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d), scale d**-0.5
        return self.out_proj(rearrange(o, "b a n d -> b n (a d)"))


def attend(attn: MultiHeadAttention, norm: nn.Module, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
    """x + attention(norm(x)) over the h*w positions of a (B, C, h, w) map."""
    _, _, h, w = x.shape
    n = rearrange(norm(x, *cond), "b c h w -> b (h w) c")  # (B, N, C)
    return x + rearrange(attn(n), "b (h w) c -> b c h w", h=h, w=w)


class MiddleBlock(nn.Module):
    def __init__(self, cfg: Emu3VQConfig, c: int, quant_channels: int | None):
        super().__init__()
        norm = (lambda ch: SpatialNorm(quant_channels, ch)) if quant_channels else CondGroupNorm
        self.block_1 = VQGANResnetBlock(c, c, norm)
        self.attn_1 = MultiHeadAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.attn_norm = norm(c)
        self.block_2 = VQGANResnetBlock(c, c, norm)

    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x, *cond)
        x = attend(self.attn_1, self.attn_norm, x, *cond)
        return self.block_2(x, *cond)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_multiplier
        self.down = nn.ModuleList()
        c_in = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block, level.attn, level.attn_norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(VQGANResnetBlock(c_in, ch * m, CondGroupNorm))
                c_in = ch * m
                if i in cfg.attn_resolutions:
                    level.attn.append(MultiHeadAttention(cfg.hidden_size, cfg.num_attention_heads))
                    level.attn_norms.append(CondGroupNorm(c_in))
            if i != len(mult) - 1:
                level.downsample = AsymDownsample(c_in)
            self.down.append(level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                x = block(x)
                if len(level.attn):
                    x = attend(level.attn[j], level.attn_norms[j], x)
            if i != len(self.down) - 1:
                x = level.downsample(x)
        return x


class UpBlock(nn.Module):
    """``up[i]`` is resolution level i (0 = full resolution); forward runs from the coarsest level up."""

    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        ch, mult, e = cfg.base_channels, cfg.channel_multiplier, cfg.embed_dim
        levels: list[nn.Module] = []
        c_in = ch * mult[-1]
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block, level.attn, level.attn_norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(VQGANResnetBlock(c_in, ch * mult[i], lambda c: SpatialNorm(e, c)))
                c_in = ch * mult[i]
                if i in cfg.attn_resolutions:
                    level.attn.append(MultiHeadAttention(cfg.hidden_size, cfg.num_attention_heads))
                    level.attn_norms.append(SpatialNorm(e, c_in))
            if i != 0:
                level.upsample = Upsample(c_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)

    def forward(self, x: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                x = block(x, quant)
                if len(level.attn):
                    x = attend(level.attn[j], level.attn_norms[j], x, quant)
            if i != 0:
                x = level.upsample(x)
        return x


class Emu3Encoder(nn.Module):
    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        c_top = cfg.base_channels * cfg.channel_multiplier[-1]
        c_out = 2 * cfg.latent_channels if cfg.double_latent else cfg.latent_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.down_block = DownBlock(cfg)
        self.middle_block = MiddleBlock(cfg, c_top, None)
        self.norm_out = group_norm(c_top)
        self.conv_out = nn.Conv2d(c_top, c_out, 3, padding=1)
        steps = int(math.log2(cfg.temporal_downsample_factor))
        self.time_conv = nn.ModuleList([TemporalDownsample(c_out) for _ in range(steps)])
        self.time_res_stack = nn.ModuleList([TemporalResnetBlock(c_out, c_out) for _ in range(cfg.num_res_blocks)])

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[:2]
        x = rearrange(frames, "b t c h w -> (b t) c h w")  # every frame through the 2-D encoder
        x = self.middle_block(self.down_block(self.conv_in(x)))
        x = self.conv_out(F.silu(self.norm_out(x)))
        x = rearrange(x, "(b t) c h w -> b c t h w", b=b, t=t)
        for conv in self.time_conv:
            x = F.silu(conv(x))
        for block in self.time_res_stack:
            x = block(x)
        return x  # (B, C, T / factor, h, w)


class Emu3Decoder(nn.Module):
    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        c, e = cfg.latent_channels, cfg.embed_dim
        c_top = cfg.base_channels * cfg.channel_multiplier[-1]
        self.time_res_stack = nn.ModuleList([TemporalResnetBlock(c, c) for _ in range(cfg.num_res_blocks)])
        steps = int(math.log2(cfg.temporal_downsample_factor))
        self.time_conv = nn.ModuleList([TemporalUpsample(c) for _ in range(steps)])
        self.conv_in = nn.Conv2d(c, c_top, 3, padding=1)
        self.middle_block = MiddleBlock(cfg, c_top, e)
        self.up_block = UpBlock(cfg)
        self.norm_out = SpatialNorm(e, cfg.base_channels * cfg.channel_multiplier[0])
        self.conv_out = nn.Conv2d(cfg.base_channels * cfg.channel_multiplier[0], cfg.out_channels, 3, padding=1)

    def forward(self, latent: torch.Tensor, quant: torch.Tensor) -> torch.Tensor:
        """latent, quant (B, C, T, h, w) -> frames (B, T * factor, 3, H, W)."""
        b = latent.shape[0]
        # The reference stacks latent and codes on the batch axis for the temporal layers (same weights for both).
        x = torch.cat([latent, quant], dim=0)  # (2B, C, T, h, w)
        for block in self.time_res_stack:
            x = block(x)
        for conv in self.time_conv:
            x = F.silu(conv(x))
        x = rearrange(x, "b c t h w -> (b t) c h w")  # (2B*T', C, h, w)
        h, q = x.chunk(2, dim=0)
        h = self.up_block(self.middle_block(self.conv_in(h), q), q)
        h = self.conv_out(F.silu(self.norm_out(h, q)))
        return rearrange(h, "(b t) c h w -> b t c h w", b=b)


class Emu3VQTokenizer(nn.Module):
    """Emu3's VQ as an ``ImageTokenizer`` (encode and decode)."""

    def __init__(self, cfg: Emu3VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Emu3Encoder(cfg)
        self.decoder = Emu3Decoder(cfg)
        self.quantize = NearestCodebook(cfg.codebook_size, cfg.embed_dim)
        self.quant_conv = CausalConv3d(cfg.latent_channels, cfg.embed_dim, (3, 1, 1), (1, 1, 1))
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_channels, (3, 1, 1), (1, 1, 1))
        factor = 2 ** (len(cfg.channel_multiplier) - 1)
        self.codebook_size: int = cfg.codebook_size
        self.image_size: tuple[int, int] = tuple(cfg.image_size)
        self.grid: tuple[int, int] = (cfg.image_size[0] // factor, cfg.image_size[1] // factor)
        self.register_buffer("mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @torch.no_grad()
    def encode_normalized(self, pixel_values: torch.Tensor) -> ImageCodes:
        """pixel_values (B, 3, H, W) already normalised as Emu3's processor does (the reference's input)."""
        frames = repeat(pixel_values, "b c h w -> b t c h w", t=self.cfg.temporal_downsample_factor)
        z = self.quant_conv(self.encoder(frames))  # (B, E, 1, h, w)
        b, _, t, h, w = z.shape
        codes = self.quantize.nearest(rearrange(z, "b e t h w -> (b t h w) e"))
        return ImageCodes(codes=rearrange(codes, "(b t h w) -> b t h w", b=b, t=t, h=h, w=w)[:, 0])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> ImageCodes:
        x = check_images(images, self.image_size)
        return self.encode_normalized(((x + 1) / 2 - self.mean) / self.std)

    @torch.no_grad()
    def decode_raw(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> (B, 3, H, W) in the processor's normalised space (the reference's output)."""
        if codes.ndim != 3:
            raise ValueError(f"codes must be (B, h, w), got {tuple(codes.shape)}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}]")
        quant = rearrange(self.quantize.embedding(codes), "b h w e -> b e 1 h w")  # (B, E, 1, h, w)
        frames = self.decoder(self.post_quant_conv(quant), quant)  # (B, T, 3, H, W)
        return frames[:, 0]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        unit = self.decode_raw(codes) * self.std + self.mean  # [0, 1]
        return (unit * 2 - 1).clamp(-1.0, 1.0)

    def save(self, folder: str | Path) -> Path:
        return save_imported(self, folder, "emu3_vq")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Emu3VQTokenizer:
        return load_imported(cls, Emu3VQConfig, folder, "emu3_vq").to(device)


def import_emu3_vq(folder: str | Path, image_size: tuple[int, int] = (512, 512)) -> Emu3VQTokenizer:
    """A Hugging Face Emu3 folder (whole model or ``emu3_vqgan``) -> Emu3VQTokenizer (eval)."""
    hf = read_hf_vq(folder, "emu3_vqgan", "emu3")
    source = hf.folder / "config.json"
    cfg = Emu3VQConfig.from_hf(hf.config, source, image_size, hf.extra)
    top = cfg.base_channels * cfg.channel_multiplier[-1]
    if cfg.hidden_size != top:
        raise ValueError(f"{source}: vq hidden_size {cfg.hidden_size} must equal base_channels * "
                         f"channel_multiplier[-1] = {top} (the middle block attends at that width)")
    if cfg.base_channels % 32:
        raise ValueError(f"{source}: base_channels {cfg.base_channels} is not a multiple of 32 (GroupNorm(32))")
    model = Emu3VQTokenizer(cfg)
    load_checked(model, hf.state_dict, hf.folder)
    return model.eval()

"""Chameleon's VQGAN (encoder + quantizer), ported from the Hugging Face layout, with an importer.

    images (B, 3, H, W) in [-1, 1] ──encoder──▶ (B, latent, h, w) ──quant_conv──▶ (B, embed, h, w)
        ──nearest codebook──▶ codes (B, h, w)

The Hugging Face port (``ChameleonVQVAE``) has no decoder, so no weights for one exist in that format and
``decode`` raises a clear error; use Emu3's VQ or the world tokenizer when images must come back. Chameleon's
processor maps uint8 pixels with x / 128 - 1; ``encode`` takes the contract's x / 127.5 - 1 as is (the two
differ by < 0.8% of the range).

Axis legend: B batch, C channels, H/W image size, h/w code grid (H / 2**(levels - 1)), N = h*w, K codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from anyloom.tokenizers.base import ImageCodes
from anyloom.tokenizers.image_importers import (
    AsymDownsample,
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


@dataclass(frozen=True)
class ChameleonVQConfig:
    resolution: int = 512
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()  # resolutions (pixels) whose encoder blocks get attention
    attn_type: str = "vanilla"  # "vanilla": attention in the middle block (and at attn_resolutions); else none
    latent_channels: int = 256
    double_latent: bool = False
    embed_dim: int = 256
    num_embeddings: int = 8192
    in_channels: int = 3

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str | Path) -> ChameleonVQConfig:
        return cls(
            resolution=need(hf, "resolution", source),
            base_channels=need(hf, "base_channels", source),
            channel_multiplier=tuple(need(hf, "channel_multiplier", source, (list, tuple))),
            num_res_blocks=need(hf, "num_res_blocks", source),
            attn_resolutions=tuple(hf.get("attn_resolutions") or ()),
            attn_type=str(hf.get("attn_type", "vanilla")),
            latent_channels=need(hf, "latent_channels", source),
            double_latent=bool(hf.get("double_latent", False)),
            embed_dim=need(hf, "embed_dim", source),
            num_embeddings=need(hf, "num_embeddings", source),
            in_channels=int(hf.get("in_channels", 3)),
        )


class ChameleonAttnBlock(nn.Module):
    """Single-head self-attention over positions with 1x1-conv q/k/v/proj_out (taming ``AttnBlock``)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        n = self.norm(x)
        q, k, v = (rearrange(f(n), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))  # (B, 1, N, C)
        o = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as the reference
        return x + self.proj_out(rearrange(o, "b 1 (h w) c -> b c h w", h=h, w=w))


class ChameleonEncoder(nn.Module):
    def __init__(self, cfg: ChameleonVQConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_multiplier
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, c_in = cfg.resolution, ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(VQGANResnetBlock(c_in, ch * m))
                c_in = ch * m
                if res in cfg.attn_resolutions and cfg.attn_type == "vanilla":
                    level.attn.append(ChameleonAttnBlock(c_in))
            if i != len(mult) - 1:
                level.downsample = AsymDownsample(c_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = VQGANResnetBlock(c_in, c_in)
        self.mid.attn_1 = ChameleonAttnBlock(c_in) if cfg.attn_type == "vanilla" else nn.Identity()
        self.mid.block_2 = VQGANResnetBlock(c_in, c_in)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * cfg.latent_channels if cfg.double_latent else cfg.latent_channels, 3,
                                  padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, latent, h, w)


class ChameleonVQTokenizer(nn.Module):
    """Chameleon's image tokenizer; the ``ImageTokenizer`` contract with ``decode`` unavailable (no weights)."""

    def __init__(self, cfg: ChameleonVQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ChameleonEncoder(cfg)
        self.quantize = NearestCodebook(cfg.num_embeddings, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        # Part of the checkpoint (it feeds the unreleased decoder); kept so save/load round-trips the file.
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        factor = 2 ** (len(cfg.channel_multiplier) - 1)
        self.codebook_size: int = cfg.num_embeddings
        self.image_size: tuple[int, int] = (cfg.resolution, cfg.resolution)
        self.grid: tuple[int, int] = (cfg.resolution // factor, cfg.resolution // factor)

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> ImageCodes:
        x = check_images(images, self.image_size)
        z = self.quant_conv(self.encoder(x))  # (B, embed, h, w)
        b, _, h, w = z.shape
        codes = self.quantize.nearest(rearrange(z, "b d h w -> (b h w) d"))  # (B*N,)
        return ImageCodes(codes=rearrange(codes, "(b h w) -> b h w", b=b, h=h, w=w))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "Chameleon's VQGAN decoder is not part of the Hugging Face port (ChameleonVQVAE has encoder and "
            "quantizer only), so there are no decoder weights to import; decode with the Emu3 VQ or a trained "
            "ImageVQTokenizer instead"
        )

    def save(self, folder: str | Path) -> Path:
        return save_imported(self, folder, "chameleon_vq")

    @classmethod
    def load(cls, folder: str | Path) -> ChameleonVQTokenizer:
        return load_imported(cls, ChameleonVQConfig, folder, "chameleon_vq")


def import_chameleon_vq(folder: str | Path) -> ChameleonVQTokenizer:
    """A Hugging Face Chameleon folder (whole model or ``chameleon_vqgan``) -> ChameleonVQTokenizer (eval)."""
    hf = read_hf_vq(folder, "chameleon_vqgan", "chameleon")
    cfg = ChameleonVQConfig.from_hf(hf.config, hf.folder / "config.json")
    if cfg.base_channels % 32:
        raise ValueError(f"{hf.folder}/config.json: base_channels {cfg.base_channels} is not a multiple of 32 "
                         "(GroupNorm(32) needs it)")
    model = ChameleonVQTokenizer(cfg)
    load_checked(model, hf.state_dict, hf.folder)
    return model.eval()

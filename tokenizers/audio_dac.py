"""A port of the Descript Audio Codec (DAC; Kumar et al. 2023) for imported weights, behind ``AudioTokenizer``.

Architecture (parameter names follow the Hugging Face layout, so imported weights load without renaming):
Snake activations (x + sin²(αx)/α), dilated residual units (1, 3, 9), strided convs with padding
ceil(stride/2), and a residual quantizer with *factorized, l2-normalised* codes: each level projects the
residual to a small ``codebook_dim`` (1x1 conv), picks the nearest codebook entry by cosine similarity,
and projects the (un-normalised) entry back with another 1x1 conv.

Weight norm is folded into plain weights at import (inference needs only the product g * v / |v|).
``audio_importers.import_dac`` builds one from a Hugging Face folder.

Axis legend: B batch, T samples, C channels, D latent dim, d codebook dim, F frames, Q codebooks, K entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F_
from einops import rearrange
from torch import nn

from anyloom.tokenizers.audio_common import pad_to_multiple, prepare_wave
from anyloom.tokenizers.audio_module import AudioCodecModule
from anyloom.tokenizers.base import AudioCodes


@dataclass(frozen=True)
class DacCodecConfig:
    sample_rate: int = 16000
    encoder_hidden_size: int = 64
    downsampling_ratios: tuple[int, ...] = (2, 4, 8, 8)
    decoder_hidden_size: int = 1536
    upsampling_ratios: tuple[int, ...] = (8, 8, 4, 2)
    hidden_size: int = 1024  # latent dim D
    num_codebooks: int = 12
    codebook_size: int = 1024
    codebook_dim: int = 8

    @property
    def hop_length(self) -> int:
        return math.prod(self.downsampling_ratios)


class Snake1d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class DacResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.snake1 = Snake1d(dim)
        self.conv1 = nn.Conv1d(dim, dim, 7, dilation=dilation, padding=3 * dilation)
        self.snake2 = Snake1d(dim)
        self.conv2 = nn.Conv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.snake2(self.conv1(self.snake1(x))))
        crop = (x.shape[-1] - y.shape[-1]) // 2  # 0 with "same" padding; kept for odd shapes
        if crop > 0:
            x = x[..., crop:-crop]
        return x + y


class DacEncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.res_unit1 = DacResidualUnit(dim // 2, 1)
        self.res_unit2 = DacResidualUnit(dim // 2, 3)
        self.res_unit3 = DacResidualUnit(dim // 2, 9)
        self.snake1 = Snake1d(dim // 2)
        self.conv1 = nn.Conv1d(dim // 2, dim, 2 * stride, stride=stride, padding=math.ceil(stride / 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_unit3(self.res_unit2(self.res_unit1(x)))
        return self.conv1(self.snake1(x))  # (B, C/2, T) -> (B, C, T / stride)


class DacDecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.snake1 = Snake1d(c_in)
        self.conv_t1 = nn.ConvTranspose1d(c_in, c_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2))
        self.res_unit1 = DacResidualUnit(c_out, 1)
        self.res_unit2 = DacResidualUnit(c_out, 3)
        self.res_unit3 = DacResidualUnit(c_out, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_t1(self.snake1(x))  # (B, C, F) -> (B, C', F * stride)
        return self.res_unit3(self.res_unit2(self.res_unit1(x)))


class DacEncoder(nn.Module):
    def __init__(self, cfg: DacCodecConfig):
        super().__init__()
        self.conv1 = nn.Conv1d(1, cfg.encoder_hidden_size, 7, padding=3)
        self.block = nn.ModuleList(
            DacEncoderBlock(cfg.encoder_hidden_size * 2 ** (i + 1), s) for i, s in enumerate(cfg.downsampling_ratios)
        )
        d_model = cfg.encoder_hidden_size * 2 ** len(cfg.downsampling_ratios)
        self.snake1 = Snake1d(d_model)
        self.conv2 = nn.Conv1d(d_model, cfg.hidden_size, 3, padding=1)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.conv1(wave)  # (B, 1, T) -> (B, C, T)
        for block in self.block:
            x = block(x)
        return self.conv2(self.snake1(x))  # (B, D, F)


class DacDecoder(nn.Module):
    def __init__(self, cfg: DacCodecConfig):
        super().__init__()
        c = cfg.decoder_hidden_size
        self.conv1 = nn.Conv1d(cfg.hidden_size, c, 7, padding=3)
        self.block = nn.ModuleList(
            DacDecoderBlock(c // 2**i, c // 2 ** (i + 1), s) for i, s in enumerate(cfg.upsampling_ratios)
        )
        out = c // 2 ** len(cfg.upsampling_ratios)
        self.snake1 = Snake1d(out)
        self.conv2 = nn.Conv1d(out, 1, 7, padding=3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for block in self.block:
            x = block(x)
        return torch.tanh(self.conv2(self.snake1(x)))  # (B, 1, T)


class DacVectorQuantize(nn.Module):
    """One factorized level: in_proj (D -> d), cosine nearest neighbour, codebook entry, out_proj (d -> D)."""

    def __init__(self, cfg: DacCodecConfig):
        super().__init__()
        self.in_proj = nn.Conv1d(cfg.hidden_size, cfg.codebook_dim, 1)
        self.out_proj = nn.Conv1d(cfg.codebook_dim, cfg.hidden_size, 1)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)

    def encode(self, residual: torch.Tensor) -> torch.Tensor:
        """(B, D, F) -> (B, F) indices."""
        latents = self.in_proj(residual)
        b = latents.shape[0]
        x = F_.normalize(rearrange(latents, "b d f -> (b f) d"))
        book = F_.normalize(self.codebook.weight)  # (K, d)
        # the expanded distance in DAC's order of operations (near-ties resolve like the reference)
        dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ book.t()) + book.pow(2).sum(1, keepdim=True).t()
        return dist.max(1)[1].reshape(b, -1)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, D, F)."""
        return self.out_proj(rearrange(self.codebook(indices), "b f d -> b d f"))


class DacQuantizer(nn.Module):
    def __init__(self, cfg: DacCodecConfig):
        super().__init__()
        self.quantizers = nn.ModuleList(DacVectorQuantize(cfg) for _ in range(cfg.num_codebooks))

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        residual, codes = z, []
        for q in self.quantizers:
            idx = q.encode(residual)
            residual = residual - q.decode(idx)
            codes.append(idx)
        return torch.stack(codes, dim=1)  # (B, Q, F)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return sum(self.quantizers[i].decode(codes[:, i]) for i in range(codes.shape[1]))


KIND = "anyloom.dac"


class DacCodec(AudioCodecModule):
    """Imported DAC weights behind ``AudioTokenizer``; encode pads the input to whole frames (like DAC's
    feature extractor), decode returns F * hop samples."""

    KIND = KIND
    CONFIG = DacCodecConfig

    def __init__(self, cfg: DacCodecConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = DacEncoder(cfg)
        self.decoder = DacDecoder(cfg)
        self.quantizer = DacQuantizer(cfg)

    @torch.inference_mode()
    def encode(self, wave: torch.Tensor, sample_rate: int, lengths: torch.Tensor | None = None) -> AudioCodes:
        prepared = prepare_wave(wave, sample_rate, self.sample_rate, min_samples=self.samples_per_frame)
        w = pad_to_multiple(prepared.wave, self.samples_per_frame).to(self.encoder.conv1.weight.device)
        codes = self.quantizer.encode(self.encoder(w[:, None]))
        return AudioCodes(codes=codes.cpu(), lengths=self.frame_lengths(lengths, sample_rate, codes))

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_codes(codes)
        z = self.quantizer.decode(codes.to(self.encoder.conv1.weight.device))
        return self.decoder(z)[:, 0].cpu()


__all__ = ["DacCodecConfig", "DacCodec", "KIND"]

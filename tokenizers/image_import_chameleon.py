"""Chameleon's VQGAN: encoder + quantizer, and the decoder when the weights have one; two importers.

    images (B, 3, H, W) in [-1, 1] ──encoder──▶ (B, latent, h, w) ──quant_conv──▶ (B, embed, h, w)
        ──nearest codebook──▶ codes (B, h, w)
    codes (B, h, w) ──codebook──▶ (B, embed, h, w) ──post_quant_conv──▶ (B, latent, h, w)
        ──decoder──▶ images (B, 3, H, W), clamped to [-1, 1]

Two sources, one module (taming-transformers' parameter names, so both map by a prefix strip):

- ``import_chameleon_vq(folder)``: the Hugging Face port (``ChameleonVQVAE``). It ships encoder and quantizer
  only, so that tokenizer has no decoder and ``decode`` raises a clear error.
- ``import_chameleon_vqgan(ckpt, yaml)``: Meta's original release (also Anole's), ``tokenizer/vqgan.ckpt`` (a
  Lightning checkpoint whose ``state_dict`` holds encoder, decoder, codebook and the training losses' tensors,
  ``loss.*``, which are skipped and counted) with ``tokenizer/vqgan.yaml`` (``model.params``: ``n_embed``,
  ``embed_dim``, ``ddconfig``). That tokenizer decodes.

Chameleon's processor maps uint8 pixels with x / 128 - 1; ``encode`` takes the contract's x / 127.5 - 1 as is
(the two differ by < 0.8% of the range).

Axis legend: B batch, C channels, H/W image size, h/w code grid (H / 2**(levels - 1)), N = h*w, K codes,
E embed (codebook) dim.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from anyloom.config import added_field
from anyloom.tokenizers.base import DecoderUnavailableError, ImageCodes
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
    attn_resolutions: tuple[int, ...] = ()  # resolutions (pixels) whose encoder/decoder blocks get attention
    attn_type: str = "vanilla"  # "vanilla": attention in the middle block (and at attn_resolutions); else none
    latent_channels: int = 256
    double_latent: bool = False
    embed_dim: int = 256
    num_embeddings: int = 8192
    in_channels: int = 3
    # Whether the weights include the decoder: Meta's vqgan.ckpt does, the Hugging Face port does not (folders
    # saved before this field existed are HF imports, hence the default).
    has_decoder: bool = added_field(False)
    out_channels: int = added_field(3)  # the decoder's output channels (ddconfig.out_ch)

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

    @classmethod
    def from_taming(cls, params: dict[str, Any], source: str | Path) -> ChameleonVQConfig:
        """From ``model.params`` of Meta's ``vqgan.yaml`` (taming-transformers' names: ``n_embed``, ``ddconfig``
        with ``ch``, ``ch_mult``, ``z_channels``, ...); ``source`` names that section in errors. The result has a
        decoder. Options the reference decoder supports but Chameleon does not use are refused by name."""
        dd = need(params, "ddconfig", source, dict)
        where = f"{source}.ddconfig"
        for key, value in (("resamp_with_conv", True), ("give_pre_end", False), ("tanh_out", False),
                           ("use_linear_attn", False)):
            if key in dd and bool(dd[key]) != value:
                raise ValueError(f"{where}: '{key}' = {dd[key]!r} is not supported (only {value})")
        attn_type = str(dd.get("attn_type", "vanilla"))
        if attn_type not in ("vanilla", "none"):
            raise ValueError(f"{where}: 'attn_type' = {attn_type!r} is not supported ('vanilla' or 'none')")
        return cls(
            resolution=need(dd, "resolution", where),
            base_channels=need(dd, "ch", where),
            channel_multiplier=tuple(need(dd, "ch_mult", where, (list, tuple))),
            num_res_blocks=need(dd, "num_res_blocks", where),
            attn_resolutions=tuple(dd.get("attn_resolutions") or ()),
            attn_type=attn_type,
            latent_channels=need(dd, "z_channels", where),
            double_latent=bool(dd.get("double_z", False)),
            embed_dim=need(params, "embed_dim", source),
            num_embeddings=need(params, "n_embed", source),
            in_channels=int(dd.get("in_channels", 3)),
            has_decoder=True,
            out_channels=int(dd.get("out_ch", 3)),
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


class NearestUpsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv (taming's ``Upsample`` with ``resamp_with_conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(c: int, cfg: ChameleonVQConfig) -> nn.Module:
    """ResNet block, attention (or nothing), ResNet block at the lowest resolution; taming's ``mid``."""
    mid = nn.Module()
    mid.block_1 = VQGANResnetBlock(c, c)
    mid.attn_1 = ChameleonAttnBlock(c) if cfg.attn_type == "vanilla" else nn.Identity()
    mid.block_2 = VQGANResnetBlock(c, c)
    return mid


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
        self.mid = _middle(c_in, cfg)
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


class ChameleonDecoder(nn.Module):
    """The mirror of the encoder (taming ``Decoder``): latent -> conv_in -> mid -> levels from the coarsest up,
    each ``num_res_blocks + 1`` ResNet blocks (with attention where the resolution is in ``attn_resolutions``)
    and a 2x upsample except the finest -> norm, SiLU, conv_out. ``up[i]`` is level ``i`` of the encoder's
    numbering (the reference builds it coarse-first and prepends), which is what the checkpoint's keys say."""

    def __init__(self, cfg: ChameleonVQConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_multiplier
        c_in = ch * mult[-1]
        res = cfg.resolution // 2 ** (len(mult) - 1)
        self.conv_in = nn.Conv2d(cfg.latent_channels, c_in, 3, padding=1)
        self.mid = _middle(c_in, cfg)
        levels: list[nn.Module] = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(VQGANResnetBlock(c_in, ch * mult[i]))
                c_in = ch * mult[i]
                if res in cfg.attn_resolutions and cfg.attn_type == "vanilla":
                    level.attn.append(ChameleonAttnBlock(c_in))
            if i != 0:
                level.upsample = NearestUpsample(c_in)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, C, h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out, H, W)


class ChameleonVQTokenizer(nn.Module):
    """Chameleon's image tokenizer (the ``ImageTokenizer`` contract); ``decode`` needs ``cfg.has_decoder``."""

    def __init__(self, cfg: ChameleonVQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ChameleonEncoder(cfg)
        self.quantize = NearestCodebook(cfg.num_embeddings, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        # Both formats carry it (it feeds the decoder); kept without a decoder so save/load round-trips the file.
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.decoder: ChameleonDecoder | None = ChameleonDecoder(cfg) if cfg.has_decoder else None
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
        z = self.quant_conv(self.encoder(x))  # (B, E, h, w)
        b, _, h, w = z.shape
        codes = self.quantize.nearest(rearrange(z, "b d h w -> (b h w) d"))  # (B*N,)
        return ImageCodes(codes=rearrange(codes, "(b h w) -> b h w", b=b, h=h, w=w))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> images (B, 3, H, W) in [-1, 1]; any grid works (the decoder is convolutional)."""
        if self.decoder is None:
            raise DecoderUnavailableError(
                "this ChameleonVQTokenizer has no decoder weights: the Hugging Face port (ChameleonVQVAE) ships "
                "encoder and quantizer only. The decoder comes with Meta's (or Anole's) tokenizer/vqgan.ckpt: "
                "re-import with `make import FROM=chameleon ... ARGS=\"--vqgan <folder of vqgan.ckpt>\"` "
                "(or import_chameleon_vqgan(ckpt, yaml) from Python)"
            )
        if not isinstance(codes, torch.Tensor) or codes.ndim != 3 or codes.is_floating_point():
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"codes must be an integer (B, h, w) tensor, got {shape}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}]")
        quant = rearrange(self.quantize.embedding(codes.long()), "b h w e -> b e h w")  # (B, E, h, w)
        return self.decoder(self.post_quant_conv(quant)).clamp(-1.0, 1.0)  # (B, 3, H, W)

    def save(self, folder: str | Path) -> Path:
        return save_imported(self, folder, "chameleon_vq")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> ChameleonVQTokenizer:
        """A folder written by :meth:`save`, with or without a decoder (as its config says)."""
        return load_imported(cls, ChameleonVQConfig, folder, "chameleon_vq").to(device)


def _check_group_norm(cfg: ChameleonVQConfig, source: str | Path, key: str) -> None:
    if cfg.base_channels % 32:
        raise ValueError(f"{source}: {key} {cfg.base_channels} is not a multiple of 32 (GroupNorm(32) needs it)")


def import_chameleon_vq(folder: str | Path) -> ChameleonVQTokenizer:
    """A Hugging Face Chameleon folder (whole model or ``chameleon_vqgan``) -> ChameleonVQTokenizer (eval), no
    decoder."""
    hf = read_hf_vq(folder, "chameleon_vqgan", "chameleon")
    cfg = ChameleonVQConfig.from_hf(hf.config, hf.folder / "config.json")
    _check_group_norm(cfg, hf.folder / "config.json", "base_channels")
    model = ChameleonVQTokenizer(cfg)
    load_checked(model, hf.state_dict, hf.folder)
    return model.eval()


# ------------------------------------------------------------------------- Meta's vqgan.ckpt + vqgan.yaml

LOSS_PREFIX = "loss."  # the training losses' tensors (LPIPS, discriminator) stored beside the model's


@dataclass
class ChameleonVQGAN:
    tokenizer: ChameleonVQTokenizer  # with its decoder, in eval mode
    skipped: list[str]  # checkpoint keys not loaded: the ``loss.*`` tensors


def read_torch_checkpoint(path: Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, memory-mapped when the file is in the zip
    format (multi-GB checkpoints then cost no copy). A file that needs pickled code, or is no torch checkpoint,
    fails naming the file; nothing in it is ever run."""
    import zipfile

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True): it holds pickled objects "
                         "other than tensors and plain containers (code, which is refused rather than run) or is no "
                         f"torch checkpoint ({type(e).__name__}: {e})") from e


def _read_yaml_params(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected the VQGAN's vqgan.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    node: Any = data
    for i, key in enumerate(("model", "params")):
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            raise ValueError(f"{path}: no mapping at '{'.'.join(('model', 'params')[: i + 1])}' (expected "
                             "taming-transformers' model.params with n_embed, embed_dim, ddconfig)")
        node = node[key]
    return node


def read_chameleon_vqgan(ckpt: str | Path, yaml: str | Path) -> ChameleonVQGAN:
    """Meta's ``vqgan.ckpt`` + ``vqgan.yaml`` -> the tokenizer with its decoder, and the keys it skipped.

    Every model key and shape is checked (``load_checked``); ``loss.*`` tensors are skipped and listed; anything
    else unexpected fails naming the key."""
    ckpt, yaml = Path(ckpt), Path(yaml)
    cfg = ChameleonVQConfig.from_taming(_read_yaml_params(yaml), f"{yaml}:model.params")
    _check_group_norm(cfg, yaml, "model.params.ddconfig.ch")
    loaded = read_torch_checkpoint(ckpt)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{ckpt}: expected a checkpoint with a 'state_dict' of tensors (Lightning's layout)")
    skipped = sorted(k for k in state if k.startswith(LOSS_PREFIX))
    model = ChameleonVQTokenizer(cfg)
    load_checked(model, state, ckpt, ignore=(LOSS_PREFIX,))
    return ChameleonVQGAN(tokenizer=model.eval(), skipped=skipped)


def import_chameleon_vqgan(ckpt: str | Path, yaml: str | Path) -> ChameleonVQTokenizer:
    """Meta's (or Anole's) ``tokenizer/vqgan.ckpt`` + ``tokenizer/vqgan.yaml`` -> ChameleonVQTokenizer (eval)
    that encodes and decodes. See :func:`read_chameleon_vqgan` for the keys it skipped."""
    return read_chameleon_vqgan(ckpt, yaml).tokenizer

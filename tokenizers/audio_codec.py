"""SEANet waveform codec: conv encoder with strided downsampling -> residual quantizer -> mirrored conv decoder.

The layout is EnCodec's (Défossez et al. 2022): weight-normed (or time-group-normed) convs with "same"
padding that also works causally, ELU residual blocks, an LSTM at the bottleneck, transposed convs in
the decoder. Pretrained EnCodec checkpoints import into it unchanged (``audio_importers.py``); for
training here the quantizer is vector-quantize-pytorch's ResidualVQ or ResidualFSQ, with quantizer
dropout (a random number of levels per step) so that fewer codebooks still decode.

    wave (B, T) --encoder--> z (B, D, F) --quantizer--> codes (B, Q, F) --lookup, sum--> z_q --decoder--> wave

F = ceil(T / hop) with hop = prod(ratios) (320 at 16 kHz -> 50 Hz frames).

Axis legend: B batch, T samples, C channels, D latent dim, F frames, Q codebooks, K codebook entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F_
from einops import rearrange
from torch import nn

from anyloom.tokenizers.audio_common import prepare_wave
from anyloom.tokenizers.audio_module import AudioCodecModule
from anyloom.tokenizers.base import AudioCodes


@dataclass(frozen=True)
class SeanetConfig:
    channels: int = 1  # audio channels the network sees (mono; stereo input is downmixed before)
    num_filters: int = 32
    ratios: tuple[int, ...] = (8, 5, 4, 2)  # decoder upsampling order; the encoder downsamples in reverse
    num_residual_layers: int = 1
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    kernel_size: int = 7
    last_kernel_size: int = 7
    compress: int = 2  # residual blocks squeeze to dim // compress
    lstm_layers: int = 2  # 0: no LSTM at the bottleneck
    causal: bool = False
    pad_mode: Literal["reflect", "constant", "replicate"] = "reflect"
    norm: Literal["weight_norm", "time_group_norm", "none"] = "weight_norm"  # none: plain convs (Mimi)
    trim_right_ratio: float = 1.0  # causal transposed convs: share of the trim taken on the right
    conv_shortcut: bool = True  # residual blocks: 1x1 conv on the skip path (else identity)
    hidden_size: int = 128  # latent dim D

    def __post_init__(self) -> None:
        if not self.ratios or any(r <= 0 for r in self.ratios):
            raise ValueError(f"ratios must be positive, got {self.ratios}")
        if not self.causal and self.trim_right_ratio != 1.0:
            raise ValueError("trim_right_ratio != 1.0 only makes sense for causal convolutions")

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)


@dataclass(frozen=True)
class WaveCodecConfig:
    sample_rate: int = 16000
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    # euclidean: plain nearest-neighbour codebooks (EnCodec's layout; what imports use)
    # residual_vq / residual_fsq: vector-quantize-pytorch modules for training here
    quantizer: Literal["euclidean", "residual_vq", "residual_fsq"] = "residual_vq"
    num_codebooks: int = 4
    codebook_size: int = 1024  # residual_fsq: must equal prod(fsq_levels)
    codebook_dim: int = 0  # 0: the latent dim (hidden_size)
    fsq_levels: tuple[int, ...] = (8, 8, 8, 2)
    quantizer_dropout: bool = True  # training: keep a random 1..Q levels per step (variable bitrate)
    commitment_weight: float = 1.0
    ema_decay: float = 0.99

    def __post_init__(self) -> None:
        if self.quantizer == "residual_fsq" and math.prod(self.fsq_levels) != self.codebook_size:
            raise ValueError(f"codebook_size {self.codebook_size} != prod(fsq_levels) {math.prod(self.fsq_levels)}")
        if self.quantizer == "euclidean" and self.codebook_dim not in (0, self.seanet.hidden_size):
            raise ValueError("the euclidean quantizer works in the latent space: codebook_dim must be 0 or hidden_size")


# -- layers ---------------------------------------------------------------------------------------------------
def _normed(conv: nn.Module, norm: str) -> nn.Module:
    if norm == "weight_norm":
        return nn.utils.parametrizations.weight_norm(conv)
    return conv


class SConv1d(nn.Module):
    """Conv1d whose padding keeps ``ceil(T / stride)`` frames for any T, centred or causal."""

    def __init__(
        self, cfg: SeanetConfig, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1,
        groups: int = 1, bias: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        self.conv = _normed(nn.Conv1d(c_in, c_out, kernel, stride, dilation=dilation, groups=groups, bias=bias),
                            cfg.norm)
        self.norm = nn.GroupNorm(1, c_out) if cfg.norm == "time_group_norm" else nn.Identity()
        self.stride = stride
        self.effective_kernel = (kernel - 1) * dilation + 1
        self.padding_total = self.effective_kernel - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        # extra right padding so that the last window is complete (no samples are dropped)
        frames = math.ceil((length - self.effective_kernel + self.padding_total) / self.stride + 1) - 1
        extra = frames * self.stride + self.effective_kernel - self.padding_total - length
        if self.cfg.causal:
            left, right = self.padding_total, extra
        else:
            right = self.padding_total // 2
            left, right = self.padding_total - right, right + extra
        return self.norm(self.conv(_pad(x, left, right, self.cfg.pad_mode)))


def _pad(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """F.pad that also reflects inputs shorter than the padding (zero-extends first, then trims)."""
    if mode != "reflect":
        return F_.pad(x, (left, right), mode)
    extra = max(0, max(left, right) - x.shape[-1] + 1)
    if extra:
        x = F_.pad(x, (0, extra))
    out = F_.pad(x, (left, right), "reflect")
    return out[..., : out.shape[-1] - extra]


class SConvTranspose1d(nn.Module):
    def __init__(
        self, cfg: SeanetConfig, c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1, bias: bool = True
    ):
        super().__init__()
        self.cfg = cfg
        self.conv = _normed(nn.ConvTranspose1d(c_in, c_out, kernel, stride, groups=groups, bias=bias), cfg.norm)
        self.norm = nn.GroupNorm(1, c_out) if cfg.norm == "time_group_norm" else nn.Identity()
        self.padding_total = kernel - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        if self.cfg.causal:
            right = math.ceil(self.padding_total * self.cfg.trim_right_ratio)
        else:
            right = self.padding_total // 2
        left = self.padding_total - right
        return y[..., left : y.shape[-1] - right]  # exactly stride * T_in samples


class BottleneckLSTM(nn.Module):
    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = rearrange(x, "b c f -> f b c")
        return rearrange(self.lstm(seq)[0] + seq, "f b c -> b c f")


class ResidualUnit(nn.Module):
    def __init__(self, cfg: SeanetConfig, dim: int, dilation: int):
        super().__init__()
        hidden = dim // cfg.compress
        self.conv1 = SConv1d(cfg, dim, hidden, cfg.residual_kernel_size, dilation=dilation)
        self.conv2 = SConv1d(cfg, hidden, dim, 1)
        self.shortcut = SConv1d(cfg, dim, dim, 1) if cfg.conv_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv2(F_.elu(self.conv1(F_.elu(x))))


class SeanetEncoder(nn.Module):
    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        self.first = SConv1d(cfg, cfg.channels, cfg.num_filters, cfg.kernel_size)
        stages, dim = [], cfg.num_filters
        for ratio in reversed(cfg.ratios):
            units = [ResidualUnit(cfg, dim, cfg.dilation_growth_rate**j) for j in range(cfg.num_residual_layers)]
            stages.append(nn.ModuleDict({
                "units": nn.ModuleList(units), "down": SConv1d(cfg, dim, dim * 2, 2 * ratio, stride=ratio),
            }))
            dim *= 2
        self.stages = nn.ModuleList(stages)
        self.lstm = BottleneckLSTM(dim, cfg.lstm_layers) if cfg.lstm_layers else nn.Identity()
        self.last = SConv1d(cfg, dim, cfg.hidden_size, cfg.last_kernel_size)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.first(wave)  # (B, channels, T) -> (B, C, T)
        for stage in self.stages:
            for unit in stage["units"]:
                x = unit(x)
            x = stage["down"](F_.elu(x))
        return self.last(F_.elu(self.lstm(x)))  # (B, D, F)


class SeanetDecoder(nn.Module):
    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        dim = cfg.num_filters * 2 ** len(cfg.ratios)
        self.first = SConv1d(cfg, cfg.hidden_size, dim, cfg.kernel_size)
        self.lstm = BottleneckLSTM(dim, cfg.lstm_layers) if cfg.lstm_layers else nn.Identity()
        stages = []
        for ratio in cfg.ratios:
            units = [ResidualUnit(cfg, dim // 2, cfg.dilation_growth_rate**j) for j in range(cfg.num_residual_layers)]
            stages.append(nn.ModuleDict({
                "up": SConvTranspose1d(cfg, dim, dim // 2, 2 * ratio, stride=ratio), "units": nn.ModuleList(units),
            }))
            dim //= 2
        self.stages = nn.ModuleList(stages)
        self.last = SConv1d(cfg, cfg.num_filters, cfg.channels, cfg.last_kernel_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.lstm(self.first(z))  # (B, D, F) -> (B, C, F)
        for stage in self.stages:
            x = stage["up"](F_.elu(x))
            for unit in stage["units"]:
                x = unit(x)
        return self.last(F_.elu(x))  # (B, channels, F * hop)


# -- quantizers -----------------------------------------------------------------------------------------------
@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, D, F)
    codes: torch.Tensor  # (B, Q, F)
    loss: torch.Tensor  # scalar (0 for quantizers without an auxiliary loss)


class EuclideanRVQ(nn.Module):
    """Residual nearest-neighbour codebooks (EnCodec's inference quantizer). ``embed``: (Q, K, D)."""

    def __init__(self, num_codebooks: int, codebook_size: int, dim: int):
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(num_codebooks, codebook_size, dim), requires_grad=False)

    def _nearest(self, x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        # the expanded squared distance, in EnCodec's order of operations, so that near-ties resolve alike
        e = embed.t()  # (D, K)
        dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ e + e.pow(2).sum(0, keepdim=True))
        return dist.max(dim=-1).indices

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        residual = rearrange(z, "b d f -> b f d")
        codes = []
        for embed in self.embed:
            idx = self._nearest(residual.reshape(-1, residual.shape[-1]), embed).view(residual.shape[:-1])
            residual = residual - F_.embedding(idx, embed)
            codes.append(idx)
        return torch.stack(codes, dim=1)  # (B, Q, F)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = sum(F_.embedding(codes[:, q], self.embed[q]) for q in range(codes.shape[1]))  # (B, F, D)
        return rearrange(out, "b f d -> b d f")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        codes = self.encode(z)
        zq = self.decode(codes)
        # commitment only (the codebooks are not trained by gradient); straight-through to the encoder
        loss = F_.mse_loss(z, zq.detach())
        return QuantizerOutput(z + (zq - z).detach(), codes, loss)


class VQPQuantizer(nn.Module):
    """vector-quantize-pytorch's ResidualVQ / ResidualFSQ behind the same encode/decode/forward."""

    def __init__(self, cfg: WaveCodecConfig):
        super().__init__()
        from vector_quantize_pytorch import ResidualFSQ, ResidualVQ

        dim = cfg.seanet.hidden_size
        dropout = dict(quantize_dropout=cfg.quantizer_dropout, quantize_dropout_cutoff_index=0)
        if cfg.quantizer == "residual_fsq":
            self.rq = ResidualFSQ(dim=dim, levels=list(cfg.fsq_levels), num_quantizers=cfg.num_codebooks, **dropout)
        else:
            self.rq = ResidualVQ(
                dim=dim, num_quantizers=cfg.num_codebooks, codebook_size=cfg.codebook_size,
                codebook_dim=cfg.codebook_dim or None, decay=cfg.ema_decay, kmeans_init=True, kmeans_iters=10,
                threshold_ema_dead_code=2, commitment_weight=cfg.commitment_weight, **dropout,
            )

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        out = self.rq(rearrange(z, "b d f -> b f d"))
        quantized, indices = out[0], out[1]
        loss = out[2].sum() if len(out) > 2 else z.new_zeros(())
        # quantizer dropout marks the dropped levels with -1: report them as 0 (they carry no signal)
        codes = rearrange(indices, "b f q -> b q f").clamp_min(0).long()
        return QuantizerOutput(rearrange(quantized, "b f d -> b d f"), codes, loss)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        was = self.rq.training
        self.rq.eval()  # every level, no dropout, no codebook updates
        codes = self.forward(z).codes
        self.rq.train(was)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return rearrange(self.rq.get_output_from_indices(rearrange(codes, "b q f -> b f q")), "b f d -> b d f")


def build_quantizer(cfg: WaveCodecConfig) -> nn.Module:
    if cfg.quantizer == "euclidean":
        return EuclideanRVQ(cfg.num_codebooks, cfg.codebook_size, cfg.seanet.hidden_size)
    return VQPQuantizer(cfg)


# -- the codec --------------------------------------------------------------------------------------------------
@dataclass
class CodecOutput:
    wave: torch.Tensor  # (B, T') reconstruction, T' = F * hop
    codes: torch.Tensor  # (B, Q, F)
    quantizer_loss: torch.Tensor  # scalar


KIND = "anyloom.seanet_codec"


class WaveCodec(AudioCodecModule):
    """A SEANet codec; implements ``AudioTokenizer`` (encode/decode) and save/load."""

    KIND = KIND
    CONFIG = WaveCodecConfig

    def __init__(self, cfg: WaveCodecConfig):
        super().__init__()
        if cfg.seanet.channels != 1:
            raise ValueError("WaveCodec is mono (stereo input is downmixed by encode); seanet.channels must be 1")
        self.cfg = cfg
        self.encoder = SeanetEncoder(cfg.seanet)
        self.decoder = SeanetDecoder(cfg.seanet)
        self.quantizer = build_quantizer(cfg)

    @property
    def samples_per_frame(self) -> int:
        return self.cfg.seanet.hop_length

    @torch.inference_mode()
    def encode(self, wave: torch.Tensor, sample_rate: int, lengths: torch.Tensor | None = None) -> AudioCodes:
        """wave (B, T) / (B, C, T), int16 or float -> codes (B, Q, ceil(T' / hop)) at the codec's rate."""
        prepared = prepare_wave(wave, sample_rate, self.sample_rate, min_samples=self.samples_per_frame)
        w = prepared.wave.to(self._device())[:, None]  # (B, 1, T)
        codes = self.quantizer.encode(self.encoder(w))
        return AudioCodes(codes=codes.cpu(), lengths=self.frame_lengths(lengths, sample_rate, codes))

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, Q, F) -> wave (B, F * hop) at ``sample_rate`` (fewer than Q levels decode too)."""
        self.check_codes(codes)
        z = self.quantizer.decode(codes.to(self._device()))
        return self.decoder(z)[:, 0].cpu()

    def forward(self, wave: torch.Tensor) -> CodecOutput:
        """Training pass: (B, T) float at ``sample_rate`` -> reconstruction, codes, quantizer loss."""
        q = self.quantizer(self.encoder(wave[:, None]))
        return CodecOutput(self.decoder(q.quantized)[:, 0], q.codes, q.loss)

    def _device(self) -> torch.device:
        return next(self.parameters()).device


__all__ = [
    "SeanetConfig", "WaveCodecConfig", "WaveCodec", "CodecOutput", "EuclideanRVQ", "VQPQuantizer", "SeanetEncoder",
    "SeanetDecoder", "SConv1d", "SConvTranspose1d", "KIND",
]

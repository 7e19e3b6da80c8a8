"""Mel-spectrogram audio tokenizer: log-mel -> conv encoder -> residual VQ -> conv decoder -> log-mel -> Griffin-Lim.

Why mel and not waveform: on 2 CPU cores a waveform codec spends its minutes learning phase, which speech
recognition (and the LM downstream) does not need. A mel autoencoder trains ~5x faster per step, and
Griffin-Lim recovers an intelligible waveform from magnitudes without any training (measured in
docs/BENCHMARKS.md, "Audio tokenizer"). The waveform codec (``audio_codec.py``) is the alternative.

Pipeline (``encode`` / ``decode`` honour ``anyloom.tokenizers.base.AudioTokenizer``)::

    wave (B, T) --STFT |.|, mel filterbank, log--> mel (B, M, F_mel) --normalise (per-bin mean/std)-->
    encoder (conv, optional stride ``downsample``) --> z (B, D, F) --ResidualVQ--> codes (B, Q, F)
    codes --lookup--> z_q --> decoder --> mel --> linear magnitude (least squares, >= 0) --Griffin-Lim--> wave

Axis legend: B batch, T samples, M mel bins, K linear-frequency bins, F code frames, D code dim,
Q codebooks (residual levels), C conv channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F_
from einops import rearrange
from torch import nn

from anyloom.tokenizers.audio_common import pad_to_multiple, prepare_wave
from anyloom.tokenizers.audio_module import AudioCodecModule
from anyloom.tokenizers.base import AudioCodes


@dataclass(frozen=True)
class MelFeatureConfig:
    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 320  # 50 mel frames per second at 16 kHz
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8000.0
    log_floor: float = 1e-2  # mel magnitudes below this (~80 dB under a loud vowel) read as silence (and int16 dither)
    inverse_iters: int = 30  # mel -> linear: multiplicative NNLS (KL) updates after the pseudo-inverse

    def __post_init__(self) -> None:
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length {self.win_length} > n_fft {self.n_fft}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= sample_rate/2, got {self.f_min}, {self.f_max}")


@dataclass(frozen=True)
class MelTokenizerConfig:
    features: MelFeatureConfig = field(default_factory=MelFeatureConfig)
    downsample: int = 1  # mel frames per code frame: 1 -> 50 Hz codes, 2 -> 25 Hz
    channels: int = 256
    res_blocks: int = 3  # residual conv blocks in the encoder and in the decoder
    code_dim: int = 64
    num_codebooks: int = 4
    codebook_size: int = 1024
    commitment_weight: float = 0.25
    ema_decay: float = 0.95  # codebook EMA; lower adapts faster, which short CPU runs need
    kmeans_init: bool = True
    dead_code_threshold: int = 2  # codes used fewer times per batch are re-seeded from the batch
    quantizer_dropout: bool = False  # train with a random number of levels (variable bitrate)
    griffin_lim_iters: int = 48
    griffin_lim_momentum: float = 0.99  # "fast Griffin-Lim" (Perraudin et al. 2013)

    def __post_init__(self) -> None:
        for name in ("downsample", "channels", "code_dim", "num_codebooks", "codebook_size", "griffin_lim_iters"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def tokens_per_second(self) -> float:
        f = self.features
        return self.num_codebooks * f.sample_rate / (f.hop_length * self.downsample)


def mel_filterbank(cfg: MelFeatureConfig) -> torch.Tensor:
    """(K, M) triangular filters on the HTK mel scale, K = n_fft // 2 + 1 (no area normalisation)."""
    n_freqs = cfg.n_fft // 2 + 1
    freqs = np.linspace(0, cfg.sample_rate / 2, n_freqs)

    def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    mel_points = np.linspace(hz_to_mel(cfg.f_min), hz_to_mel(cfg.f_max), cfg.n_mels + 2)
    hz_points = 700.0 * (10 ** (mel_points / 2595.0) - 1.0)
    lower, centre, upper = hz_points[:-2], hz_points[1:-1], hz_points[2:]
    rising = (freqs[:, None] - lower[None]) / (centre - lower)[None]
    falling = (upper[None] - freqs[:, None]) / (upper - centre)[None]
    fb = np.clip(np.minimum(rising, falling), 0.0, None)
    return torch.from_numpy(fb.astype(np.float32))


class MelFeatures(nn.Module):
    """Waveform <-> log-mel magnitudes; the inverse is least squares + Griffin-Lim (no parameters)."""

    def __init__(self, cfg: MelFeatureConfig):
        super().__init__()
        self.cfg = cfg
        fb = mel_filterbank(cfg)
        self.register_buffer("fb", fb, persistent=False)  # (K, M)
        self.register_buffer("fb_pinv", torch.linalg.pinv(fb.double()).float(), persistent=False)  # (M, K)
        self.register_buffer("window", torch.hann_window(cfg.win_length), persistent=False)

    def _stft(self, wave: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return torch.stft(
            wave, c.n_fft, c.hop_length, c.win_length, self.window, center=True, pad_mode="constant",
            return_complex=True,
        )  # (B, K, T // hop + 1)

    def _istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        c = self.cfg
        return torch.istft(spec, c.n_fft, c.hop_length, c.win_length, self.window, center=True, length=length)

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, T) with T a multiple of hop_length -> (B, M, T // hop_length) natural-log mel magnitudes."""
        if wave.shape[-1] % self.cfg.hop_length:
            raise ValueError(f"wave length {wave.shape[-1]} is not a multiple of hop {self.cfg.hop_length}")
        mag = self._stft(wave).abs()[..., :-1]  # drop the frame centred past the end: F = T / hop
        mel = torch.einsum("bkf,km->bmf", mag, self.fb)
        return torch.log(mel.clamp_min(self.cfg.log_floor))

    def to_linear(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(B, M, F) log-mel -> (B, K, F) non-negative linear magnitudes whose mel matches ``log_mel``.

        The clamped pseudo-inverse alone misses the target mel by ~0.19 nats (mean |log error|); KL
        multiplicative updates (Lee & Seung) from it stay non-negative and bring that to ~0.001 in 30 steps.
        """
        mel = log_mel.exp()
        lin = torch.einsum("bmf,mk->bkf", mel, self.fb_pinv).clamp_min(1e-4)  # zeros could never grow back
        column_mass = self.fb.sum(dim=1)[None, :, None] + 1e-9  # (1, K, 1)
        for _ in range(self.cfg.inverse_iters):
            ratio = mel / (torch.einsum("bkf,km->bmf", lin, self.fb) + 1e-9)
            lin = lin * torch.einsum("bmf,km->bkf", ratio, self.fb) / column_mass
        return lin

    def griffin_lim(self, mag: torch.Tensor, iters: int, momentum: float, seed: int = 0) -> torch.Tensor:
        """(B, K, F) magnitudes -> (B, F * hop) wave. Seeded initial phase, so decoding is deterministic."""
        hop = self.cfg.hop_length
        length = mag.shape[-1] * hop
        # one extra frame (a copy of the last) so that every output sample is covered by F + 1 frames
        mag = torch.cat([mag, mag[..., -1:]], dim=-1)  # (B, K, F + 1)
        g = torch.Generator(device="cpu").manual_seed(seed)
        phase = torch.rand(mag.shape, generator=g).to(mag.device) * 2 * math.pi
        angles = torch.polar(torch.ones_like(mag), phase)
        previous = torch.zeros_like(angles)
        for _ in range(iters):
            rebuilt = self._stft(self._istft(mag * angles, length))
            angles = rebuilt - previous * (momentum / (1 + momentum))
            angles = angles / (angles.abs() + 1e-16)
            previous = rebuilt
        return self._istft(mag * angles, length)


class ResBlock(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F_.gelu(self.conv1(F_.gelu(x))))


class MelEncoder(nn.Module):
    def __init__(self, cfg: MelTokenizerConfig):
        super().__init__()
        c, d = cfg.channels, cfg.downsample
        layers: list[nn.Module] = [nn.Conv1d(cfg.features.n_mels, c, 5, padding=2)]
        layers += [ResBlock(c, 3**i) for i in range(cfg.res_blocks)]
        if d > 1:  # strided conv: d mel frames -> one code frame
            layers += [nn.GELU(), nn.Conv1d(c, c, 2 * d, stride=d, padding=d // 2)]
        layers += [nn.GELU(), nn.Conv1d(c, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.net(mel)  # (B, M, F * d) -> (B, D, F)


class MelDecoder(nn.Module):
    def __init__(self, cfg: MelTokenizerConfig):
        super().__init__()
        c, d = cfg.channels, cfg.downsample
        layers: list[nn.Module] = [nn.Conv1d(cfg.code_dim, c, 3, padding=1)]
        if d > 1:
            layers += [nn.GELU(), nn.ConvTranspose1d(c, c, 2 * d, stride=d, padding=d // 2)]
        layers += [ResBlock(c, 3**i) for i in range(cfg.res_blocks)]
        layers += [nn.GELU(), nn.Conv1d(c, cfg.features.n_mels, 5, padding=2)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (B, D, F) -> (B, M, F * d)


@dataclass
class MelAutoencoderOutput:
    recon: torch.Tensor  # (B, M, F * d) normalised log-mel
    codes: torch.Tensor  # (B, Q, F)
    commit_loss: torch.Tensor  # scalar, summed over levels


KIND = "anyloom.mel_rvq"


class MelTokenizer(AudioCodecModule):
    """A trained mel RVQ tokenizer; implements ``AudioTokenizer`` (encode/decode) and save/load."""

    KIND = KIND
    CONFIG = MelTokenizerConfig

    def __init__(self, cfg: MelTokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.features = MelFeatures(cfg.features)
        n = cfg.features.n_mels
        # per-bin statistics of the training data's log-mel, fitted once before training
        self.register_buffer("mel_mean", torch.zeros(n))
        self.register_buffer("mel_std", torch.ones(n))
        self.encoder = MelEncoder(cfg)
        self.decoder = MelDecoder(cfg)
        from vector_quantize_pytorch import ResidualVQ  # seconds to import: only when a model is built

        self.quantizer = ResidualVQ(
            dim=cfg.code_dim,
            num_quantizers=cfg.num_codebooks,
            codebook_size=cfg.codebook_size,
            decay=cfg.ema_decay,
            kmeans_init=cfg.kmeans_init,
            kmeans_iters=10,
            threshold_ema_dead_code=cfg.dead_code_threshold,
            commitment_weight=cfg.commitment_weight,
            quantize_dropout=cfg.quantizer_dropout,
            quantize_dropout_cutoff_index=1 if cfg.quantizer_dropout else 0,
        )

    # -- the AudioTokenizer contract ------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.cfg.features.sample_rate

    @property
    def samples_per_frame(self) -> int:
        return self.cfg.features.hop_length * self.cfg.downsample

    @torch.inference_mode()
    def encode(self, wave: torch.Tensor, sample_rate: int, lengths: torch.Tensor | None = None) -> AudioCodes:
        """wave (B, T) / (B, C, T), int16 or float -> codes (B, Q, F). ``lengths``: valid input samples per item."""
        prepared = prepare_wave(wave, sample_rate, self.sample_rate, min_samples=self.samples_per_frame)
        device = self.mel_mean.device
        w = pad_to_multiple(prepared.wave.to(device), self.samples_per_frame)  # (B, T')
        z = self.encoder(self.normalize(self.features.log_mel(w)))  # (B, D, F)
        codes = self.quantize(z)
        return AudioCodes(codes=codes.cpu(), lengths=self.frame_lengths(lengths, sample_rate, codes))

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, Q, F) -> wave (B, F * samples_per_frame) at ``sample_rate``."""
        log_mel = self.decode_mel(codes)
        mag = self.features.to_linear(log_mel)
        wave = self.features.griffin_lim(mag, self.cfg.griffin_lim_iters, self.cfg.griffin_lim_momentum)
        return wave.clamp(-1.0, 1.0).cpu()

    # -- pieces used by training and evaluation ------------------------------------------------------
    def normalize(self, log_mel: torch.Tensor) -> torch.Tensor:
        return (log_mel - self.mel_mean[:, None]) / self.mel_std[:, None]

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mel_std[:, None] + self.mel_mean[:, None]

    def fit_normalization(self, log_mel: torch.Tensor) -> None:
        """Set the per-bin statistics from (N, M, F) training log-mels (before training)."""
        flat = rearrange(log_mel, "n m f -> m (n f)")
        self.mel_mean.copy_(flat.mean(dim=1))
        self.mel_std.copy_(flat.std(dim=1).clamp_min(1e-3))

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, F) -> codes (B, Q, F) int64 with every level."""
        _, indices, _ = self.quantizer(rearrange(z, "b d f -> b f d"))
        return rearrange(indices, "b f q -> b q f").long()

    def decode_mel(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, Q, F) -> log-mel (B, M, F * downsample) (not normalised)."""
        self._check_codes(codes)
        codes = codes.to(self.mel_mean.device)
        z = self.quantizer.get_output_from_indices(rearrange(codes, "b q f -> b f q"))  # (B, F, D)
        return self.denormalize(self.decoder(rearrange(z, "b f d -> b d f")))

    def forward(self, mel_norm: torch.Tensor) -> MelAutoencoderOutput:
        """Training pass on normalised log-mel (B, M, F * downsample)."""
        z = self.encoder(mel_norm)
        quantized, indices, losses = self.quantizer(rearrange(z, "b d f -> b f d"))
        recon = self.decoder(rearrange(quantized, "b f d -> b d f"))
        return MelAutoencoderOutput(recon, rearrange(indices, "b f q -> b q f"), losses.sum())

    def _check_codes(self, codes: torch.Tensor) -> None:
        self.check_codes(codes, min_levels=self.num_codebooks)


__all__ = ["MelFeatureConfig", "MelTokenizerConfig", "MelFeatures", "MelTokenizer", "MelAutoencoderOutput", "KIND"]

"""Multi-scale STFT discriminator (EnCodec's MS-STFTD) and its losses, for training the waveform codec.

EnCodec (Défossez et al. 2022, section 3.4) judges a waveform by several 2-D conv stacks, one per STFT
resolution, each reading the complex spectrogram as two channels (real, imaginary): the real/imaginary split
lets it see phase, which a magnitude loss cannot. The codec is trained against it with

- an adversarial loss: hinge (EnCodec) ``mean relu(1 - D_k(x_hat))`` or least squares ``mean (1 - D_k(x_hat))^2``,
  averaged over the K scales;
- feature matching: ``1/(K L) sum_k sum_l |D_k^l(x) - D_k^l(x_hat)|_1 / mean |D_k^l(x)|``, i.e. the L1 distance
  of every intermediate feature map, normalised per layer by the real map's mean magnitude (the paper's
  formula), so that every layer counts alike whatever its scale.

The discriminator is training-only state: the training loop saves it in its checkpoints (so that a run resumes
with it) and never in the exported tokenizer. Fixed loss weights replace EnCodec's gradient balancer (not
implemented here).

Layout per scale (audiocraft's ``DiscriminatorSTFT``): a (3, 9) conv from the 2 spectrogram channels, three
(3, 9) convs with stride 2 along frequency and dilation 1, 2, 4 along time, a (3, 3) conv, then a (3, 3) conv
to one logit per (frame, frequency) cell. LeakyReLU(0.2) after every conv but the last; weight norm on all.

Axis legend: B batch, T samples, C channels, F STFT frames (time), W frequency bins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F_
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The recipe section ``audio_tokenizer.discriminator`` (kind ``seanet_codec`` only)."""

    enabled: bool = False
    n_ffts: tuple[int, ...] = (1024, 2048, 512)  # one sub-discriminator per resolution (EnCodec's three)
    hop_lengths: tuple[int, ...] = (256, 512, 128)  # n_fft / 4 each
    channels: int = 32  # conv width of every sub-discriminator
    kernel_size: tuple[int, int] = (3, 9)  # (time, frequency)
    time_dilations: tuple[int, ...] = (1, 2, 4)  # one frequency-strided conv per entry
    loss: Literal["hinge", "least_squares"] = "hinge"
    adversarial_weight: float = 1.0  # times the generator's adversarial loss, added to the reconstruction loss
    feature_weight: float = 1.0  # times the normalised feature-matching L1
    start_step: int = 200  # both the discriminator updates and the codec's adversarial terms start here
    lr: float = 3e-4  # EnCodec: Adam 3e-4, betas (0.5, 0.9), constant
    betas: tuple[float, float] = (0.5, 0.9)

    def __post_init__(self) -> None:
        if not self.n_ffts or len(self.n_ffts) != len(self.hop_lengths):
            raise ValueError(f"n_ffts {self.n_ffts} and hop_lengths {self.hop_lengths} must be non-empty and of "
                             "equal length (one hop per resolution)")
        for n, hop in zip(self.n_ffts, self.hop_lengths):
            if n < 4 or not 0 < hop <= n:
                raise ValueError(f"n_fft {n} with hop_length {hop}: expected n_fft >= 4 and 0 < hop <= n_fft")
        if self.channels <= 0 or min(self.kernel_size) <= 0 or not self.time_dilations:
            raise ValueError("channels and kernel_size must be > 0 and time_dilations non-empty")
        if self.adversarial_weight < 0 or self.feature_weight < 0 or self.lr <= 0 or self.start_step < 0:
            raise ValueError("adversarial_weight, feature_weight and start_step must be >= 0, lr > 0")

    @property
    def min_samples(self) -> int:
        """Shortest input every scale can frame (the STFT is not centred: no padding invents signal)."""
        return max(self.n_ffts)


@dataclass
class DiscriminatorOutput:
    logits: list[torch.Tensor]  # per scale: (B, 1, F, W') real-vs-fake scores
    features: list[list[torch.Tensor]]  # per scale, per layer: (B, C, F, W') activations (feature matching)


def _conv(c_in: int, c_out: int, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1),
          dilation: tuple[int, int] = (1, 1)) -> nn.Module:
    # "same" padding along both axes (strided axes then halve): audiocraft's get_2d_padding
    padding = ((kernel[0] - 1) * dilation[0] // 2, (kernel[1] - 1) * dilation[1] // 2)
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, dilation=dilation, padding=padding)
    return nn.utils.parametrizations.weight_norm(conv)


class STFTDiscriminator(nn.Module):
    """One resolution: complex STFT -> (real, imag) channels -> 2-D conv stack -> logits + feature maps."""

    def __init__(self, cfg: DiscriminatorConfig, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        k, c = cfg.kernel_size, cfg.channels
        convs = [_conv(2, c, k)]
        for d in cfg.time_dilations:
            convs.append(_conv(c, c, k, stride=(1, 2), dilation=(d, 1)))
        convs.append(_conv(c, c, (k[0], k[0])))
        self.convs = nn.ModuleList(convs)
        self.post = _conv(c, 1, (k[0], k[0]))

    def spectrogram(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, 2, F, W): real and imaginary parts, scaled by 1 / ||window|| (torchaudio's
        ``normalized=True``) so that the input scale does not depend on n_fft."""
        spec = torch.stft(wave, self.n_fft, self.hop_length, window=self.window, center=False, return_complex=True)
        spec = spec / self.window.pow(2).sum().sqrt()  # (B, W, F) complex
        return rearrange(torch.view_as_real(spec), "b w f c -> b c f w")

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.spectrogram(wave)
        features = []
        for conv in self.convs:
            x = F_.leaky_relu(conv(x), 0.2)
            features.append(x)
        return self.post(x), features  # (B, 1, F, W / 2**len(dilations))


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        self.scales = nn.ModuleList(
            STFTDiscriminator(cfg, n, hop) for n, hop in zip(cfg.n_ffts, cfg.hop_lengths)
        )

    def forward(self, wave: torch.Tensor) -> DiscriminatorOutput:
        """(B, T) float waveform, T >= cfg.min_samples -> per-scale logits and feature maps."""
        if wave.ndim != 2 or wave.shape[-1] < self.cfg.min_samples:
            raise ValueError(f"discriminator input must be (B, T) with T >= {self.cfg.min_samples} (the largest "
                             f"n_fft), got shape {tuple(wave.shape)}; lengthen train.crop_seconds or lower n_ffts")
        logits, features = [], []
        for scale in self.scales:
            out, feats = scale(wave)
            logits.append(out)
            features.append(feats)
        return DiscriminatorOutput(logits, features)


# -- losses ---------------------------------------------------------------------------------------------------
LossKind = Literal["hinge", "least_squares"]


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor], kind: LossKind) -> torch.Tensor:
    """Per-scale logits of real and (detached) fake audio -> the discriminator's loss, mean over scales.

    hinge: ``relu(1 - D(x)) + relu(1 + D(x_hat))`` (0 once real scores >= 1 and fake scores <= -1);
    least squares: ``(1 - D(x))^2 + D(x_hat)^2`` (0 at real = 1, fake = 0).
    """
    if len(real) != len(fake) or not real:
        raise ValueError(f"expected one logit map per scale for real and fake, got {len(real)} and {len(fake)}")
    total = real[0].new_zeros(())
    for r, f in zip(real, fake):
        if kind == "hinge":
            total = total + F_.relu(1 - r).mean() + F_.relu(1 + f).mean()
        else:
            total = total + (1 - r).pow(2).mean() + f.pow(2).mean()
    return total / len(real)


def generator_loss(fake: list[torch.Tensor], kind: LossKind) -> torch.Tensor:
    """Per-scale logits of generated audio -> the codec's adversarial loss, mean over scales.

    hinge (EnCodec): ``relu(1 - D(x_hat))``; least squares: ``(1 - D(x_hat))^2``. Both are 0 when the
    discriminator scores the reconstruction as real (>= 1, or = 1).
    """
    if not fake:
        raise ValueError("expected at least one logit map")
    per_scale = [F_.relu(1 - f).mean() if kind == "hinge" else (1 - f).pow(2).mean() for f in fake]
    return torch.stack(per_scale).mean()


def feature_matching_loss(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]],
                          eps: float = 1e-8) -> torch.Tensor:
    """Mean over scales and layers of ``mean |real - fake| / mean |real|`` (EnCodec's per-layer normalisation).

    The real maps are targets: they (and their normaliser) are detached, so only the codec learns from it.
    """
    if len(real) != len(fake) or not real:
        raise ValueError(f"expected feature maps for the same scales, got {len(real)} real and {len(fake)} fake")
    terms = []
    for k, (rs, fs) in enumerate(zip(real, fake)):
        if len(rs) != len(fs):
            raise ValueError(f"scale {k}: {len(rs)} real feature maps but {len(fs)} fake ones")
        for r, f in zip(rs, fs):
            if r.shape != f.shape:
                raise ValueError(f"scale {k}: feature shapes differ, real {tuple(r.shape)} vs fake {tuple(f.shape)}")
            r = r.detach()
            terms.append((f - r).abs().mean() / (r.abs().mean() + eps))
    return torch.stack(terms).mean()


__all__ = [
    "DiscriminatorConfig", "DiscriminatorOutput", "STFTDiscriminator", "MultiScaleSTFTDiscriminator",
    "discriminator_loss", "generator_loss", "feature_matching_loss",
]

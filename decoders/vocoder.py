"""A neural vocoder for log-mel spectrograms: mel frames -> STFT magnitude and phase -> inverse STFT.

The generator follows Vocos (Siuzdenko et al. 2023): a stack of ConvNeXt blocks runs at the mel frame rate and
predicts, per frame, a log magnitude and a phase for every STFT bin; ``torch.istft`` turns them into the wave. All
the work happens at 50 frames per second instead of 16,000 samples per second, and no transposed convolution
upsamples anything, which is why it is cheap on a CPU (much cheaper than Griffin-Lim's dozens of STFT round
trips) while it learns a phase that Griffin-Lim can only search for.

- Input: natural-log mel magnitudes ``(B, M, F)`` as :class:`~anyloom.tokenizers.audio_mel.MelFeatures` computes
  them (the mel tokenizer's ``decode_mel`` gives the same kind of frames). The vocoder stores the feature
  settings it was trained for, and a tokenizer refuses a vocoder whose settings differ.
- Output: ``(B, F * hop)`` samples, the same length Griffin-Lim gives for F frames.
- Phase: the head's second half is an angle (radians); the spectrum is ``exp(log_mag) * (cos + i sin)``.

Training lives in ``anyloom.training.vocoder``; the mel tokenizer uses a vocoder through
``MelTokenizer.use_vocoder``.

Axis legend: B batch, M mel bins, F frames, C channels, K STFT bins (n_fft // 2 + 1), T samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from anyloom.config import build, to_dict
from anyloom.tokenizers.audio_mel import MelFeatureConfig, MelTokenizer
from anyloom.weights import load_weights, save_weights

KIND = "anyloom.mel_vocoder"


@dataclass(frozen=True)
class VocoderConfig:
    channels: int = 192  # width of the ConvNeXt stack
    blocks: int = 6
    kernel_size: int = 7  # depthwise convolution over frames
    expansion: int = 3  # pointwise hidden width = expansion x channels
    n_fft: int = 1024  # of the inverse STFT; its hop is the mel features' hop_length
    max_log_magnitude: float = 7.0  # the predicted log magnitude is clamped here (exp(7) ~ 1100)

    def __post_init__(self) -> None:
        for name in ("channels", "blocks", "kernel_size", "expansion"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-length convolution), got {self.kernel_size}")
        if self.n_fft < 4:
            raise ValueError(f"n_fft must be >= 4, got {self.n_fft}")


class ConvNeXtBlock(nn.Module):
    """Depthwise conv over frames -> LayerNorm -> pointwise MLP (GELU) -> layer scale -> residual."""

    def __init__(self, channels: int, kernel_size: int, expansion: int, layer_scale: float):
        super().__init__()
        self.dwconv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.up = nn.Linear(channels, expansion * channels)
        self.down = nn.Linear(expansion * channels, channels)
        self.scale = nn.Parameter(torch.full((channels,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, F)
        h = self.dwconv(x).transpose(1, 2)  # (B, F, C)
        h = self.down(nn.functional.gelu(self.up(self.norm(h))))
        return x + (self.scale * h).transpose(1, 2)


class MelVocoder(nn.Module):
    """log-mel (B, M, F) -> wave (B, F * hop). ``save`` / ``load`` use model.safetensors + config.json."""

    KIND = KIND

    def __init__(self, cfg: VocoderConfig, features: MelFeatureConfig):
        super().__init__()
        if cfg.n_fft < features.hop_length:
            raise ValueError(f"vocoder n_fft {cfg.n_fft} is shorter than the mel hop {features.hop_length}: frames "
                             "would leave gaps")
        self.cfg = cfg
        self.features = features  # the mel frames it reads (bins, hop, rate)
        c = cfg.channels
        self.embed = nn.Conv1d(features.n_mels, c, cfg.kernel_size, padding=cfg.kernel_size // 2)
        self.embed_norm = nn.LayerNorm(c)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(c, cfg.kernel_size, cfg.expansion, layer_scale=1.0 / cfg.blocks) for _ in range(cfg.blocks)
        )
        self.out_norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, 2 * (cfg.n_fft // 2 + 1))
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)

    @property
    def sample_rate(self) -> int:
        return self.features.sample_rate

    def spectrum(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(B, M, F) -> complex STFT (B, K, F)."""
        if log_mel.ndim != 3 or log_mel.shape[1] != self.features.n_mels:
            raise ValueError(f"expected log-mel (B, {self.features.n_mels}, F), got {tuple(log_mel.shape)}")
        x = self.embed(log_mel).transpose(1, 2)
        x = self.embed_norm(x).transpose(1, 2)  # (B, C, F)
        for block in self.blocks:
            x = block(x)
        out = self.head(self.out_norm(x.transpose(1, 2))).transpose(1, 2)  # (B, 2K, F)
        log_mag, angle = out.chunk(2, dim=1)
        mag = log_mag.clamp(max=self.cfg.max_log_magnitude).exp()
        return torch.polar(mag, angle)

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(B, M, F) -> (B, F * hop) float wave (not clamped: training sees the raw output)."""
        spec = self.spectrum(log_mel.float())
        frames = spec.shape[-1]
        spec = torch.cat([spec, spec[..., -1:]], dim=-1)  # one more frame: every sample of F * hop is covered
        return torch.istft(spec, self.cfg.n_fft, self.features.hop_length, self.cfg.n_fft, self.window, center=True,
                           length=frames * self.features.hop_length)

    @torch.inference_mode()
    def vocode(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Inference: (B, M, F) -> (B, F * hop) in [-1, 1] on the CPU."""
        return self(log_mel.to(self.window.device)).clamp(-1.0, 1.0).cpu()

    def check_features(self, features: MelFeatureConfig, where: str = "the tokenizer") -> None:
        """Refuse mel frames computed with other settings than the ones this vocoder learned from."""
        mine, theirs = to_dict(self.features), to_dict(features)
        diff = {k: (mine[k], theirs.get(k)) for k in mine if k != "inverse_iters" and mine[k] != theirs.get(k)}
        if diff:
            detail = ", ".join(f"{k}: vocoder {a} vs {b}" for k, (a, b) in diff.items())
            raise ValueError(f"the vocoder was trained on other mel features than {where}'s ({detail})")

    def save(self, folder: str | Path, metadata: dict[str, str] | None = None) -> Path:
        config = {"kind": KIND, "config": to_dict(self.cfg), "features": to_dict(self.features)}
        return save_weights(folder, self.state_dict(), config, metadata=metadata)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> MelVocoder:
        saved = load_weights(folder, device)
        if saved.config.get("kind") != KIND:
            raise ValueError(f"{folder}: config.json kind is {saved.config.get('kind')!r}, expected {KIND!r}")
        where = f"{folder}/config.json"
        model = cls(build(VocoderConfig, saved.config.get("config"), prefix=f"{where} config"),
                    build(MelFeatureConfig, saved.config.get("features"), prefix=f"{where} features"))
        model.load_state_dict(saved.state_dict, strict=True)
        return model.to(device).eval()


class VocodedMelTokenizer:
    """A mel tokenizer whose ``decode`` goes through a neural vocoder instead of Griffin-Lim.

    It honours the ``AudioTokenizer`` contract by delegation: ``encode`` and the properties are the tokenizer's,
    so codes are the same; only the last step of ``decode`` (mel frames -> wave) changes.
    """

    def __init__(self, tokenizer: MelTokenizer, vocoder: MelVocoder):
        vocoder.check_features(tokenizer.cfg.features)
        self.tokenizer = tokenizer
        self.vocoder = vocoder

    def __getattr__(self, name: str):  # sample_rate, frame_rate, num_codebooks, codebook_size, encode, ...
        if name in ("tokenizer", "vocoder"):  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, Q, F) -> wave (B, F * samples_per_frame) in [-1, 1]."""
        return self.vocoder.vocode(self.tokenizer.decode_mel(codes))


__all__ = ["KIND", "VocoderConfig", "MelVocoder", "ConvNeXtBlock", "VocodedMelTokenizer"]

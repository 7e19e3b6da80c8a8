"""What every audio tokenizer module here shares, written once: the ``AudioTokenizer`` contract's geometry,
the check every ``decode`` makes on its codes, frame counts for zero-padded batches, and persistence.

Subclasses (``MelTokenizer``, ``WaveCodec``, ``DacCodec``, ``MimiCodec``) set ``KIND`` (the ``kind`` in
config.json that ``tokenizers.registry`` dispatches on) and ``CONFIG`` (their config dataclass),
keep their config in ``self.cfg``, and override ``sample_rate`` / ``samples_per_frame`` where their config
names them differently. Saved folders are ``model.safetensors`` + ``config.json`` (anyloom.weights).

Axis legend: B batch, Q codebooks, F frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from anyloom.config import build, to_dict
from anyloom.weights import load_weights, save_weights


class AudioCodecModule(nn.Module):
    KIND: ClassVar[str]
    CONFIG: ClassVar[type]
    cfg: Any

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def samples_per_frame(self) -> int:
        return self.cfg.hop_length

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.samples_per_frame

    @property
    def num_codebooks(self) -> int:
        return self.cfg.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def check_codes(self, codes: torch.Tensor, min_levels: int = 1) -> None:
        """codes must be (B, q, F) with ``min_levels <= q <= num_codebooks`` and every id in [0, codebook_size)."""
        if codes.ndim != 3 or not min_levels <= codes.shape[1] <= self.num_codebooks:
            top = self.num_codebooks
            levels = str(top) if min_levels == top else f"{min_levels}..{top}"
            raise ValueError(f"codes must be (B, {levels}, F), got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes out of range [0, {self.codebook_size}): min {int(codes.min())}, max {int(codes.max())}"
            )

    def frame_lengths(self, lengths: torch.Tensor | None, sample_rate: int, codes: torch.Tensor) -> torch.Tensor:
        """Real frames per item (B,) of ``codes`` (B, Q, F) encoded from a batch whose item i had ``lengths[i]``
        valid samples at ``sample_rate`` (None: every frame is real)."""
        frames = codes.shape[-1]
        if lengths is None:
            return torch.full((codes.shape[0],), frames, dtype=torch.long)
        scaled = torch.as_tensor(lengths, dtype=torch.float64) * self.sample_rate / sample_rate
        return torch.ceil(scaled / self.samples_per_frame).long().clamp(1, frames)

    def save(self, folder: str | Path, metadata: dict[str, str] | None = None) -> Path:
        return save_weights(folder, self.state_dict(), {"kind": self.KIND, "config": to_dict(self.cfg)},
                            metadata=metadata)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Any:
        saved = load_weights(folder, device)
        if saved.config.get("kind") != cls.KIND:
            raise ValueError(f"{folder}: config.json kind is {saved.config.get('kind')!r}, expected {cls.KIND!r}")
        model = cls(build(cls.CONFIG, saved.config["config"], prefix="config"))
        model.load_state_dict(saved.state_dict)
        return model.to(device).eval()


__all__ = ["AudioCodecModule"]

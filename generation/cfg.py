"""Classifier-free guidance for image and audio spans (Chameleon / LlamaGen style).

The conditional prompts and their unconditional twins (the condition dropped, as in training with condition
dropout) run as one batch of 2B rows: rows [0, B) conditional, rows [B, 2B) unconditional. Each step the
guided logits ``cond + (scale - 1) * (cond - uncond)`` replace the conditional ones, with a scale chosen per
row by its current modality (text keeps scale 1: guidance is for image and audio spans). The sampled token is
fed to both twins, so both caches follow the same stream.

Writing the mix as ``cond + (s - 1) * (cond - uncond)`` (instead of ``uncond + s * (cond - uncond)``) makes
scale 1 reproduce the unguided logits bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anyloom.generation.sampling import AUDIO, IMAGE, TEXT


@dataclass(frozen=True)
class GuidanceConfig:
    image_scale: float = 1.0  # 1 = no guidance
    audio_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("image_scale", "audio_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return self.image_scale != 1.0 or self.audio_scale != 1.0

    def scales(self, device: torch.device) -> torch.Tensor:
        """(3,) indexed by TEXT / IMAGE / AUDIO."""
        table = torch.ones(3, dtype=torch.float32, device=device)
        table[IMAGE] = self.image_scale
        table[AUDIO] = self.audio_scale
        table[TEXT] = 1.0
        return table


def guide(logits: torch.Tensor, modality: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """logits (2B, V) [cond; uncond], modality (B,) of the next token, scales (3,) -> guided (B, V)."""
    cond, uncond = logits.float().chunk(2, dim=0)  # (B, V) each
    scale = scales[modality][:, None]  # (B, 1)
    return cond + (scale - 1.0) * (cond - uncond)

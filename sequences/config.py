"""The recipe's ``sequences`` section: span layout, task mixture and pre-tokenization settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from anyloom.sequences.mixture import MixtureConfig
from anyloom.sequences.pretokenize import PretokenizeConfig


@dataclass(frozen=True)
class SequenceConfig:
    image_row_end: bool = False  # a <row_end> token after each row of image codes (Emu3 / Lumina-mGPT)
    audio_pattern: Literal["flat", "delay"] = "flat"  # audio span layout: frame-major, or MusicGen's delay pattern
    # modalities whose condition spans attention reads bidirectionally (prefix-LM); [] = all causal. Saved in the
    # vocabulary (anyloom.sequences.vocab), so generation reads prompts the way training read conditions
    bidirectional: tuple[Literal["image", "audio"], ...] = ()
    mixture: MixtureConfig = field(default_factory=MixtureConfig)  # task templates and condition dropout
    pretokenize: PretokenizeConfig = field(default_factory=PretokenizeConfig)  # shard size, encode batch size


__all__ = ["SequenceConfig"]

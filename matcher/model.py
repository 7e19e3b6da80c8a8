"""An image-text matcher: a small contrastive model (CLIP-style) that scores how well a picture shows a text.

Why it exists: text->image samples several pictures per prompt and keeps one. The LM's own reverse direction
(log p(prompt | picture), ``generation/rerank.py``) reads a malformed object as the prompt's; a separate
discriminative model that looks at the decoded *pixels* has other blind spots, and picks better (measured in
docs/experiments/2026-11-27-image-matcher.md). It is trained in the chain's ``image_matcher`` stage
(``anyloom.training.matcher``) on the training split's pictures as the image tokenizer reconstructs them, the
pictures generation produces.

- image side: pixels (B, 3, H, W) in [-1, 1] -> a 2x2 space-to-depth stem -> 3x3 convs (BatchNorm, SiLU), the
  last two strided -> flattened (a count needs the layout, not a pooled average) -> MLP -> unit vector;
- text side: the text tokenizer's ids -> embeddings + learned positions, averaged over the real tokens -> MLP ->
  unit vector;
- score: the cosine times a learned scale (``similarity``), the logit the contrastive loss trained.
- optional head (``head``): a plug-in's extra reader of the same pictures (``MatcherHead`` below; e.g. the world's
  region head, ``anyloom.world.regions``), trained in the matcher's steps on its own parameters and saved with it.

Axis legend: B images, T texts (or T = B when paired), L text length, D embedding width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from anyloom.config import ConfigError, added_field, build, to_dict
from anyloom.plugins import load_plugin
from anyloom.weights import load_weights, save_weights

KIND = "image_text_matcher"
HEAD_GROUP = "anyloom.matcher_heads"  # the entry point group of matcher heads (anyloom/plugins.py)


@dataclass(frozen=True)
class MatcherConfig:
    image_size: tuple[int, int] = (32, 32)  # (H, W): the image tokenizer's; divisible by 8
    channels: tuple[int, int, int] = (32, 64, 128)  # conv widths at H/2, H/4, H/8
    hidden: int = 256  # the image MLP's hidden width
    dim: int = 128  # the shared embedding width
    text_vocab: int = 512  # the text tokenizer's vocabulary size
    max_text_tokens: int = 32  # longer texts are cut (the matcher reads captions and names)
    # the cosines' scale in the loss: 0 = learned (from e^2.5); > 0 = fixed at this value (a low one keeps the loss
    # from pushing every cosine of a caption's pictures to the ceiling, docs/experiments/2026-11-27-image-matcher.md)
    logit_scale: float = added_field(0.0)

    def __post_init__(self) -> None:
        h, w = self.image_size
        if h % 8 or w % 8 or h <= 0 or w <= 0:
            raise ValueError(f"image_size must be positive multiples of 8, got {tuple(self.image_size)}")
        if len(self.channels) != 3 or min(self.channels) <= 0:
            raise ValueError(f"channels must be three positive widths, got {tuple(self.channels)}")
        for name in ("hidden", "dim", "text_vocab", "max_text_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.logit_scale < 0:
            raise ValueError(f"logit_scale must be 0 (learned) or > 0 (fixed), got {self.logit_scale}")


class MatcherHead(nn.Module):
    """The contract of a matcher head: an extra reader of the matcher's pictures that a plug-in brings (registered
    in the entry point group ``anyloom.matcher_heads``; a recipe names it in ``image_matcher.head``).

    - ``Config``: its typed options, a frozen dataclass (the recipe's head section less ``name``, and whatever the
      head's trainer completes from the training data);
    - ``__init__(config)``: its nets. The matcher builds it after its own nets, so the global nets' initial weights
      are the same with or without a head;
    - ``trainer(config, train, val, seed, where)``, a classmethod: its training side, an
      ``anyloom.training.matcher.HeadTrainer`` (what it adds to each step's loss, what it reports on validation).

    It is saved in the matcher's safetensors file (parameters ``head.*``); config.json records its name and config.
    """

    Config: ClassVar[type]


@dataclass(frozen=True)
class HeadSpec:
    name: str  # the plug-in's entry point name (anyloom.matcher_heads)
    config: Any  # its typed options: an instance of the plug-in's ``Config``


def head_class(name: str, where: str = "") -> type[MatcherHead]:
    """The matcher head registered as ``name``; an unknown name fails with the known ones."""
    return load_plugin(HEAD_GROUP, name, where=where)


def head_spec(section: dict[str, Any] | None, where: str = "head") -> HeadSpec | None:
    """A head section ``{name: <plug-in>, <its options>...}`` (a recipe's or a saved config.json's) -> its typed
    spec (None for no section). An unknown name or option fails naming it (``where`` prefixes the key)."""
    if section is None:
        return None
    options = dict(section)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"missing required value '{where}.name' (str): the head's plug-in "
                          f"({HEAD_GROUP}), got {name!r}")
    cls = head_class(name, where=f"{where}.name")
    return HeadSpec(name, build(cls.Config, options, prefix=where))


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.SiLU())


class ImageTextMatcher(nn.Module):
    def __init__(self, cfg: MatcherConfig, head: HeadSpec | None = None):
        super().__init__()
        self.cfg = cfg
        self.head_spec = head
        c1, c2, c3 = cfg.channels
        h, w = cfg.image_size
        self.image_net = nn.Sequential(
            nn.PixelUnshuffle(2), _conv(12, c1, 1), _conv(c1, c2, 2), _conv(c2, c3, 2), nn.Flatten(),
            nn.Linear(c3 * (h // 8) * (w // 8), cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.dim),
        )
        self.token_emb = nn.Embedding(cfg.text_vocab, cfg.dim)
        self.text_pos = nn.Parameter(torch.zeros(cfg.max_text_tokens, cfg.dim))
        self.text_net = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        fixed = cfg.logit_scale > 0
        start = math.log(cfg.logit_scale) if fixed else 2.5  # e^2.5 ~ 12: a usual starting scale when it is learned
        self.log_scale = nn.Parameter(torch.tensor(start), requires_grad=not fixed)
        # last: its initial weights draw after the global nets' (which are then the same with or without it)
        self.head: MatcherHead | None = head_class(head.name)(head.config) if head is not None else None

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) floats in [-1, 1] -> (B, D) unit vectors."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != tuple(self.cfg.image_size):
            raise ValueError(f"images must be (B, 3, {self.cfg.image_size[0]}, {self.cfg.image_size[1]}), "
                             f"got {tuple(images.shape)}")
        return F.normalize(self.image_net(images), dim=-1)

    def text_batch(self, texts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-id lists -> (T, L) ids and a (T, L) mask of real tokens (cut at max_text_tokens)."""
        cut = [list(t)[: self.cfg.max_text_tokens] for t in texts]
        if any(not t for t in cut):
            raise ValueError("the matcher got an empty text: every text needs at least one token")
        bad = [i for t in cut for i in t if not 0 <= i < self.cfg.text_vocab]
        if bad:
            raise ValueError(f"text token id {bad[0]} is outside the matcher's vocabulary 0..{self.cfg.text_vocab - 1}")
        length = max(len(t) for t in cut)
        ids = torch.zeros(len(cut), length, dtype=torch.long)
        mask = torch.zeros(len(cut), length, dtype=torch.bool)
        for row, t in enumerate(cut):
            ids[row, : len(t)] = torch.as_tensor(t)
            mask[row, : len(t)] = True
        device = self.text_pos.device
        return ids.to(device), mask.to(device)

    def encode_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(T, L) ids + mask -> (T, D) unit vectors."""
        x = self.token_emb(ids) + self.text_pos[: ids.shape[1]]  # (T, L, D)
        m = mask.unsqueeze(-1).to(x.dtype)
        return F.normalize(self.text_net((x * m).sum(1) / m.sum(1)), dim=-1)

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """(B, D) x (T, D) -> (B, T) scaled cosines."""
        return self.log_scale.exp() * image_emb @ text_emb.T

    @torch.no_grad()
    def similarity(self, images: torch.Tensor | np.ndarray, texts: Sequence[Sequence[int]],
                   batch_size: int = 512) -> torch.Tensor:
        """Paired scores: image i against text i, (B,) floats (higher = a better match).

        ``images``: (B, H, W, 3) uint8 or (B, 3, H, W) floats in [-1, 1].
        """
        x = to_unit(images).to(self.text_pos.device)
        if len(x) != len(texts):
            raise ValueError(f"similarity pairs images with texts: got {len(x)} images and {len(texts)} texts")
        was = self.training
        self.eval()
        ids, mask = self.text_batch(texts)
        t = self.encode_texts(ids, mask)
        i = torch.cat([self.encode_images(x[s : s + batch_size]) for s in range(0, len(x), batch_size)])
        self.train(was)
        return (self.log_scale.exp() * (i * t).sum(-1)).float().cpu()

    def save(self, folder: str | Path, metadata: dict[str, str] | None = None) -> Path:
        config = {"kind": KIND, **to_dict(self.cfg)}
        if self.head_spec is not None:
            config["head"] = {"name": self.head_spec.name, **to_dict(self.head_spec.config)}
        return save_weights(folder, self.state_dict(), config, metadata=metadata)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> ImageTextMatcher:
        saved = load_weights(folder, device="cpu")
        config = dict(saved.config)
        if config.pop("kind", None) != KIND:
            raise ValueError(f"{folder}: config.json is not an image-text matcher's (kind {KIND!r})")
        where = f"{folder}/config.json"
        head = head_spec(config.pop("head", None), where=f"{where}:head")
        model = cls(build(MatcherConfig, config, prefix=where), head)
        model.load_state_dict(saved.state_dict)
        return model.to(device).eval()


def to_unit(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 (array or tensor) -> (B, 3, H, W) floats in [-1, 1]; float (B, 3, H, W) passes through."""
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (B, H, W, 3), got {tuple(x.shape)}")
        return rearrange(x.float() / 127.5 - 1.0, "b h w c -> b c h w")
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 pixels or floats in [-1, 1], got dtype {x.dtype}")
    return x.float()


__all__ = ["HEAD_GROUP", "HeadSpec", "ImageTextMatcher", "MatcherConfig", "MatcherHead", "head_class", "head_spec",
           "to_unit"]

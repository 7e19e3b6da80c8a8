"""An image-text matcher: a small contrastive model (CLIP-style) that scores how well a picture shows a text.

Why it exists: text->image samples several pictures per prompt and keeps one. The LM's own reverse direction
(log p(prompt | picture), ``generation/rerank.py``) reads a malformed object as the prompt's; a separate
discriminative model that looks at the decoded *pixels* has other blind spots, and picks better (measured in
docs/BENCHMARKS.md, "Session 14: the image matcher"). It is trained in the chain's ``image_matcher`` stage
(``anyloom.training.matcher``) on the training split's pictures as the image tokenizer reconstructs them, the
pictures generation produces.

- image side: pixels (B, 3, H, W) in [-1, 1] -> a 2x2 space-to-depth stem -> 3x3 convs (BatchNorm, SiLU), the
  last two strided -> flattened (a count needs the layout, not a pooled average) -> MLP -> unit vector;
- text side: the text tokenizer's ids -> embeddings + learned positions, averaged over the real tokens -> MLP ->
  unit vector;
- score: the cosine times a learned scale (``similarity``), the logit the contrastive loss trained.
- optional region head (``region_keys``, trained where the documents give object boxes and per-object labels in
  their ``meta``, e.g. the world's ``shape`` and ``color``): its own small fully convolutional net, one cell per
  4 x 4 pixels -> per cell an object/background logit and, per key, logits over the key's values.
  ``consistency`` reads it: for each key, the value the picture's object cells hold most, then the least sure
  object cell's log-probability of that value, summed over keys (0 = every object cell certain of one value; a
  picture with one object of another shape or colour among the rest scores far lower). It looks at each object
  where the global embedding above sums the whole picture, and needs no prompt.
  With ``region_contact`` the head also gives each cell a contact logit: two objects touching there (the world keeps
  objects >= 2 px apart; the LM sometimes draws two squares run together into one rectangle, which the judge then
  counts as one). It is trained on copy-paste pictures (``anyloom.training.matcher.touching_copies``: a document's
  object copied so it touches another) against the clean ones, and ``consistency`` adds log(1 - p) of the picture's
  most contact-like cell.
  ``region_colorblind`` keys (the world's ``shape``) are read by a second net of the same form that sees only each
  pixel's distance from the picture's background (``colorless``): a head that sees colour learns which shapes come
  in which colours, and reads a colour-shape pair held out of training (a red star) as unsure or as another shape.

Axis legend: B images, T texts (or T = B when paired), L text length, D embedding width, g x w region cells,
K a key's values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from anyloom.config import added_field, build, to_dict
from anyloom.weights import load_weights, save_weights

KIND = "image_text_matcher"


@dataclass(frozen=True)
class MatcherConfig:
    image_size: tuple[int, int] = (32, 32)  # (H, W): the image tokenizer's; divisible by 8
    channels: tuple[int, int, int] = (32, 64, 128)  # conv widths at H/2, H/4, H/8
    hidden: int = 256  # the image MLP's hidden width
    dim: int = 128  # the shared embedding width
    text_vocab: int = 512  # the text tokenizer's vocabulary size
    max_text_tokens: int = 32  # longer texts are cut (the matcher reads captions and names)
    # the cosines' scale in the loss: 0 = learned (from e^2.5); > 0 = fixed at this value (a low one keeps the loss
    # from pushing every cosine of a caption's pictures to the ceiling, docs/BENCHMARKS.md "Session 14")
    logit_scale: float = added_field(0.0)
    # the region head: meta keys labelling each object box (empty = no head), each key's values (class order)
    region_keys: tuple[str, ...] = added_field(())
    region_values: tuple[tuple[str, ...], ...] = added_field(())
    region_channels: int = added_field(64)
    # the region head's contact logit per cell (objects touching there); needs region_keys (the boxes' head)
    region_contact: bool = added_field(False)
    # region keys read by a colour-blind head: it sees each pixel's distance from the picture's background only, so
    # it cannot tie them to colours (the world's shape: colour-shape pairs held out of training are read as well)
    region_colorblind: tuple[str, ...] = added_field(())

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
        # region_values may be left empty in a recipe: the matcher stage fills them in from the training data
        if self.region_values and (len(self.region_keys) != len(self.region_values)
                                   or any(len(v) < 1 for v in self.region_values)):
            raise ValueError(f"region_values needs one non-empty list of values per region key, got "
                             f"{len(self.region_values)} for keys {tuple(self.region_keys)}")
        if self.region_channels <= 0:
            raise ValueError(f"region_channels must be > 0, got {self.region_channels}")
        if self.region_contact and not self.region_keys:
            raise ValueError("region_contact needs the region head: set region_keys too (the documents' meta keys "
                             "labelling each object box)")
        unknown = [k for k in self.region_colorblind if k not in self.region_keys]
        if unknown:
            raise ValueError(f"region_colorblind key {unknown[0]!r} is not one of region_keys "
                             f"{tuple(self.region_keys)}")


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.SiLU())


def _region_net(channels_in: int, c: int, heads: int) -> nn.Sequential:
    """A fully convolutional cell reader: 2x2 space-to-depth of ``channels_in / 4`` channels -> one cell per
    4 x 4 pixels -> ``heads`` logits per cell."""
    return nn.Sequential(nn.PixelUnshuffle(2), _conv(channels_in, c // 2, 1), _conv(c // 2, c, 2), _conv(c, c, 1),
                         _conv(c, c, 1), nn.Conv2d(c, heads, 1))


def colorless(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) in [0, 1]: each pixel's distance from the median colour of the
    picture's border (its background), over the picture's largest such distance. Object shapes stay; which colour
    they are does not."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values  # (B, 3)
    distance = (images - background[:, :, None, None]).norm(dim=1, keepdim=True)
    return distance / distance.flatten(1).amax(1).clamp(min=1e-3)[:, None, None, None]


class ImageTextMatcher(nn.Module):
    def __init__(self, cfg: MatcherConfig):
        super().__init__()
        self.cfg = cfg
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
        self.regions: nn.Sequential | None = None
        self.blind_regions: nn.Sequential | None = None
        # each region key's number of values, split by which net reads it (region_keys order within each)
        self._seeing = [len(v) for k, v in zip(cfg.region_keys, cfg.region_values) if k not in cfg.region_colorblind]
        self._blind = [len(v) for k, v in zip(cfg.region_keys, cfg.region_values) if k in cfg.region_colorblind]
        if cfg.region_keys:
            if not cfg.region_values:
                raise ValueError(f"region keys {tuple(cfg.region_keys)} without their values: a matcher with a "
                                 "region head is built by the image_matcher stage (which reads them from the data)")
            c = cfg.region_channels
            # object logit + each colour-seeing key's values (+ the contact logit)
            self.regions = _region_net(12, c, 1 + sum(self._seeing) + int(cfg.region_contact))
            # the colour-blind keys' values, from the one-channel distance map (colorless)
            self.blind_regions = _region_net(4, c, sum(self._blind)) if self._blind else None

    def region_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """(B, 3, H, W) in [-1, 1] -> object logits (B, g, w), per region key value logits (B, K, g, w), and the
        contact logits (B, g, w) (None without ``region_contact``)."""
        if self.regions is None:
            raise ValueError("this matcher has no region head (trained without region_keys)")
        cfg = self.cfg
        out = self.regions(images)
        obj, *seen = torch.split(out, [1, *self._seeing, *([1] if cfg.region_contact else [])], dim=1)
        contact = seen.pop()[:, 0] if cfg.region_contact else None
        blind: list[torch.Tensor] = []
        if self.blind_regions is not None:
            blind = list(torch.split(self.blind_regions(colorless(images)), self._blind, dim=1))
        per_key = [blind.pop(0) if k in cfg.region_colorblind else seen.pop(0) for k in cfg.region_keys]
        return obj[:, 0], per_key, contact

    @torch.no_grad()
    def consistency(self, images: torch.Tensor | np.ndarray, batch_size: int = 512) -> torch.Tensor:
        """(B,) floats <= 0: per region key, the least sure object cell's log-probability of the value the picture's
        object cells hold most, summed over keys, plus log(1 - p) of the most contact-like cell with
        ``region_contact`` (module docstring). A picture with no cell judged an object is read at its single most
        object-like cell."""
        x = to_unit(images).to(self.text_pos.device)
        was = self.training
        self.eval()
        scores = []
        for start in range(0, len(x), batch_size):
            obj, per_key, contact = self.region_logits(x[start:start + batch_size])
            flat = obj.flatten(1)  # (B, g*w)
            is_obj = (flat > 0) | (flat == flat.amax(1, keepdim=True))  # at least one cell each
            total = torch.zeros(len(flat), device=flat.device)
            for logits in per_key:
                logp = logits.flatten(2).log_softmax(1)  # (B, K, g*w)
                held = (logp.exp() * is_obj[:, None]).sum(2).argmax(1)  # (B,) the dominant value
                own = logp.gather(1, held[:, None, None].expand(-1, 1, logp.shape[2]))[:, 0]  # (B, g*w)
                total += own.masked_fill(~is_obj, 0.0).amin(1)
            if contact is not None:
                total -= F.softplus(contact.flatten(1).amax(1))  # log(1 - sigmoid(the largest contact logit))
            scores.append(total)
        self.train(was)
        return torch.cat(scores).float().cpu()

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
        return save_weights(folder, self.state_dict(), {"kind": KIND, **to_dict(self.cfg)}, metadata=metadata)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> ImageTextMatcher:
        saved = load_weights(folder, device="cpu")
        config = dict(saved.config)
        if config.pop("kind", None) != KIND:
            raise ValueError(f"{folder}: config.json is not an image-text matcher's (kind {KIND!r})")
        model = cls(build(MatcherConfig, config, prefix=f"{folder}/config.json"))
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


__all__ = ["ImageTextMatcher", "MatcherConfig", "to_unit"]

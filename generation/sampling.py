"""Next-token sampling: temperature, top-k, top-p, min-p and greedy, chosen per row, with an explicit generator.

Every row of a batch may be in a different modality (one row writes a caption while another is inside an
image span), so the sampling parameters are per-row tensors picked by the row's modality
(:func:`params_for_modality`); all the work is vectorised over the batch.

Axis legend: B rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Modality ids used by the constraint state machine and here; they index ModalitySampling.as_tensors rows.
TEXT, IMAGE, AUDIO = 0, 1, 2


@dataclass(frozen=True)
class SamplingConfig:
    """How one modality is sampled. ``temperature == 0`` is greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    top_p: float = 1.0  # nucleus: the smallest set whose probability reaches top_p; 1.0 disables
    # min-p (Nguyen et al. 2024): keep tokens at least min_p times as likely as the most likely one (after the
    # temperature), so the cut is tight where the model is sure and loose where it is not; 0.0 disables
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")


GREEDY = SamplingConfig(temperature=0.0)


@dataclass(frozen=True)
class ModalitySampling:
    """One SamplingConfig per modality: the row's current modality decides which applies."""

    text: SamplingConfig = SamplingConfig()
    image: SamplingConfig = SamplingConfig()
    audio: SamplingConfig = SamplingConfig()

    @classmethod
    def uniform(cls, cfg: SamplingConfig) -> ModalitySampling:
        return cls(cfg, cfg, cfg)

    def as_tensors(self, device: torch.device) -> SamplingTable:
        rows = (self.text, self.image, self.audio)  # indexed by TEXT, IMAGE, AUDIO
        return SamplingTable(
            temperature=torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=device),
            top_k=torch.tensor([r.top_k for r in rows], dtype=torch.long, device=device),
            top_p=torch.tensor([r.top_p for r in rows], dtype=torch.float32, device=device),
            min_p=torch.tensor([r.min_p for r in rows], dtype=torch.float32, device=device),
        )


@dataclass
class SamplingTable:
    """ModalitySampling as (3,) tensors so that per-row parameters are one gather."""

    temperature: torch.Tensor  # (3,)
    top_k: torch.Tensor  # (3,)
    top_p: torch.Tensor  # (3,)
    min_p: torch.Tensor  # (3,)


@dataclass
class RowParams:
    temperature: torch.Tensor  # (B,) float, 0 = greedy
    top_k: torch.Tensor  # (B,) long, 0 = off
    top_p: torch.Tensor  # (B,) float, 1 = off
    min_p: torch.Tensor | None = None  # (B,) float, 0 = off; None = off for every row


def params_for_modality(table: SamplingTable, modality: torch.Tensor) -> RowParams:
    """Per-row parameters for rows whose next token is in ``modality`` (B,) (TEXT / IMAGE / AUDIO)."""
    return RowParams(table.temperature[modality], table.top_k[modality], table.top_p[modality],
                     table.min_p[modality])


def filter_logits(logits: torch.Tensor, params: RowParams) -> torch.Tensor:
    """Temperature-scale, then keep the top-k, the top-p nucleus and the min-p set per row (their intersection);
    removed entries become -inf."""
    greedy = params.temperature <= 0
    temperature = torch.where(greedy, torch.ones_like(params.temperature), params.temperature)
    logits = logits.float() / temperature[:, None]
    use_k = params.top_k > 0
    use_p = params.top_p < 1
    if params.min_p is not None and bool((params.min_p > 0).any()):
        # min-p on the whole (temperature-scaled) distribution: p / p_max = exp(logit - max logit); no sort needed
        floor = logits.amax(dim=-1, keepdim=True) + torch.log(params.min_p.clamp(min=1e-30))[:, None]
        logits = logits.masked_fill(logits < floor, float("-inf"))
    if not bool((use_k | use_p).any()):
        return logits
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)  # (B, V)
    rank = torch.arange(vocab, device=logits.device)[None, :]  # (1, V)
    k = torch.where(use_k, params.top_k.clamp(max=vocab), torch.full_like(params.top_k, vocab))
    remove = rank >= k[:, None]
    # nucleus on the top-k survivors: drop a token when the mass strictly before it already reaches top_p
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= (mass_before >= params.top_p[:, None]) & use_p[:, None] & (rank > 0)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)


def sample(logits: torch.Tensor, params: RowParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) (already constrained: disallowed ids at -inf) -> next ids (B,) int64.

    Greedy rows (temperature 0) take the argmax of the raw logits; the others draw from the filtered
    distribution with ``generator`` (same generator state -> same draw).
    """
    greedy = params.temperature <= 0
    argmax = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return argmax
    probs = torch.softmax(filter_logits(logits, params), dim=-1)  # (B, V)
    # greedy rows draw too (so the generator advances identically whatever the mix), then are overwritten.
    # Inverse CDF with one uniform per row: the first id whose cumulative probability reaches u * total, with u
    # in (0, 1] so that an id of probability 0 is never the first to reach it. torch.multinomial (and an
    # exponential race) spent 13-17% of a batched text->image call on CPU drawing per-vocabulary randomness
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = 1.0 - torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    drawn = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    return torch.where(greedy, argmax, drawn)

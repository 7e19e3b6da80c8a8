"""A diffusion image decoder (diffusers ``UNet2DModel``; DDPM training, DDIM sampling) on top of a VQ tokenizer.

What it diffuses: the *residual* between an image and its VQ reconstruction, conditioned on that
reconstruction (concatenated as extra input channels, SR3-style). The conditioning image is
``tokenizer.decode(codes)``, so the decoder works with any :class:`ImageTokenizer`, and it is already a
coarse but correct picture: the UNet only has to learn the detail the codebook lost. That is why a
~1M-parameter UNet is useful after a few minutes of CPU training, where a UNet that had to learn the whole
image from looked-up codebook vectors would not be. The residual is divided by its standard deviation
(measured on the training set, stored as a buffer) so that the noise schedule sees unit-scale data.

Axis legend: B batch, C channels (3, RGB), H/W pixels, h/w code grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from anyloom.config import added_field, build
from anyloom.weights import load_weights, save_weights

if TYPE_CHECKING:  # diffusers costs seconds to import: only when a decoder is built
    from diffusers import DDIMScheduler, DDPMScheduler


@dataclass(frozen=True)
class DiffusionDecoderConfig:
    image_size: tuple[int, int] = (32, 32)  # (H, W); must equal the tokenizer's image_size
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # one UNet resolution level per entry
    layers_per_block: int = 1
    norm_num_groups: int = 8  # GroupNorm groups; must divide every entry of block_out_channels
    attention_levels: int = 1  # how many of the lowest-resolution levels get self-attention
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
    inference_steps: int = 20  # default DDIM steps at sampling time
    eta: float = 0.0  # DDIM eta: 0 is deterministic given the initial noise
    # sampling clips each step's estimate of the clean residual to [-x0_clip, x0_clip] (in units of the training
    # residual's std; 0: off). Off, the first "trailing" DDIM step (alpha_bar ~ 0) divides by ~0 and the picture
    # explodes (4.9 dB on the world); at 1: 31.4 dB at 10 steps (docs/experiments/, diffusion decoder sampling)
    x0_clip: float = added_field(1.0, neutral=0.0)

    def __post_init__(self) -> None:
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise ValueError(f"image_size must be two positive ints (H, W), got {self.image_size}")
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups {self.norm_num_groups} does not divide block_out_channels {bad}")
        down = 2 ** (len(self.block_out_channels) - 1)
        if self.image_size[0] % down or self.image_size[1] % down:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by {down} ({len(self.block_out_channels)} levels)"
            )
        if not 0 <= self.attention_levels <= len(self.block_out_channels):
            raise ValueError(
                f"attention_levels must be in [0, {len(self.block_out_channels)}], got {self.attention_levels}"
            )
        if self.layers_per_block <= 0 or self.num_train_timesteps <= 1:
            raise ValueError("layers_per_block must be > 0 and num_train_timesteps > 1")
        if not 1 <= self.inference_steps <= self.num_train_timesteps:
            raise ValueError(f"inference_steps must be in [1, {self.num_train_timesteps}], got {self.inference_steps}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.x0_clip < 0:
            raise ValueError(f"x0_clip must be >= 0 (0: off), got {self.x0_clip}")


@dataclass
class DiffusionLoss:
    loss: torch.Tensor  # scalar MSE against the scheduler's target
    timesteps: torch.Tensor  # (B,) the sampled noise levels


class DiffusionDecoder(nn.Module):
    """UNet over [noisy residual (3) | VQ reconstruction (3)] -> the scheduler's target for the residual."""

    def __init__(self, cfg: DiffusionDecoderConfig):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.block_out_channels)
        down = tuple("AttnDownBlock2D" if i >= n - cfg.attention_levels else "DownBlock2D" for i in range(n))
        up = tuple(b.replace("Down", "Up") for b in reversed(down))
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(
            sample_size=tuple(cfg.image_size),
            in_channels=6,  # 3 noisy residual + 3 conditioning (the tokenizer's reconstruction)
            out_channels=3,
            layers_per_block=cfg.layers_per_block,
            block_out_channels=tuple(cfg.block_out_channels),
            down_block_types=down,
            up_block_types=up,
            norm_num_groups=cfg.norm_num_groups,
        )
        self.register_buffer("residual_std", torch.ones(()))  # set from training data; saved with the weights

    def _scheduler_kwargs(self) -> dict:
        # clip_sample off: the normalized residual is not confined to [-1, 1]
        return dict(
            num_train_timesteps=self.cfg.num_train_timesteps,
            beta_schedule=self.cfg.beta_schedule,
            prediction_type=self.cfg.prediction_type,
            clip_sample=False,
        )

    def train_scheduler(self) -> DDPMScheduler:
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self._scheduler_kwargs())

    def sample_scheduler(self) -> DDIMScheduler:
        # "trailing" spacing makes the first DDIM step start from pure noise even with few steps
        from diffusers import DDIMScheduler

        kwargs = self._scheduler_kwargs()
        if self.cfg.x0_clip > 0:
            kwargs.update(clip_sample=True, clip_sample_range=self.cfg.x0_clip)
        return DDIMScheduler(**kwargs, timestep_spacing="trailing", set_alpha_to_one=True)

    def _check_pair(self, name: str, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != tuple(self.cfg.image_size):
            raise ValueError(
                f"{name} must be (B, 3, {self.cfg.image_size[0]}, {self.cfg.image_size[1]}), got {tuple(x.shape)}"
            )

    def loss(self, images: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None) -> DiffusionLoss:
        """DDPM training loss. images, cond: (B, 3, H, W) in [-1, 1]; cond is tokenizer.decode(codes)."""
        self._check_pair("images", images)
        self._check_pair("cond", cond)
        scheduler = self.train_scheduler()
        residual = (images - cond) / self.residual_std  # (B, 3, H, W), ~unit scale
        b = residual.shape[0]
        t = torch.randint(0, self.cfg.num_train_timesteps, (b,), generator=generator).to(images.device)
        noise = torch.randn(residual.shape, generator=generator).to(residual)
        noisy = scheduler.add_noise(residual, noise, t)
        if self.cfg.prediction_type == "epsilon":
            target = noise
        elif self.cfg.prediction_type == "sample":
            target = residual
        else:
            target = scheduler.get_velocity(residual, noise, t)
        pred = self.unet(torch.cat([noisy, cond], dim=1), t).sample  # (B, 3, H, W)
        return DiffusionLoss(loss=torch.nn.functional.mse_loss(pred, target), timesteps=t)

    @torch.no_grad()
    def sample(
        self, cond: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """DDIM sampling. cond (B, 3, H, W) in [-1, 1] -> images (B, 3, H, W) clamped to [-1, 1].

        With a seeded CPU ``generator`` (and eta=0 or not) the output is a pure function of cond and seed.
        """
        self._check_pair("cond", cond)
        steps = self.cfg.inference_steps if steps is None else steps
        if not 1 <= steps <= self.cfg.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {self.cfg.num_train_timesteps}], got {steps}")
        scheduler = self.sample_scheduler()  # fresh per call: schedulers keep per-run state
        scheduler.set_timesteps(steps, device=cond.device)
        x = torch.randn(cond.shape, generator=generator).to(cond)  # (B, 3, H, W) normalized residual
        for t in scheduler.timesteps:
            pred = self.unet(torch.cat([x, cond], dim=1), t).sample
            x = scheduler.step(pred, t, x, eta=self.cfg.eta, generator=generator).prev_sample
        return (cond + x * self.residual_std).clamp(-1.0, 1.0)

    def save(self, folder: str | Path) -> Path:
        """model.safetensors + config.json (see anyloom.weights)."""
        return save_weights(folder, self.state_dict(), self.cfg, metadata={"kind": "diffusion_decoder"})

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> DiffusionDecoder:
        saved = load_weights(folder, device=device)
        kind = saved.metadata.get("kind")
        if kind != "diffusion_decoder":
            raise ValueError(f"{folder}: weights of kind {kind!r}, expected 'diffusion_decoder'")
        model = cls(build(DiffusionDecoderConfig, saved.config, prefix="config.json"))
        model.load_state_dict(saved.state_dict, strict=True)
        return model.to(device).eval()


__all__ = ["DiffusionDecoderConfig", "DiffusionDecoder", "DiffusionLoss"]

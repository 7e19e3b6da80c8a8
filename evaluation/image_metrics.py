"""Image tokenizer metrics: PSNR, SSIM, codebook usage / perplexity, and the world judge's agreement.

All pixel metrics take uint8 RGB arrays (N, H, W, 3) (what the tokenizer's users see after decoding) and
work on [0, 1] floats. SSIM follows Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), K1 0.01,
K2 0.03, computed per channel and averaged, "valid" windows only (as skimage with gaussian_weights=True,
use_sample_covariance=False).

Axis legend: N images, H/W height/width, h/w code grid, K codebook size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _as_unit(pixels: np.ndarray) -> torch.Tensor:
    x = np.asarray(pixels)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 pixels, got {x.dtype} {x.shape}")
    return torch.from_numpy(x).double().div(255.0).permute(0, 3, 1, 2)  # (N, 3, H, W)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"originals {np.shape(a)} and reconstructions {np.shape(b)} differ in shape")


def psnr(originals: np.ndarray, recons: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB (peak 1.0 on [0, 1] pixels); identical images give inf."""
    _check_pair(originals, recons)
    mse = (_as_unit(originals) - _as_unit(recons)).pow(2).flatten(1).mean(1)
    with np.errstate(divide="ignore"):
        return (10.0 * np.log10(1.0 / mse.numpy())).astype(np.float64)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)  # (size, size)


def ssim(originals: np.ndarray, recons: np.ndarray, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Per-image mean SSIM over channels and valid window positions."""
    _check_pair(originals, recons)
    x, y = _as_unit(originals), _as_unit(recons)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    w = _gaussian_window(window, sigma).expand(c, 1, window, window)  # depthwise (C, 1, k, k)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).numpy()


@dataclass
class CodebookStats:
    usage: float  # fraction of the K codes used at least once
    perplexity: float  # exp(entropy) of the code histogram; K when uniform
    used: int  # number of distinct codes used
    codebook_size: int


def codebook_stats(codes: torch.Tensor | np.ndarray, codebook_size: int) -> CodebookStats:
    """Usage and perplexity of a set of codes (any shape) from a codebook of ``codebook_size``."""
    c = torch.as_tensor(np.asarray(codes) if not torch.is_tensor(codes) else codes).flatten().long()
    if c.numel() == 0:
        raise ValueError("codebook_stats: no codes given")
    if int(c.min()) < 0 or int(c.max()) >= codebook_size:
        raise ValueError(f"codes must lie in [0, {codebook_size}), got [{int(c.min())}, {int(c.max())}]")
    counts = torch.bincount(c, minlength=codebook_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    used = int((counts > 0).sum())
    return CodebookStats(usage=used / codebook_size, perplexity=float(np.exp(entropy)), used=used,
                         codebook_size=codebook_size)


def code_change_rate(codes: torch.Tensor | np.ndarray) -> float:
    """Fraction of horizontally or vertically neighbouring cells of (N, h, w) code maps that hold different codes.

    A flat background the tokenizer spells with one code changes nowhere; every change is a token that carries
    something the LM has to predict. Reconstruction numbers do not show it. Lowering it on purpose (the image
    tokenizer's ``code_smoothness``) lowered the LM's image loss but not its text->image accuracy
    (docs/experiments/2026-11-26-image-tokenizer-fixed-steps.md): a description of the codes, not a target."""
    c = torch.as_tensor(codes)
    if c.ndim != 3 or c.shape[1] * c.shape[2] < 2:
        raise ValueError(f"code_change_rate: expected (N, h, w) code maps with h*w >= 2, got {tuple(c.shape)}")
    dx, dy = c[:, :, 1:] != c[:, :, :-1], c[:, 1:, :] != c[:, :-1, :]
    return float((dx.sum() + dy.sum()) / (dx.numel() + dy.numel()))


@dataclass
class JudgeAgreement:
    agreement: float  # fraction of images where judge(original) == judge(reconstruction)
    agree: int
    total: int
    originals_readable: int  # originals the judge reads as a caption (sanity: should be all of them)


def judge_agreement(originals: np.ndarray, recons: np.ndarray) -> JudgeAgreement:
    """Does the world judge read the same caption (count, colour, shape) from both? None == None counts too."""
    from anyloom.world.judge import judge_images

    _check_pair(originals, recons)
    a, b = judge_images(originals), judge_images(recons)
    agree = sum(int(x == y) for x, y in zip(a, b))
    return JudgeAgreement(agreement=agree / max(1, len(a)), agree=agree, total=len(a),
                          originals_readable=sum(x is not None for x in a))


@dataclass
class ImageTokenizerReport:
    psnr: float  # dB, mean over images
    ssim: float
    codebook_usage: float
    perplexity: float
    detector_agreement: float  # the world judge's agreement, originals vs reconstructions
    images: int
    code_change_rate: float  # neighbouring cells with different codes (code_change_rate)

    def as_eval(self) -> dict[str, float]:
        """The eval.json names (DESIGN.md): image_tokenizer.psnr, .detector_agreement, .codebook_usage, ..."""
        return {
            "image_tokenizer.psnr": self.psnr,
            "image_tokenizer.ssim": self.ssim,
            "image_tokenizer.codebook_usage": self.codebook_usage,
            "image_tokenizer.perplexity": self.perplexity,
            "image_tokenizer.detector_agreement": self.detector_agreement,
            "image_tokenizer.code_change_rate": self.code_change_rate,
        }


def evaluate_reconstructions(
    originals: np.ndarray, recons: np.ndarray, codes: torch.Tensor, codebook_size: int, judge: bool = True
) -> ImageTokenizerReport:
    stats = codebook_stats(codes, codebook_size)
    agreement = judge_agreement(originals, recons).agreement if judge else float("nan")
    return ImageTokenizerReport(
        psnr=float(psnr(originals, recons).mean()),
        ssim=float(ssim(originals, recons).mean()),
        codebook_usage=stats.usage,
        perplexity=stats.perplexity,
        detector_agreement=agreement,
        images=len(originals),
        code_change_rate=code_change_rate(codes),
    )

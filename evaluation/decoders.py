"""Decoders side by side on the same codes: pictures (the image tokenizer's VQ decoder and a run's diffusion
decoder) and speech (the mel tokenizer's Griffin-Lim and a run's neural vocoder).

``compare_decoders`` encodes originals once and decodes the same codes both ways: PSNR and SSIM against the
originals, the world judge's agreement (world pictures only), seconds per picture on this machine (the diffusion
decoder's time includes the VQ decode it refines). ``RedrawnPictures`` replays a text->image evaluation's codes
through the diffusion decoder, so the judge scores both decoders on the very same generated codes.

``compare_vocoders`` decodes the same speech codes through Griffin-Lim and the neural vocoder: the ASR judge's word
error rate (and its ground truth on the originals), mel distance, SI-SNR, STOI/PESQ where installed, and seconds of
audio made per second of decoding on this machine. ``RevocodedSpeech`` replays a text->speech evaluation's codes
through the neural vocoder, as ``RedrawnPictures`` does for pictures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from anyloom.evaluation.image_metrics import judge_agreement, psnr, ssim
from anyloom.progress import progress
from anyloom.tokenizers.base import ImageTokenizer
from anyloom.tokenizers.image_vq import float_to_uint8, uint8_to_float


@dataclass
class DecoderScores:
    psnr: float  # dB, mean over pictures (8-bit pixels)
    ssim: float  # mean over pictures
    judge_agreement: float | None  # the world judge reads the same caption as from the original; None: not world
    seconds_per_image: float  # decoding only (codes -> pixels), this machine, batch ``batch_size``


@dataclass
class DecoderComparison:
    images: int
    ddim_steps: int
    vq: DecoderScores
    diffusion: DecoderScores


@torch.no_grad()
def compare_decoders(tokenizer: ImageTokenizer, model: Any, pixels: np.ndarray, steps: int, batch_size: int = 64,
                     seed: int = 0, judge: bool = True) -> DecoderComparison:
    """(N, H, W, 3) uint8 originals -> codes once -> the VQ decode and the diffusion decode (``steps`` DDIM steps,
    seeded), each scored against the originals. ``judge``: add the world judge's agreement (world pictures)."""
    if isinstance(tokenizer, torch.nn.Module):
        tokenizer.eval()  # an EMA codebook in training mode would update itself on every encode
    x = uint8_to_float(pixels)
    codes = torch.cat([tokenizer.encode(x[i:i + batch_size]).codes for i in range(0, len(x), batch_size)])
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    vq_out, diffusion_out, t_vq, t_diffusion = [], [], 0.0, 0.0
    for i in progress(range(0, len(codes), batch_size), desc=f"decoders (DDIM {steps})"):
        t0 = time.perf_counter()
        cond = tokenizer.decode(codes[i:i + batch_size]).float()
        t1 = time.perf_counter()
        sampled = model.sample(cond.to(device), steps=steps, generator=generator).cpu()
        t2 = time.perf_counter()
        t_vq, t_diffusion = t_vq + (t1 - t0), t_diffusion + (t2 - t0)
        vq_out.append(float_to_uint8(cond))
        diffusion_out.append(float_to_uint8(sampled))
    n = len(pixels)

    def scores(recons: np.ndarray, seconds: float) -> DecoderScores:
        return DecoderScores(psnr=float(np.mean(psnr(pixels, recons))), ssim=float(np.mean(ssim(pixels, recons))),
                             judge_agreement=judge_agreement(pixels, recons).agreement if judge else None,
                             seconds_per_image=seconds / n)

    return DecoderComparison(images=n, ddim_steps=steps, vq=scores(np.concatenate(vq_out), t_vq),
                             diffusion=scores(np.concatenate(diffusion_out), t_diffusion))


class RedrawnPictures:
    """A text->image "model" that answers each call with the next recorded batch of codes, drawn by the diffusion
    decoder: the evaluation that recorded them, replayed call for call, judges the other decoder on the same codes."""

    def __init__(self, pipe: Any, recorded: list[torch.Tensor], seed: int = 0):
        from anyloom.decoders.images import DiffusionImageDecoder

        self.pipe, self.recorded = pipe, list(recorded)
        self.decode = DiffusionImageDecoder(pipe.diffusion, seed=seed)
        self.seconds, self.pictures = 0.0, 0

    def text_to_image(self, captions: list[str]) -> list[np.ndarray]:
        if not captions:
            return []
        if not self.recorded:
            raise RuntimeError("more text->image calls than were recorded: replay the same evaluation")
        codes = self.recorded.pop(0)
        if len(codes) != len(captions):
            raise RuntimeError(f"recorded {len(codes)} pictures for a call of {len(captions)} captions")
        t0 = time.perf_counter()
        images = self.decode(self.pipe.image_tokenizer, codes.to(self.pipe.device))
        self.seconds += time.perf_counter() - t0
        self.pictures += len(images)
        return [np.asarray(im.convert("RGB")) for im in images]


def decoding_speed(decoder: Any, codes: list[torch.Tensor], frame_seconds: float, repeats: int = 2) -> float:
    """Seconds of audio made per second of ``decoder.decode`` (the best of ``repeats`` passes over ``codes``)."""
    audio = sum(c.shape[-1] for c in codes) * frame_seconds
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for c in codes:
            decoder.decode(c)
        best = min(best, time.perf_counter() - t0)
    return audio / best


def compare_vocoders(tokenizer: Any, vocoder: Any, waves: list[np.ndarray], sample_rate: int,
                     texts: list[str] | None = None, judge: Any | None = None) -> dict[str, Any]:
    """Griffin-Lim (``tokenizer.decode``) and ``vocoder`` on the same codes of ``waves``:
    ``{"utterances": n, "griffin_lim": {metric: value}, "neural": {...}}`` with ``audio_seconds_per_second``
    (decoding only). ``judge`` (with ``texts``) adds the ASR word error rates."""
    from anyloom.decoders.vocoder import VocodedMelTokenizer
    from anyloom.evaluation.asr import word_error_rate
    from anyloom.evaluation.audio_metrics import evaluate_reconstruction

    codes = [tokenizer.encode(torch.from_numpy(np.asarray(w, dtype=np.float32))[None], sample_rate).codes
             for w in waves]
    out: dict[str, Any] = {"utterances": len(waves)}
    for name, decoder in (("griffin_lim", tokenizer), ("neural", VocodedMelTokenizer(tokenizer, vocoder))):
        report = evaluate_reconstruction(decoder, waves, sample_rate, texts if judge else None, judge,
                                         word_error_rate)
        scores = {k.split(".", 1)[1]: v for k, v in report.as_eval("x").items()
                  if k not in ("x.items", "x.tokens_per_second")}
        scores["audio_seconds_per_second"] = decoding_speed(decoder, codes, 1.0 / float(tokenizer.frame_rate))
        out[name] = scores
    return out


class RevocodedSpeech:
    """A text->speech "model" that answers with recorded codes, per caption, voiced by ``decoder`` (an audio
    tokenizer, or one with the neural vocoder): the evaluation that recorded them, replayed, judges another vocoder on
    the same generated codes."""

    def __init__(self, decoder: Any, recorded: dict[str, torch.Tensor]):
        self.decoder, self.recorded = decoder, recorded

    def text_to_speech(self, captions: list[str]) -> tuple[list[np.ndarray], int]:
        missing = [c for c in captions if c not in self.recorded]
        if missing:
            raise RuntimeError(f"no recorded speech for {missing[0]!r}: replay the same evaluation")
        waves = [self.decoder.decode(self.recorded[c][None])[0].numpy() for c in captions]
        return waves, int(self.decoder.sample_rate)

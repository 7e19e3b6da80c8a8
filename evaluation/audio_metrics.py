"""How good is an audio tokenizer's reconstruction? Signal metrics and intelligibility by an ASR judge.

- SI-SNR (scale-invariant SNR, dB): waveform fidelity. Griffin-Lim recovers magnitudes, not phase, so the
  mel tokenizer scores low here by construction; it is meaningful for waveform codecs.
- Mel distance: mean |log-mel(reconstruction) - log-mel(original)| (natural log, 80 bins at 16 kHz).
- STOI (``pystoi``) and wideband PESQ (``pesq``), when those packages are installed; otherwise the keys are
  absent from the result (never a made-up value).
- Intelligibility: the judge's word error rate on reconstructions and on the originals, both against the
  reference transcripts. The tokenizer's quality bar compares the two.

Axis legend: B batch, T samples.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from anyloom.tokenizers.audio_common import resample
from anyloom.tokenizers.audio_mel import MelFeatureConfig, MelFeatures
from anyloom.tokenizers.base import AudioTokenizer


class SpeechTranscriber(Protocol):
    def transcribe(self, waves: Sequence[np.ndarray], sample_rate: int) -> list[str]: ...


def si_snr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, T) x (B, T) -> (B,) scale-invariant SNR in dB (both zero-meaned; lengths must match)."""
    if estimate.shape != reference.shape:
        raise ValueError(f"si_snr: shapes differ, {tuple(estimate.shape)} vs {tuple(reference.shape)}")
    est = estimate - estimate.mean(dim=-1, keepdim=True)
    ref = reference - reference.mean(dim=-1, keepdim=True)
    scale = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps)
    target = scale * ref
    noise = est - target
    return 10 * torch.log10(target.pow(2).sum(-1) / (noise.pow(2).sum(-1) + eps) + eps)


_MEL = {}


def mel_distance(estimate: torch.Tensor, reference: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """(B, T) x (B, T) at ``sample_rate`` -> (B,) mean absolute log-mel difference (80 bins)."""
    if estimate.shape != reference.shape:
        raise ValueError(f"mel_distance: shapes differ, {tuple(estimate.shape)} vs {tuple(reference.shape)}")
    if sample_rate not in _MEL:
        _MEL[sample_rate] = MelFeatures(MelFeatureConfig(sample_rate=sample_rate, f_max=sample_rate / 2))
    feats = _MEL[sample_rate]
    hop = feats.cfg.hop_length
    usable = estimate.shape[-1] - estimate.shape[-1] % hop
    if usable == 0:
        raise ValueError(f"mel_distance needs at least {hop} samples, got {estimate.shape[-1]}")
    a = feats.log_mel(estimate[..., :usable].float())
    b = feats.log_mel(reference[..., :usable].float())
    return (a - b).abs().mean(dim=(1, 2))


def stoi_available() -> bool:
    return importlib.util.find_spec("pystoi") is not None


def pesq_available() -> bool:
    return importlib.util.find_spec("pesq") is not None


@dataclass
class ReconstructionReport:
    items: int
    si_snr_db: float
    mel_distance: float
    stoi: float | None = None  # None: pystoi is not installed
    pesq_wb: float | None = None  # None: pesq is not installed
    asr_wer: float | None = None  # judge on reconstructions vs references
    asr_wer_ground_truth: float | None = None  # judge on the originals vs references
    tokens_per_second: float = 0.0
    failed_pesq: int = 0  # items PESQ refused (e.g. no speech found); counted, not hidden
    extra: dict[str, float] = field(default_factory=dict)

    def as_eval(self, prefix: str = "audio_tokenizer") -> dict[str, float]:
        """Flat ``eval.json`` keys (``audio_tokenizer.asr_wer`` ...); unavailable metrics are left out."""
        out = {}
        for key in ("items", "si_snr_db", "mel_distance", "stoi", "pesq_wb", "asr_wer", "asr_wer_ground_truth",
                    "tokens_per_second", "failed_pesq"):
            value = getattr(self, key)
            if value is not None:
                out[f"{prefix}.{key}"] = value
        out.update({f"{prefix}.{k}": v for k, v in self.extra.items()})
        return out


def reconstruct(tokenizer: AudioTokenizer, waves: Sequence[np.ndarray], sample_rate: int) -> list[np.ndarray]:
    """Encode and decode each item on its own (no padding effects); the output is at ``sample_rate``
    and trimmed to the input length."""
    out = []
    for w in waves:
        codes = tokenizer.encode(torch.as_tensor(w, dtype=torch.float32)[None], sample_rate).codes
        rec = tokenizer.decode(codes)[0]
        rec = resample(rec, tokenizer.sample_rate, sample_rate)
        rec = torch.nn.functional.pad(rec, (0, max(0, len(w) - rec.shape[-1])))[: len(w)]
        out.append(rec.numpy().astype(np.float32))
    return out


def evaluate_reconstruction(
    tokenizer: AudioTokenizer,
    waves: Sequence[np.ndarray],
    sample_rate: int,
    references: Sequence[str] | None = None,
    judge: SpeechTranscriber | None = None,
    word_error_rate=None,
) -> ReconstructionReport:
    """Reconstruct ``waves`` (mono float at ``sample_rate``) and score them; the ASR part needs a judge,
    its ``word_error_rate(refs, hyps)`` and ``references``."""
    if not waves:
        raise ValueError("evaluate_reconstruction: no audio items given")
    recs = reconstruct(tokenizer, waves, sample_rate)
    snr, mel = [], []
    for w, r in zip(waves, recs):
        a, b = torch.as_tensor(r)[None], torch.as_tensor(np.asarray(w, dtype=np.float32))[None]
        snr.append(float(si_snr(a, b)[0]))
        mel.append(float(mel_distance(a, b, sample_rate)[0]))
    report = ReconstructionReport(
        items=len(waves), si_snr_db=float(np.mean(snr)), mel_distance=float(np.mean(mel)),
        tokens_per_second=tokenizer.num_codebooks * tokenizer.frame_rate,
    )
    if stoi_available():
        from pystoi import stoi

        report.stoi = float(np.mean([stoi(np.asarray(w), r, sample_rate) for w, r in zip(waves, recs)]))
    if pesq_available() and sample_rate in (8000, 16000):
        from pesq import pesq

        scores = []
        for w, r in zip(waves, recs):
            try:
                scores.append(pesq(sample_rate, np.asarray(w, dtype=np.float32), r, "wb" if sample_rate == 16000
                                   else "nb"))
            except Exception:  # pesq raises on utterances it finds no speech in; those are counted
                report.failed_pesq += 1
        report.pesq_wb = float(np.mean(scores)) if scores else None
    if judge is not None:
        if references is None or word_error_rate is None:
            raise ValueError("an ASR judge needs references and a word_error_rate function")
        if len(references) != len(waves):
            raise ValueError(f"{len(references)} references for {len(waves)} audio items")
        refs = list(references)
        report.asr_wer_ground_truth = float(word_error_rate(refs, judge.transcribe(list(waves), sample_rate)))
        report.asr_wer = float(word_error_rate(refs, judge.transcribe(recs, sample_rate)))
    return report


__all__ = [
    "si_snr", "mel_distance", "stoi_available", "pesq_available", "ReconstructionReport", "reconstruct",
    "evaluate_reconstruction", "SpeechTranscriber",
]

"""Training of the neural vocoder (``anyloom.decoders.vocoder``) for a frozen mel tokenizer.

``train_vocoder(cfg, tokenizer, train_manifest, val_manifest, run) -> Path`` (the exported vocoder folder):

1. read the speech of both manifests and compute, once, each training utterance's input frames: the tokenizer's
   own reconstruction ``decode_mel(encode(wave))`` (``train.input: reconstruction``, the default: the vocoder
   then learns to turn exactly what the LM's codes decode to into speech) or the clean log-mel (``original``);
2. train on random aligned windows (mel frames and the samples they cover): the waveform loss of the codec
   (multi-resolution STFT + log-mel L1), optionally with EnCodec's multi-scale STFT discriminator and feature
   matching (``discriminator.enabled``); clip, step, log (metrics.jsonl, tensorboard, a progress bar);
3. resumable checkpoints (model, optimizer, discriminator when enabled; every step's randomness derives from
   (seed, step)) and WAV samples (original, Griffin-Lim, vocoder) of validation utterances;
4. export to ``run.path / "vocoder"`` and score both decoders of the same codes side by side on validation speech
   into ``eval.json`` (``vocoder.griffin_lim.*`` and ``vocoder.neural.*``: ASR WER and its ground truth, mel
   distance, SI-SNR, STOI/PESQ when installed, and seconds of audio made per second of decoding).

A second call with the same config, tokenizer and data returns the exported folder without training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F_

from anyloom.config import fingerprint
from anyloom.decoders.vocoder import MelVocoder, VocodedMelTokenizer, VocoderConfig
from anyloom.evaluation.asr import grammar_judge
from anyloom.evaluation.decoders import compare_vocoders
from anyloom.progress import progress
from anyloom.tokenizers.audio_discriminator import (
    DiscriminatorConfig,
    MultiScaleSTFTDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
)
from anyloom.tokenizers.audio_mel import MelTokenizer
from anyloom.training.audio_tokenizer import SpeechSet, SpeechTrainConfig, WaveformLoss, load_speech
from anyloom.training.metrics import MetricsLogger
from anyloom.training.optim import OptimConfig, build_optimizer, lr_factor
from anyloom.training.run import RunDir
from anyloom.training.seed import seed_everything, step_generator
from anyloom.training.snapshots import Snapshots, TrainingLoop
from anyloom.weights import read_metadata


@dataclass(frozen=True)
class VocoderTrainConfig(SpeechTrainConfig):
    """The speech trainers' loop settings (samples: original, griffin_lim and neural WAVs; the end-of-training
    report scores both decoders), and what the vocoder learns from."""

    crop_seconds: float = 0.64  # aligned windows of mel frames and samples
    input: Literal["reconstruction", "original"] = "reconstruction"  # what mel frames the vocoder learns from
    asr_grammar: str | None = None  # the ASR judge's plug-in grammar (see audio_tokenizer.train.asr_grammar)


@dataclass(frozen=True)
class VocoderStageConfig:
    """The recipe section ``vocoder``: the generator, its optimizer, training, and the optional discriminator."""

    model: VocoderConfig = field(default_factory=VocoderConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-3, weight_decay=0.0, warmup_steps=50, schedule="cosine")
    )
    train: VocoderTrainConfig = field(default_factory=VocoderTrainConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


@dataclass
class VocoderData:
    """Aligned training frames and samples: mel (M, N) and wave (N * hop,), utterances end to end."""

    mel: torch.Tensor
    wave: torch.Tensor
    hop: int


def vocoder_inputs(tokenizer: MelTokenizer, waves: list[np.ndarray], input: str) -> VocoderData:
    """Each utterance (padded to whole code frames) and the mel frames the vocoder reads for it."""
    spf, hop = tokenizer.samples_per_frame, tokenizer.cfg.features.hop_length
    mels, samples = [], []
    with torch.inference_mode():
        for w in progress(waves, desc=f"vocoder inputs ({input})"):
            t = F_.pad(torch.from_numpy(w)[None], (0, (-len(w)) % spf))
            if input == "reconstruction":
                mel = tokenizer.decode_mel(tokenizer.encode(t, tokenizer.sample_rate).codes)[0]
            else:
                mel = tokenizer.features.log_mel(t)[0]
            mels.append(mel.cpu())
            samples.append(t[0, : mel.shape[-1] * hop])
    return VocoderData(torch.cat(mels, dim=-1), torch.cat(samples), hop)


def aligned_crops(data: VocoderData, batch: int, frames: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M, frames) mel windows and the (B, frames * hop) samples they cover."""
    n = data.mel.shape[-1]
    if n < frames:
        raise ValueError(f"the training speech has {n} mel frames, fewer than one window of {frames}: lower "
                         "vocoder.train.crop_seconds")
    starts = torch.randint(0, n - frames + 1, (batch,), generator=g)
    mel = data.mel[:, starts[:, None] + torch.arange(frames)[None]].permute(1, 0, 2)
    wave = data.wave[starts[:, None] * data.hop + torch.arange(frames * data.hop)[None]]
    return mel, wave


def vocoder_fingerprint(cfg: VocoderStageConfig, tokenizer_folder: str | Path, train_manifest: str | Path,
                        seed: int) -> str:
    parts = {"model": cfg.model, "optim": cfg.optim, "train": cfg.train, "seed": seed,
             "tokenizer": read_metadata(tokenizer_folder).get("fingerprint") or str(tokenizer_folder),
             "train_manifest": str(train_manifest)}
    if cfg.discriminator.enabled:
        parts["discriminator"] = cfg.discriminator
    return fingerprint(parts)


def _flat(nested: dict, prefix: str = "vocoder") -> dict[str, float]:
    out = {}
    for k, v in nested.items():
        out.update(_flat(v, f"{prefix}.{k}") if isinstance(v, dict) else {f"{prefix}.{k}": v})
    return out


def _write_samples(tokenizer: MelTokenizer, vocoder: MelVocoder, val: SpeechSet, run: RunDir, logger: MetricsLogger,
                   step: int, n: int) -> None:
    vocoder.eval()
    neural = VocodedMelTokenizer(tokenizer, vocoder)
    for i, wave in enumerate(val.waves[:n]):
        codes = tokenizer.encode(torch.from_numpy(wave)[None], val.sample_rate).codes
        sf.write(run.samples / f"speech_{i}_original.wav", wave, val.sample_rate)
        sf.write(run.samples / f"speech_{i}_griffin_lim.wav", tokenizer.decode(codes)[0].numpy(), val.sample_rate)
        rec = neural.decode(codes)[0].numpy()
        sf.write(run.samples / f"speech_step{step:07d}_{i}_neural.wav", rec, val.sample_rate)
        logger.audio(f"vocoder/neural_{i}", step, rec, val.sample_rate)
    vocoder.train()


def train_vocoder(cfg: VocoderStageConfig, tokenizer: MelTokenizer, tokenizer_folder: str | Path,
                  train_manifest: str | Path, val_manifest: str | Path, run: RunDir, seed: int = 0,
                  device: str | torch.device = "cpu") -> Path:
    """Train (or reuse) a vocoder for ``tokenizer`` (read from ``tokenizer_folder``); returns the exported folder,
    which :meth:`MelVocoder.load` reads."""
    if not isinstance(tokenizer, MelTokenizer):
        raise ValueError(f"the vocoder turns mel frames into speech: it needs a mel tokenizer "
                         f"(audio_tokenizer.kind: mel_rvq), got {type(tokenizer).__name__}")
    tc = cfg.train
    fp = vocoder_fingerprint(cfg, tokenizer_folder, train_manifest, seed)
    out = run.path / "vocoder"
    if (out / "config.json").exists() and read_metadata(out).get("fingerprint") == fp:
        print(f"vocoder: {out} is up to date (fingerprint {fp}); not retraining")
        return out
    seed_everything(seed)
    tokenizer = tokenizer.eval()
    vocoder = MelVocoder(cfg.model, tokenizer.cfg.features).to(device)
    sr = tokenizer.sample_rate
    train = load_speech(train_manifest, sr, tc.max_train_items)
    val = load_speech(val_manifest, sr, max(tc.eval_items, tc.num_samples))
    print(f"vocoder: {sum(p.numel() for p in vocoder.parameters()):,} parameters; {len(train.waves)} training "
          f"utterances {train.counts()}, {len(val.waves)} validation")
    data = vocoder_inputs(tokenizer, train.waves, tc.input)
    frames = max(1, int(round(tc.crop_seconds * sr / data.hop)))
    loss_fn = WaveformLoss(sr).to(device)
    opt = build_optimizer(vocoder, cfg.optim)
    dc = cfg.discriminator
    disc = disc_opt = None
    if dc.enabled:
        if frames * data.hop < dc.min_samples:
            raise ValueError(f"vocoder.train.crop_seconds {tc.crop_seconds} gives {frames * data.hop} samples, "
                             f"shorter than the discriminator's largest n_fft {dc.min_samples}")
        disc = MultiScaleSTFTDiscriminator(dc).to(device)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=dc.lr, betas=dc.betas)
    snapshots = Snapshots(run.checkpoints, fp, keep_last=tc.keep_last, name="vocoder",
                          models={"model": vocoder, **({"disc": disc} if disc else {})},
                          optimizers={"optim": opt, **({"disc_optim": disc_opt} if disc else {})})
    logger = MetricsLogger(run)
    start = snapshots.resume()
    vocoder.train()
    loop = TrainingLoop("vocoder", tc.steps, start=start, max_seconds=tc.max_seconds)
    for step in loop:
        g = step_generator(seed, step)
        for group in opt.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(step, tc.steps, cfg.optim)
        mel, target = aligned_crops(data, tc.batch_size, frames, g)
        mel, target = mel.to(device), target.to(device)
        fake = vocoder(mel)
        loss, mel_l1 = loss_fn(fake, target)
        gan: dict[str, torch.Tensor] = {}
        adversarial = disc is not None and step >= dc.start_step
        if adversarial:
            with torch.no_grad():
                real_out = disc(target)
            disc.requires_grad_(False)  # this backward feeds the vocoder only
            fake_out = disc(fake)
            disc.requires_grad_(True)
            gan["g_adv"] = generator_loss(fake_out.logits, dc.loss)
            gan["g_feat"] = feature_matching_loss(real_out.features, fake_out.features)
            loss = loss + dc.adversarial_weight * gan["g_adv"] + dc.feature_weight * gan["g_feat"]
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(vocoder.parameters(), cfg.optim.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if adversarial:
            d_loss = discriminator_loss(disc(target).logits, disc(fake.detach()).logits, dc.loss)
            d_loss.backward()
            disc_opt.step()
            disc_opt.zero_grad(set_to_none=True)
            gan["d_loss"] = d_loss
        if step % tc.log_every == 0 or step == tc.steps - 1:
            record = dict(loss=loss.item(), mel_l1_nats=mel_l1.item(), grad_norm=float(grad_norm),
                          lr=opt.param_groups[0]["lr"], cpu_seconds=loop.cpu_seconds,
                          **{k: v.item() for k, v in gan.items()})
            logger.log(step, **record)
            loop.set_postfix(loss=f"{record['loss']:.3f}", nats=f"{record['mel_l1_nats']:.3f}")
        if loop.due(tc.ckpt_every, step + 1):
            snapshots.save(step + 1)
    step, trained_seconds, trained_cpu = loop.done, loop.elapsed, loop.cpu_seconds
    snapshots.save(step)
    vocoder.eval()
    _write_samples(tokenizer, vocoder, val, run, logger, step, tc.num_samples)
    vocoder.save(out, metadata={"fingerprint": fp, "steps": str(step), "train_seconds": f"{trained_seconds:.1f}"})
    results: dict[str, float] = {"vocoder.steps": step, "vocoder.train_seconds": trained_seconds,
                                 "vocoder.train_cpu_seconds": trained_cpu}
    if tc.eval_items:
        judge = grammar_judge(tc.asr_grammar, "vocoder.train.asr_grammar")
        results.update(_flat(compare_vocoders(tokenizer, vocoder, val.waves[:tc.eval_items], val.sample_rate,
                                              val.texts[:tc.eval_items], judge)))
    run.write_json("eval.json", results)
    print("vocoder: " + json.dumps({k: round(v, 4) for k, v in results.items()}))
    return out


__all__ = ["VocoderTrainConfig", "VocoderStageConfig", "VocoderData", "vocoder_inputs", "aligned_crops",
           "train_vocoder"]

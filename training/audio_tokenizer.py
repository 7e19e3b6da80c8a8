"""Training loop for the mel RVQ audio tokenizer, on the shared infrastructure.

``train_audio_tokenizer(cfg, train_manifest, val_manifest, run) -> Path`` (the exported tokenizer folder):

1. read the speech of both manifests (every audio segment, resampled to the tokenizer's rate; documents
   without audio are counted and skipped), and precompute the log-mel of the training audio once: the
   model sees mel frames only, so training never touches a waveform;
2. fit the per-bin normalisation, then train on random crops: forward, loss (L1 on normalised log-mel +
   commitment), backward, clip, step, log (metrics.jsonl + tensorboard, a progress bar); the waveform codec
   can add EnCodec's multi-scale STFT discriminator (``discriminator.enabled``, ``audio_discriminator.py``):
   adversarial + feature-matching terms for the codec, then a discriminator step of its own optimizer;
3. save resumable checkpoints (``training/snapshots.py``: model + AdamW state, and the discriminator + its Adam
   state when enabled) and WAV samples (original and reconstruction, also to tensorboard);
4. export the tokenizer to ``run.path / "tokenizer"`` with its config fingerprint, and score it on the
   validation speech (SI-SNR, mel distance, STOI/PESQ when installed, ASR-judge WER) into ``eval.json``.

A second call with the same config (fingerprint) returns the exported folder without retraining. Every
step's randomness is derived from (seed, step), so a resumed run continues exactly like an uninterrupted one.

Run it alone on the world:  ``python -m anyloom.training.audio_tokenizer --recipe audio_tokenizer``
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

from anyloom.config import added_field, fingerprint
from anyloom.progress import progress
from anyloom.tokenizers.audio_codec import WaveCodec, WaveCodecConfig
from anyloom.tokenizers.audio_common import prepare_wave
from anyloom.tokenizers.audio_discriminator import (
    DiscriminatorConfig,
    MultiScaleSTFTDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
)
from anyloom.tokenizers.audio_mel import MelFeatureConfig, MelFeatures, MelTokenizer, MelTokenizerConfig
from anyloom.training.metrics import MetricsLogger
from anyloom.training.optim import OptimConfig, build_optimizer, lr_factor
from anyloom.training.run import RunDir
from anyloom.training.seed import seed_everything, step_generator, step_seed
from anyloom.training.snapshots import Snapshots, TrainingLoop
from anyloom.weights import load_weights, read_metadata


@dataclass(frozen=True)
class SpeechTrainConfig:
    """The loop settings the trainers on speech share (the audio tokenizer's and the vocoder's ``train`` sections)."""

    steps: int = 1500
    batch_size: int = 16
    crop_seconds: float = 1.0  # random windows of the concatenated training speech
    max_seconds: float = 0.0  # wall-clock budget (0: none): training stops early past it, and says so
    max_train_items: int = 0  # 0: every training utterance
    log_every: int = 25
    ckpt_every: int = 250  # 0: only at the end
    keep_last: int = 2
    num_samples: int = 2  # validation utterances written as WAV
    eval_items: int = 64  # validation utterances scored at the end (ASR judge); 0: skip

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "keep_last"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.crop_seconds <= 0:
            raise ValueError(f"crop_seconds must be > 0, got {self.crop_seconds}")


@dataclass(frozen=True)
class AudioTokenizerTrainConfig(SpeechTrainConfig):
    sample_every: int = 0  # 0: samples only at the end
    # the ASR judge of that report: null, pocketsphinx's general English model; or a plug-in (group
    # anyloom.asr_grammars) giving a JSGF grammar of the data's sentences, e.g. the world's world_captions
    asr_grammar: str | None = added_field(None, neutral="world_captions")


@dataclass(frozen=True)
class AudioTokenizerStageConfig:
    """The recipe section ``audio_tokenizer``: which model, its config, and how to train it."""

    kind: Literal["mel_rvq", "seanet_codec"] = "mel_rvq"  # measured side by side in docs/BENCHMARKS.md
    mel: MelTokenizerConfig = field(default_factory=MelTokenizerConfig)  # kind mel_rvq
    codec: WaveCodecConfig = field(default_factory=WaveCodecConfig)  # kind seanet_codec
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-3, weight_decay=0.0, warmup_steps=50, schedule="cosine")
    )
    train: AudioTokenizerTrainConfig = field(default_factory=AudioTokenizerTrainConfig)
    # optional MS-STFT discriminator + feature matching (EnCodec), kind seanet_codec only; off by default
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)

    @property
    def sample_rate(self) -> int:
        """The rate the chosen model reads and writes."""
        return self.mel.features.sample_rate if self.kind == "mel_rvq" else self.codec.sample_rate

    def __post_init__(self) -> None:
        if self.discriminator.enabled and self.kind != "seanet_codec":
            raise ValueError(f"discriminator.enabled needs kind seanet_codec (it judges waveforms), got kind "
                             f"{self.kind!r}")


@dataclass
class SpeechSet:
    waves: list[np.ndarray]  # (T,) float32 mono at sample_rate
    texts: list[str]  # the document's text (the caption, for the world); "" if none
    sample_rate: int
    skipped: int  # documents without an audio segment
    repeated: int = 0  # documents whose recording an earlier document named (read once)

    def counts(self) -> str:
        """The read's counts for a log line: "(2 documents without audio skipped, 5 repeated recordings read once)"."""
        again = f", {self.repeated} repeated recording{'s' * (self.repeated != 1)} read once" if self.repeated else ""
        return f"({self.skipped} documents without audio skipped{again})"


def load_speech(manifest: str | Path, sample_rate: int, limit: int = 0) -> SpeechSet:
    """Every document's first audio segment (and its text), resampled to ``sample_rate``. A recording file that
    several documents name (instruction documents repeating it) is read once, with the first document's text: a
    trainer of sounds learns each recording once; the repeats are counted."""
    from anyloom.data.document import AudioSegment, TextSegment
    from anyloom.data.manifest import read_manifest

    waves, texts, skipped, seen, repeated = [], [], 0, set(), 0
    for doc in read_manifest(manifest).documents:
        audio = doc.first(AudioSegment)
        if audio is None:
            skipped += 1
            continue
        if audio.path is not None:
            if audio.path in seen:
                repeated += 1
                continue
            seen.add(audio.path)
        where = audio.path or f"{manifest} document {doc.id!r}"
        try:
            wave = prepare_wave(np.asarray(audio.wave), audio.sample_rate, sample_rate).wave[0]
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        waves.append(wave.numpy())
        texts.append(" ".join(s.text for s in doc.segments if isinstance(s, TextSegment)))
        if limit and len(waves) >= limit:
            break
    if not waves:
        raise ValueError(f"{manifest}: no document has an audio segment ({skipped} documents without one)")
    return SpeechSet(waves, texts, sample_rate, skipped, repeated)


def mel_corpus(model: MelTokenizer, waves: list[np.ndarray]) -> torch.Tensor:
    """(M, N): the log-mel frames of all utterances, end to end (each padded to whole code frames)."""
    spf, device = model.samples_per_frame, model.mel_mean.device
    chunks = []
    with torch.no_grad():
        for w in progress(waves, desc="log-mel"):
            t = torch.from_numpy(w)[None].to(device)
            t = F_.pad(t, (0, (-t.shape[-1]) % spf))
            chunks.append(model.features.log_mel(t)[0])
    return torch.cat(chunks, dim=-1)


def sample_crops(corpus: torch.Tensor, batch: int, frames: int, g: torch.Generator) -> torch.Tensor:
    """(M, N) -> (B, M, frames) random windows."""
    if corpus.shape[-1] < frames:
        corpus = F_.pad(corpus, (0, frames - corpus.shape[-1]), value=float(corpus.min()))
    starts = torch.randint(0, corpus.shape[-1] - frames + 1, (batch,), generator=g)
    idx = starts[:, None] + torch.arange(frames)[None]  # (B, frames)
    return corpus[:, idx].permute(1, 0, 2)  # (M, B, frames) -> (B, M, frames)


def wave_crops(corpus: torch.Tensor, batch: int, samples: int, g: torch.Generator) -> torch.Tensor:
    """(N,) -> (B, samples) random windows of the concatenated training speech."""
    return sample_crops(corpus[None], batch, samples, g)[:, 0]


class WaveformLoss(torch.nn.Module):
    """Multi-resolution STFT (spectral convergence + log magnitude L1) plus 80-bin log-mel L1."""

    def __init__(self, sample_rate: int, ffts: tuple[int, ...] = (512, 1024, 2048)):
        super().__init__()
        self.ffts = ffts
        self.mel = MelFeatures(MelFeatureConfig(sample_rate=sample_rate, hop_length=sample_rate // 50,
                                                f_max=sample_rate / 2))
        for n in ffts:
            self.register_buffer(f"window_{n}", torch.hann_window(n), persistent=False)

    def forward(self, est: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) x (B, T) -> (total loss, mel L1 in nats)."""
        loss = est.new_zeros(())
        for n in self.ffts:
            w = getattr(self, f"window_{n}")
            a = torch.stft(est, n, n // 4, window=w, return_complex=True).abs().clamp_min(1e-5)
            b = torch.stft(ref, n, n // 4, window=w, return_complex=True).abs().clamp_min(1e-5)
            loss = loss + (a - b).norm() / b.norm() + (a.log() - b.log()).abs().mean()
        usable = est.shape[-1] - est.shape[-1] % self.mel.cfg.hop_length
        mel_l1 = (self.mel.log_mel(est[:, :usable]) - self.mel.log_mel(ref[:, :usable])).abs().mean()
        return loss / len(self.ffts) + mel_l1, mel_l1


def codebook_perplexity(codes: torch.Tensor, codebook_size: int) -> list[float]:
    """(B, Q, F) -> per level exp(entropy) of the code histogram: how many codes are effectively in use."""
    out = []
    for q in range(codes.shape[1]):
        p = torch.bincount(codes[:, q].flatten(), minlength=codebook_size).float()
        p = p / p.sum()
        out.append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
    return out


# -- training ---------------------------------------------------------------------------------------------
@dataclass
class Adversary:
    """The discriminator and its optimizer: training state, checkpointed with the codec, never exported."""

    disc: MultiScaleSTFTDiscriminator
    opt: torch.optim.Optimizer


@dataclass
class AudioTrainer:
    """What a training step needs: the model, its training windows' source and its optimizer(s)."""

    cfg: AudioTokenizerStageConfig
    model: MelTokenizer | WaveCodec
    corpus: torch.Tensor  # (M, N) normalised log-mel frames (mel_rvq), or (N,) samples (seanet_codec)
    crop: int  # mel frames (whole code frames) or samples per training window
    opt: torch.optim.Optimizer
    adversary: Adversary | None = None
    wave_loss: WaveformLoss | None = None  # seanet_codec only
    seed: int = 0

    @property
    def waveform(self) -> bool:
        return self.wave_loss is not None


@dataclass
class StepOutput:
    """One step's losses and what its log line reads (tensors detached by the logging)."""

    loss: torch.Tensor
    recon_loss: torch.Tensor
    result: object  # the model's forward result (codes, losses, reconstruction)
    target: torch.Tensor  # the batch: (B, M, frames) normalised mel or (B, T) wave
    grad_norm: torch.Tensor
    mel_l1: torch.Tensor | None = None  # seanet_codec
    gan: dict[str, torch.Tensor] = field(default_factory=dict)  # d_loss, g_adv, g_feat when adversarial


def audio_tokenizer_fingerprint(cfg: AudioTokenizerStageConfig, train_manifest: str | Path, seed: int) -> str:
    """Only what shapes this kind's result: editing the other kind's section must not force a retrain."""
    model_cfg = cfg.codec if cfg.kind == "seanet_codec" else cfg.mel
    parts = {"kind": cfg.kind, "model": model_cfg, "optim": cfg.optim, "train": cfg.train, "seed": seed,
             "train_manifest": str(train_manifest)}
    if cfg.discriminator.enabled:  # only then: runs without it keep the fingerprints they had
        parts["discriminator"] = cfg.discriminator
    return fingerprint(parts)


def build_trainer(cfg: AudioTokenizerStageConfig, train: SpeechSet, model: MelTokenizer | WaveCodec, seed: int,
                  device: str | torch.device) -> AudioTrainer:
    """The training windows' source (log-mel computed once and normalised, or the concatenated waves), the
    optimizer, and the discriminator when enabled (built in this order: the order of random draws)."""
    tc = cfg.train
    crop_frames = max(1, int(round(tc.crop_seconds * model.frame_rate)))
    wave_loss = None
    if cfg.kind == "seanet_codec":
        corpus = torch.from_numpy(np.concatenate(train.waves)).to(device)  # (N,) samples
        crop = crop_frames * model.samples_per_frame
        wave_loss = WaveformLoss(model.sample_rate).to(device)
        if cfg.discriminator.enabled and crop < cfg.discriminator.min_samples:
            raise ValueError(f"audio_tokenizer.train.crop_seconds {tc.crop_seconds} gives {crop} samples, shorter "
                             f"than the discriminator's largest n_fft {cfg.discriminator.min_samples}")
    else:
        corpus = mel_corpus(model, train.waves).to(device)
        model.fit_normalization(corpus[None])
        corpus = model.normalize(corpus[None])[0]
        crop = crop_frames * cfg.mel.downsample  # mel frames of whole code frames
    opt = build_optimizer(model, cfg.optim)
    adversary = None
    if cfg.discriminator.enabled:
        disc = MultiScaleSTFTDiscriminator(cfg.discriminator).to(device)
        adversary = Adversary(disc, torch.optim.Adam(disc.parameters(), lr=cfg.discriminator.lr,
                                                     betas=cfg.discriminator.betas))
    return AudioTrainer(cfg, model, corpus, crop, opt, adversary, wave_loss, seed)


def train_step(t: AudioTrainer, step: int) -> StepOutput:
    """Draw the step's windows, forward, loss, backward, clip, step; then the discriminator's step."""
    cfg, tc, model = t.cfg, t.cfg.train, t.model
    torch.manual_seed(step_seed(t.seed, step))  # vector-quantize's k-means / dead-code draws
    g = step_generator(t.seed, step)
    for group in t.opt.param_groups:
        group["lr"] = cfg.optim.lr * lr_factor(step, tc.steps, cfg.optim)
    adversary = t.adversary if t.adversary is not None and step >= cfg.discriminator.start_step else None
    mel_l1, gan = None, {}
    if t.waveform:
        target = wave_crops(t.corpus, tc.batch_size, t.crop, g)  # (B, T)
        result = model(target)
        fake = result.wave[:, : target.shape[-1]]
        recon_loss, mel_l1 = t.wave_loss(fake, target)
        loss = recon_loss + result.quantizer_loss
        if adversary is not None:
            dc = cfg.discriminator
            with torch.no_grad():
                real_out = adversary.disc(target)  # feature-matching targets
            adversary.disc.requires_grad_(False)  # this backward feeds the codec only: skip D's weight grads
            fake_out = adversary.disc(fake)
            adversary.disc.requires_grad_(True)
            gan["g_adv"] = generator_loss(fake_out.logits, dc.loss)
            gan["g_feat"] = feature_matching_loss(real_out.features, fake_out.features)
            loss = loss + dc.adversarial_weight * gan["g_adv"] + dc.feature_weight * gan["g_feat"]
    else:
        target = sample_crops(t.corpus, tc.batch_size, t.crop, g)  # (B, M, frames)
        result = model(target)
        recon_loss = F_.l1_loss(result.recon, target)
        loss = recon_loss + result.commit_loss
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
    t.opt.step()
    t.opt.zero_grad(set_to_none=True)
    if adversary is not None:  # then the discriminator, on the same batch against the (detached) reconstruction
        d_loss = discriminator_loss(adversary.disc(target).logits, adversary.disc(fake.detach()).logits,
                                    cfg.discriminator.loss)
        d_loss.backward()
        adversary.opt.step()
        adversary.opt.zero_grad(set_to_none=True)
        gan = {"d_loss": d_loss, **gan}
    return StepOutput(loss, recon_loss, result, target, grad_norm, mel_l1, gan)


def step_record(t: AudioTrainer, out: StepOutput, cpu_seconds: float) -> dict[str, float]:
    """The step's log line: losses, mel L1 in natural-log units, commitment, codebook perplexity per level."""
    if t.waveform:
        nats, commit = float(out.mel_l1.detach()), float(out.result.quantizer_loss.detach())
    else:  # L1 in natural-log mel units: undo the per-bin scaling
        nats = float(((out.result.recon.detach() - out.target).abs() * t.model.mel_std[None, :, None]).mean())
        commit = float(out.result.commit_loss.detach())
    usage = codebook_perplexity(out.result.codes, t.model.codebook_size)
    return dict(loss=out.loss.item(), recon=out.recon_loss.item(), mel_l1_nats=nats, commit=commit,
                **{k: v.item() for k, v in out.gan.items()}, grad_norm=float(out.grad_norm),
                lr=t.opt.param_groups[0]["lr"],
                cpu_seconds=cpu_seconds,  # steadier than wall time on a shared machine
                **{f"perplexity_q{q}": u for q, u in enumerate(usage)})


def _write_samples(model: MelTokenizer | WaveCodec, speech: SpeechSet, run: RunDir, logger: MetricsLogger, step: int,
                   n: int) -> None:
    model.eval()
    for i, wave in enumerate(speech.waves[:n]):
        codes = model.encode(torch.from_numpy(wave)[None], speech.sample_rate).codes
        rec = model.decode(codes)[0].numpy()
        sf.write(run.samples / f"audio_step{step:07d}_{i}_reconstruction.wav", rec, model.sample_rate)
        sf.write(run.samples / f"audio_{i}_original.wav", wave, speech.sample_rate)
        logger.audio(f"audio/reconstruction_{i}", step, rec, model.sample_rate)
    model.train()


def evaluate_tokenizer(model: MelTokenizer | WaveCodec, val: SpeechSet, items: int,
                       asr_grammar: str | None = None) -> dict[str, float]:
    """Reconstruction scores on the first ``items`` validation utterances (SI-SNR, mel distance, ASR WER...);
    ``asr_grammar``: the plug-in whose JSGF grammar constrains the ASR judge (None: its general model)."""
    from anyloom.evaluation.asr import grammar_judge, word_error_rate
    from anyloom.evaluation.audio_metrics import evaluate_reconstruction

    judge = grammar_judge(asr_grammar, "audio_tokenizer.train.asr_grammar")
    report = evaluate_reconstruction(model, val.waves[:items], val.sample_rate, val.texts[:items], judge,
                                     word_error_rate)
    return report.as_eval()


def train_audio_tokenizer(
    cfg: AudioTokenizerStageConfig, train_manifest: str | Path, val_manifest: str | Path, run: RunDir,
    seed: int = 0, device: str | torch.device = "cpu",
) -> Path:
    """Train (or reuse) the audio tokenizer; returns the exported folder (``MelTokenizer.load`` or
    ``WaveCodec.load`` reads it, by ``kind`` in its config.json)."""
    fp = audio_tokenizer_fingerprint(cfg, train_manifest, seed)
    out = run.path / "tokenizer"
    if (out / "config.json").exists() and read_metadata(out).get("fingerprint") == fp:
        print(f"audio tokenizer: {out} is up to date (fingerprint {fp}); not retraining")
        return out
    tc = cfg.train
    seed_everything(seed)
    model = (WaveCodec(cfg.codec) if cfg.kind == "seanet_codec" else MelTokenizer(cfg.mel)).to(device)
    train = load_speech(train_manifest, model.sample_rate, tc.max_train_items)
    val = load_speech(val_manifest, model.sample_rate, max(tc.eval_items, tc.num_samples))
    print(f"audio tokenizer: {len(train.waves)} training utterances {train.counts()}, {len(val.waves)} validation")
    t = build_trainer(cfg, train, model, seed, device)
    snapshots = Snapshots(run.checkpoints, fp, keep_last=tc.keep_last, name="audio tokenizer",
                          models={"model": model, **({"disc": t.adversary.disc} if t.adversary else {})},
                          optimizers={"optim": t.opt, **({"disc_optim": t.adversary.opt} if t.adversary else {})})
    logger = MetricsLogger(run)
    start = snapshots.resume()
    model.train()
    loop = TrainingLoop("audio tokenizer", tc.steps, start=start, max_seconds=tc.max_seconds)
    for step in loop:
        outcome = train_step(t, step)
        if step % tc.log_every == 0 or step == tc.steps - 1:
            record = step_record(t, outcome, loop.cpu_seconds)
            logger.log(step, **record)
            loop.set_postfix(loss=f"{record['loss']:.3f}", nats=f"{record['mel_l1_nats']:.3f}")
        if loop.due(tc.ckpt_every, step + 1):
            snapshots.save(step + 1)
        if loop.due(tc.sample_every, step + 1):
            _write_samples(model, val, run, logger, step + 1, tc.num_samples)
    step, trained_seconds, trained_cpu = loop.done, loop.elapsed, loop.cpu_seconds
    snapshots.save(step)
    _write_samples(model, val, run, logger, step, tc.num_samples)
    model.eval()
    model.save(out, metadata={"fingerprint": fp, "steps": str(step), "train_seconds": f"{trained_seconds:.1f}"})
    results: dict[str, float] = {"audio_tokenizer.steps": step, "audio_tokenizer.train_seconds": trained_seconds,
                                 "audio_tokenizer.train_cpu_seconds": trained_cpu}
    if tc.eval_items:
        scores = evaluate_tokenizer(model, val, tc.eval_items, tc.asr_grammar)
        results.update(scores)
        logger.log(step, **{k.split(".", 1)[1]: v for k, v in scores.items()})
    run.write_json("eval.json", results)
    print("audio tokenizer: " + json.dumps({k: round(v, 4) for k, v in results.items()}))
    return out


def main(argv: list[str] | None = None) -> int:
    """Build the world, train the recipe's audio tokenizer on it, and score it on a split (default: test)."""
    import argparse
    import sys

    from anyloom.config import ConfigError
    from anyloom.evaluation.audio_metrics import evaluate_reconstruction
    from anyloom.recipes import load_recipe
    from anyloom.world.asr import SpeechJudge, word_error_rate
    from anyloom.world.dataset import WorldConfig, build_world

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--recipe", default="audio_tokenizer")
    p.add_argument("--eval-split", default="test", choices=["val", "test", "compositional", "none"])
    p.add_argument("--eval-items", type=int, default=500)
    p.add_argument("--score", default=None, help="an exported tokenizer folder to score instead of training one")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a loaded machine)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = build_world(getattr(recipe, "world", None) or WorldConfig())
    run = RunDir.from_config(recipe.run)
    if args.score:
        folder = Path(args.score)
    else:
        run.write_recipe(recipe)
        folder = train_audio_tokenizer(recipe.audio_tokenizer, world.train, world.val, run, seed=recipe.run.seed)
    if args.eval_split != "none":
        kind = load_weights(folder).config.get("kind")
        model = (WaveCodec if kind == "anyloom.seanet_codec" else MelTokenizer).load(folder)
        speech = load_speech(world.split(args.eval_split), model.sample_rate, args.eval_items)
        report = evaluate_reconstruction(model, speech.waves, speech.sample_rate, speech.texts, SpeechJudge(),
                                         word_error_rate)
        scores = report.as_eval(f"audio_tokenizer.{args.eval_split}")
        out = RunDir(folder.parent) if args.score else run
        out.write_json(f"eval_{args.eval_split}.json", {**scores, "tokenizer": str(folder)})
        print(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

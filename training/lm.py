"""The LM training loop: one function, ``train_lm``, reading top to bottom like nanoGPT's.

    for each step:  micro-batches -> forward -> loss -> backward (grad sync on the last) -> clip
                    -> stability check -> optimizer step (or skip) -> zero_grad -> lr step -> log -> checkpoint

It runs the same code in one process and under torchrun (FSDP2, see ``training/parallel.py``); the caller
(``scripts/train.py``) gives it the recipe slices, a run directory and a loader factory. Resuming is automatic:
the latest complete checkpoint in ``run.checkpoints`` is restored before the first step. SIGINT (Ctrl-C) and
SIGTERM (SLURM preemption) finish the current step, save a checkpoint and return ``interrupted=True``.

Loss normalisation: every micro-batch's mean loss is weighted by its share of the step's target tokens,
counted over all micro-batches and ranks. The gradient is then that of the mean over the global batch's
target tokens, whatever the split into ranks and accumulation steps (which is what makes 1 rank and N ranks
with the same global batch agree).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from anyloom.config import to_dict
from anyloom.progress import progress
from anyloom.sequences.vocab import Vocabulary
from anyloom.training import faults
from anyloom.training.checkpoint import Checkpointer
from anyloom.training.init import InitConfig, RowGradMask, freeze, row_mask
from anyloom.training.metrics import MetricsLogger
from anyloom.training.optim import OptimConfig, TimeBudgetLR, build_optimizer
from anyloom.training.parallel import (
    DistEnv,
    ParallelConfig,
    all_reduce_sum,
    autocast_context,
    build_parallel_model,
    close_distributed,
    init_distributed,
    set_gradient_sync,
)
from anyloom.training.run import RunDir
from anyloom.training.seed import seed_everything
from anyloom.training.stability import StabilityGuard, StepVerdict
from anyloom.training.train_config import TrainConfig
from anyloom.transformer.model import ModelConfig, Transformer

MODALITIES = ("text", "image", "audio")  # Batch.modality codes 0, 1, 2 (3 = special tokens, not reported)
_SUMS_DTYPE = torch.float64  # loss sums and token counts, summed over micro-batches, steps and ranks
# the train keys a checkpoint's weights depend on besides the model, optimizer and seed: resuming under other values
# is refused. Those left out may change between invocations: steps and max_seconds (a run extended or given a larger
# budget continues), grad_accum (the same global batch), logging, checkpointing and stability settings
_TRAJECTORY_KEYS = ("batch_size", "seq_len", "whole_documents")

# Dense bf16 peak FLOP/s for MFU, by a substring of torch.cuda.get_device_name(); unknown GPUs get no MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


class BatchLike(Protocol):
    tokens: torch.Tensor  # (B, T) int64 inputs
    targets: torch.Tensor  # (B, T) next-token ids
    loss_mask: torch.Tensor  # (B, T) bool: which targets count
    doc_ids: torch.Tensor  # (B, T) packed-document ids
    positions: torch.Tensor  # (B, T) positions restarting in every document
    modality: torch.Tensor  # (B, T) int8 modality of the target (0 text, 1 image, 2 audio, 3 special)


class LoaderLike(Protocol):
    """``sequences.packing.PackedLoader``: iterable of batches; its state restores exactly the next batch."""

    def __iter__(self) -> Iterator[BatchLike]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# sample_fn(model, step, run): periodic samples (PNG/WAV/TXT into run.samples). Called on EVERY rank, since a
# sharded model's forward needs all ranks; only rank 0 should write files.
SampleFn = Callable[[nn.Module, int, RunDir], None]


@dataclass
class LMTrainResult:
    step: int  # optimizer steps done in total (including those before a resume)
    resumed_from: int  # the checkpoint step this process started from (0: fresh start)
    losses: dict[int, float] = field(default_factory=dict)  # step -> global mean loss, steps run here
    skipped_steps: list[int] = field(default_factory=list)  # non-finite steps whose update was skipped
    interrupted: bool = False  # stopped by SIGINT/SIGTERM (after saving a checkpoint)
    checkpoint: Path | None = None  # the last checkpoint written
    tokens_per_s: float = 0.0  # global tokens per second over the steps run here
    budget_spent: bool = False  # stopped before train.steps because train.max_seconds ran out


def micro_batch_size(train_cfg: TrainConfig, world_size: int) -> int:
    """Rows per rank per micro-batch that the loader factory must produce."""
    per_rank, rem = divmod(train_cfg.batch_size, world_size * train_cfg.grad_accum)
    if rem or per_rank == 0:
        raise ValueError(
            f"train.batch_size={train_cfg.batch_size} must be a positive multiple of world_size ({world_size}) x "
            f"train.grad_accum ({train_cfg.grad_accum})"
        )
    return per_rank


class _StopFlag:
    """SIGINT/SIGTERM -> stop after this step; another SIGINT 2 s later interrupts at once.

    (A Ctrl-C under torchrun reaches a worker twice within milliseconds: from the terminal and forwarded by
    the agent. The second one must not abort the checkpoint that the first one asked for.)
    """

    def __init__(self) -> None:
        self.set = False
        self._first = 0.0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, Ctrl-C behaves as usual
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set and signum == signal.SIGINT and time.monotonic() - self._first > 2.0:
            raise KeyboardInterrupt
        if not self.set:
            self.set, self._first = True, time.monotonic()

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _batches(loader: LoaderLike) -> Iterator[BatchLike]:
    """Endless stream of batches: a loader that ends an epoch is iterated again."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the data loader produced no batch at all: no training data for this rank?")


def _check_batch(batch: BatchLike, rows: int, seq_len: int, step: int) -> None:
    shape = tuple(batch.tokens.shape)
    if shape != (rows, seq_len):
        raise ValueError(
            f"step {step}: the loader gave tokens of shape {shape}, expected (micro_batch_size, train.seq_len) = "
            f"({rows}, {seq_len}); build the loader with micro_batch_size(train_cfg, world_size) rows"
        )


def peak_bf16_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of ``device`` when it is a GPU of ``PEAK_BF16_FLOPS``; None otherwise."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _mfu(tokens_per_s: float, n_params: int, env: DistEnv) -> float | None:
    """Model FLOPs utilisation, 6N FLOPs per token (attention not counted), over all ranks' peak."""
    peak = peak_bf16_flops(env.device)
    return None if peak is None else 6 * n_params * tokens_per_s / (peak * env.world_size)


def _grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip to ``max_norm`` (0: no clipping) and return the global norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding this rank's partial norm
        norm = norm.full_tensor()
    return float(norm)


def train_lm(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    parallel_cfg: ParallelConfig,
    run: RunDir,
    make_loader: Callable[[int, int], LoaderLike],
    vocab_json: dict[str, Any] | None,
    seed: int,
    *,
    device: str = "auto",
    sample_fn: SampleFn | None = None,
    init: InitConfig | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
    data_key: str | None = None,
) -> LMTrainResult:
    """Train (or resume training) the LM; see the module docstring. Every rank calls this. ``initial_state``: full
    weights to start from (``training/init.py``), ``init`` what of them trains. ``data_key`` names the training data
    (e.g. a hash of the token shards and the task mixture): checkpoints record it, and resuming on other data is
    refused like resuming under other settings."""
    env = init_distributed(device)
    try:
        with _StopFlag() as stop:
            return _train(model_cfg, optim_cfg, train_cfg, parallel_cfg, run, make_loader, vocab_json, seed,
                          env, sample_fn, stop, init, initial_state, data_key)
    finally:
        close_distributed(env)


def _train(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    parallel_cfg: ParallelConfig,
    run: RunDir,
    make_loader: Callable[[int, int], LoaderLike],
    vocab_json: dict[str, Any] | None,
    seed: int,
    env: DistEnv,
    sample_fn: SampleFn | None,
    stop: _StopFlag,
    init: InitConfig | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
    data_key: str | None = None,
) -> LMTrainResult:
    """Build (or resume), then each step: train, account and log, sample, checkpoint; save at the end."""
    tr = _build(model_cfg, optim_cfg, train_cfg, parallel_cfg, run, make_loader, vocab_json, seed, env, init,
                initial_state, data_key)
    start = tr.result.resumed_from
    batches = _batches(tr.loader)
    meter = _Meter(torch.zeros(3 + 3 * len(MODALITIES), dtype=_SUMS_DTYPE, device=env.device))
    bar = progress(total=train_cfg.steps, initial=start, desc="train lm")
    tr.model.train()
    step = start
    try:
        while step < train_cfg.steps and not tr.scheduler.spent:
            step += 1
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(train_cfg.grad_accum)]
            out = _train_step(tr, micro, step, meter, stop, t0)
            _account(tr, meter, bar, step, out, time.perf_counter() - t0)
            paused = time.perf_counter()  # samples and checkpoints do not count against tokens/s
            if sample_fn is not None and train_cfg.sample_every and step % train_cfg.sample_every == 0:
                tr.model.eval()
                sample_fn(tr.model, step, run)
                tr.model.train()
            if out.stop:
                _save_interrupted(tr, step)
                break
            if train_cfg.ckpt_every and step % train_cfg.ckpt_every == 0 and step < train_cfg.steps:
                tr.save(step)
            meter.t0 += time.perf_counter() - paused
        else:
            _finish(tr, step)
        tr.ckpt.wait()
    finally:
        bar.close()
        tr.metrics.close()
    if tr.ckpt.last_saved is not None:
        tr.result.checkpoint = tr.ckpt.last_saved.path
    tr.result.tokens_per_s = meter.total_tokens / meter.total_time if meter.total_time > 0 else 0.0
    return tr.result


@dataclass
class _Trainer:
    """What the loop works on, built (or restored from the latest checkpoint) by ``_build``."""

    train_cfg: TrainConfig
    optim_cfg: OptimConfig
    env: DistEnv
    model: nn.Module
    n_params: int
    optimizer: torch.optim.Optimizer
    scheduler: TimeBudgetLR
    loader: LoaderLike
    rows: int  # rows per rank per micro-batch
    ckpt: Checkpointer
    config: dict[str, Any]  # saved with every checkpoint
    vocab_json: dict[str, Any] | None
    budget_start: float  # training seconds before this process (resume)
    result: LMTrainResult
    metrics: MetricsLogger
    guard: StabilityGuard
    amp: Any  # the autocast context of every forward
    grad_mask: Callable[[], None] | None = None  # init.output_rows: zeroes the frozen rows' gradients

    def save(self, step: int) -> None:
        self.result.checkpoint = self.ckpt.save(step, model=self.model, optimizer=self.optimizer,
                                                scheduler=self.scheduler, loader=self.loader, config=self.config,
                                                vocab=self.vocab_json)


@dataclass
class _Meter:
    """Sums since the last metrics line, and the totals behind ``LMTrainResult.tokens_per_s``."""

    # [loss*n, z*n, n, then (loss, correct, count) per modality], all-reduced at log time (kept on the device:
    # no host sync per micro-batch)
    sums: torch.Tensor
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)  # start of the interval (pauses excluded)
    total_tokens: int = 0
    total_time: float = 0.0


@dataclass
class _StepOutcome:
    loss: float  # global mean loss of the step
    grad_norm: float  # before clipping
    lr: float  # the lr the step was taken with
    stop: bool  # some rank got SIGINT/SIGTERM: every rank saves and stops after this step
    verdict: StepVerdict


def _build(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    train_cfg: TrainConfig,
    parallel_cfg: ParallelConfig,
    run: RunDir,
    make_loader: Callable[[int, int], LoaderLike],
    vocab_json: dict[str, Any] | None,
    seed: int,
    env: DistEnv,
    init: InitConfig | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
    data_key: str | None = None,
) -> _Trainer:
    """Seed, build model, optimizer, scheduler and loader, and restore the latest checkpoint into them."""
    rows = micro_batch_size(train_cfg, env.world_size)
    seed_everything(seed)
    trained: list[str] = []
    model = build_parallel_model(lambda: Transformer(model_cfg), parallel_cfg, env, initial_state,
                                 prepare=(lambda m: trained.extend(freeze(m, init))) if init is not None else None)
    n_params = sum(p.numel() for p in model.parameters())
    grad_mask, no_decay = None, ()
    if init is not None:
        total = len(list(model.parameters()))
        if init.output_rows != "all":
            vocab = Vocabulary.from_dict(vocab_json or {}, source="the run's vocabulary")
            grad_mask = RowGradMask(model, row_mask(vocab, init.output_rows, model_cfg.vocab_size))
            no_decay = ("output.weight",)
        if env.is_main and (len(trained) < total or grad_mask is not None):
            rows_note = f"; of output.weight only the {init.output_rows} rows" if grad_mask is not None else ""
            print(f"init: training {len(trained)} of {total} parameter tensors{rows_note}")
    optimizer = build_optimizer(model, optim_cfg, no_decay=no_decay)
    scheduler = TimeBudgetLR(optimizer, train_cfg.steps, optim_cfg, train_cfg.max_seconds)
    loader = make_loader(env.rank, env.world_size)
    ckpt = Checkpointer(run.checkpoints, train_cfg.keep_last, train_cfg.async_checkpoint)
    data = {"data": data_key} if data_key else {}
    config = {"model": to_dict(model_cfg), "optim": to_dict(optim_cfg), "train": to_dict(train_cfg),
              "parallel": to_dict(parallel_cfg), "seed": seed, **data}
    expect = {"model": model_cfg, "optim": optim_cfg, "seed": seed,
              "train": {k: config["train"][k] for k in _TRAJECTORY_KEYS}, **data}
    resumed = ckpt.resume(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, expect=expect)
    start = resumed.step if resumed else 0
    budget_start = scheduler.elapsed
    result = LMTrainResult(step=start, resumed_from=start, checkpoint=resumed.path if resumed else None)
    metrics = MetricsLogger(run)
    if resumed and env.is_main:
        print(f"resumed from {resumed.path} (step {start})")
    guard = StabilityGuard(train_cfg.max_bad_steps, train_cfg.spike_factor, train_cfg.spike_window)
    amp = autocast_context(parallel_cfg, env, model)
    return _Trainer(train_cfg, optim_cfg, env, model, n_params, optimizer, scheduler, loader, rows, ckpt, config,
                    vocab_json, budget_start, result, metrics, guard, amp, grad_mask)


def _forward_backward(tr: _Trainer, micro: list[BatchLike], step: int, sums: torch.Tensor) -> float:
    """Forward and backward every micro-batch (gradients synced on the last), adding its loss sums to ``sums``;
    returns the step's target-token count over every micro-batch and rank (see module docstring)."""
    env = tr.env
    for mb in micro:
        _check_batch(mb, tr.rows, tr.train_cfg.seq_len, step)
    n_locals = [float(mb.loss_mask.sum()) for mb in micro]  # host tensors: no device sync
    n_global = float(all_reduce_sum(torch.tensor([sum(n_locals)], dtype=_SUMS_DTYPE, device=env.device)))
    if n_global == 0:
        raise ValueError(f"step {step}: the global batch has no target tokens (loss_mask is all False)")
    for i, (mb, n_local) in enumerate(zip(micro, n_locals)):
        mb = vars(mb.to(env.device, non_blocking=True))
        set_gradient_sync(tr.model, i == len(micro) - 1)
        with tr.amp:
            hidden = tr.model(mb["tokens"], doc_ids=mb["doc_ids"], positions=mb["positions"],
                              span_ids=mb["span_ids"])
            out = tr.model.loss(hidden, mb["targets"], mb["loss_mask"])
        # FSDP averages gradients over ranks: multiply by world_size to get the global token mean
        loss = faults.maybe_nan_loss(out.loss * (n_local * env.world_size / n_global), step)
        loss.backward()
        accumulate_loss_sums(sums, out, mb, n_local, loss.detach() * (n_global / env.world_size))
    return n_global


def _train_step(tr: _Trainer, micro: list[BatchLike], step: int, meter: _Meter, stop: _StopFlag,
                t0: float) -> _StepOutcome:
    """Forward/backward, clip, stability check, optimizer step (or skip), zero_grad, lr step."""
    env = tr.env
    step_sums = torch.zeros_like(meter.sums)
    n_global = _forward_backward(tr, micro, step, step_sums)
    if tr.grad_mask is not None:
        tr.grad_mask()
    grad_norm = _grad_norm(tr.model, tr.optim_cfg.grad_clip)
    # one collective for the step's loss, "did any rank get SIGINT/SIGTERM" (all stop together) and the
    # training time so far (its mean over ranks drives a time budget identically everywhere)
    elapsed = tr.budget_start + meter.total_time + (time.perf_counter() - t0)
    flags = torch.tensor([float(stop.set), elapsed], dtype=_SUMS_DTYPE, device=env.device)
    shared = all_reduce_sum(torch.cat([step_sums[:1], flags]))
    step_loss, stop_votes = float(shared[0]) / n_global, float(shared[1])
    elapsed = float(shared[2]) / env.world_size
    verdict = tr.guard.check(step, step_loss, grad_norm)
    if verdict.skip:
        tr.result.skipped_steps.append(step)
        tr.metrics.log(step, skipped=1, loss=step_loss, grad_norm=grad_norm, reason=verdict.reason)
        if env.is_main:
            print(f"warning: {verdict.reason}; update skipped")
    else:
        tr.optimizer.step()
        meter.sums += step_sums
    tr.optimizer.zero_grad(set_to_none=True)
    lr = tr.scheduler.get_last_lr()[0]
    tr.scheduler.step(step, elapsed)
    return _StepOutcome(step_loss, grad_norm, lr, stop_votes > 0, verdict)


def _account(tr: _Trainer, meter: _Meter, bar: tqdm, step: int, out: _StepOutcome, dt: float) -> None:
    """Count the step's tokens and time, record its loss (and a spike), move the bar; log every log_every."""
    train_cfg = tr.train_cfg
    step_tokens = train_cfg.batch_size * train_cfg.seq_len
    meter.tokens += step_tokens
    meter.total_tokens += step_tokens
    meter.total_time += dt
    tr.result.step = step
    tr.result.losses[step] = out.loss
    if out.verdict.spike:
        tr.metrics.log(step, loss_spike=out.loss, reason=out.verdict.reason)
    bar.update(1)
    bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{out.lr:.2e}")
    if step % train_cfg.log_every == 0 or step == train_cfg.steps:
        _log_interval(tr, meter, step, out)


def _log_interval(tr: _Trainer, meter: _Meter, step: int, out: _StepOutcome) -> None:
    """One metrics line: the interval's losses and accuracies over all ranks, this step's grad norm and lr,
    tokens/s (and MFU) since the last line; then start a new interval."""
    totals = all_reduce_sum(meter.sums.clone())
    elapsed = time.perf_counter() - meter.t0
    tps = meter.tokens / max(elapsed, 1e-9)
    record = loss_metrics(totals)
    record.update(grad_norm=out.grad_norm, lr=out.lr, tokens_per_s=tps)
    mfu = _mfu(tps, tr.n_params, tr.env)
    if mfu is not None:
        record["mfu"] = mfu
    tr.metrics.log(step, **record)
    meter.sums.zero_()
    meter.tokens, meter.t0 = 0, time.perf_counter()


def _save_interrupted(tr: _Trainer, step: int) -> None:
    tr.result.interrupted = True
    tr.save(step)
    if tr.env.is_main:
        print(f"interrupted at step {step}: checkpoint saved to {tr.result.checkpoint}; run again to resume")


def _finish(tr: _Trainer, step: int) -> None:
    """The loop ran out of steps or of time: save the last step (if any ran here) and say why it stopped early."""
    train_cfg = tr.train_cfg
    if step > tr.result.resumed_from:
        tr.save(step)
    if tr.scheduler.spent and step < train_cfg.steps:
        tr.result.budget_spent = True
        if tr.env.is_main:
            print(f"train lm: stopped at step {step}/{train_cfg.steps}: the train.max_seconds budget of "
                  f"{train_cfg.max_seconds:.0f} s is spent (the lr schedule ended annealed)")


def accumulate_loss_sums(sums: torch.Tensor, out: Any, mb: dict[str, Any], n_local: float,
                         weighted_loss: torch.Tensor) -> None:
    """Add one micro-batch's loss sums (token-weighted) and per-modality loss/accuracy sums to ``sums``.

    Shared with ``evaluation.lm_perplexity`` so held-out numbers mean exactly what the training metrics mean.
    """
    sums[0] += weighted_loss.to(sums.dtype)  # = out.loss * n_local (NaN when injected)
    sums[1] += out.z_loss.detach().to(sums.dtype) * n_local
    sums[2] += n_local
    mask = mb["loss_mask"].bool()
    token_loss = out.token_loss.detach().to(sums.dtype)
    for m in range(len(MODALITIES)):
        sel = mask & (mb["modality"] == m)
        sums[3 + 3 * m] += torch.where(sel, token_loss, 0).sum()
        sums[4 + 3 * m] += (out.correct & sel).sum()
        sums[5 + 3 * m] += sel.sum()


def loss_metrics(totals: torch.Tensor) -> dict[str, float]:
    n = float(totals[2])
    record = {"loss": float(totals[0]) / n if n else math.nan, "z_loss": float(totals[1]) / n if n else math.nan}
    for m, name in enumerate(MODALITIES):
        count = float(totals[5 + 3 * m])
        if count:
            record[f"loss_{name}"] = float(totals[3 + 3 * m]) / count
            record[f"acc_{name}"] = float(totals[4 + 3 * m]) / count
    return record

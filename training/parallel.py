"""Distribution applied from outside the model (torchtitan's ``parallelize.py`` order).

    activation checkpointing (none / selective / full)  ->  optional per-block torch.compile (and of ``model.loss``)
    ->  FSDP2 ``fully_shard`` per block  ->  ``fully_shard`` of the root

The model file knows nothing about any of this: it only exposes ``model.layers`` (an ``nn.ModuleList`` of
blocks) and two forward-like methods, ``model(tokens, ...)`` and ``model.loss(hidden, ...)``.

Process groups come from the torchrun environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...): gloo on
CPU, nccl on GPU. A single process (``WORLD_SIZE`` unset or 1) runs the plain module with no process group.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch import nn

from anyloom import device as devices
from anyloom.config import added_field
from anyloom.device import pick_device

# how an LM trains in bf16 (ParallelConfig.mixed_precision)
MixedPrecision = Literal["auto", "amx", "native_bf16", "bf16", "fp32"]
MIXED_PRECISION_MODES: tuple[str, ...] = get_args(MixedPrecision)


@dataclass(frozen=True)
class ParallelConfig:
    # fsdp: FSDP2 when WORLD_SIZE > 1 (a single process trains the plain module); hsdp: hybrid sharding, each group
    # of shard_group ranks holds one sharded replica and the groups replicate it; none: single process only
    strategy: Literal["fsdp", "hsdp", "none"] = "fsdp"
    shard_group: int = 0  # hsdp: ranks per replica (0: the ranks of one node, torchrun's LOCAL_WORLD_SIZE)
    # none; selective: recompute cheap ops, keep matmul/attention outputs; full: recompute whole blocks
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    compile: bool = False  # torch.compile each block (after AC, before sharding)
    # torch.compile model.loss too: the output head and its chunked cross-entropy, with dynamic shapes (the rows
    # under the loss mask vary from batch to batch), its target check left eager. Same losses as eager in fp32;
    # whether it pays depends on the machine (docs/experiments/2026-12-07-compiled-loss.md)
    compile_loss: bool = added_field(False)
    # auto: bf16 params + fp32 gradient reduction on GPU, fp32 everywhere on CPU. amx: as auto, and bf16 also on a
    # CPU with AMX tiles (Sapphire Rapids and later), whose bf16 matmuls run ~4-5x faster than fp32 ones there.
    # native_bf16: as amx, and bf16 also on a CPU with AVX-512 BF16 (Zen 4, Cooper Lake), whose bf16 matmuls run
    # ~2-3x faster than fp32 ones (docs/BENCHMARKS.md). Attention stays fp32 on the CPU (transformer.attention)
    mixed_precision: MixedPrecision = "auto"
    # cpu: build the full model on the host, initialise it, then shard: the initial weights do not depend on
    # the number of ranks (1-vs-N parity). meta: each rank allocates and initialises only its own shard, for
    # models too large for host memory; the initial weights then depend on the sharding.
    init_device: Literal["cpu", "meta"] = "cpu"
    reshard_after_forward: bool = True  # FSDP: free gathered block params after forward (less memory)


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its rank, how many there are, and its device."""

    rank: int
    world_size: int
    device: torch.device
    created_group: bool  # this process initialised the default process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun job described by the environment; a plain process when ``WORLD_SIZE`` <= 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world <= 1:
        return DistEnv(0, 1, dev, created_group=False)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {key} is not set: launch with torchrun "
                               "(see docs/DISTRIBUTED.md)")
    created = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if dev.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=dev)
        else:
            dist.init_process_group(backend="gloo")
        created = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), dev, created_group=created)


def close_distributed(env: DistEnv) -> None:
    if env.created_group and dist.is_initialized():
        dist.destroy_process_group()


def cpu_runs_bf16(mode: str) -> bool:
    """Whether ``mode`` (a ``mixed_precision`` setting) trains in bf16 on this machine's CPU."""
    return mode == "bf16" or (mode == "amx" and devices.cpu_has_amx()) or (
        mode == "native_bf16" and devices.cpu_has_native_bf16())


def param_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    mode = cfg.mixed_precision
    if mode not in MIXED_PRECISION_MODES:
        raise ValueError(f"parallel.mixed_precision={mode!r}: expected one of {', '.join(MIXED_PRECISION_MODES)}")
    if mode == "bf16" or (mode != "fp32" and device.type == "cuda"):
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and cpu_runs_bf16(mode) else torch.float32


# Ops whose outputs selective checkpointing keeps: the expensive ones (matmuls, attention). Everything else
# (norms, activations, rotary, residual adds) is cheap to recompute and dominates activation memory.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs):  # noqa: ANN001 - signature fixed by torch.utils.checkpoint
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap each block of ``model.layers``; the wrapper's state-dict hooks keep the plain parameter names."""
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kwargs = {}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    elif mode != "full":
        raise ValueError(f"activation_checkpointing must be none, selective or full, got {mode!r}")
    # a block no gradient flows through (frozen, with nothing trained before it: a fine-tune of the head only) is
    # left alone: its backward never runs, and compile refuses full checkpointing of such a graph
    flowing = any(p.requires_grad for p in model.tok_embeddings.parameters())
    for i, block in enumerate(model.layers):
        flowing = flowing or any(p.requires_grad for p in block.parameters())
        if flowing:
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (``Module.compile`` keeps parameter names, unlike ``torch.compile(m)``)."""
    for block in model.layers:
        block.compile()


def apply_compile_loss(model: nn.Module) -> None:
    """Compile ``model.loss`` in place: the instance attribute shadows the method, parameters and state dict are
    untouched. ``dynamic=True``: one graph whatever the count of rows under the loss mask."""
    model.loss = torch.compile(model.loss, dynamic=True)


def mesh_shape(cfg: ParallelConfig, world_size: int) -> tuple[int, ...]:
    """(ranks,) for FSDP; (replicas, ranks per replica) for HSDP, the shard groups being consecutive ranks (one
    node each by default, so the all-gathers stay inside a node and only gradient all-reduces cross nodes)."""
    if cfg.strategy != "hsdp":
        return (world_size,)
    group = cfg.shard_group or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if group < 1 or world_size % group:
        raise ValueError(f"parallel.shard_group={group} must divide the {world_size} ranks (hsdp: replicas x ranks "
                         f"per replica)")
    return (world_size // group, group)


def apply_fsdp(model: nn.Module, cfg: ParallelConfig, device: torch.device) -> None:
    """``fully_shard`` each block, then the root; ``model.loss`` becomes an FSDP forward method so the
    output head's parameters are gathered when the loss uses them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, mesh_shape(cfg, dist.get_world_size()),
                            mesh_dim_names=("replicate", "shard") if cfg.strategy == "hsdp" else ("shard",))
    dtype = param_dtype(cfg, device)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    # the root keeps its parameters gathered after forward: model.loss needs the output head right away
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    if hasattr(model, "loss"):
        register_fsdp_forward_method(model, "loss")


def build_parallel_model(model_factory, cfg: ParallelConfig, env: DistEnv,  # noqa: ANN001
                         initial_state: dict[str, torch.Tensor] | None = None,
                         prepare: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Build the model with ``model_factory()`` and distribute it; initial weights from ``init_weights()``, or the
    full (unsharded) ``initial_state`` when given (over several ranks rank 0's, broadcast; the others pass ``{}``).
    ``prepare(model)`` runs on the plain module before it is wrapped (freezing parameters, ``training/init.py``).

    The caller seeds the RNG before calling: with ``init_device='cpu'`` every rank builds identical weights.
    """
    if cfg.strategy == "none" and env.distributed:
        raise ValueError(
            f"parallel.strategy=none runs a single process, but WORLD_SIZE={env.world_size}; use strategy=fsdp"
        )
    use_fsdp = cfg.strategy in ("fsdp", "hsdp") and env.distributed
    if cfg.init_device == "meta" and not use_fsdp:
        raise ValueError("parallel.init_device=meta only makes sense with FSDP over several ranks")
    init_ctx = torch.device("meta") if cfg.init_device == "meta" else contextlib.nullcontext()
    with init_ctx:
        model = model_factory()
    if cfg.init_device == "cpu":
        model.init_weights()
    if prepare is not None:
        prepare(model)
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model)
    if cfg.compile_loss:
        apply_compile_loss(model)
    if use_fsdp:
        apply_fsdp(model, cfg, env.device)
    if cfg.init_device == "meta":
        model.to_empty(device=env.device)
        with torch.no_grad():
            model.init_weights()
    else:
        model.to(env.device)
    if initial_state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # names and shards are matched through FSDP, activation-checkpoint and compile wrappers alike; over several
        # ranks only rank 0 holds the weights (the others pass {}) and each rank receives its shard from it
        options = StateDictOptions(full_state_dict=True, strict=True, broadcast_from_rank0=env.distributed)
        set_model_state_dict(model, initial_state, options=options)
    return model


def autocast_context(cfg: ParallelConfig, env: DistEnv, model: nn.Module) -> contextlib.AbstractContextManager:
    """bf16 autocast for a single unsharded process whose param_dtype is bf16 (FSDP's MixedPrecisionPolicy does
    it otherwise): fp32 master weights and optimizer state, bf16 matmuls."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule) or param_dtype(cfg, env.device) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=torch.bfloat16)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Gradient accumulation: skip the reduce-scatter on all but the last micro-batch of a step."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t

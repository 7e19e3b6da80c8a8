"""Start LM training from an existing model (``init:`` in a recipe): an imported checkpoint or an exported run.

    make train RECIPE=manifest_tiny ARGS="init.from=runs/llama"
    init:
      from: runs/anole               # a run directory with export/, or an export folder
      train: ["output.weight"]       # parameter-name patterns that train (fnmatch); the rest stay frozen
      output_rows: image             # only these rows of output.weight train (Anole trained its image rows)

With ``init.from`` the run keeps the model's id space: its vocabulary, its text tokenizer and its image / audio
tokenizers are used as they are (the tokenizer stages copy them into the run instead of training), and the LM
starts from its weights, with its architecture (``model:`` keeps choosing kernels, fused CE, z-loss ...;
``ARCHITECTURE`` lists the fields that come from the checkpoint). A run that already has a checkpoint resumes
from that instead, as usual.

Freezing: parameters outside ``init.train`` get ``requires_grad=False`` (FSDP2 shards them like the rest and
reduces no gradient for them); ``output_rows`` zeroes the gradient of the other rows of ``output.weight`` after
every backward and takes the head out of weight decay, so those rows stay exactly as they were.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from anyloom.config import ConfigError, build
from anyloom.sequences.vocab import Vocabulary
from anyloom.transformer.model import ModelConfig

# ModelConfig fields that describe the weights (taken from the checkpoint); the others choose how to compute
ARCHITECTURE = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "multiple_of", "max_seq_len",
                "rope_theta", "norm_eps", "qk_norm", "qk_norm_type", "norm_reorder", "tie_embeddings",
                "grid_positions", "grid_token_range", "grid_start_token", "grid_size", "code_factors")
Rows = Literal["all", "text", "image", "audio"]


@dataclass(frozen=True)
class InitConfig:
    # a run directory (with export/) or an export folder: weights, vocabulary and tokenizers the run starts from
    from_: str | None = field(default=None, metadata={"key": "from"})
    train: tuple[str, ...] = ("*",)  # parameter-name patterns (fnmatch, e.g. "layers.*.attention.*") that train
    output_rows: Rows = "all"  # rows of output.weight that train: the ids of one modality, or all

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("init.train is empty: list the parameter patterns that train (['*'] for all)")
        if self.from_ is None and (tuple(self.train) != ("*",) or self.output_rows != "all"):
            raise ValueError("init.train / init.output_rows freeze parts of a model given by init.from; set it")


@dataclass
class Start:
    """A model to continue from: its export folder, architecture, vocabulary and full (unsharded) weights."""

    export: Path
    config: ModelConfig
    vocab: Vocabulary
    state: dict[str, torch.Tensor]


def _export(cfg: InitConfig) -> Path:
    from anyloom.generation.pipeline import PipelineError, find_export

    try:
        return find_export(Path(cfg.from_))
    except PipelineError as e:
        raise ConfigError(f"init.from: {e}") from e


def read_start(cfg: InitConfig, recipe_model: ModelConfig, weights: bool = True) -> Start:
    """The export ``init.from`` names, its architecture with the recipe's computing choices (kernels, losses);
    ``weights=False`` leaves ``state`` empty (ranks other than 0 receive their shards from rank 0)."""
    from anyloom.weights import load_weights

    export = _export(cfg)
    saved = load_weights(export, tensors=weights)
    if saved.vocab is None:
        raise ConfigError(f"init.from: {export} has no vocab.json; its id space is unknown")
    vocab = Vocabulary.from_dict(saved.vocab, source=str(export / "vocab.json"))
    theirs = build(ModelConfig, saved.config, prefix=f"{export / 'config.json'}")
    model = dataclasses.replace(recipe_model, **{k: getattr(theirs, k) for k in ARCHITECTURE})
    return Start(export, model, vocab, saved.state_dict)


def tokenizer_folder(export: Path, modality: str) -> Path | None:
    """Where the ``modality`` tokenizer of an export is (the places ``anyloom.load`` looks), or None."""
    from anyloom.generation.pipeline import STAGES, tokenizer_candidates
    from anyloom.tokenizers.registry import holds_tokenizer

    found = [c for c in tokenizer_candidates(export, STAGES[modality]) if holds_tokenizer(c, modality)]
    return found[0] if found else None


def media_sizes(cfg: InitConfig, image_size: tuple[int, int], sample_rate: int) -> tuple[tuple[int, int], int]:
    """The picture size and audio rate of the tokenizers of the export ``init.from`` names (the given defaults for a
    modality it has no tokenizer of): the data stage prepares documents for them."""
    from anyloom.tokenizers.registry import load_tokenizer

    export = _export(cfg)
    image, audio = tokenizer_folder(export, "image"), tokenizer_folder(export, "audio")
    if image is not None:
        image_size = tuple(load_tokenizer("image", image).image_size)
    if audio is not None:
        sample_rate = int(load_tokenizer("audio", audio).sample_rate)
    return image_size, sample_rate


def freeze(model: nn.Module, cfg: InitConfig) -> list[str]:
    """``requires_grad=False`` on the parameters no ``init.train`` pattern names; returns the trained names. Runs on
    the plain model, before activation checkpointing, compile and FSDP wrap it (``build_parallel_model``'s
    ``prepare``), so the names are the model's own."""
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pattern) for pattern in cfg.train))
        if p.requires_grad:
            trained.append(name)
    if not trained:
        names = [n for n, _ in model.named_parameters()][:4]
        raise ConfigError(f"init.train {list(cfg.train)} names no parameter (names look like {names})")
    return trained


def row_mask(vocab: Vocabulary, rows: Rows, size: int) -> torch.Tensor | None:
    """(size, 1) 1.0 on the output rows that train, 0.0 elsewhere; None for all rows."""
    if rows == "all":
        return None
    lo, hi = {"text": vocab.text_range, "image": vocab.image_range,
              "audio": (vocab.audio_offset, vocab.special_offset)}[rows]
    if lo == hi:
        raise ConfigError(f"init.output_rows: {rows}: the vocabulary has no {rows} ids")
    mask = torch.zeros(size, 1)
    mask[lo:hi] = 1.0
    return mask


class RowGradMask:
    """Zeroes the gradient of the frozen rows of ``output.weight`` (call after backward, before clipping)."""

    def __init__(self, model: nn.Module, mask: torch.Tensor):
        self.param = dict(model.named_parameters()).get("output.weight")
        if self.param is None or not self.param.requires_grad:
            raise ConfigError("init.output_rows needs output.weight to train (add it to init.train; a model with "
                              "tied embeddings has no separate head)")
        mask = mask.to(self.param.device, self.param.dtype)
        if hasattr(self.param, "device_mesh"):  # an FSDP2-sharded DTensor: the mask sharded the same way
            from torch.distributed.tensor import distribute_tensor

            mask = distribute_tensor(mask, self.param.device_mesh, self.param.placements)
        self.mask = mask

    def __call__(self) -> None:
        if self.param.grad is not None:
            self.param.grad.mul_(self.mask)

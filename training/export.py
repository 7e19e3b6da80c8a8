"""Consolidate a sharded DCP training checkpoint into inference weights.

    python scripts/export.py --checkpoint runs/world/checkpoints/step_00001500 --out runs/world/export
    python scripts/export.py --run runs/world            # the latest complete checkpoint of the run

Writes ``model.safetensors`` (the model's full tensors, no optimizer state) + ``config.json`` (the model
config the run trained with) + ``vocab.json`` through ``anyloom.weights.save_weights``. Runs in one
process whatever the number of ranks that wrote the checkpoint; the model is never instantiated, so any
checkpoint written by ``anyloom.training.checkpoint`` exports.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from anyloom.training.checkpoint import CONFIG, TRAIN_STATE, VOCAB, is_complete, latest_checkpoint
from anyloom.weights import save_weights

PREFIX = "model."


def load_model_tensors(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of a DCP checkpoint, keyed by parameter name."""
    checkpoint = Path(checkpoint)
    if not is_complete(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: not a complete DCP checkpoint (no .metadata; an interrupted save?)")
    reader = FileSystemReader(checkpoint)
    meta = reader.read_metadata()
    state = {
        key: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for key, m in meta.state_dict_metadata.items()
        if key.startswith(PREFIX) and isinstance(m, TensorStorageMetadata)
    }
    if not state:
        raise ValueError(f"{checkpoint}: holds no '{PREFIX}*' tensors; not an LM training checkpoint")
    dcp.load(state, storage_reader=reader, no_dist=True)
    return {key[len(PREFIX):]: t for key, t in state.items()}


def checkpoint_digest(checkpoint: str | Path) -> str:
    """A cheap identity of a checkpoint's contents (its settings and training state, which records the training
    time spent): two trainings that reach the same step under the same path get different digests, without
    reading the weights. The export records it (``source_digest``) so the chain knows whether its export is
    of this very checkpoint."""
    digest = hashlib.sha256()
    for name in (CONFIG, TRAIN_STATE):
        f = Path(checkpoint) / name
        digest.update(f.read_bytes() if f.is_file() else b"-")
    return digest.hexdigest()[:16]


def export(checkpoint: str | Path, out: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    config_path = checkpoint / CONFIG
    if not config_path.exists():
        raise FileNotFoundError(f"{checkpoint}: no {CONFIG}; cannot know which model these weights belong to")
    config = json.loads(config_path.read_text())
    if "model" not in config:
        raise ValueError(f"{config_path}: no 'model' section")
    vocab = json.loads((checkpoint / VOCAB).read_text()) if (checkpoint / VOCAB).exists() else None
    tensors = load_model_tensors(checkpoint)
    return save_weights(out, tensors, config["model"], vocab,
                        metadata={"source": str(checkpoint), "source_digest": checkpoint_digest(checkpoint)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint directory (step_XXXXXXXX)")
    src.add_argument("--run", help="a run directory: export its latest complete checkpoint")
    p.add_argument("--out", help="output folder (default: <run>/export)")
    a = p.parse_args(argv)
    if a.run:
        ref = latest_checkpoint(Path(a.run) / "checkpoints")
        if ref is None:
            print(f"error: {a.run}/checkpoints has no complete checkpoint", file=sys.stderr)
            return 2
        checkpoint, out = ref.path, Path(a.out or Path(a.run) / "export")
    else:
        checkpoint = Path(a.checkpoint)
        out = Path(a.out or checkpoint.parent.parent / "export")
    try:
        folder = export(checkpoint, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {checkpoint} -> {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

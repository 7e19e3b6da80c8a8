"""Inference weights on disk: ``model.safetensors`` + ``config.json`` (+ ``vocab.json``) in one folder.

This is the plain, framework-free format that exports, tokenizers and decoders use. Loading never
executes code: tensors come from safetensors, everything else is JSON. (Sharded, resumable training
state uses torch.distributed.checkpoint instead; see the distributed training modules.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from anyloom.config import to_dict

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.json"


@dataclass
class SavedWeights:
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    vocab: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def save_weights(
    folder: str | Path,
    state_dict: dict[str, torch.Tensor],
    config: Any,
    vocab: Any | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write weights (contiguous, de-aliased), the config (dataclass or dict) and optional vocabulary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
    if vocab is not None:
        (folder / VOCAB).write_text(json.dumps(to_dict(vocab), indent=2) + "\n")
    return folder


def read_metadata(folder: str | Path) -> dict[str, str]:
    """The safetensors metadata of ``folder``'s weights (e.g. the fingerprint they were trained with); {} if none."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_weights(folder: str | Path, device: str | torch.device = "cpu", tensors: bool = True) -> SavedWeights:
    """Read a folder written by :func:`save_weights`; clear errors for missing or foreign folders. ``tensors=False``
    reads only the config and vocabulary (``state_dict`` empty)."""
    folder = Path(folder)
    if not (folder / WEIGHTS).exists():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS} (expected a folder written by save_weights)")
    if not (folder / CONFIG).exists():
        raise FileNotFoundError(f"{folder}: {WEIGHTS} without {CONFIG}; cannot know what model it belongs to")
    metadata = read_metadata(folder)
    state = load_file(str(folder / WEIGHTS), device=str(device)) if tensors else {}
    config = json.loads((folder / CONFIG).read_text())
    vocab = json.loads((folder / VOCAB).read_text()) if (folder / VOCAB).exists() else None
    return SavedWeights(state, config, vocab, metadata)


def read_json(path: str | Path, missing: str) -> Any:
    """A JSON file's content; FileNotFoundError with ``missing`` when there is none, ValueError naming the file and
    line when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


def hf_weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face-format model folder: the shards ``model.safetensors.index.json``
    names, else ``model.safetensors``. Other safetensors files beside them (an adapter, a reference file) are not
    the model's and are never read."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (expected a JSON object with 'weight_map')") from e
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in the folder: {', '.join(missing[:4])}")
        return files
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    others = sorted(f.name for f in folder.glob("*.safetensors"))
    found = f" (found only {', '.join(others[:4])}, which are not the model's weights)" if others else ""
    raise FileNotFoundError(f"{folder}: no {WEIGHTS} and no model.safetensors.index.json{found}; only safetensors "
                            f"checkpoints in Hugging Face layout are imported")

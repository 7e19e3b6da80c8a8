"""Pretrained image tokenizers from Hugging Face-format folders (``config.json`` + safetensors).

    import_image_tokenizer("path/to/emu3-vq")       -> Emu3VQTokenizer       (encode AND decode)
    import_image_tokenizer("path/to/chameleon-7b")  -> ChameleonVQTokenizer  (encode only: see below)

Accepted folders: the standalone VQ model (``model_type`` ``emu3_vqgan`` / ``chameleon_vqgan``, keys
``encoder.*``, ``quantize.*``, ...) or a whole Emu3 / Chameleon checkpoint (``model_type`` ``emu3`` /
``chameleon``, the VQ config under ``vq_config`` and its weights under ``model.vqmodel.`` or ``vqmodel.``),
single-file or sharded (``model.safetensors.index.json``). Only the VQ tensors are read.

The weights go into our own ports of the two architectures (``image_import_emu3.py``,
``image_import_chameleon.py``); they keep the Hugging Face parameter names, so the mapping is a prefix strip,
and every key and shape is checked before anything is loaded. Chameleon's Hugging Face port ships only the
VQGAN encoder and quantizer (no decoder weights exist in that format), so ``ChameleonVQTokenizer.decode``
raises a clear error; Emu3's port has the decoder, and ours decodes.

This file also holds the VQGAN building blocks both ports share (ResNet block, asymmetric-pad downsample,
nearest-neighbour codebook), written after taming-transformers' layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------- reading


@dataclass
class HFVQWeights:
    config: dict[str, Any]  # the VQ model's own config (vq_config of a whole checkpoint)
    state_dict: dict[str, torch.Tensor]  # VQ tensors with the VQ model's own names (prefix stripped)
    folder: Path
    extra: dict[str, Any]  # preprocessor_config.json when present


VQ_PREFIXES = ("model.vqmodel.", "vqmodel.")


def read_hf_vq(folder: str | Path, vq_model_type: str, full_model_type: str) -> HFVQWeights:
    """Read ``config.json`` and the VQ tensors of a Hugging Face folder (see module docstring)."""
    from safetensors import safe_open

    folder = Path(folder)
    from anyloom.weights import hf_weight_files, read_json

    cfg_file = folder / "config.json"
    config = read_json(cfg_file, f"{folder}: no config.json (expected a Hugging Face model folder)")
    model_type = config.get("model_type")
    if model_type == full_model_type:
        if not isinstance(config.get("vq_config"), dict):
            raise ValueError(f"{cfg_file}: model_type {model_type!r} without a 'vq_config' mapping")
        vq_config, prefixes = config["vq_config"], VQ_PREFIXES
    elif model_type == vq_model_type:
        vq_config, prefixes = config, ("",)
    else:
        raise ValueError(f"{cfg_file}: model_type is {model_type!r}; expected {vq_model_type!r} or {full_model_type!r}")

    files = hf_weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                for prefix in prefixes:
                    if key.startswith(prefix):
                        state[key[len(prefix) :]] = f.get_tensor(key)
                        break
    if not state:
        raise ValueError(f"{folder}: no VQ tensors found (looked for keys starting with {list(prefixes)})")
    pre = folder / "preprocessor_config.json"
    extra = json.loads(pre.read_text()) if pre.is_file() else {}
    return HFVQWeights(config=vq_config, state_dict=state, folder=folder, extra=extra)


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str | Path,
                 ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` after checking every key and shape; the error lists what is wrong."""
    expected = module.state_dict()
    given = {k: v for k, v in state.items() if not k.startswith(ignore)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(given)) if tuple(given[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:4]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})")
    if shapes:
        problems.append(f"{len(shapes)} with other shapes (e.g. {shapes[:3]})")
    if problems:
        raise ValueError(f"{source}: weights do not match the config: " + "; ".join(problems))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in given.items()}, strict=True)


def save_imported(model: nn.Module, folder: str | Path, kind: str) -> Path:
    """An imported tokenizer -> ``folder`` (safetensors + config.json with ``kind`` beside the config fields)."""
    from anyloom.config import to_dict
    from anyloom.weights import save_weights

    return save_weights(folder, model.state_dict(), {"kind": kind, **to_dict(model.cfg)})


def load_imported(cls: type, config_cls: type, folder: str | Path, kind: str) -> Any:
    """The inverse of :func:`save_imported`: refuses a folder of another kind, checks every key and shape."""
    from anyloom.config import build
    from anyloom.weights import load_weights

    saved = load_weights(folder)
    config = dict(saved.config)
    if config.pop("kind", None) != kind:
        raise ValueError(f"{folder}: not a saved {cls.__name__} (config.json kind != {kind!r})")
    model = cls(build(config_cls, config, prefix="config.json"))
    load_checked(model, saved.state_dict, folder)
    return model.eval()


def need(config: dict[str, Any], key: str, source: str | Path, kind: type | tuple[type, ...] = int) -> Any:
    if key not in config:
        raise ValueError(f"{source}: config is missing '{key}'")
    value = config[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ValueError(f"{source}: config '{key}' = {value!r} has the wrong type")
    return value


# ------------------------------------------------------------------------------------------ blocks


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class VQGANResnetBlock(nn.Module):
    """norm-SiLU-conv twice + (1x1 nin_shortcut when widths differ). ``norm`` builds norm1 / norm2, so the
    decoder can use a spatially conditioned norm (Emu3) where the encoder uses GroupNorm(32)."""

    def __init__(self, c_in: int, c_out: int, norm: Callable[[int], nn.Module] = group_norm):
        super().__init__()
        self.norm1 = norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, *cond)))
        h = self.conv2(F.silu(self.norm2(h, *cond)))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class CondGroupNorm(nn.GroupNorm):
    """GroupNorm(32) that ignores an optional conditioning argument (same call as SpatialNorm)."""

    def __init__(self, channels: int):
        super().__init__(num_groups=32, num_channels=channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class AsymDownsample(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom by one (taming-transformers' downsample)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class NearestCodebook(nn.Module):
    """A plain VQ codebook: the code of a vector is its nearest embedding in L2."""

    def __init__(self, num_codes: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z (M, D) -> codes (M,); ||z||^2 + ||e||^2 - 2 z.e, the same expansion both reference models use."""
        e = self.embedding.weight
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()  # (M, K)
        return d.argmin(1)


def import_image_tokenizer(folder: str | Path, **kw: Any) -> nn.Module:
    """Detect Emu3 or Chameleon from ``config.json`` and import it (keyword args go to the importer)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type in ("emu3", "emu3_vqgan"):
        from anyloom.tokenizers.image_import_emu3 import import_emu3_vq

        return import_emu3_vq(folder, **kw)
    if model_type in ("chameleon", "chameleon_vqgan"):
        from anyloom.tokenizers.image_import_chameleon import import_chameleon_vq

        return import_chameleon_vq(folder, **kw)
    raise ValueError(f"{path}: model_type {model_type!r} has no image tokenizer importer (emu3, chameleon)")

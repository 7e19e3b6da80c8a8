"""Which class reads an exported tokenizer folder: the ``kind`` in its ``config.json`` -> the class.

A text tokenizer folder holds ``text.model`` (sentencepiece, trained here) or ``tokenizer.json`` + ``text_ids.json``
(an imported checkpoint's own tokenizer, ``text_hf.py``); an image or audio tokenizer folder holds
``config.json`` + ``model.safetensors``, and ``config.json``'s ``kind`` names one of the classes below, each
satisfying its contract in :mod:`anyloom.tokenizers.base`. A new tokenizer kind adds one line here.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

# config.json "kind" -> (module, class)
IMAGE_KINDS: dict[str, tuple[str, str]] = {
    "image_vq": ("anyloom.tokenizers.image_vq", "ImageVQTokenizer"),
    "emu3_vq": ("anyloom.tokenizers.image_import_emu3", "Emu3VQTokenizer"),  # imported (image_importers.py)
    "chameleon_vq": ("anyloom.tokenizers.image_import_chameleon", "ChameleonVQTokenizer"),  # imported
}
AUDIO_KINDS: dict[str, tuple[str, str]] = {
    "anyloom.mel_rvq": ("anyloom.tokenizers.audio_mel", "MelTokenizer"),
    "anyloom.seanet_codec": ("anyloom.tokenizers.audio_codec", "WaveCodec"),  # trained here, or imported EnCodec
    "anyloom.dac": ("anyloom.tokenizers.audio_dac", "DacCodec"),  # imported (tokenizers/audio_importers.py)
    "anyloom.mimi": ("anyloom.tokenizers.audio_mimi", "MimiCodec"),  # imported (tokenizers/audio_importers.py)
}
KINDS = {"image": IMAGE_KINDS, "audio": AUDIO_KINDS}


class TokenizerFolderError(ValueError):
    """A folder that is not an exported tokenizer of the asked modality; names the file and what was expected."""


def holds_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _holds_hf_text(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() and (folder / "text_ids.json").is_file()


def holds_tokenizer(folder: Path, modality: str) -> bool:
    """Whether ``folder`` has the files of an exported ``modality`` tokenizer (its kind is checked on loading)."""
    if modality == "text":
        return (folder / "text.model").is_file() or _holds_hf_text(folder)
    return holds_weights(folder)


def tokenizer_class(modality: str, folder: Path) -> Any:
    """The class that loads the image or audio tokenizer exported in ``folder`` (by its config.json ``kind``)."""
    kinds = KINDS[modality]
    try:
        kind = json.loads((folder / "config.json").read_text()).get("kind")
    except json.JSONDecodeError as e:
        raise TokenizerFolderError(f"{folder / 'config.json'}: not valid JSON ({e})") from e
    if kind not in kinds:
        raise TokenizerFolderError(f"{folder / 'config.json'}: tokenizer kind {kind!r} is unknown; known: "
                                   f"{sorted(kinds)}")
    module, name = kinds[kind]
    return getattr(importlib.import_module(module), name)


def load_tokenizer(modality: str, folder: str | Path, device: torch.device | str = "cpu") -> Any:
    """Load one exported tokenizer folder (text: TextTokenizer; image/audio: by the ``kind`` in config.json)."""
    folder = Path(folder)
    if modality not in ("text", *KINDS):
        raise TokenizerFolderError(f"modality {modality!r}: expected text, image or audio")
    if not holds_tokenizer(folder, modality):
        raise TokenizerFolderError(f"{folder}: not an exported {modality} tokenizer folder")
    if modality == "text":
        from anyloom.tokenizers.text import TextTokenizer
        from anyloom.tokenizers.text_hf import HFTextTokenizer

        return TextTokenizer.load(folder) if (folder / "text.model").is_file() else HFTextTokenizer.load(folder)
    return tokenizer_class(modality, folder).load(folder, device=device)

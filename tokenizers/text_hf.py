"""A released checkpoint's own text tokenizer (a ``tokenizer.json`` of the Hugging Face ``tokenizers`` library),
seen through the unified vocabulary's text range.

An imported model keeps its tokenizer file unchanged; what changes is where its ids live. The unified vocabulary
puts text ids first, image codes after them and the special tokens last (``anyloom.sequences.vocab``), so the
checkpoint's ids are renumbered on import: its image-code ids and the ids of its bos / eos / pad / image markers
leave the text range, and every other id of the file keeps its order. ``text_ids.json`` records which file ids
make up the text range, as ``[lo, hi)`` runs; ``encode`` and ``decode`` translate through it, so
``encode(s)`` are unified text ids and ``decode`` reads them back as the original tokenizer would.

The folder: ``tokenizer.json`` (the checkpoint's file, byte for byte) + ``text_ids.json``. Nothing is executed:
both are JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
IDS_FILE = "text_ids.json"
FORMAT_VERSION = 1


def runs_of(ids: np.ndarray) -> list[list[int]]:
    """Sorted unique ids -> ``[lo, hi)`` runs of consecutive ids (a 150k-id text range is a handful of runs)."""
    if ids.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [ids.size]])
    return [[int(ids[s]), int(ids[e - 1]) + 1] for s, e in zip(starts, ends)]


class HFTextTokenizer:
    """``encode`` / ``decode`` of a ``tokenizers`` file, in unified text ids ``[0, vocab_size)``."""

    def __init__(self, tokenizer_json: bytes, file_ids: Iterable[int], source: str = "tokenizer.json"):
        from tokenizers import Tokenizer

        self.tokenizer_json = tokenizer_json
        self.source = source
        try:
            self._tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise ValueError(f"{source}: not a tokenizers-library JSON file ({e})") from e
        self.file_ids = np.asarray(sorted(set(int(i) for i in file_ids)), dtype=np.int64)  # text id -> file id
        if self.file_ids.size == 0:
            raise ValueError(f"{source}: the text range is empty")
        self._to_text = np.full(int(self.file_ids[-1]) + 1, -1, dtype=np.int64)  # file id -> text id (-1: none)
        self._to_text[self.file_ids] = np.arange(self.file_ids.size)

    @property
    def vocab_size(self) -> int:
        return int(self.file_ids.size)

    @property
    def fingerprint(self) -> str:
        """Hash of the file and the text range: changes whenever the tokenizer would produce other ids."""
        h = hashlib.sha256(self.tokenizer_json)
        h.update(self.file_ids.tobytes())
        return h.hexdigest()[:16]

    def file_id(self, token: str) -> int | None:
        """The file id of a token name (a special token such as ``<s>``, or a piece), or None."""
        return self._tok.token_to_id(token)

    def encode_file_ids(self, text: str) -> list[int]:
        """The file's own ids of ``text``, without the file's bos/eos (the vocabulary adds its own)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def to_text_ids(self, file_ids: Iterable[int]) -> list[int]:
        """File ids -> unified text ids; an id outside the text range (an image code, a marker) is refused."""
        ids = np.asarray(list(file_ids), dtype=np.int64)
        inside = (ids >= 0) & (ids < self._to_text.size)
        mapped = np.where(inside, self._to_text[np.clip(ids, 0, self._to_text.size - 1)], -1)
        bad = np.flatnonzero(mapped < 0)
        if bad.size:
            token = self._tok.id_to_token(int(ids[bad[0]]))
            raise ValueError(f"{token!r} (id {int(ids[bad[0]])} of {self.source}) is not text in this model's "
                             f"vocabulary: it is one of its image codes or special markers")
        return mapped.tolist()

    def encode(self, text: str) -> list[int]:
        return self.to_text_ids(self.encode_file_ids(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"text ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self._tok.decode(self.file_ids[ids].tolist(), skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(self.file_ids[int(token_id)]))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TOKENIZER_FILE).write_bytes(self.tokenizer_json)
        meta = {"format_version": FORMAT_VERSION, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint,
                "file_ids": runs_of(self.file_ids)}
        (folder / IDS_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> HFTextTokenizer:
        folder = Path(folder)
        for name in (TOKENIZER_FILE, IDS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder}: no {name} (expected a folder written by HFTextTokenizer.save)")
        where = folder / IDS_FILE
        try:
            meta = json.loads(where.read_text())
            runs = meta["file_ids"]
            file_ids = np.concatenate([np.arange(lo, hi) for lo, hi in runs]) if runs else np.zeros(0, np.int64)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: expected {{'file_ids': [[lo, hi], ...], ...}} ({e})") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{where}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}")
        tok = cls((folder / TOKENIZER_FILE).read_bytes(), file_ids, source=str(folder / TOKENIZER_FILE))
        if meta.get("vocab_size") != tok.vocab_size:
            raise ValueError(f"{where}: vocab_size {meta.get('vocab_size')} does not match its runs "
                             f"({tok.vocab_size} ids)")
        return tok

    def __repr__(self) -> str:
        return f"HFTextTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"

"""Text tokenizer: a sentencepiece BPE trained in process, with byte fallback so no string is ever unknown.

The model is trained from an iterator of strings (the world's captions, plus an optional general corpus file)
in about a second, single-threaded so that the same corpus always gives the same model bytes. It is saved
beside checkpoints as ``text.model`` (sentencepiece's own protobuf) plus ``text_tokenizer.json`` (the config) and
``words.txt`` (the training texts' words, one per line: prompts with other words are flagged as out of domain).

sentencepiece's own bos/eos/pad are disabled: the unified vocabulary (``anyloom.sequences.vocab``) owns every
special token. Ids here are ``[0, vocab_size)``; id 0 is sentencepiece's ``<unk>`` (never produced, thanks to
byte fallback) and ids 1..256 are the byte pieces ``<0x00>``..``<0xFF>``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from anyloom.config import build, to_dict

MODEL_FILE = "text.model"
CONFIG_FILE = "text_tokenizer.json"
WORDS_FILE = "words.txt"

# unk + 256 byte pieces + at least a handful of merges; below this sentencepiece cannot train a byte-fallback BPE.
MIN_VOCAB_SIZE = 260


@dataclass(frozen=True)
class TextTokenizerConfig:
    vocab_size: int = 512  # an upper bound: a small corpus stops earlier (every word is one piece by then)
    corpus_path: str | None = None  # optional extra UTF-8 text file, one sentence per line, added to the captions
    max_sentence_length: int = 4192  # bytes; longer corpus lines are skipped by sentencepiece

    def __post_init__(self) -> None:
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size={self.vocab_size} is too small: byte fallback needs >= {MIN_VOCAB_SIZE}")


def _corpus_lines(path: str | Path) -> Iterator[str]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text corpus {path} does not exist (text_tokenizer.corpus_path)")
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


class TextTokenizer:
    """A trained sentencepiece BPE; ``encode``/``decode`` are exact inverses for any string (byte fallback)."""

    def __init__(self, model_bytes: bytes, config: TextTokenizerConfig | None = None,
                 known_words: Iterable[str] | None = None):
        import sentencepiece as spm

        self.config = config or TextTokenizerConfig()
        self.model_bytes = model_bytes
        # the words of the training texts (``words_of``), for out-of-domain warnings; None: not recorded
        self.known_words = None if known_words is None else frozenset(known_words)
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int | None = None,
        config: TextTokenizerConfig | None = None,
    ) -> TextTokenizer:
        """Train on ``texts`` (plus ``config.corpus_path`` if set). Same inputs -> byte-identical model."""
        import sentencepiece as spm

        config = config or TextTokenizerConfig()
        vocab_size = vocab_size if vocab_size is not None else config.vocab_size
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback needs >= {MIN_VOCAB_SIZE}")
        lines = [t.strip() for t in texts if t and t.strip()]
        if config.corpus_path:
            lines.extend(_corpus_lines(config.corpus_path))
        if not lines:
            raise ValueError("cannot train a text tokenizer on an empty corpus (no non-blank strings)")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # a tiny caption corpus runs out of merges before vocab_size; keep what exists
            byte_fallback=True,
            character_coverage=1.0,
            num_threads=1,  # multi-threaded training is not guaranteed to be deterministic
            max_sentence_length=config.max_sentence_length,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            unk_id=0,
            minloglevel=2,
        )
        return cls(model.getvalue(), config, known_words={w for line in lines for w in words_of(line)})

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def fingerprint(self) -> str:
        """Hash of the model bytes: changes whenever the tokenizer would produce different ids."""
        return hashlib.sha256(self.model_bytes).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"text ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self._sp.decode(ids)

    def unseen_words(self, text: str) -> list[str]:
        """The words of ``text`` (``words_of``) that no training text had, in order, each once; [] when the
        training words were not recorded."""
        if self.known_words is None:
            return []
        return list(dict.fromkeys(w for w in words_of(text) if w not in self.known_words))

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (MODEL_FILE + ".tmp")
        tmp.write_bytes(self.model_bytes)
        tmp.replace(folder / MODEL_FILE)
        meta = {"config": to_dict(self.config), "vocab_size": self.vocab_size, "fingerprint": self.fingerprint}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if self.known_words is not None:
            (folder / WORDS_FILE).write_text("".join(w + "\n" for w in sorted(self.known_words)))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TextTokenizer:
        folder = Path(folder)
        model_path = folder / MODEL_FILE
        if not model_path.exists():
            raise FileNotFoundError(f"{folder}: no {MODEL_FILE} (expected a folder written by TextTokenizer.save)")
        config = TextTokenizerConfig()
        meta: dict = {}
        if (folder / CONFIG_FILE).exists():
            meta = json.loads((folder / CONFIG_FILE).read_text())
            config = build(TextTokenizerConfig, meta.get("config", {}), prefix=str(folder / CONFIG_FILE))
        words_path = folder / WORDS_FILE
        words = words_path.read_text().split() if words_path.is_file() else None
        tok = cls(model_path.read_bytes(), config, known_words=words)
        if "vocab_size" in meta and meta["vocab_size"] != tok.vocab_size:
            raise ValueError(
                f"{folder / CONFIG_FILE}: vocab_size {meta['vocab_size']} does not match {MODEL_FILE} "
                f"({tok.vocab_size}); the folder mixes files from two tokenizers"
            )
        return tok

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"


def words_of(text: str) -> list[str]:
    """The lower-cased words of a text: runs of letters and digits in any script (a run without spaces, as in
    Japanese, counts as one word)."""
    return re.findall(r"\w+", text.lower())


__all__ = ["TextTokenizer", "TextTokenizerConfig", "MODEL_FILE", "CONFIG_FILE", "WORDS_FILE", "words_of"]

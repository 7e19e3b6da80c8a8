"""The unified vocabulary: one frozen, typed description of the id space the LM's embedding sees.

Layout of ids (contiguous ranges, in this order)::

    [0, text_size)                                  text ids (sentencepiece BPE)
    [image_offset, image_offset + K_img)            image codes (one codebook)
    [audio_offset + q*K_aud, audio_offset+(q+1)*K_aud)  audio codes of residual level q = 0..Q-1
    [special_offset, special_offset + len(SPECIAL_TOKENS))   special tokens, in SPECIAL_TOKENS order

Audio gets one range per codebook level (as in AnyGPT/MusicGen flattening), so a token id alone says which
level it is, and constrained decoding can enforce the level order.

Besides the id space, the vocabulary fixes the span layout (image grid, row-end tokens, audio pattern),
because a stream can only be parsed back with it; it is saved with every checkpoint (``vocab.json``) and
checked on load. Special tokens are always all reserved (unused ones are simply never legal), so their ids
do not move when a layout option is switched.

Modality ids (per token, used by the loader and losses): 0 text, 1 image, 2 audio, 3 special.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

MODALITY_TEXT, MODALITY_IMAGE, MODALITY_AUDIO, MODALITY_SPECIAL = 0, 1, 2, 3
MODALITY_NAMES = ("text", "image", "audio", "special")

# name -> what it means. Order is the id order after special_offset; append only (ids are saved in checkpoints).
SPECIAL_TOKENS: tuple[tuple[str, str], ...] = (
    ("pad", "filler after a document; never a target"),
    ("bos", "first token of every document"),
    ("eos", "last token of every document"),
    ("boi", "begin of an image span: h*w image codes (+ row ends) follow, then eoi"),
    ("eoi", "end of an image span"),
    ("boa", "begin of an audio span: audio codes laid out by audio_pattern follow, then eoa"),
    ("eoa", "end of an audio span"),
    ("row_end", "after each row of image codes, only when image_row_end (Emu3 / Lumina-mGPT style)"),
    ("audio_pad", "empty slot of the MusicGen delay pattern (level q is delayed by q frames)"),
)
SPECIAL_NAMES = tuple(name for name, _ in SPECIAL_TOKENS)

AudioPattern = Literal["flat", "delay"]
_PATTERNS = ("flat", "delay")
BIDIRECTIONAL_MODALITIES = ("image", "audio")
FORMAT_VERSION = 1
# fields added after the first files were written: saved only when set, so older files keep their bytes
_WRITTEN_WHEN_SET = ("bidirectional", "image_prefix", "image_suffix")


class VocabularyError(ValueError):
    """A vocabulary that is invalid or does not match the one a checkpoint or shard was built with."""


@dataclass(frozen=True)
class Vocabulary:
    text_size: int  # number of text ids (the text tokenizer's vocab_size)
    image_codebook_size: int  # K_img; 0 when the model has no images
    image_grid: tuple[int, int]  # (h, w) codes per image; every image span holds exactly h*w codes
    audio_codebook_size: int  # K_aud per level; 0 when the model has no audio
    audio_num_codebooks: int  # Q residual levels
    image_row_end: bool = False  # a row_end token after each row of image codes
    audio_pattern: AudioPattern = "flat"  # "flat": frame-major f0q0 f0q1 .. ; "delay": MusicGen delay pattern
    # modalities ("image", "audio") whose GIVEN spans the model reads bidirectionally (prefix-LM style): a span
    # that is a condition (not trained in its document, or part of a prompt) attends to all of itself; trained
    # spans stay causal. It moves no id; it is how streams are read, so it travels with the checkpoint's
    # vocab.json (written only when set: vocabularies without it keep their files and fingerprints)
    bidirectional: tuple[str, ...] = ()
    # fixed ids inside every image span, right after <boi> and right before <eoi>: an imported model's own image
    # layout (Emu3: the "h*w" size text and its image-token marker before the codes, end-of-frame after them);
    # written to vocab.json only when set
    image_prefix: tuple[int, ...] = ()
    image_suffix: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("text_size", "image_codebook_size", "audio_codebook_size", "audio_num_codebooks"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise VocabularyError(f"Vocabulary.{name} must be an integer >= 0, got {value!r}")
        if self.text_size < 1:
            raise VocabularyError(f"Vocabulary.text_size must be >= 1, got {self.text_size}")
        grid = tuple(self.image_grid)
        if len(grid) != 2 or any(not isinstance(g, (int, np.integer)) or g < 1 for g in grid):
            raise VocabularyError(f"Vocabulary.image_grid must be (h, w) with h, w >= 1, got {self.image_grid!r}")
        object.__setattr__(self, "image_grid", (int(grid[0]), int(grid[1])))
        if self.audio_codebook_size > 0 and self.audio_num_codebooks < 1:
            raise VocabularyError("Vocabulary.audio_num_codebooks must be >= 1 when audio_codebook_size > 0")
        if self.audio_pattern not in _PATTERNS:
            raise VocabularyError(f"Vocabulary.audio_pattern must be one of {_PATTERNS}, got {self.audio_pattern!r}")
        if isinstance(self.bidirectional, str) or not all(m in BIDIRECTIONAL_MODALITIES for m in self.bidirectional):
            raise VocabularyError(f"Vocabulary.bidirectional must list modalities among {BIDIRECTIONAL_MODALITIES}, "
                                  f"got {self.bidirectional!r}")
        object.__setattr__(self, "bidirectional", tuple(dict.fromkeys(self.bidirectional)))
        for name in ("image_prefix", "image_suffix"):
            ids = getattr(self, name)
            if isinstance(ids, (str, bytes)) or not all(
                    isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < self.text_size
                    for i in ids):
                raise VocabularyError(f"Vocabulary.{name} must list text ids in [0, {self.text_size}), got {ids!r}")
            object.__setattr__(self, name, tuple(int(i) for i in ids))

    @classmethod
    def build(
        cls,
        text_vocab_size: int,
        image_codebook_size: int,
        audio_codebook_size: int,
        audio_num_codebooks: int,
        image_grid: tuple[int, int],
        *,
        image_row_end: bool = False,
        audio_pattern: AudioPattern = "flat",
        bidirectional: tuple[str, ...] = (),
        image_prefix: tuple[int, ...] = (),
        image_suffix: tuple[int, ...] = (),
    ) -> Vocabulary:
        """The vocabulary for tokenizers of these sizes (read them off the trained tokenizers' configs)."""
        return cls(
            text_size=text_vocab_size,
            image_codebook_size=image_codebook_size,
            image_grid=tuple(image_grid),
            audio_codebook_size=audio_codebook_size,
            audio_num_codebooks=audio_num_codebooks if audio_codebook_size > 0 else 0,
            image_row_end=image_row_end,
            audio_pattern=audio_pattern,
            bidirectional=bidirectional,
            image_prefix=tuple(image_prefix),
            image_suffix=tuple(image_suffix),
        )

    @classmethod
    def from_tokenizers(
        cls, text: Any, image: Any, audio: Any, *, image_row_end: bool = False, audio_pattern: AudioPattern = "flat",
        bidirectional: tuple[str, ...] = (),
    ) -> Vocabulary:
        """From a text tokenizer (``vocab_size``), an ImageTokenizer and an AudioTokenizer (tokenizers/base.py); a
        modality without a tokenizer (None: the data has none of it) gets no ids."""
        return cls.build(
            text.vocab_size,
            image.codebook_size if image is not None else 0,
            audio.codebook_size if audio is not None else 0,
            audio.num_codebooks if audio is not None else 0,
            tuple(image.grid) if image is not None else (0, 0),
            image_row_end=image_row_end,
            audio_pattern=audio_pattern,
            bidirectional=bidirectional,
        )

    # ---- ranges (cached: the dataclass is frozen, and the loader asks once per span) --------------------------
    @functools.cached_property
    def image_offset(self) -> int:
        return self.text_size

    @functools.cached_property
    def audio_offset(self) -> int:
        return self.image_offset + self.image_codebook_size

    @functools.cached_property
    def special_offset(self) -> int:
        return self.audio_offset + self.audio_codebook_size * self.audio_num_codebooks

    @functools.cached_property
    def size(self) -> int:
        """Total number of ids: what the LM's embedding and output layer see."""
        return self.special_offset + len(SPECIAL_TOKENS)

    @property
    def image_tokens_per_image(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def image_span_length(self) -> int:
        """Tokens between boi and eoi (exclusive): the fixed prefix, the codes (and row ends), the fixed suffix."""
        h, w = self.image_grid
        return len(self.image_prefix) + h * w + (h if self.image_row_end else 0) + len(self.image_suffix)

    def audio_range(self, level: int) -> tuple[int, int]:
        """[lo, hi) ids of audio level ``level``."""
        if not 0 <= level < self.audio_num_codebooks:
            raise IndexError(f"audio level {level} out of range [0, {self.audio_num_codebooks})")
        lo = self.audio_offset + level * self.audio_codebook_size
        return lo, lo + self.audio_codebook_size

    @property
    def image_range(self) -> tuple[int, int]:
        return self.image_offset, self.audio_offset

    @property
    def text_range(self) -> tuple[int, int]:
        return 0, self.text_size

    # ---- special tokens -------------------------------------------------------------------------------------
    @functools.cached_property
    def _special_ids(self) -> dict[str, int]:
        return {name: self.special_offset + i for i, name in enumerate(SPECIAL_NAMES)}

    def special(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_NAMES)}") from None

    @property
    def pad(self) -> int:
        return self.special("pad")

    @property
    def bos(self) -> int:
        return self.special("bos")

    @property
    def eos(self) -> int:
        return self.special("eos")

    @property
    def boi(self) -> int:
        return self.special("boi")

    @property
    def eoi(self) -> int:
        return self.special("eoi")

    @property
    def boa(self) -> int:
        return self.special("boa")

    @property
    def eoa(self) -> int:
        return self.special("eoa")

    @property
    def row_end(self) -> int:
        return self.special("row_end")

    @property
    def audio_pad(self) -> int:
        return self.special("audio_pad")

    def special_name(self, token_id: int) -> str:
        if not self.is_special(token_id):
            raise ValueError(f"id {token_id} is not a special token")
        return SPECIAL_NAMES[token_id - self.special_offset]

    # ---- conversions (scalars or numpy arrays) --------------------------------------------------------------
    def image_token(self, code: Any) -> Any:
        return self.image_offset + code

    def image_code(self, token_id: Any) -> Any:
        return token_id - self.image_offset

    def audio_token(self, code: Any, level: Any) -> Any:
        return self.audio_offset + level * self.audio_codebook_size + code

    def audio_code(self, token_id: Any) -> Any:
        return (token_id - self.audio_offset) % max(self.audio_codebook_size, 1)

    def audio_level(self, token_id: Any) -> Any:
        return (token_id - self.audio_offset) // max(self.audio_codebook_size, 1)

    def is_text(self, token_id: Any) -> Any:
        return (token_id >= 0) & (token_id < self.text_size)

    def is_image(self, token_id: Any) -> Any:
        return (token_id >= self.image_offset) & (token_id < self.audio_offset)

    def is_audio(self, token_id: Any) -> Any:
        return (token_id >= self.audio_offset) & (token_id < self.special_offset)

    def is_special(self, token_id: Any) -> Any:
        return (token_id >= self.special_offset) & (token_id < self.size)

    def modality(self, token_id: Any) -> Any:
        """0 text, 1 image, 2 audio, 3 special (array in, int8 array out)."""
        ids = np.asarray(token_id)
        if ((ids < 0) | (ids >= self.size)).any():
            raise ValueError(f"ids out of the vocabulary [0, {self.size})")
        out = np.full(ids.shape, MODALITY_SPECIAL, dtype=np.int8)
        out[ids < self.special_offset] = MODALITY_AUDIO
        out[ids < self.audio_offset] = MODALITY_IMAGE
        out[ids < self.image_offset] = MODALITY_TEXT
        return out if out.ndim else int(out)

    def describe(self, token_id: int) -> str:
        """Human-readable name of one id, for error messages and debugging."""
        t = int(token_id)
        if not 0 <= t < self.size:
            return f"<invalid id {t}>"
        if t < self.image_offset:
            return f"text:{t}"
        if t < self.audio_offset:
            return f"image:{t - self.image_offset}"
        if t < self.special_offset:
            return f"audio[q{self.audio_level(t)}]:{self.audio_code(t)}"
        return f"<{self.special_name(t)}>"

    # ---- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields plus the derived ranges (the latter are checked on load, so edits are caught)."""
        out: dict[str, Any] = {"format_version": FORMAT_VERSION}
        # bidirectional only when set, so files written before the field existed keep their bytes and fingerprints
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in _WRITTEN_WHEN_SET})
        out["image_grid"] = list(self.image_grid)
        for name in _WRITTEN_WHEN_SET:
            if getattr(self, name):
                out[name] = list(getattr(self, name))
        out["size"] = self.size
        out["ranges"] = {
            "text": list(self.text_range),
            "image": list(self.image_range),
            "audio": [list(self.audio_range(q)) for q in range(self.audio_num_codebooks)],
        }
        out["special_tokens"] = {name: {"id": self.special(name), "meaning": doc} for name, doc in SPECIAL_TOKENS}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "vocabulary") -> Vocabulary:
        if not isinstance(data, dict):
            raise VocabularyError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise VocabularyError(f"{source}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        names = [f.name for f in fields(cls)]
        optional = {name: [] for name in _WRITTEN_WHEN_SET}  # fields added later: files written before them load
        data = {**optional, **data}
        missing = [n for n in names if n not in data]
        if missing:
            raise VocabularyError(f"{source}: missing field '{missing[0]}'")
        known = set(names) | {"format_version", "size", "ranges", "special_tokens"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VocabularyError(f"{source}: unknown field '{unknown[0]}'")
        kwargs = {n: data[n] for n in names}
        if not isinstance(kwargs["image_grid"], (list, tuple)):
            raise VocabularyError(f"{source}: image_grid must be a list [h, w], got {kwargs['image_grid']!r}")
        kwargs["image_grid"] = tuple(kwargs["image_grid"])
        for name in _WRITTEN_WHEN_SET:
            if not isinstance(kwargs[name], list):
                raise VocabularyError(f"{source}: {name} must be a list, got {kwargs[name]!r}")
            kwargs[name] = tuple(kwargs[name])
        for flag in ("image_row_end",):
            if not isinstance(kwargs[flag], bool):
                raise VocabularyError(f"{source}: {flag} must be true/false, got {kwargs[flag]!r}")
        try:
            vocab = cls(**kwargs)
        except VocabularyError as e:
            raise VocabularyError(f"{source}: {e}") from e
        # The derived entries are redundant on purpose: a hand-edited or foreign file that disagrees with the
        # layout rules above would silently remap ids, so it is refused.
        expected = vocab.to_dict()
        for key in ("size", "ranges", "special_tokens"):
            if key in data and data[key] != expected[key]:
                raise VocabularyError(
                    f"{source}: field '{key}' is {data[key]!r} but the layout implies {expected[key]!r}"
                )
        return vocab

    @classmethod
    def from_json(cls, text: str, source: str = "vocabulary JSON") -> Vocabulary:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise VocabularyError(f"{source}: not valid JSON: {e}") from e
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"vocabulary file {path} does not exist")
        return cls.from_json(path.read_text(), source=str(path))

    def check_compatible(self, other: Vocabulary, what: str = "checkpoint") -> None:
        """Raise if ``other`` (e.g. the vocabulary a checkpoint was trained with) assigns ids differently."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                raise VocabularyError(
                    f"vocabulary mismatch with {what}: field '{f.name}' is {theirs!r} there but {mine!r} here"
                )


__all__ = [
    "Vocabulary",
    "VocabularyError",
    "SPECIAL_TOKENS",
    "SPECIAL_NAMES",
    "MODALITY_TEXT",
    "MODALITY_IMAGE",
    "MODALITY_AUDIO",
    "MODALITY_SPECIAL",
    "MODALITY_NAMES",
]

"""What each released model family means by its ids: special tokens, image codes and the image layout.

A released checkpoint numbers its ids its own way (Chameleon hides its 8,192 image codes among the text pieces as
``IMGIMG...Z`` tokens; Emu3 puts ``<|visual token 000000|>``... after Qwen's text). :func:`id_layout` reads them
from the checkpoint's ``config.json`` (``vocabulary_map`` where it has one) and its tokenizer file, and returns
the :class:`IdLayout` the importer renumbers into the unified vocabulary (``anyloom.sequences.vocab``):

- Chameleon / Anole: ``<racm3:break>`` (begin of image), 1,024 codes, ``<eoss>`` (end of image);
- Emu3: ``<|image start|>``, the size "h*w" as text, ``<|image token|>``, rows of codes each closed by
  ``<|extra_200|>`` (end of line), ``<|extra_201|>`` (end of frame), ``<|image end|>``;
- Llama: text only.

bos / eos / pad come from the checkpoint's config (``bos_token_id`` ...), as transformers reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["llama", "chameleon", "emu3", "anole"]
FAMILIES: tuple[str, ...] = ("chameleon", "emu3", "llama", "anole")

# the token names of each family's image markers (unified special name -> the family's token)
MARKERS: dict[str, dict[str, str]] = {
    "chameleon": {"boi": "<racm3:break>", "eoi": "<eoss>"},
    "emu3": {"boi": "<|image start|>", "eoi": "<|image end|>", "row_end": "<|extra_200|>"},
    "llama": {},
}
EMU3_IMAGE_MARKER = "<|image token|>"  # after the size text, before the first row
EMU3_END_OF_FRAME = "<|extra_201|>"  # after the last row, before <|image end|>
CHAMELEON_CODE_PREFIX = "IMGIMG"  # IMGIMG + the code's decimal digits spelled with A..J + Z
EMU3_CODE_PREFIX = "<|visual token "  # <|visual token 000123|>


class LayoutError(ValueError):
    """A checkpoint whose tokenizer or config lacks what its family's layout needs; names the token and file."""


@dataclass
class IdLayout:
    """A checkpoint's ids as the unified vocabulary needs them (file ids = the checkpoint's own ids)."""

    family: str
    specials: dict[str, int]  # unified special name (bos, eos, pad, boi, eoi, row_end) -> file id
    image_codes: list[int] = field(default_factory=list)  # code c -> its file id; [] for text-only models
    image_prefix: list[int] = field(default_factory=list)  # file ids after <boi> (Emu3: "h*w" + image marker)
    image_suffix: list[int] = field(default_factory=list)  # file ids before <eoi> (Emu3: end of frame)

    @property
    def row_end(self) -> bool:
        return "row_end" in self.specials


def chameleon_code(name: str) -> int | None:
    """``IMGIMGBCZ`` -> 12 (letters A..J are digits 0..9), or None for another token."""
    if not (name.startswith(CHAMELEON_CODE_PREFIX) and name.endswith("Z")):
        return None
    digits = name[len(CHAMELEON_CODE_PREFIX):-1]
    if not digits or any(not "A" <= c <= "J" for c in digits):
        return None
    return int("".join(str(ord(c) - ord("A")) for c in digits))


def emu3_code(name: str) -> int | None:
    """``<|visual token 000123|>`` -> 123, or None for another token."""
    if not (name.startswith(EMU3_CODE_PREFIX) and name.endswith("|>")):
        return None
    digits = name[len(EMU3_CODE_PREFIX):-2]
    return int(digits) if digits.isdigit() else None


def _codes(names: dict[str, int], family: str, where: str) -> list[int]:
    reader, prefix = (chameleon_code, CHAMELEON_CODE_PREFIX) if family == "chameleon" else (emu3_code, EMU3_CODE_PREFIX)
    found = {code: i for name, i in names.items() if (code := reader(name)) is not None}
    if not found:
        raise LayoutError(f"{where}: no image-code tokens ({prefix}...) in the vocabulary map or the tokenizer; is "
                          f"this a {family} checkpoint?")
    if sorted(found) != list(range(len(found))):
        gap = next(c for c in range(len(found)) if c not in found)
        raise LayoutError(f"{where}: image codes are not 0..{len(found) - 1} (code {gap} has no token)")
    return [found[c] for c in range(len(found))]


def _named(names: dict[str, int], token: str, where: str) -> int:
    if token not in names:
        raise LayoutError(f"{where}: the tokenizer has no {token!r} token, which the image layout needs")
    return names[token]


def id_layout(family: str, text_config: dict[str, Any], names: dict[str, int], where: str,
              image_grid: tuple[int, int] | None, encode: Any = None) -> IdLayout:
    """The id layout of a ``family`` checkpoint.

    ``text_config``: the LM's config dict (bos/eos/pad token ids); ``names``: token name -> file id (the
    tokenizer's vocabulary with its added tokens, and the config's ``vocabulary_map``); ``image_grid``: (h, w)
    codes per picture (Emu3 writes it into every image span); ``encode``: text -> file ids (Emu3's size text).
    """
    family = "chameleon" if family == "anole" else family
    if family not in MARKERS:
        raise LayoutError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    specials: dict[str, int] = {}
    for name in ("bos", "eos", "pad"):
        value = text_config.get(f"{name}_token_id")
        if isinstance(value, list):  # several eos ids: the first is the one the model writes
            value = value[0] if value else None
        if value is not None:
            specials[name] = int(value)
    if "eos" not in specials:
        raise LayoutError(f"{where}: the config has no eos_token_id; a reply could never end")
    for special, token in MARKERS[family].items():
        specials[special] = _named(names, token, where)
    if len(set(specials.values())) != len(specials):
        raise LayoutError(f"{where}: two special tokens share an id ({specials}); the layout would be ambiguous")
    layout = IdLayout(family, specials)
    if family == "llama":
        return layout
    layout.image_codes = _codes(names, family, where)
    if family == "emu3":
        if image_grid is None or encode is None:
            raise LayoutError("an Emu3 layout needs the image grid and the tokenizer (for the size text)")
        h, w = image_grid
        layout.image_prefix = [*encode(f"{h}*{w}"), _named(names, EMU3_IMAGE_MARKER, where)]
        layout.image_suffix = [_named(names, EMU3_END_OF_FRAME, where)]
    return layout

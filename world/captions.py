"""The caption language of the world: "<count> <colour> <shape(s)>", e.g. "three yellow triangles".

One module owns the words (numbers, colours with their palette, shapes with their plurals) so that the
generator, the image judge, the caption parser and the ASR grammar can never disagree about them.
"""

from __future__ import annotations

from dataclasses import dataclass

NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four")  # index + 1 is the count

# Saturated, mutually distant colours: the image judge classifies by nearest palette entry, and
# backgrounds are low-saturation greys, so every entry must stay far from grey and from each other.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 36, 36),
    "orange": (246, 138, 18),
    "yellow": (238, 222, 30),
    "green": (36, 168, 56),
    "cyan": (28, 204, 214),
    "blue": (40, 76, 224),
    "purple": (142, 56, 204),
    "pink": (244, 108, 184),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}


@dataclass(frozen=True)
class Caption:
    count: int  # 1..4
    color: str  # a key of PALETTE
    shape: str  # one of SHAPES (singular)

    def __post_init__(self) -> None:
        if not 1 <= self.count <= len(NUMBER_WORDS):
            raise ValueError(f"count must be 1..{len(NUMBER_WORDS)}, got {self.count}")
        if self.color not in PALETTE:
            raise ValueError(f"unknown colour {self.color!r}; known: {', '.join(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")

    @property
    def text(self) -> str:
        """The canonical caption: "one red circle", "three yellow triangles"."""
        return f"{NUMBER_WORDS[self.count - 1]} {self.color} {noun(self.shape, self.count)}"


def noun(word: str, count: int) -> str:
    """``word`` (a shape, or "shape") in the number ``count`` asks for: "circle", "circles"."""
    return word if count == 1 else PLURALS.get(word, word + "s")


def parse_caption(text: str) -> Caption:
    """Read a caption back; raises ValueError (saying why) for anything that is not exactly a caption.

    Case and surrounding/extra whitespace are forgiven; wrong words, wrong word order, extra words and a
    noun whose number disagrees with the count ("two red circle") are not.
    """
    if not isinstance(text, str):
        raise ValueError(f"a caption must be a string, got {type(text).__name__}")
    words = text.lower().split()
    if len(words) != 3:
        raise ValueError(f"not a caption: {text!r} (expected '<count> <colour> <shape>', 3 words, got {len(words)})")
    number, color, noun = words
    if number not in NUMBER_WORDS:
        raise ValueError(f"not a caption: {text!r} (unknown count word {number!r}; expected one of {NUMBER_WORDS})")
    if color not in PALETTE:
        raise ValueError(f"not a caption: {text!r} (unknown colour {color!r}; expected one of {COLORS})")
    count = NUMBER_WORDS.index(number) + 1
    singular = {s: s for s in SHAPES}
    plural = {p: s for s, p in PLURALS.items()}
    expected = singular if count == 1 else plural
    if noun not in expected:
        other = plural if count == 1 else singular
        why = (
            f"{'singular' if count == 1 else 'plural'} noun expected after {number!r}"
            if noun in other
            else f"unknown shape {noun!r}; expected one of {SHAPES}"
        )
        raise ValueError(f"not a caption: {text!r} ({why})")
    return Caption(count=count, color=color, shape=expected[noun])


def caption_vocabulary() -> tuple[str, ...]:
    """Every word a caption can contain, sorted (for tokenizer coverage checks and the ASR dictionary)."""
    words = set(NUMBER_WORDS) | set(COLORS) | set(SHAPES) | set(PLURALS.values())
    return tuple(sorted(words))


def caption_jsgf(rule: str = "caption") -> str:
    """A JSGF grammar accepting exactly the captions (number agreement included) for the ASR judge."""
    colors = " | ".join(COLORS)
    singular = " | ".join(SHAPES)
    plural = " | ".join(PLURALS[s] for s in SHAPES)
    many = " | ".join(NUMBER_WORDS[1:])
    return (
        "#JSGF V1.0;\n"
        f"grammar {rule};\n"
        f"public <{rule}> = (one <color> <singular>) | (<many> <color> <plural>);\n"
        f"<many> = {many};\n"
        f"<color> = {colors};\n"
        f"<singular> = {singular};\n"
        f"<plural> = {plural};\n"
    )


__all__ = [
    "NUMBER_WORDS",
    "PALETTE",
    "COLORS",
    "SHAPES",
    "PLURALS",
    "Caption",
    "noun",
    "parse_caption",
    "caption_vocabulary",
    "caption_jsgf",
]

"""Task mixtures: weighted document templates assembled at load time from the same pre-tokenized items.

An item (a world scene: caption, image, speech) holds tokenized segments; a template picks which of them
form the document, in which order, and which carry loss:

    t2i  text -> image     i2t  image -> text     t2a  text -> speech    a2t  speech -> text
    i2a  image -> speech   a2i  speech -> image   interleaved: the item's segments in their own order, all trained

A conditional template trains only its target span (with its markers and the final <eos>), or every span with
``condition_loss``. For templates whose target is an image or audio, condition dropout (probability
``cfg_dropout``) removes the condition, leaving ``<bos> target <eos>``: the unconditional model that
classifier-free guidance subtracts (the generator's unconditional prompt is therefore just ``<bos>``).

Each document's template and dropout come from the two uniform draws the packing loader hands over
(``draws_per_document = 2``), so a mixture is deterministic and resumable through the loader's state.
Items that no enabled template applies to (e.g. no audio while only t2a is enabled) are left out and counted
in ``skipped_items``. An item whose document names its ``tasks`` (``["interleaved"]`` for an instruction and its
answer) serves only those templates; the enabled ones' weights are renormalised over what it may serve.
"""

from __future__ import annotations

import bisect
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from anyloom.progress import progress
from anyloom.sequences.interleave import (
    AudioIds,
    ImageIds,
    TextIds,
    TokenStream,
    TokSegment,
    assemble_stream,
    encode_document,
    encode_segment,
)
from anyloom.sequences.shards import KIND_AUDIO, KIND_IMAGE, KIND_TEXT
from anyloom.sequences.vocab import Vocabulary

Kind = Literal["text", "image", "audio"]
_KIND_INDEX = {"text": KIND_TEXT, "image": KIND_IMAGE, "audio": KIND_AUDIO}
_SEG_KIND = {TextIds: KIND_TEXT, ImageIds: KIND_IMAGE, AudioIds: KIND_AUDIO}


@dataclass(frozen=True)
class Template:
    name: str
    condition: tuple[Kind, ...]  # segments before the target, not trained (empty: interleaved)
    target: Kind | None  # the trained segment; None: every segment of the item, in order, trained
    guidance: bool  # condition dropout applies (the target is generated with classifier-free guidance)

    @property
    def needs(self) -> tuple[int, ...]:
        """Kind indices an item must have for this template."""
        kinds = self.condition + ((self.target,) if self.target else ())
        return tuple(sorted({_KIND_INDEX[k] for k in kinds}))


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("t2i", ("text",), "image", guidance=True),
        Template("i2t", ("image",), "text", guidance=False),
        Template("t2a", ("text",), "audio", guidance=True),
        Template("a2t", ("audio",), "text", guidance=False),
        Template("i2a", ("image",), "audio", guidance=True),
        Template("a2i", ("audio",), "image", guidance=True),
        Template("interleaved", (), None, guidance=False),
    )
}


def _default_tasks() -> dict[str, float]:
    return {"t2i": 1.0, "i2t": 1.0, "t2a": 1.0, "a2t": 1.0, "i2a": 0.25, "a2i": 0.25, "interleaved": 0.5}


@dataclass(frozen=True)
class MixtureConfig:
    tasks: dict[str, float] = field(default_factory=_default_tasks)  # template -> relative weight (0 disables)
    cfg_dropout: float = 0.1  # probability of dropping the condition of an image/audio-target document
    # False: a conditional document trains only its target span. True: every span is trained (Chameleon-style),
    # so an image->text document also teaches the image codes (unconditionally) for the cost of a few more rows
    # of the output layer; the target's loss then shares the batch mean with the conditions'.
    condition_loss: bool = False

    def __post_init__(self) -> None:
        for name, weight in self.tasks.items():
            if name not in TEMPLATES:
                near = difflib.get_close_matches(name, list(TEMPLATES), n=1)
                hint = f"; did you mean '{near[0]}'?" if near else f"; known: {', '.join(TEMPLATES)}"
                raise ValueError(f"tasks: unknown template '{name}'{hint}")
            if not weight >= 0:
                raise ValueError(f"tasks.{name}: weight must be >= 0, got {weight}")
        if not sum(self.tasks.values()) > 0:
            raise ValueError("tasks: at least one template needs a positive weight")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")


class ItemSource(Protocol):
    """Pre-tokenized items: :class:`anyloom.sequences.shards.TokenShards` or :class:`ItemList`."""

    def __len__(self) -> int: ...

    def item(self, index: int) -> list[TokSegment]: ...

    def kinds(self) -> np.ndarray: ...


class ItemList:
    """Items held in memory (tests, small evaluation sets); ``tasks[i]``: the templates item i may serve (None: any)."""

    def __init__(self, items: Sequence[Sequence[TokSegment]], tasks: Sequence[Sequence[str] | None] | None = None):
        self.items = [list(segs) for segs in items]
        self._tasks = [tuple(t) if t is not None else None for t in tasks] if tasks is not None else None
        if self._tasks is not None and len(self._tasks) != len(self.items):
            raise ValueError(f"{len(self.items)} items but {len(self._tasks)} task lists")

    def __len__(self) -> int:
        return len(self.items)

    def item(self, index: int) -> list[TokSegment]:
        return self.items[index]

    def tasks(self) -> list[tuple[str, ...] | None]:
        return self._tasks if self._tasks is not None else [None] * len(self.items)

    def kinds(self) -> np.ndarray:
        out = np.zeros((len(self.items), 3), dtype=np.int64)
        for i, segs in enumerate(self.items):
            for seg in segs:
                out[i, _SEG_KIND[type(seg)]] += 1
        return out


def build_document(
    segments: Sequence[TokSegment], template: Template, vocab: Vocabulary, *, drop_condition: bool = False,
    condition_loss: bool = False,
) -> TokenStream:
    """One item's document for ``template`` (the first segment of each needed kind is used)."""
    if template.target is None:
        return encode_document(segments, vocab)
    first: dict[int, TokSegment] = {}
    for seg in segments:
        first.setdefault(_SEG_KIND[type(seg)], seg)
    missing = [k for k in template.needs if k not in first]
    if missing:
        raise ValueError(f"template {template.name} needs a {('text', 'image', 'audio')[missing[0]]} segment")
    condition = [] if drop_condition else [first[_KIND_INDEX[k]] for k in template.condition]
    target = first[_KIND_INDEX[template.target]]
    return encode_document([*condition, target], vocab, loss=[condition_loss] * len(condition) + [True])


class TaskMixture:
    """A :class:`~anyloom.sequences.packing.StreamSource` of task documents over pre-tokenized items.

    At construction every segment of every usable item is encoded once into the unified vocabulary and kept
    in one int32 array (4 bytes per token; about 10 MB for the world), so producing a document is a few
    slices and one concatenation: per-document encoding from the shards would cap the loader below 1M
    tokens/s on one CPU core. For corpora whose token count does not fit in RAM, split the items into several
    mixtures (e.g. per shard range) -- the shards themselves stay memory-mapped.
    """

    draws_per_document = 2  # template choice, condition dropout

    def __init__(self, items: ItemSource, vocab: Vocabulary, config: MixtureConfig | None = None):
        self.items = items
        self.vocab = vocab
        self.config = config or MixtureConfig()
        self.templates = [TEMPLATES[n] for n, w in self.config.tasks.items() if w > 0]
        weights = np.array([self.config.tasks[t.name] for t in self.templates], dtype=np.float64)
        has = items.kinds() > 0  # (items, 3)
        applicable = np.stack([has[:, list(t.needs)].all(axis=1) for t in self.templates], axis=1)  # (items, tasks)
        applicable &= self._allowed(items)
        # one cumulative-weight row per distinct pattern of applicable templates (at most 2^3 patterns of kinds)
        patterns, pattern_of = np.unique(applicable, axis=0, return_inverse=True)
        pattern_of = pattern_of.reshape(-1)
        masked = patterns * weights[None, :]
        totals = masked.sum(axis=1, keepdims=True)
        cum = np.cumsum(masked / np.where(totals > 0, totals, 1.0), axis=1)  # (patterns, tasks)
        usable = totals[pattern_of, 0] > 0
        index = np.flatnonzero(usable)  # mixture index -> item index
        self.skipped_items = int((~usable).sum())
        if index.size == 0:
            enabled = ", ".join(t.name for t in self.templates)
            raise ValueError(f"no item has the segments any enabled template ({enabled}) needs")
        # Python lists: choose() and stream() run once per document, where numpy scalar indexing costs more
        self._cum_rows: list[list[float]] = cum.tolist()
        self._pattern: list[int] = pattern_of[index].tolist()
        self._item: list[int] = index.tolist()
        self._encode_spans()

    def _allowed(self, items: ItemSource) -> np.ndarray:
        """(items, templates) bool: what each item's document allows (its ``tasks``; all where it names none)."""
        allowed = np.ones((len(items), len(self.templates)), dtype=bool)
        restricted = items.tasks() if hasattr(items, "tasks") else [None] * len(items)
        names = [t.name for t in self.templates]
        for i, tasks in enumerate(restricted):
            if tasks is None:
                continue
            unknown = [t for t in tasks if t not in TEMPLATES]
            if unknown:
                where = items.item_id(i) if hasattr(items, "item_id") else f"item {i}"
                raise ValueError(f"{where}: tasks names {unknown[0]!r}, not a task template (known: "
                                 f"{', '.join(TEMPLATES)})")
            allowed[i] = [n in tasks for n in names]
        return allowed

    def _encode_spans(self) -> None:
        spans: list[np.ndarray] = []
        self._segs: list[list[int]] = []  # per mixture document: its segments' span numbers, in order
        self._first: list[tuple[int, int, int]] = []  # per mixture document: first span of each kind, or -1
        for item in progress(self._item, desc="encode spans", unit="item"):
            numbers, first = [], [-1, -1, -1]
            for seg in self.items.item(item):
                kind = _SEG_KIND[type(seg)]
                if first[kind] < 0:
                    first[kind] = len(spans)
                numbers.append(len(spans))
                spans.append(encode_segment(seg, self.vocab))
            self._segs.append(numbers)
            self._first.append((first[0], first[1], first[2]))
        self._bounds: list[int] = np.cumsum([0] + [s.shape[0] for s in spans]).tolist()
        self._spans = np.concatenate(spans).astype(np.int32)  # ids < 2^31: int32 halves the cache

    def __len__(self) -> int:
        return len(self._item)

    @property
    def cached_tokens(self) -> int:
        return int(self._spans.shape[0])

    def choose(self, index: int, draws: np.ndarray) -> tuple[Template, bool]:
        """The template and whether the condition is dropped, for mixture document ``index``."""
        cum = self._cum_rows[self._pattern[index]]
        u, v = float(draws[0]), float(draws[1])
        k = min(bisect.bisect_right(cum, u), len(cum) - 1)
        while cum[k] == (cum[k - 1] if k else 0.0):  # rounding at the top end: skip zero-weight templates
            k -= 1
        template = self.templates[k]
        return template, template.guidance and v < self.config.cfg_dropout

    def stream(self, index: int, draws: np.ndarray) -> TokenStream:
        template, dropped = self.choose(index, draws)
        return self._assemble(index, template, dropped)

    def length(self, index: int, draws: np.ndarray) -> int:
        """``len(stream(index, draws))`` without building it (lets each rank skip the others' documents)."""
        template, dropped = self.choose(index, draws)
        b = self._bounds
        return 2 + sum(b[n + 1] - b[n] for n in self._numbers(index, template, dropped))  # + bos, eos

    def _numbers(self, index: int, template: Template, dropped: bool) -> list[int]:
        if template.target is None:
            return self._segs[index]
        first = self._first[index]
        cond = [] if dropped else [first[_KIND_INDEX[k]] for k in template.condition]
        return [*cond, first[_KIND_INDEX[template.target]]]

    def _assemble(self, index: int, template: Template, dropped: bool) -> TokenStream:
        numbers = self._numbers(index, template, dropped)
        train_all = template.target is None or self.config.condition_loss
        loss = [True] * len(numbers) if train_all else [False] * (len(numbers) - 1) + [True]
        b = self._bounds
        return assemble_stream([self._spans[b[n] : b[n + 1]] for n in numbers], loss, self.vocab)

    def document(self, index: int, task: str, *, drop_condition: bool = False) -> TokenStream:
        """Mixture document ``index`` under a fixed template (evaluation, debugging)."""
        if task not in TEMPLATES:
            raise KeyError(f"unknown template {task!r}; known: {', '.join(TEMPLATES)}")
        template = TEMPLATES[task]
        first = self._first[index]
        missing = [k for k in template.needs if first[k] < 0]
        if missing:
            raise ValueError(f"item {self._item[index]} has no {('text', 'image', 'audio')[missing[0]]} for {task}")
        return self._assemble(index, template, drop_condition)

    def item_index(self, index: int) -> int:
        """The item (in the item source) behind mixture document ``index``."""
        return self._item[index]


__all__ = ["MixtureConfig", "Template", "TEMPLATES", "TaskMixture", "ItemList", "ItemSource", "build_document"]

"""Interleaved documents <-> one token stream, and the layout rules of image and audio spans.

A *tokenized document* is a list of segments, each already in its tokenizer's own code space:
``TextIds(ids)`` (sentencepiece ids), ``ImageIds(codes (h, w))``, ``AudioIds(codes (Q, F))``.
``encode_document`` maps it into the unified vocabulary; ``parse_stream`` is its exact inverse.

Stream grammar (ids of the unified vocabulary, see ``vocab.py``)::

    document := <bos> segment* <eos> <pad>*
    text     := text-id+                       (adjacent text segments merge: they are one run of text)
    image    := <boi> prefix (code{w} <row_end>?){h} suffix <eoi>
                row ends only when vocab.image_row_end; prefix / suffix: the vocabulary's fixed image_prefix /
                image_suffix ids (empty unless an imported model's layout has them, e.g. Emu3's size text)
    audio    := <boa> frames <eoa>
      flat : frame-major, F frames of Q levels: f0q0 f0q1 .. f0q{Q-1} f1q0 ...        (F*Q tokens)
      delay: MusicGen's delay pattern: S = F+Q-1 steps of Q slots; slot (s, q) holds frame s-q of level q,
             or <audio_pad> where s-q is outside [0, F)                              (S*Q tokens)

Every audio token carries its level in its id (one id range per level), so both patterns parse without
knowing F in advance. ``image_slot``/``audio_slot``/``legal_ranges`` answer "what may come at this offset
inside a span", which is what a constrained decoder needs.

Axis legend: h/w image code grid, Q audio levels (codebooks), F audio frames, S delay-pattern steps, N tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from anyloom.sequences.vocab import Vocabulary


class StreamError(ValueError):
    """A token stream that does not follow the grammar; the message names the position and what was expected."""


def _as_int_array(x: object, ndim: int, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim} dimension(s), got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected integer codes, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


@dataclass(eq=False)
class TextIds:
    ids: np.ndarray  # (L,) text tokenizer ids

    def __post_init__(self) -> None:
        self.ids = _as_int_array(self.ids, 1, "TextIds.ids")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TextIds) and np.array_equal(self.ids, other.ids)

    def __repr__(self) -> str:
        return f"TextIds({self.ids.tolist()})"


@dataclass(eq=False)
class ImageIds:
    codes: np.ndarray  # (h, w) image codebook indices

    def __post_init__(self) -> None:
        self.codes = _as_int_array(self.codes, 2, "ImageIds.codes")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageIds) and np.array_equal(self.codes, other.codes)

    def __repr__(self) -> str:
        return f"ImageIds(shape={self.codes.shape})"


@dataclass(eq=False)
class AudioIds:
    codes: np.ndarray  # (Q, F) audio codebook indices per level

    def __post_init__(self) -> None:
        self.codes = _as_int_array(self.codes, 2, "AudioIds.codes")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AudioIds) and np.array_equal(self.codes, other.codes)

    def __repr__(self) -> str:
        return f"AudioIds(shape={self.codes.shape})"


TokSegment = TextIds | ImageIds | AudioIds


@dataclass
class TokenStream:
    ids: np.ndarray  # (N,) int64 unified-vocabulary ids
    modality: np.ndarray  # (N,) int8: 0 text, 1 image, 2 audio, 3 special
    loss_mask: np.ndarray  # (N,) bool: True where predicting this token (from the ones before) is trained

    def __len__(self) -> int:
        return int(self.ids.shape[0])


# ---- encoding -----------------------------------------------------------------------------------------------


def _check_range(codes: np.ndarray, size: int, what: str) -> None:
    # int64 viewed as uint64: negatives become huge, so one max() checks both ends
    if codes.size and int(codes.view(np.uint64).max()) >= size:
        bad = codes[(codes < 0) | (codes >= size)].reshape(-1)[0]
        raise ValueError(f"{what}: code {int(bad)} outside [0, {size})")


def encode_text(seg: TextIds, vocab: Vocabulary) -> np.ndarray:
    _check_range(seg.ids, vocab.text_size, "text segment")
    return seg.ids


def encode_image(seg: ImageIds, vocab: Vocabulary) -> np.ndarray:
    """<boi> prefix codes (row ends) suffix <eoi> as unified ids."""
    if vocab.image_codebook_size == 0:
        raise ValueError("image segment, but the vocabulary has no image codebook (image_codebook_size=0)")
    if seg.codes.shape != vocab.image_grid:
        raise ValueError(f"image segment: codes of shape {seg.codes.shape}, the vocabulary expects {vocab.image_grid}")
    _check_range(seg.codes, vocab.image_codebook_size, "image segment")
    body = seg.codes + vocab.image_offset  # (h, w)
    if vocab.image_row_end:
        ends = np.full((body.shape[0], 1), vocab.row_end, dtype=np.int64)
        body = np.concatenate([body, ends], axis=1)  # (h, w+1)
    return np.concatenate([[vocab.boi, *vocab.image_prefix], body.reshape(-1),
                           [*vocab.image_suffix, vocab.eoi]]).astype(np.int64)


@functools.lru_cache(maxsize=16)
def audio_level_offsets(vocab: Vocabulary) -> np.ndarray:
    """(Q, 1) id offset of each level's range (cached: the vocabulary is frozen; do not modify the result)."""
    q = np.arange(vocab.audio_num_codebooks, dtype=np.int64)[:, None]
    offsets = vocab.audio_offset + q * vocab.audio_codebook_size
    offsets.flags.writeable = False
    return offsets


def encode_audio(seg: AudioIds, vocab: Vocabulary) -> np.ndarray:
    """<boa> frames laid out by ``vocab.audio_pattern`` <eoa> as unified ids."""
    if vocab.audio_codebook_size == 0:
        raise ValueError("audio segment, but the vocabulary has no audio codebook (audio_codebook_size=0)")
    n_q, n_f = seg.codes.shape
    if n_q != vocab.audio_num_codebooks:
        raise ValueError(f"audio segment: {n_q} levels, the vocabulary expects {vocab.audio_num_codebooks}")
    if n_f < 1:
        raise ValueError("audio segment: zero frames (an empty audio span cannot be told apart from a bad one)")
    _check_range(seg.codes, vocab.audio_codebook_size, "audio segment")
    tok = seg.codes + audio_level_offsets(vocab)  # (Q, F)
    if vocab.audio_pattern == "flat":
        body = tok.T.reshape(-1)  # (F, Q) -> frame-major
    else:
        grid = np.full((n_f + n_q - 1, n_q), vocab.audio_pad, dtype=np.int64)  # (S, Q)
        steps = np.arange(n_f)[None, :] + np.arange(n_q)[:, None]  # (Q, F): level q of frame f sits at step f+q
        grid[steps, np.arange(n_q)[:, None]] = tok
        body = grid.reshape(-1)
    return np.concatenate([[vocab.boa], body, [vocab.eoa]]).astype(np.int64)


def encode_segment(seg: TokSegment, vocab: Vocabulary) -> np.ndarray:
    if isinstance(seg, TextIds):
        return encode_text(seg, vocab)
    if isinstance(seg, ImageIds):
        return encode_image(seg, vocab)
    if isinstance(seg, AudioIds):
        return encode_audio(seg, vocab)
    raise TypeError(f"expected TextIds, ImageIds or AudioIds, got {type(seg).__name__}")


def encode_document(
    segments: Sequence[TokSegment],
    vocab: Vocabulary,
    *,
    loss: Sequence[bool] | None = None,
    bos: bool = True,
    eos: bool = True,
) -> TokenStream:
    """Segments -> one stream. ``loss[i]`` says whether segment i's tokens are trained on (default: all).

    A segment's loss covers its whole span, markers included (<boi> .. <eoi>), so the model also learns when
    to open and close a span. The final <eos> is trained iff the last segment is; <bos> never is (it has no
    predecessor).
    """
    if loss is None:
        loss = [True] * len(segments)
    if len(loss) != len(segments):
        raise ValueError(f"loss has {len(loss)} entries for {len(segments)} segments")
    return assemble_stream([encode_segment(seg, vocab) for seg in segments], loss, vocab, bos=bos, eos=eos)


def assemble_stream(
    spans: Sequence[np.ndarray], loss: Sequence[bool], vocab: Vocabulary, *, bos: bool = True, eos: bool = True
) -> TokenStream:
    """Already-encoded spans (``encode_segment`` outputs) -> one stream, with the loss rules of ``encode_document``."""
    bos_ids, eos_ids, bounds = _stream_constants(vocab)
    pieces: list[np.ndarray] = [bos_ids] if bos else []
    flags: list[bool] = [False] if bos else []
    pieces.extend(spans)
    flags.extend(bool(t) for t in loss)
    if eos:
        pieces.append(eos_ids)
        flags.append(bool(loss[-1]) if len(loss) else False)
    if not pieces:
        return TokenStream(np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, bool))
    ids = np.concatenate(pieces, dtype=np.int64)
    loss_mask = np.repeat(flags, [p.shape[0] for p in pieces])
    # the ranges are contiguous and in modality order, so one search yields the modality id of every token
    modality = bounds.searchsorted(ids, side="right").astype(np.int8)
    return TokenStream(ids=ids, modality=modality, loss_mask=loss_mask)


@functools.lru_cache(maxsize=16)
def _stream_constants(vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[bos], [eos] and the modality boundaries, built once per vocabulary (assemble_stream runs per document)."""
    arrays = (
        np.array([vocab.bos], dtype=np.int64),
        np.array([vocab.eos], dtype=np.int64),
        np.array([vocab.image_offset, vocab.audio_offset, vocab.special_offset], dtype=np.int64),
    )
    for a in arrays:
        a.flags.writeable = False
    return arrays


# ---- bidirectional spans (how the model reads given spans) ----------------------------------------------------


def bidirectional_span_ids(vocab: Vocabulary, tokens: torch.Tensor, given: torch.Tensor) -> torch.Tensor | None:
    """(B, T) int64 ids of the spans the model attends bidirectionally (0 = causal), or None when ``vocab`` reads
    every span causally (``vocab.bidirectional`` empty).

    ``given`` (B, T) bool marks the tokens that are conditions rather than targets: not trained in a training
    document, or part of a prompt. A span is a maximal run of given tokens of a listed modality: an image's codes
    (and row ends), an audio span's codes (and delay pads); the markers around them (<boi> .. <eoi>) stay causal.
    Every position inside a span only ever predicts given tokens, so no trained target is seen early; the
    training loader, the decoder's prefill and the reranker's scoring all draw their spans from this one rule.
    """
    if not vocab.bidirectional:
        return None
    member = torch.zeros_like(given)
    if "image" in vocab.bidirectional and vocab.image_codebook_size:
        member |= ((tokens >= vocab.image_offset) & (tokens < vocab.audio_offset)) | (tokens == vocab.row_end)
    if "audio" in vocab.bidirectional and vocab.audio_codebook_size:
        member |= ((tokens >= vocab.audio_offset) & (tokens < vocab.special_offset)) | (tokens == vocab.audio_pad)
    member &= given
    starts = member.clone()
    starts[:, 1:] &= ~member[:, :-1]
    return torch.cumsum(starts, dim=1) * member


# ---- span layout rules (for constrained decoding) -----------------------------------------------------------


@dataclass(frozen=True)
class ImageSlot:
    kind: Literal["code", "row_end", "fixed", "end"]  # "end": only <eoi> is legal here; "fixed": only ``token``
    row: int
    col: int
    token: int = -1  # the one legal id of a "fixed" slot (the vocabulary's image_prefix / image_suffix)


def image_slot(vocab: Vocabulary, offset: int) -> ImageSlot:
    """What comes at ``offset`` tokens after <boi> (0 = the first token after it)."""
    h, w = vocab.image_grid
    if offset < 0 or offset > vocab.image_span_length:
        raise IndexError(f"offset {offset} outside an image span of {vocab.image_span_length} tokens + <eoi>")
    if offset == vocab.image_span_length:
        return ImageSlot("end", h, 0)
    prefix, suffix = vocab.image_prefix, vocab.image_suffix
    if offset < len(prefix):
        return ImageSlot("fixed", 0, 0, prefix[offset])
    tail = offset - (vocab.image_span_length - len(suffix))
    if tail >= 0:
        return ImageSlot("fixed", h, 0, suffix[tail])
    stride = w + 1 if vocab.image_row_end else w
    row, col = divmod(offset - len(prefix), stride)
    return ImageSlot("row_end" if col == w else "code", row, col)


@dataclass(frozen=True)
class AudioSlot:
    level: int  # codebook level q of this slot
    frame: int  # frame index f this slot holds (may be < 0 or >= F in the delay pattern: then it is a pad)
    kind: Literal["code", "pad", "end"]  # "end": only <eoa> is legal here


def audio_span_length(vocab: Vocabulary, n_frames: int) -> int:
    """Tokens between <boa> and <eoa> for ``n_frames`` frames."""
    n_q = vocab.audio_num_codebooks
    return n_frames * n_q if vocab.audio_pattern == "flat" else (n_frames + n_q - 1) * n_q


def audio_slot(vocab: Vocabulary, offset: int, n_frames: int) -> AudioSlot:
    """The slot at ``offset`` tokens after <boa> in a span of ``n_frames`` frames."""
    n_q = vocab.audio_num_codebooks
    total = audio_span_length(vocab, n_frames)
    if offset < 0 or offset > total:
        raise IndexError(f"offset {offset} outside an audio span of {total} tokens + <eoa>")
    if offset == total:
        return AudioSlot(0, n_frames, "end")
    step, level = divmod(offset, n_q)
    if vocab.audio_pattern == "flat":
        return AudioSlot(level, step, "code")
    frame = step - level
    return AudioSlot(level, frame, "code" if 0 <= frame < n_frames else "pad")


def legal_ranges(
    vocab: Vocabulary, span: Literal["image", "audio"], offset: int, n_frames: int | None = None
) -> list[tuple[int, int]]:
    """[lo, hi) id ranges that may come ``offset`` tokens after <boi>/<boa>.

    For audio, ``n_frames`` is the span's frame count once it is known: the decoder decides it by emitting
    <eoa> (flat) or an <audio_pad> at level 0 (delay). While it is ``None`` the span may still end there.
    """

    def one(t: int) -> tuple[int, int]:
        return (t, t + 1)

    if span == "image":
        slot = image_slot(vocab, offset)
        if slot.kind == "end":
            return [one(vocab.eoi)]
        if slot.kind == "fixed":
            return [one(slot.token)]
        return [one(vocab.row_end)] if slot.kind == "row_end" else [vocab.image_range]
    if span != "audio":
        raise ValueError(f"span must be 'image' or 'audio', got {span!r}")
    n_q = vocab.audio_num_codebooks
    if n_frames is not None:
        slot = audio_slot(vocab, offset, n_frames)
        if slot.kind == "end":
            return [one(vocab.eoa)]
        return [one(vocab.audio_pad)] if slot.kind == "pad" else [vocab.audio_range(slot.level)]
    step, level = divmod(offset, n_q)
    if vocab.audio_pattern == "flat" or n_q == 1:
        # Q == 1 delay is the flat layout: there is nothing to delay.
        return [vocab.audio_range(level)] + ([one(vocab.eoa)] if level == 0 and step > 0 else [])
    frame = step - level
    if frame < 0:
        return [one(vocab.audio_pad)]
    if level == 0 and step > 0:
        return [vocab.audio_range(0), one(vocab.audio_pad)]  # a pad at level 0 ends the frames: F = step
    return [vocab.audio_range(level)]


# ---- parsing ------------------------------------------------------------------------------------------------


@dataclass
class ParsedStream:
    segments: list[TokSegment]
    problems: list[str] = field(default_factory=list)  # empty for a valid stream (strict parsing raises instead)
    ended: bool = False  # an <eos> was seen

    @property
    def ok(self) -> bool:
        return not self.problems


def _decode_image(body: np.ndarray, vocab: Vocabulary, start: int) -> ImageIds | str:
    """The content between <boi> and <eoi>; returns the codes or a problem description."""
    h, w = vocab.image_grid
    if body.shape[0] != vocab.image_span_length:
        return (
            f"image span opened at position {start}: expected {vocab.image_span_length} tokens "
            f"({h}x{w} codes{' + row ends' if vocab.image_row_end else ''}) before <eoi>, found {body.shape[0]}"
        )
    prefix, suffix = vocab.image_prefix, vocab.image_suffix
    for fixed, got, first in ((prefix, body[:len(prefix)], 0), (suffix, body[len(body) - len(suffix):],
                                                                  len(body) - len(suffix))):
        wrong = np.flatnonzero(got != np.asarray(fixed, dtype=np.int64))
        if wrong.size:
            k = int(wrong[0])
            return (f"position {start + 1 + first + k}: expected {vocab.describe(fixed[k])} of the image layout, found "
                    f"{vocab.describe(got[k])}")
    start += len(prefix)
    body = body[len(prefix):len(body) - len(suffix)]
    grid = body.reshape(h, -1)  # (h, w) or (h, w+1)
    if vocab.image_row_end:
        bad_rows = np.flatnonzero(grid[:, w] != vocab.row_end)
        if bad_rows.size:
            r = int(bad_rows[0])
            pos = start + 1 + r * (w + 1) + w
            return f"position {pos}: expected <row_end> after image row {r}, found {vocab.describe(grid[r, w])}"
        grid = grid[:, :w]
    bad = np.flatnonzero(~vocab.is_image(grid.reshape(-1)))
    if bad.size:
        r, c = divmod(int(bad[0]), w)
        pos = start + 1 + r * (w + (1 if vocab.image_row_end else 0)) + c
        return f"position {pos}: expected an image code in the image span, found {vocab.describe(grid[r, c])}"
    return ImageIds(grid - vocab.image_offset)


def _decode_audio(body: np.ndarray, vocab: Vocabulary, start: int) -> AudioIds | str:
    n_q = vocab.audio_num_codebooks
    if body.shape[0] == 0 or body.shape[0] % n_q:
        return f"audio span opened at position {start}: {body.shape[0]} tokens is not a positive multiple of Q={n_q}"
    slots = body.reshape(-1, n_q)  # (S, Q) steps x levels
    n_s = slots.shape[0]
    levels = np.arange(n_q)
    if vocab.audio_pattern == "flat":
        code_mask = np.ones_like(slots, dtype=bool)
        n_f = n_s
    else:
        n_f = n_s - n_q + 1
        if n_f < 1:
            return f"audio span opened at position {start}: {n_s} delay-pattern steps hold no frame (need >= {n_q})"
        frame = np.arange(n_s)[:, None] - levels[None, :]  # (S, Q)
        code_mask = (frame >= 0) & (frame < n_f)
    lo = vocab.audio_offset + levels * vocab.audio_codebook_size  # (Q,)
    ok = np.where(code_mask, (slots >= lo) & (slots < lo + vocab.audio_codebook_size), slots == vocab.audio_pad)
    if not ok.all():
        s, q = (int(v) for v in np.argwhere(~ok)[0])
        want = f"an audio code of level {q}" if code_mask[s, q] else "<audio_pad>"
        return f"position {start + 1 + s * n_q + q}: expected {want}, found {vocab.describe(slots[s, q])}"
    if vocab.audio_pattern == "flat":
        codes = slots.T  # (Q, F)
    else:
        steps = np.arange(n_f)[None, :] + levels[:, None]  # (Q, F)
        codes = slots[steps, levels[:, None]]
    return AudioIds(codes - lo[:, None])


def parse_stream(ids: Sequence[int] | np.ndarray, vocab: Vocabulary, strict: bool = True) -> ParsedStream:
    """Stream -> segments, the inverse of :func:`encode_document` (leading <bos> and trailing <eos> optional).

    ``strict=True`` raises :class:`StreamError` at the first violation. ``strict=False`` never raises: it
    keeps every well-formed segment, drops malformed spans, and lists each problem in ``.problems``.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = ids.shape[0]
    out = ParsedStream(segments=[])

    def problem(msg: str) -> None:
        if strict:
            raise StreamError(msg)
        out.problems.append(msg)

    if n and ((ids < 0) | (ids >= vocab.size)).any():
        pos = int(np.flatnonzero((ids < 0) | (ids >= vocab.size))[0])
        problem(f"position {pos}: id {int(ids[pos])} is outside the vocabulary [0, {vocab.size})")
        ids = np.where((ids < 0) | (ids >= vocab.size), vocab.pad, ids)
    non_text = np.flatnonzero(ids >= vocab.text_size)  # where text runs stop
    markers = np.flatnonzero(np.isin(ids, [vocab.boi, vocab.boa, vocab.eos, vocab.bos]))  # where recovery resumes

    def next_from(table: np.ndarray, i: int) -> int:
        k = int(np.searchsorted(table, i))
        return int(table[k]) if k < table.shape[0] else n

    i = 0
    while i < n:
        t = int(ids[i])
        if t < vocab.text_size:
            j = next_from(non_text, i)
            if out.segments and isinstance(out.segments[-1], TextIds):  # only after a dropped span
                out.segments[-1] = TextIds(np.concatenate([out.segments[-1].ids, ids[i:j]]))
            else:
                out.segments.append(TextIds(ids[i:j].copy()))
            i = j
        elif t == vocab.bos:
            if i != 0:
                problem(f"position {i}: <bos> inside a document (only the first token may be <bos>)")
            i += 1
        elif t == vocab.eos:
            out.ended = True
            rest = ids[i + 1 :]
            if (rest != vocab.pad).any():
                pos = i + 1 + int(np.flatnonzero(rest != vocab.pad)[0])
                problem(f"position {pos}: {vocab.describe(ids[pos])} after <eos> (only <pad> may follow)")
            break
        elif t == vocab.boi:
            end = i + 1 + vocab.image_span_length
            if end < n and ids[end] == vocab.eoi:
                seg = _decode_image(ids[i + 1 : end], vocab, i)
            else:
                found = vocab.describe(ids[end]) if end < n else "the end of the stream"
                seg = f"position {end}: expected <eoi> after {vocab.image_span_length} image-span tokens, found {found}"
            if isinstance(seg, str):
                problem(seg)
                eoi = np.flatnonzero(ids[i + 1 :] == vocab.eoi)
                stop = next_from(markers, i + 1)
                i = min(i + 2 + int(eoi[0]), stop) if eoi.size else stop
            else:
                out.segments.append(seg)
                i = end + 1
        elif t == vocab.boa:
            # audio_pad and audio codes are the only non-marker ids allowed inside; eoa closes the span
            inner = np.flatnonzero((ids[i + 1 :] >= vocab.special_offset) & (ids[i + 1 :] != vocab.audio_pad))
            end = i + 1 + int(inner[0]) if inner.size else n
            if end < n and ids[end] == vocab.eoa:
                seg = _decode_audio(ids[i + 1 : end], vocab, i)
            else:
                found = vocab.describe(ids[end]) if end < n else "the end of the stream"
                seg = f"audio span opened at position {i}: expected <eoa> to close it, found {found} at {end}"
            if isinstance(seg, str):
                problem(seg)
                i = end + 1 if end < n and ids[end] == vocab.eoa else end
            else:
                out.segments.append(seg)
                i = end + 1
        else:
            # a stray code or closing marker outside its span: skip to the next place a segment can start
            j = min(next_from(markers, i + 1), next_from(np.flatnonzero(ids < vocab.text_size), i + 1))
            problem(f"position {i}: {vocab.describe(t)} outside any span (expected text, <boi>, <boa> or <eos>)")
            i = j
    return out


def parse_segments(ids: Sequence[int] | np.ndarray, vocab: Vocabulary) -> list[TokSegment]:
    """Strict parse, segments only."""
    return parse_stream(ids, vocab, strict=True).segments


__all__ = [
    "bidirectional_span_ids",
    "TextIds",
    "ImageIds",
    "AudioIds",
    "TokSegment",
    "TokenStream",
    "StreamError",
    "ParsedStream",
    "encode_document",
    "assemble_stream",
    "encode_segment",
    "parse_stream",
    "parse_segments",
    "ImageSlot",
    "AudioSlot",
    "image_slot",
    "audio_slot",
    "audio_span_length",
    "legal_ranges",
]

"""Vocabulary and interleaving: JSON round trip, mismatch errors, stream round trips, layout rules, bad streams."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anyloom.sequences.interleave import (
    AudioIds,
    ImageIds,
    StreamError,
    TextIds,
    audio_slot,
    audio_span_length,
    encode_document,
    image_slot,
    legal_ranges,
    parse_stream,
)
from anyloom.sequences.vocab import SPECIAL_NAMES, Vocabulary, VocabularyError


def make_vocab(row_end: bool = False, pattern: str = "flat", q: int = 3) -> Vocabulary:
    return Vocabulary.build(300, 16, 8, q, (2, 3), image_row_end=row_end, audio_pattern=pattern)


# ---- vocabulary -----------------------------------------------------------------------------------------------


def test_vocab_layout_golden():
    v = Vocabulary.build(512, 1024, 256, 4, (8, 8))
    assert (v.image_offset, v.audio_offset, v.special_offset) == (512, 1536, 1536 + 1024)
    assert v.size == 512 + 1024 + 4 * 256 + len(SPECIAL_NAMES)
    assert v.audio_range(2) == (1536 + 512, 1536 + 768)
    assert v.audio_token(5, 2) == 1536 + 512 + 5 and v.audio_level(v.audio_token(5, 2)) == 2
    assert v.audio_code(v.audio_token(5, 2)) == 5
    assert v.image_token(7) == 519 and v.is_image(519) and not v.is_image(1536)
    assert v.describe(v.boi) == "<boi>" and v.special_name(v.eos) == "eos"
    ids = np.array([0, 511, 512, 1535, 1536, v.special_offset - 1, v.special_offset, v.size - 1])
    assert v.modality(ids).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_vocab_json_round_trip(tmp_path):
    for v in (make_vocab(), make_vocab(True, "delay"), Vocabulary.build(300, 0, 0, 0, (1, 1))):
        assert Vocabulary.from_json(v.to_json()) == v
    v = make_vocab(True, "delay")
    assert Vocabulary.load(v.save(tmp_path / "vocab.json")) == v


def test_vocab_load_errors_name_the_field():
    v = make_vocab()
    data = json.loads(v.to_json())
    with pytest.raises(VocabularyError, match="'size'"):
        Vocabulary.from_dict({**data, "size": v.size + 1})
    with pytest.raises(VocabularyError, match="missing field 'audio_pattern'"):
        Vocabulary.from_dict({k: x for k, x in data.items() if k != "audio_pattern"})
    with pytest.raises(VocabularyError, match="unknown field 'colour'"):
        Vocabulary.from_dict({**data, "colour": 1})
    with pytest.raises(VocabularyError, match="audio_pattern"):
        Vocabulary.from_dict({**data, "audio_pattern": "zigzag"})
    with pytest.raises(VocabularyError, match="format_version"):
        Vocabulary.from_dict({**data, "format_version": 99})
    with pytest.raises(VocabularyError, match="not valid JSON"):
        Vocabulary.from_json("{")


def test_check_compatible():
    v = make_vocab()
    v.check_compatible(make_vocab())
    with pytest.raises(VocabularyError, match="'image_row_end' is True there but False here"):
        v.check_compatible(make_vocab(row_end=True))
    with pytest.raises(VocabularyError, match="'text_size'"):
        v.check_compatible(Vocabulary.build(301, 16, 8, 3, (2, 3)))


# ---- round trips ----------------------------------------------------------------------------------------------


@st.composite
def documents(draw, vocab: Vocabulary):
    """Random canonical documents: no two text segments in a row (the stream merges them)."""
    segs = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["text", "image", "audio"]))
        if kind == "text":
            if segs and isinstance(segs[-1], TextIds):
                continue
            n = draw(st.integers(1, 6))
            segs.append(TextIds(draw(st.lists(st.integers(0, vocab.text_size - 1), min_size=n, max_size=n))))
        elif kind == "image":
            codes = draw(st.lists(st.integers(0, 15), min_size=6, max_size=6))
            segs.append(ImageIds(np.array(codes).reshape(2, 3)))
        else:
            f = draw(st.integers(1, 5))
            codes = draw(st.lists(st.integers(0, 7), min_size=f * 3, max_size=f * 3))
            segs.append(AudioIds(np.array(codes).reshape(3, f)))
    loss = draw(st.lists(st.booleans(), min_size=len(segs), max_size=len(segs)))
    return segs, loss


@pytest.mark.parametrize("pattern", ["flat", "delay"])
@pytest.mark.parametrize("row_end", [False, True])
def test_round_trip_property(pattern, row_end):
    vocab = make_vocab(row_end, pattern)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(documents(vocab))
    def check(doc):
        segs, loss = doc
        s = encode_document(segs, vocab, loss=loss)
        assert s.ids.dtype == np.int64 and s.modality.dtype == np.int8 and s.loss_mask.dtype == bool
        assert len(s.ids) == len(s.modality) == len(s.loss_mask)
        assert s.ids[0] == vocab.bos and s.ids[-1] == vocab.eos
        parsed = parse_stream(s.ids, vocab)
        assert parsed.ok and parsed.ended
        assert parsed.segments == segs
        # padding after eos is allowed and changes nothing
        padded = np.concatenate([s.ids, np.full(3, vocab.pad)])
        assert parse_stream(padded, vocab).segments == segs
        # the stream without bos/eos parses too (what a generator emits mid-document)
        assert parse_stream(s.ids[1:-1], vocab).segments == segs
        assert (s.modality == vocab.modality(s.ids)).all()

    check()


def test_loss_mask_covers_whole_spans():
    v = make_vocab(row_end=True)
    segs = [TextIds([1, 2]), ImageIds(np.zeros((2, 3), int)), TextIds([3])]
    s = encode_document(segs, v, loss=[False, True, False])
    # bos, 2 text | boi + 2*(3+1) + eoi | 1 text, eos
    assert s.loss_mask.tolist() == [False] * 3 + [True] * 10 + [False] * 2
    s = encode_document(segs, v, loss=[False, False, True])
    assert s.loss_mask[-2:].tolist() == [True, True]  # eos follows the last segment's loss


def test_delay_pattern_golden():
    v = make_vocab(pattern="delay", q=2)
    codes = np.array([[1, 2, 3], [4, 5, 6]])
    s = encode_document([AudioIds(codes)], v, bos=False, eos=False)
    a0, a1, pad = v.audio_range(0)[0], v.audio_range(1)[0], v.audio_pad
    # steps: (f0q0, pad) (f1q0, f0q1) (f2q0, f1q1) (pad, f2q1)
    expected = [v.boa, a0 + 1, pad, a0 + 2, a1 + 4, a0 + 3, a1 + 5, pad, a1 + 6, v.eoa]
    assert s.ids.tolist() == expected
    flat = encode_document([AudioIds(codes)], make_vocab(q=2), bos=False, eos=False)
    assert flat.ids.tolist() == [v.boa, a0 + 1, a1 + 4, a0 + 2, a1 + 5, a0 + 3, a1 + 6, v.eoa]


# ---- layout rules for constrained decoding ------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["flat", "delay"])
def test_legal_ranges_accept_exactly_the_encoded_span(pattern):
    v = make_vocab(row_end=True, pattern=pattern)
    rng = np.random.default_rng(0)
    for n_f in (1, 4):
        body = encode_document([AudioIds(rng.integers(0, 8, (3, n_f)))], v, bos=False, eos=False).ids[1:]
        assert len(body) == audio_span_length(v, n_f) + 1
        for off, tok in enumerate(body):
            ranges = legal_ranges(v, "audio", off, n_frames=n_f)
            assert any(lo <= tok < hi for lo, hi in ranges), (off, v.describe(tok))
            assert sum(hi - lo for lo, hi in ranges) in (1, 8)  # one level's range or a single special
            # before F is decided (flat: anywhere; delay: until level 0 pads), the token is legal without F
            if pattern == "flat" or off < n_f * 3:
                assert any(lo <= tok < hi for lo, hi in legal_ranges(v, "audio", off))
        assert audio_slot(v, len(body) - 1, n_f).kind == "end"
    img = encode_document([ImageIds(rng.integers(0, 16, (2, 3)))], v, bos=False, eos=False).ids[1:]
    for off, tok in enumerate(img):
        assert any(lo <= tok < hi for lo, hi in legal_ranges(v, "image", off))
    assert [image_slot(v, o).kind for o in range(9)] == ["code"] * 3 + ["row_end"] + ["code"] * 3 + [
        "row_end",
        "end",
    ]


def test_flat_audio_may_end_at_frame_boundaries_only():
    v = make_vocab()
    eoa = (v.eoa, v.eoa + 1)
    assert eoa not in legal_ranges(v, "audio", 0)
    assert eoa not in legal_ranges(v, "audio", 1)
    assert eoa in legal_ranges(v, "audio", 3)
    d = make_vocab(pattern="delay")
    assert legal_ranges(d, "audio", 1) == [(d.audio_pad, d.audio_pad + 1)]  # level 1 of step 0 is delayed
    assert (d.audio_pad, d.audio_pad + 1) in legal_ranges(d, "audio", 3)  # level 0 may end the frames


# ---- bad streams ----------------------------------------------------------------------------------------------


def _doc(v: Vocabulary) -> np.ndarray:
    segs = [TextIds([5, 6]), ImageIds(np.arange(6).reshape(2, 3)), AudioIds(np.ones((3, 2), int)), TextIds([7])]
    return encode_document(segs, v).ids


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda ids, v: np.delete(ids, 5), r"expected <eoi> after 6 image-span tokens"),
        (lambda ids, v: ids[:14], r"expected <eoa> to close it, found the end of the stream"),
        (lambda ids, v: np.insert(ids, 1, v.eoi), r"position 1: <eoi> outside any span"),
        (lambda ids, v: np.insert(ids, 1, v.image_token(3)), r"position 1: image:3 outside any span"),
        (lambda ids, v: np.concatenate([ids, [5]]), r"text:5 after <eos>"),
        (lambda ids, v: np.where(np.arange(len(ids)) == 13, v.audio_token(1, 0), ids), r"audio code of level 1"),
        (lambda ids, v: np.concatenate([ids[:-1], [v.size + 3]]), r"outside the vocabulary"),
        (lambda ids, v: np.insert(ids, 3, v.bos), r"<bos> inside a document"),
    ],
)
def test_bad_streams_raise_clear_errors(mutate, message):
    v = make_vocab()
    ids = mutate(_doc(v), v)
    with pytest.raises(StreamError, match=message):
        parse_stream(ids, v)
    best = parse_stream(ids, v, strict=False)  # never raises; keeps the good parts, flags the rest
    assert not best.ok and best.problems


def test_best_effort_keeps_good_segments():
    v = make_vocab()
    ids = _doc(v)
    broken = np.delete(ids, 5)  # image one code short
    best = parse_stream(broken, v, strict=False)
    kinds = [type(s).__name__ for s in best.segments]
    assert kinds == ["TextIds", "AudioIds", "TextIds"]
    assert len(best.problems) == 1 and "image" in best.problems[0]
    assert best.ended


def test_encode_rejects_bad_segments():
    v = make_vocab()
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        encode_document([ImageIds(np.zeros((3, 3), int))], v)
    with pytest.raises(ValueError, match="code 16 outside"):
        encode_document([ImageIds(np.full((2, 3), 16))], v)
    with pytest.raises(ValueError, match="2 levels"):
        encode_document([AudioIds(np.zeros((2, 4), int))], v)
    with pytest.raises(ValueError, match="code 300 outside"):
        encode_document([TextIds([300])], v)
    with pytest.raises(ValueError, match="loss has 2 entries"):
        encode_document([TextIds([1])], v, loss=[True, False])


@pytest.mark.parametrize("pattern", ["flat", "delay"])
def test_garbage_streams_never_crash(pattern):
    """Any id sequence: strict parsing raises only StreamError; best-effort parsing never raises, and what it
    keeps re-encodes to a valid stream."""
    vocab = make_vocab(row_end=True, pattern=pattern)
    interesting = list(range(vocab.special_offset, vocab.size)) + [0, 1, vocab.image_offset, vocab.audio_offset]

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.one_of(st.integers(-2, vocab.size + 2), st.sampled_from(interesting)), max_size=40))
    def check(ids):
        try:
            parse_stream(ids, vocab)
        except StreamError:
            pass
        best = parse_stream(ids, vocab, strict=False)
        again = encode_document(best.segments, vocab)
        assert parse_stream(again.ids, vocab).ok

    check()

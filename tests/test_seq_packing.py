"""Packing loader: row contents, doc ids / positions / loss mask, determinism, resume, rank sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anyloom.sequences.interleave import AudioIds, ImageIds, TextIds, TokenStream, encode_document
from anyloom.sequences.packing import Batch, ListSource, PackedLoader
from anyloom.sequences.vocab import Vocabulary

VOCAB = Vocabulary.build(300, 16, 8, 2, (2, 2))


def random_streams(n: int, seed: int = 0) -> list[TokenStream]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        segs = [TextIds(rng.integers(0, 300, rng.integers(1, 9)))]
        if rng.random() < 0.5:
            segs.append(ImageIds(rng.integers(0, 16, (2, 2))))
        else:
            segs.append(AudioIds(rng.integers(0, 8, (2, rng.integers(1, 6)))))
        out.append(encode_document(segs, VOCAB, loss=[bool(rng.random() < 0.5), True]))
    return out


class DrawSource(ListSource):
    """Uses its random draws (like a mixture would): the document depends on them."""

    draws_per_document = 1

    def stream(self, index: int, draws: np.ndarray) -> TokenStream:
        s = self.streams[index]
        cut = 2 + int(draws[0] * (len(s) - 2))  # a random-length prefix, still a valid token sequence
        return TokenStream(s.ids[:cut], s.modality[:cut], s.loss_mask[:cut])


def take(loader: PackedLoader, n: int) -> list[Batch]:
    return [next(loader) for _ in range(n)]


def same(a: Batch, b: Batch) -> bool:
    def eq(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return x is y if x is None or y is None else torch.equal(x, y)

    return all(eq(getattr(a, k), getattr(b, k)) for k in a.__dict__)


def test_rows_follow_the_concatenated_stream():
    streams = random_streams(30)
    loader = PackedLoader(ListSource(streams), seq_len=16, batch_size=3, shuffle=False, infinite=False)
    flat = np.concatenate([s.ids for s in streams])
    starts = np.zeros(len(flat), bool)
    starts[np.cumsum([0] + [len(s) for s in streams[:-1]])] = True
    loss = np.concatenate([s.loss_mask for s in streams])
    mod = np.concatenate([s.modality for s in streams])
    batches = list(loader)
    assert len(batches) == (len(flat) - 1) // (3 * 16)  # one pass, the incomplete last batch dropped
    for g, b in enumerate(batches):
        assert b.tokens.shape == (3, 16) and b.tokens.dtype == torch.int64
        assert b.doc_ids.dtype == torch.int32 and b.modality.dtype == torch.int8 and b.loss_mask.dtype == torch.bool
        for r in range(3):
            s = (g * 3 + r) * 16
            assert b.tokens[r].tolist() == flat[s : s + 16].tolist()
            assert b.targets[r].tolist() == flat[s + 1 : s + 17].tolist()
            assert b.loss_mask[r].tolist() == (loss[s + 1 : s + 17] & ~starts[s + 1 : s + 17]).tolist()
            assert b.modality[r].tolist() == mod[s + 1 : s + 17].tolist()
            # reference doc ids / positions by a plain loop
            doc, pos, ref_doc, ref_pos = 0, 0, [], []
            for c in range(16):
                if c > 0 and starts[s + c]:
                    doc, pos = doc + 1, 0
                ref_doc.append(doc)
                ref_pos.append(pos)
                pos += 1
            assert b.doc_ids[r].tolist() == ref_doc
            assert b.positions[r].tolist() == ref_pos


def test_no_loss_across_documents_and_on_bos():
    loader = PackedLoader(ListSource(random_streams(40)), seq_len=32, batch_size=4, seed=1)
    for b in take(loader, 5):
        assert not b.loss_mask[b.targets == VOCAB.bos].any()
        # a target predicted from the last token of a document (eos) is never trained
        assert not b.loss_mask[b.tokens == VOCAB.eos].any()
        # positions restart exactly where the document id changes
        changes = torch.diff(b.doc_ids, dim=1) != 0
        assert torch.equal(b.positions[:, 1:] == 0, changes)


def test_deterministic_and_seed_dependent():
    src = DrawSource(random_streams(50))
    a = take(PackedLoader(src, 24, 2, seed=3), 12)
    b = take(PackedLoader(src, 24, 2, seed=3), 12)
    c = take(PackedLoader(src, 24, 2, seed=4), 12)
    assert all(same(x, y) for x, y in zip(a, b))
    assert not all(same(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("split", [1, 5, 17])
def test_resume_equals_uninterrupted(split):
    src = DrawSource(random_streams(20))  # ~13 batches per epoch: the run crosses epochs
    full = take(PackedLoader(src, 20, 2, seed=7), 40)
    first = PackedLoader(src, 20, 2, seed=7)
    take(first, split)
    state = first.state_dict()
    resumed = PackedLoader(src, 20, 2, seed=7)
    resumed.load_state_dict(dict(state))
    assert resumed.step == split
    rest = take(resumed, 40 - split)
    assert all(same(x, y) for x, y in zip(full[split:], rest))


def test_resume_refuses_a_different_configuration():
    src = ListSource(random_streams(10))
    state = PackedLoader(src, 20, 2, seed=7).state_dict()
    with pytest.raises(ValueError, match="'seq_len' was 20 when saved, is 21 now"):
        PackedLoader(src, 21, 2, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="'seed'"):
        PackedLoader(src, 20, 2, seed=8).load_state_dict(state)
    with pytest.raises(KeyError, match="'num_documents'"):
        PackedLoader(src, 20, 2, seed=7).load_state_dict({k: v for k, v in state.items() if k != "num_documents"})


def test_rank_sharding_disjoint_and_union_is_single_rank():
    src = DrawSource(random_streams(30))
    world = 3
    single = take(PackedLoader(src, 16, 2 * world, seed=5), 8)
    ranks = [take(PackedLoader(src, 16, 2, rank=r, world_size=world, seed=5), 8) for r in range(world)]
    for g in range(8):
        for field in ("tokens", "targets", "loss_mask", "doc_ids", "positions", "modality"):
            union = torch.cat([getattr(ranks[r][g], field) for r in range(world)])
            assert torch.equal(union, getattr(single[g], field)), (g, field)
    # the state is global: every rank saves the same one
    loaders = [PackedLoader(src, 16, 2, rank=r, world_size=world, seed=5) for r in range(world)]
    for ld in loaders:
        take(ld, 3)
    assert all(ld.state_dict() == loaders[0].state_dict() for ld in loaders)


def test_long_documents_span_rows():
    long = encode_document([TextIds(np.arange(100) % 300)], VOCAB)
    loader = PackedLoader(ListSource([long]), seq_len=8, batch_size=2, shuffle=False)
    b = next(loader)
    assert b.doc_ids.max() == 0 and b.positions[1].tolist() == list(range(8))
    assert b.loss_mask.all()  # all targets are inside the one document


def test_bad_arguments():
    empty = TokenStream(np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, bool))
    with pytest.raises(ValueError, match="every document is empty"):
        next(PackedLoader(ListSource([empty, empty]), 8, 2))
    with pytest.raises(ValueError, match="empty"):
        PackedLoader(ListSource([]), 8, 2)
    with pytest.raises(ValueError, match="rank 2"):
        PackedLoader(ListSource(random_streams(2)), 8, 2, rank=2, world_size=2)


def _whole(src, t, b, **kw) -> PackedLoader:
    return PackedLoader(src, t, b, whole_documents=True, pad_id=VOCAB.pad, **kw)


def test_whole_documents_are_never_split_and_padding_is_never_trained():
    streams = random_streams(60, seed=3)
    t = 24
    assert max(len(s) for s in streams) <= t
    loader = _whole(ListSource(streams), t, 3, shuffle=False, infinite=False)
    seen = []
    for b in loader:
        for r in range(3):
            row, docs = b.tokens[r], b.doc_ids[r]
            for d in docs.unique().tolist():
                piece = row[docs == d].numpy()
                if (piece == VOCAB.pad).all():  # padding: its own document, never trained, never a target
                    assert not b.loss_mask[r][docs == d].any()
                    continue
                assert piece[0] == VOCAB.bos, "every piece of a row starts a document: none was split"
                seen.append(piece)
            assert not b.loss_mask[r][b.targets[r] == VOCAB.pad].any()
    # in order, each document appears whole (the last of a row may lose only its final target, never tokens)
    for piece, stream in zip(seen, streams):
        assert piece.tolist() == stream.ids[: len(piece)].tolist() and len(piece) == len(stream)
    assert len(seen) > 30


def test_whole_documents_resume_and_rank_union():
    src = DrawSource(random_streams(25, seed=4))
    full = take(_whole(src, 20, 2, seed=7), 30)
    first = _whole(src, 20, 2, seed=7)
    take(first, 11)
    resumed = _whole(src, 20, 2, seed=7)
    resumed.load_state_dict(first.state_dict())
    assert all(same(x, y) for x, y in zip(full[11:], take(resumed, 19)))
    with pytest.raises(ValueError, match="'whole_documents'"):
        PackedLoader(src, 20, 2, seed=7).load_state_dict(first.state_dict())
    single = take(_whole(src, 16, 4, seed=5), 6)
    ranks = [take(_whole(src, 16, 2, rank=r, world_size=2, seed=5), 6) for r in range(2)]
    for g in range(6):
        for field in ("tokens", "targets", "loss_mask", "doc_ids", "positions", "modality"):
            assert torch.equal(torch.cat([getattr(ranks[r][g], field) for r in range(2)]), getattr(single[g], field))


def test_whole_documents_still_cut_documents_longer_than_a_row():
    long = encode_document([TextIds(np.arange(100) % 300)], VOCAB)
    b = next(_whole(ListSource([long]), 8, 2, shuffle=False))
    assert b.doc_ids.max() == 0 and b.loss_mask.all()

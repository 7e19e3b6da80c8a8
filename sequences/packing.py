"""Packing loader: documents -> fixed-length rows with document ids, per-document positions and a loss mask.

Documents (token streams from a source, e.g. a task mixture) are shuffled per epoch, concatenated into one
global stream, and cut into rows of ``seq_len`` tokens; a document that does not fit continues at the start of
the next row (no padding is ever spent). Row ``k`` holds stream[k*T : (k+1)*T] as inputs and the token after
each as its target, so the last column's target is the first token of the next row.

``whole_documents=True`` never splits a document that fits in a row: when the next document does not fit in
what is left of the row, the rest of the row is padding (token ``pad_id``, its own document id, no loss) and
the document starts the next row. Only documents longer than ``seq_len`` are still cut. A split conditional
document (a caption in one row, the rest of its image in the next) trains its continuation without its
condition; this mode trades the padding for that.

Per position of a row (B batch rows, T = seq_len):

- ``doc_ids``: index of the document piece within the row (0, 1, ...), for document-masked attention;
- ``positions``: index within that piece, restarting at 0 at every document start and at column 0 (a document
  continued from the previous row restarts too, so positions are always < seq_len);
- ``loss_mask``: the target is trained (the source's loss mask of the target token) and belongs to the same
  document (the last token of a document has no target: the next document's <bos> is not predictable);
- ``modality``: modality id of the TARGET token (0 text, 1 image, 2 audio, 3 special);
- ``span_ids``: with a ``span_rule`` (e.g. ``functools.partial(bidirectional_span_ids, vocab)``), the ids of the
  spans attention reads bidirectionally, from the input tokens and whether each is trained in its document
  (``given`` = not trained); None without one.

Sharding: global batch ``g`` is rows [g*B*W, (g+1)*B*W) of the global stream; rank ``r`` takes rows
[g*B*W + r*B, g*B*W + (r+1)*B), so ranks are disjoint and their union is exactly the single-rank stream with
batch size B*W. Every rank walks the same document order; a source with ``length()`` (the task mixture has one)
lets each rank build only the documents overlapping its rows, otherwise every rank builds all of them.

Determinism and resume: the document order and every random choice a source makes come from
``(seed, epoch)`` only. The loader's whole state is (epoch, document cursor, offset into that document), so
``state_dict``/``load_state_dict`` restore exactly the next batch (the state is the same on every rank).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from anyloom.sequences.interleave import TokenStream


@runtime_checkable
class StreamSource(Protocol):
    """Documents by index. ``stream`` must be a pure function of its arguments (that is what makes resume exact)."""

    draws_per_document: int  # how many uniform [0, 1) numbers ``stream`` consumes (template choice, dropout, ...)

    def __len__(self) -> int: ...

    def stream(self, index: int, draws: np.ndarray) -> TokenStream:
        """Document ``index`` as a token stream; ``draws`` is (draws_per_document,) float64 uniforms."""
        ...

    # Optional: ``length(index, draws) -> int``, equal to ``len(stream(index, draws))`` but cheap. With it, each
    # rank builds only the documents that overlap its own rows instead of the whole global batch.


class ListSource:
    """A fixed list of token streams (tests, evaluation sets, already-assembled documents)."""

    draws_per_document = 0

    def __init__(self, streams: Sequence[TokenStream]):
        self.streams = list(streams)

    def __len__(self) -> int:
        return len(self.streams)

    def stream(self, index: int, draws: np.ndarray) -> TokenStream:
        return self.streams[index]


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) int64 input ids
    targets: torch.Tensor  # (B, T) int64 next-token ids (meaningless where loss_mask is False)
    loss_mask: torch.Tensor  # (B, T) bool: train on this target
    doc_ids: torch.Tensor  # (B, T) int32 document index within the row
    positions: torch.Tensor  # (B, T) int64 position within the document, restarting at 0 per document
    modality: torch.Tensor  # (B, T) int8 modality of the target token: 0 text, 1 image, 2 audio, 3 special
    span_ids: torch.Tensor | None = None  # (B, T) int64 bidirectional spans of the inputs (0 = causal), or None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(**{k: None if v is None else v.to(device, non_blocking=non_blocking)
                        for k, v in self.__dict__.items()})

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


class PackedLoader:
    """Iterate to get :class:`Batch` es of ``batch_size`` rows of ``seq_len`` tokens for this rank.

    ``infinite=True`` (training: a fixed number of steps) runs epoch after epoch with a fresh order each;
    ``infinite=False`` stops after one pass, dropping the last incomplete global batch.
    """

    def __init__(
        self,
        source: StreamSource,
        seq_len: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        infinite: bool = True,
        whole_documents: bool = False,
        pad_id: int = 0,
        span_rule: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if len(source) == 0:
            raise ValueError("the document source is empty: nothing to pack")
        self.source = source
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.infinite = infinite
        self.whole_documents = whole_documents
        self.pad_id = pad_id
        self.span_rule = span_rule  # (tokens, given) -> span ids or None (module docstring)
        self._epoch = 0
        self._cursor = 0  # index into this epoch's order of the document holding the next row's first token
        self._offset = 0  # tokens of that document already consumed
        self._step = 0  # global batches produced
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)
        self._draws = np.zeros((0, 0))
        self._memo: dict[tuple[int, int], TokenStream] = {}  # documents built for this batch (+ the straddling one)
        self._source_length = getattr(source, "length", None)  # optional: lets ranks skip other ranks' documents

    # ---- the document order ---------------------------------------------------------------------------------
    def _plan(self, epoch: int) -> None:
        if self._order_epoch == epoch:
            return
        n = len(self.source)
        rng = np.random.default_rng([self.seed, epoch])
        self._order = rng.permutation(n) if self.shuffle else np.arange(n)
        # every random decision of the epoch in one draw: a Generator per document would cost ~100 us each
        self._draws = rng.random((n, int(self.source.draws_per_document)))
        self._order_epoch = epoch

    def _document(self, epoch: int, cursor: int) -> TokenStream:
        key = (epoch, cursor)
        if key not in self._memo:
            self._plan(epoch)
            index = int(self._order[cursor])
            self._memo[key] = self.source.stream(index, self._draws[index])
        return self._memo[key]

    def _length(self, epoch: int, cursor: int) -> int:
        if self._source_length is None:
            return len(self._document(epoch, cursor))
        self._plan(epoch)
        index = int(self._order[cursor])
        return int(self._source_length(index, self._draws[index]))

    # ---- batches --------------------------------------------------------------------------------------------
    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> Batch:
        B, T, W = self.batch_size, self.seq_len, self.world_size
        need = B * W * T + 1  # one extra token: the target of the last column
        # pass 1: which document pieces make up the global batch (lengths only, when the source can tell them)
        # (epoch, cursor, offset, start in batch, tokens taken); cursor -1 = padding
        pieces: list[tuple[int, int, int, int, int]] = []
        have = 0
        epoch, cursor, offset = self._epoch, self._cursor, self._offset
        n_docs = len(self.source)
        empty_run = 0  # consecutive empty documents: a source of only empty documents would loop forever
        while have < need:
            if empty_run > n_docs:
                raise ValueError(f"{type(self.source).__name__}: every document is empty; nothing to pack")
            if cursor >= n_docs:
                if not self.infinite:
                    raise StopIteration  # one pass only: the incomplete last global batch is dropped
                epoch, cursor, offset = epoch + 1, 0, 0
                continue
            take = self._length(epoch, cursor) - offset
            room = T - have % T  # tokens left in the current row
            if self.whole_documents and offset == 0 and room < take <= T:
                pieces.append((epoch, -1, 0, have, room))  # pad the row; the document starts the next one
                have += room
                continue
            if take > 0:
                pieces.append((epoch, cursor, offset, have, take))
                have += take
            empty_run = 0 if take > 0 else empty_run + 1
            cursor, offset = cursor + 1, 0
        # the next batch starts B*W*T tokens on, inside the last document piece
        l_epoch, l_cursor, l_offset, l_start, _ = pieces[-1]
        self._epoch, self._cursor, self._offset = l_epoch, l_cursor, l_offset + (need - 1 - l_start)
        self._step += 1

        # pass 2: build only the documents that overlap this rank's rows (plus the one target token after them)
        s0, s1 = self.rank * B * T, (self.rank + 1) * B * T + 1
        ids, mods, losses, start_at = [], [], [], []
        filled = 0
        for p_epoch, p_cursor, p_offset, p_start, p_take in pieces:
            if p_start + p_take <= s0 or p_start >= s1:
                continue
            if p_cursor < 0:  # padding: a document of its own, never trained
                n = min(s1, p_start + p_take) - max(s0, p_start)
                start_at.append(filled)
                ids.append(np.full(n, self.pad_id, dtype=np.int64))
                mods.append(np.full(n, 3, dtype=np.int8))
                losses.append(np.zeros(n, dtype=bool))
                filled += n
                continue
            doc = self._document(p_epoch, p_cursor)
            if len(doc) != p_offset + p_take:
                raise RuntimeError(
                    f"{type(self.source).__name__}: length() said {p_offset + p_take} tokens, stream() gave {len(doc)}"
                )
            lo = p_offset + max(s0 - p_start, 0)
            hi = p_offset + min(s1 - p_start, p_take)
            if lo == 0:  # a document start (not the continuation of one)
                start_at.append(filled)
            ids.append(doc.ids[lo:hi])
            mods.append(doc.modality[lo:hi])
            losses.append(doc.loss_mask[lo:hi])
            filled += hi - lo
        last_key = (l_epoch, l_cursor)  # the straddling document is needed again by the next batch
        self._memo = {last_key: self._memo[last_key]} if last_key in self._memo else {}

        buf_ids = np.concatenate(ids)  # (B*T + 1,)
        buf_start = np.zeros(buf_ids.shape[0], dtype=bool)
        buf_start[start_at] = True
        tokens = buf_ids[:-1].reshape(B, T)
        targets = buf_ids[1:].reshape(B, T)
        target_starts = buf_start[1:].reshape(B, T)  # the target opens a new document: nothing to predict
        buf_loss = np.concatenate(losses)  # (B*T + 1,) each token's own loss flag in its document
        loss_mask = buf_loss[1:].reshape(B, T) & ~target_starts
        modality = np.concatenate(mods)[1:].reshape(B, T)
        new_doc = buf_start[:-1].reshape(B, T).copy()
        new_doc[:, 0] = True  # every row starts a document piece
        doc_ids = np.cumsum(new_doc, axis=1, dtype=np.int32) - 1
        col = np.arange(T, dtype=np.int64)
        piece_start = np.maximum.accumulate(np.where(new_doc, col, 0), axis=1)
        tokens_t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        span_ids = None
        if self.span_rule is not None:  # an input is given when predicting it is not trained in its document
            given = ~torch.from_numpy(np.ascontiguousarray(buf_loss[:-1].reshape(B, T)))
            span_ids = self.span_rule(tokens_t, given)
        return Batch(
            tokens=tokens_t,
            targets=torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64)),
            loss_mask=torch.from_numpy(np.ascontiguousarray(loss_mask)),
            doc_ids=torch.from_numpy(doc_ids),
            positions=torch.from_numpy(col[None, :] - piece_start),
            modality=torch.from_numpy(np.ascontiguousarray(modality, dtype=np.int8)),
            span_ids=span_ids,
        )

    # ---- resume ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain ints; identical on every rank. Save it with the training checkpoint."""
        return {
            "epoch": self._epoch,
            "cursor": self._cursor,
            "offset": self._offset,
            "step": self._step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.batch_size * self.world_size,
            "num_documents": len(self.source),
            "shuffle": self.shuffle,
            "whole_documents": self.whole_documents,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken. Refuses a state from a differently configured loader."""
        expected = self.state_dict()
        state = {"whole_documents": False, **state}  # states saved before the option existed
        for key in ("seed", "seq_len", "global_batch_size", "num_documents", "shuffle", "whole_documents"):
            if key not in state:
                raise KeyError(f"loader state has no '{key}' (not a PackedLoader.state_dict())")
            if state[key] != expected[key]:
                raise ValueError(
                    f"loader state mismatch: '{key}' was {state[key]!r} when saved, is {expected[key]!r} now; "
                    "resuming would not continue the same stream"
                )
        for key in ("epoch", "cursor", "offset", "step"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise ValueError(f"loader state: '{key}' must be an integer >= 0, got {state.get(key)!r}")
        self._epoch, self._cursor, self._offset, self._step = (
            state["epoch"],
            state["cursor"],
            state["offset"],
            state["step"],
        )
        self._memo = {}

    @property
    def step(self) -> int:
        """Global batches produced so far (including those before a resume)."""
        return self._step

    @property
    def epoch(self) -> int:
        return self._epoch


__all__ = ["Batch", "PackedLoader", "StreamSource", "ListSource"]

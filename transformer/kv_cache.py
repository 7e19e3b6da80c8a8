"""A static KV cache of preallocated tensors (gpt-fast style): fixed shapes, so decoding steps can be compiled.

Axis legend: B batch, K key/value heads, S cache slots (``max_len``), E head dim, t new tokens.

Besides keys and values it keeps, per slot, the document id (and bidirectional span id) of the token written
there, and per row the position of the last token and the grid cell the next token would take (models with grid
positions): attention masks cached slots by document exactly as the full forward masks packed documents, which
is what makes LEFT padding work (pads carry doc id -1 and so are never seen by the real tokens of doc id 0), and
lets decoding continue without the caller tracking positions.

``cache_pos`` (the first slot the new tokens go to) is either a Python int or a 0-d int64 tensor:

- int: ``update`` returns the filled prefix, slots [0, cache_pos + t), so attention costs what the prefix costs;
  the shapes depend on the value, which is fine in eager mode but makes ``torch.compile`` specialise on it.
- tensor: writes go through ``index_copy_`` and ``update`` returns all ``max_len`` slots; slots never written
  keep doc id ``NO_DOC``, which no query has, so the document mask hides them (and the causal rule hides slots
  written by later tokens of the same call). Every shape is then fixed by (B, t, max_len), so one compiled
  decode graph serves every step. Nothing branches on the tensor's value: an out-of-range slot is refused by
  ``index_copy_`` itself (eager), not by a Python check.

The cache is a plain object holding tensors, not an ``nn.Module`` with buffers: ``torch.compile`` then sees its
tensors as ordinary inputs, guarded by shape and dtype, not by identity. A new cache of the same shape reuses the
compiled graph, also where the weights are frozen into it (``anyloom.generation.engine.compiled_decode_step``),
which guards module tensors by identity.
"""

from __future__ import annotations

import torch
from torch import Tensor

NO_DOC = -2  # doc id of slots never written (matches no real or pad document)


class LayerKV:
    """One layer's keys and values, (B, K, S, E) each: a tensor of its own, so a compiled step writes a few slots
    in place (slices of one (L, ...) tensor made inductor copy the whole cache back every step: 10x slower)."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v


class KVCache:
    def __init__(
        self,
        batch: int,
        max_len: int,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.layers = [LayerKV(torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device)) for _ in range(n_layers)]
        self.doc_ids = torch.full((batch, max_len), NO_DOC, dtype=torch.long, device=device)  # (B, S)
        self.span_ids = torch.zeros(batch, max_len, dtype=torch.long, device=device)  # (B, S)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) RoPE position of the next token
        self.grid_next = torch.full((batch,), -1, dtype=torch.long, device=device)  # (B,) its grid cell (grid_index)

    @property
    def max_len(self) -> int:
        return self.doc_ids.shape[1]

    def reset(self) -> None:
        for layer in self.layers:
            layer.k.zero_()
            layer.v.zero_()
        self.doc_ids.fill_(NO_DOC)
        self.span_ids.zero_()
        self.next_pos.zero_()
        self.grid_next.fill_(-1)

    @torch.no_grad()
    def select_rows(self, index: Tensor) -> KVCache:
        """A new cache of ``len(index)`` rows, row r a copy of this cache's row ``index[r]`` (keys, values, ids,
        positions, grid state): a prompt prefilled once serves several samples of it."""
        k = self.layers[0].k
        out = KVCache(0, self.max_len, len(self.layers), k.shape[1], k.shape[3], dtype=k.dtype, device=k.device)
        out.layers = [LayerKV(layer.k.index_select(0, index), layer.v.index_select(0, index)) for layer in self.layers]
        for name in ("doc_ids", "span_ids", "next_pos", "grid_next"):  # batch-first, like the keys and values
            setattr(out, name, getattr(self, name).index_select(0, index))
        return out

    @torch.no_grad()
    def prepare(
        self,
        doc_ids: Tensor | None,
        positions: Tensor | None,
        span_ids: Tensor | None,
        cache_pos: int | Tensor,
        t: int,
    ) -> tuple[Tensor, Tensor]:
        """Record the doc/span ids of slots [cache_pos, cache_pos + t); fill in defaults; return (doc_ids, positions).

        Defaults: doc id = the doc id of the previous slot (0 at the start), positions continue ``next_pos``.
        """
        if isinstance(cache_pos, Tensor):
            return self._prepare_static(doc_ids, positions, span_ids, cache_pos, t)
        b = self.doc_ids.shape[0]
        if cache_pos < 0 or cache_pos + t > self.max_len:
            raise ValueError(f"cache slots [{cache_pos}, {cache_pos + t}) do not fit a cache of {self.max_len}")
        dev = self.doc_ids.device
        if doc_ids is None:
            prev = self.doc_ids[:, cache_pos - 1] if cache_pos > 0 else torch.zeros(b, dtype=torch.long, device=dev)
            doc_ids = prev[:, None].expand(b, t)
        if positions is None:
            positions = self.next_pos[:, None] + torch.arange(t, device=dev)  # (B, t)
        self.doc_ids[:, cache_pos : cache_pos + t] = doc_ids
        self.span_ids[:, cache_pos : cache_pos + t] = 0 if span_ids is None else span_ids
        self.next_pos.copy_(positions[:, -1] + 1)
        return doc_ids, positions

    def _prepare_static(
        self, doc_ids: Tensor | None, positions: Tensor | None, span_ids: Tensor | None, cache_pos: Tensor, t: int
    ) -> tuple[Tensor, Tensor]:
        """``prepare`` for a tensor ``cache_pos``: the same defaults, without reading its value on the host."""
        b = self.doc_ids.shape[0]
        slots = _slots(cache_pos, t)  # (t,)
        if doc_ids is None:
            # slot cache_pos - 1 (clamped: at slot 0 the gather reads slot 0, and the where picks doc 0 instead)
            prev = self.doc_ids.index_select(1, (slots[:1] - 1).clamp(min=0))  # (B, 1)
            doc_ids = torch.where(slots[:1] > 0, prev, torch.zeros_like(prev)).expand(b, t)
        if positions is None:
            positions = self.next_pos[:, None] + torch.arange(t, device=self.next_pos.device)  # (B, t)
        self.doc_ids.index_copy_(1, slots, doc_ids)
        self.span_ids.index_copy_(1, slots, torch.zeros_like(doc_ids) if span_ids is None else span_ids)
        self.next_pos.copy_(positions[:, -1] + 1)
        return doc_ids, positions

    def grid_carry(self, cache_pos: int | Tensor) -> Tensor:
        """(B,) the grid cell each row's next token continues from (``model.grid_index``); -1, no run open, for a
        call writing from slot 0 (a new row, as the doc-id default above), whatever the cache held before."""
        if isinstance(cache_pos, Tensor):  # no host read of the value: compiled steps stay static
            return torch.where(cache_pos.reshape(()) == 0, -1, self.grid_next)
        return self.grid_next if cache_pos > 0 else torch.full_like(self.grid_next, -1)

    def update(self, layer: int, k: Tensor, v: Tensor, cache_pos: int | Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, K, t, E) at slots [cache_pos, cache_pos + t) (cast to the cache's dtype); return the filled
        prefix (B, K, S', E) for an int ``cache_pos``, every slot (B, K, max_len, E) for a tensor one (module
        docstring)."""
        t = k.shape[2]
        cache = self.layers[layer]
        if isinstance(cache_pos, Tensor):
            slots = _slots(cache_pos, t)  # (t,)
            cache.k.index_copy_(2, slots, k.to(cache.k.dtype))
            cache.v.index_copy_(2, slots, v.to(cache.v.dtype))
            return cache.k, cache.v
        cache.k[:, :, cache_pos : cache_pos + t] = k
        cache.v[:, :, cache_pos : cache_pos + t] = v
        return cache.k[:, :, : cache_pos + t], cache.v[:, :, : cache_pos + t]


def _slots(cache_pos: Tensor, t: int) -> Tensor:
    """(t,) int64 slot indices cache_pos + [0, t) from a 0-d (or one-element) tensor ``cache_pos``."""
    if cache_pos.numel() != 1 or cache_pos.dtype != torch.long:
        raise ValueError(f"a tensor cache_pos must hold one int64 slot index, got shape {tuple(cache_pos.shape)} "
                         f"{cache_pos.dtype}")
    return cache_pos.reshape(1) + torch.arange(t, device=cache_pos.device)

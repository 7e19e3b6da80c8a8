"""A static KV cache as registered buffers (gpt-fast style): fixed shapes, so decoding steps can be compiled.

Axis legend: L layers, B batch, K key/value heads, S cache slots (``max_len``), E head dim, t new tokens.

Besides keys and values it keeps, per slot, the document id (and bidirectional span id) of the token written
there, and per row the position of the last token: attention masks cached slots by document exactly as the full
forward masks packed documents, which is what makes LEFT padding work (pads carry doc id -1 and so are never
seen by the real tokens of doc id 0), and lets decoding continue without the caller tracking positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NO_DOC = -2  # doc id of slots never written (matches no real or pad document)


class KVCache(nn.Module):
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
        super().__init__()
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("doc_ids", torch.full((batch, max_len), NO_DOC, dtype=torch.long, device=device),
                             persistent=False)  # (B, S)
        self.register_buffer("span_ids", torch.zeros(batch, max_len, dtype=torch.long, device=device),
                             persistent=False)  # (B, S)
        self.register_buffer("next_pos", torch.zeros(batch, dtype=torch.long, device=device),
                             persistent=False)  # (B,) RoPE position the next token gets by default

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.doc_ids.fill_(NO_DOC)
        self.span_ids.zero_()
        self.next_pos.zero_()

    @torch.no_grad()
    def prepare(
        self, doc_ids: Tensor | None, positions: Tensor | None, span_ids: Tensor | None, cache_pos: int, t: int
    ) -> tuple[Tensor, Tensor]:
        """Record the doc/span ids of slots [cache_pos, cache_pos + t); fill in defaults; return (doc_ids, positions).

        Defaults: doc id = the doc id of the previous slot (0 at the start), positions continue ``next_pos``.
        """
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

    def update(self, layer: int, k: Tensor, v: Tensor, cache_pos: int) -> tuple[Tensor, Tensor]:
        """Write k, v (B, K, t, E) at slots [cache_pos, cache_pos + t); return the filled prefix (B, K, S', E)."""
        t = k.shape[2]
        self.k[layer, :, :, cache_pos : cache_pos + t] = k
        self.v[layer, :, :, cache_pos : cache_pos + t] = v
        return self.k[layer, :, :, : cache_pos + t], self.v[layer, :, :, : cache_pos + t]

"""The decoder-only transformer: Llama-style (RMSNorm, SwiGLU, RoPE, GQA) with Chameleon's stability measures
(QK-norm, optional norm reordering, z-loss). It trains on integer ids; it knows nothing about modalities.

Axis legend:
    B batch, T time (tokens), D model dim (``dim``), H query heads, K key/value heads (GQA groups H // K),
    E head dim (``dim // n_heads``), F feed-forward dim, V vocabulary, L layers, S key length (cache prefix + T).

Packed sequences: ``doc_ids`` (B, T) say which document each token belongs to and ``positions`` (B, T) restart
at 0 in every document; attention is causal inside a document and never crosses documents (the mask rule is in
``anyloom.transformer.attention``). Optional ``span_ids`` (B, T) make attention bidirectional inside a span
(e.g. an image's codes; 0 = no span) — a research option, off unless given.

Grid positions (``grid_positions``, off by default): tokens with ids in ``grid_token_range`` that follow a
``grid_start_token`` without a break are the cells of a raster grid of ``grid_size`` cells (an image's codes
after its <boi>); each such token gets a learned embedding of its cell index (0..grid_size-1) added to its
token embedding, so the model knows where on the grid it is without counting (RoPE only says how far apart two
tokens are). Any other token breaks a run; grid tokens not preceded by a start token in the same row (a document
continued from the previous packed row) or beyond ``grid_size`` get no grid embedding. The index is computed
from the tokens alone; with a KV cache, the cache carries each row's next index across calls.

Factorised code embeddings (``code_factors``, off by default): the ids in ``grid_token_range`` are codes of one
codebook whose index is a mixed-radix number with these digit sizes, least significant first (an FSQ codebook:
its levels, the way vector-quantize-pytorch numbers its codes). Each digit value gets a learned vector (one table
per digit for the input, one for the output), and a code's input embedding and its output row add the vectors of
its digits to their own per-code vector, so codes that share FSQ levels share what is learned about them instead
of each of the K codes being learned from its own occurrences alone. The (V, D) sums are formed per call (a gather
and an add), so the parameters, not the effective matrices, are what checkpoints hold; without gradients (decoding)
they are kept and reused until one of their parameters changes (its version counter or storage).

KV-cache decoding: ``model(tokens, positions=..., kv_cache=kv, cache_pos=p)`` writes the new keys/values at
slots [p, p + t) of the static cache and attends to every earlier slot of the same document. ``p`` is an int, or
a 0-d int64 tensor for a shape-static step that ``torch.compile`` compiles once for every position (keys span the
whole cache, unwritten slots masked; ``anyloom.transformer.kv_cache``). Prompts of
different lengths are LEFT-padded: give the pad tokens doc id -1 (they then only see each other) and the real
tokens doc id 0 with positions starting at 0; generation then continues the last document of each row (doc id
and position are taken from the cache when not given).

Init (``init_weights``): every linear and the embedding ~ N(0, init_std); the two projections that write into
the residual stream (attention ``wo``, feed-forward ``w2``) ~ N(0, init_std / sqrt(2 * n_layers)) so the
residual's variance does not grow with depth (GPT-2); norms weight 1, bias 0. It also rebuilds the RoPE tables,
so it is the one call needed after meta-device construction and ``to_empty`` (FSDP2 meta init).

Parameter names follow Meta's Llama layout (tok_embeddings, layers.N.attention.wq, ..., norm, output); fused
kernels change no parameter, so checkpoints are the same whichever kernels ran.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from anyloom.config import added_field
from anyloom.transformer.attention import attention
from anyloom.transformer.kernels.fused_ce import linear_lse, naive_linear_lse

if TYPE_CHECKING:
    from anyloom.transformer.kv_cache import KVCache


@torch.compiler.disable
def _check_targets(flat_targets: Tensor, mask: Tensor, t: int, vocab_size: int) -> None:
    """Refuse a target under the loss mask outside [0, vocab_size), naming its place. A host check: under
    ``torch.compile`` (``parallel.compile_loss``) it runs eagerly between the compiled parts of the loss."""
    bad = mask & ((flat_targets < 0) | (flat_targets >= vocab_size))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"target {int(flat_targets[i])} at (row {i // t}, col {i % t}) is outside the "
                         f"vocabulary [0, {vocab_size})")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # < n_heads: grouped-query attention
    ffn_dim: int = 0  # 0: round(8/3 * dim) up to a multiple of `multiple_of` (Llama's SwiGLU sizing)
    multiple_of: int = 64
    max_seq_len: int = 2048  # length of the RoPE tables (largest position + 1)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = True  # normalise q and k per head before RoPE (Chameleon: keeps logits bounded)
    # "rms": RMSNorm over the head dim, one weight shared by all heads; "layernorm_per_head": Chameleon's
    # LayerNorm over the head dim with a separate weight and bias per head (eps fixed at 1e-5 as in Chameleon)
    qk_norm_type: Literal["rms", "layernorm_per_head"] = "rms"
    norm_reorder: bool = False  # Chameleon's swin-norm: x + norm(attn(x)) instead of x + attn(norm(x))
    tie_embeddings: bool = False
    z_loss_weight: float = 1e-4  # weight of mean(logsumexp(logits)^2) (Chameleon / PaLM)
    attention: Literal["auto", "triton", "xformers", "flex", "sdpa"] = "auto"
    fused_ce: bool = True  # chunked linear + CE (Triton where it runs, chunked PyTorch otherwise)
    ce_chunk_size: int = 8192  # vocabulary chunk of the PyTorch fused-CE path
    fused_rmsnorm: bool = False  # Triton RMSNorm; needs CUDA (or TRITON_INTERPRET=1), else an error
    init_std: float = 0.02
    # a learned embedding of a grid token's cell index (module docstring). The LM stage fills the three fields
    # after it from the vocabulary: the image code ids [lo, hi), the <boi> id and the codes per image
    grid_positions: bool = False
    grid_token_range: tuple[int, int] = (0, 0)
    grid_start_token: int = -1
    grid_size: int = 0
    # factorised code embeddings (module docstring): the digit sizes of the codes in grid_token_range, whose
    # product must be their count; () = off. The LM stage fills grid_token_range when this is set
    code_factors: tuple[int, ...] = added_field(())

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE")
        for name in ("vocab_size", "n_layers", "max_seq_len", "multiple_of", "ce_chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def check_grid(self) -> None:
        """Grid positions need their three vocabulary fields (filled by the LM stage; the recipe only switches
        them on), so this runs when a model is built, not when a recipe is read."""
        lo, hi = self.grid_token_range
        if not (0 <= lo < hi <= self.vocab_size and 0 <= self.grid_start_token < self.vocab_size
                and self.grid_size > 0 and not lo <= self.grid_start_token < hi):
            raise ValueError(
                f"grid_positions needs grid_token_range [lo, hi) inside the vocabulary [0, {self.vocab_size}), "
                f"a grid_start_token outside it and grid_size > 0; got {tuple(self.grid_token_range)}, "
                f"{self.grid_start_token}, {self.grid_size} (the LM stage fills them from the vocabulary)")

    def check_code_factors(self) -> None:
        """Factorised code embeddings need the code ids (filled by the LM stage, like grid positions), so this runs
        when a model is built."""
        lo, hi = self.grid_token_range
        if not (0 <= lo < hi <= self.vocab_size) or math.prod(self.code_factors) != hi - lo or \
                min(self.code_factors) < 2:
            raise ValueError(
                f"code_factors {list(self.code_factors)} (each >= 2) must multiply to the number of code ids in "
                f"grid_token_range {tuple(self.grid_token_range)} inside the vocabulary [0, {self.vocab_size}) "
                f"(the LM stage fills the range from the vocabulary; the factors are the image quantizer's FSQ levels)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim > 0:
            return self.ffn_dim
        f = int(8 * self.dim / 3)
        return self.multiple_of * math.ceil(f / self.multiple_of)


def grid_index(tokens: Tensor, cfg: ModelConfig, carry: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Cell index of every grid token (module docstring), -1 elsewhere, and each row's index for the next token.

    tokens (B, T); carry (B,): the index the first token gets if it is a grid token continuing a run (-1: no run
    open, what a row start means). Returns (index (B, T) int64, next carry (B,) int64).
    """
    b, t = tokens.shape
    lo, hi = cfg.grid_token_range
    is_grid = (tokens >= lo) & (tokens < hi)
    is_start = tokens == cfg.grid_start_token
    col = torch.arange(t, device=tokens.device).expand(b, t)
    none = -(2**62)  # earlier than any virtual start or break
    if carry is None:
        carry = torch.full((b,), -1, dtype=torch.long, device=tokens.device)
    # an open run continues from a virtual start carry + 1 tokens before column 0; no open run = a break at -1
    start0 = torch.where(carry >= 0, -carry - 1, none)[:, None]
    break0 = torch.where(carry >= 0, none, -1)[:, None]
    last_start = torch.maximum(torch.where(is_start, col, none).cummax(1).values, start0)  # (B, T)
    last_break = torch.maximum(torch.where(is_grid | is_start, none, col).cummax(1).values, break0)
    idx = col - last_start - 1
    valid = is_grid & (last_start > last_break) & (idx < cfg.grid_size)
    open_run = last_start[:, -1] > last_break[:, -1]
    nxt = torch.where(open_run, t - last_start[:, -1] - 1, -1)
    return torch.where(valid, idx, -1), nxt


@dataclass
class LossOutput:
    loss: Tensor  # scalar: ce + z_loss_weight * z_loss (what to backpropagate)
    ce: Tensor  # scalar: mean cross-entropy over the masked-in tokens
    z_loss: Tensor  # scalar: mean logsumexp(logits)^2 over the masked-in tokens
    token_loss: Tensor  # (B, T) fp32, detached per-token cross-entropy, 0 where masked out
    correct: Tensor  # (B, T) bool, argmax(logits) == target (False where masked out)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fused: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            from anyloom.transformer.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        # fp32 statistics whatever the activation dtype (bf16 sums of squares lose the small rows)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class PerHeadLayerNorm(nn.Module):
    """Chameleon's QK-norm: LayerNorm statistics over the head dim, then each head's own weight and bias."""

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:  # x (B, T, H, E)
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight + self.bias

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)


def rope_tables(head_dim: int, max_len: int, theta: float, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin tables (max_len, E) in the "rotate half" layout (the first and second halves of a head pair up)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)  # (T, E/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, E)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, H, E); cos, sin (B, T, E) gathered at each token's position."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)  # (B, T, 1, E)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        e = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * e, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * e, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * e, bias=False)
        self.wo = nn.Linear(cfg.n_heads * e, cfg.dim, bias=False)
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if cfg.qk_norm and cfg.qk_norm_type == "rms":
            self.q_norm = RMSNorm(e, cfg.norm_eps, cfg.fused_rmsnorm)
            self.k_norm = RMSNorm(e, cfg.norm_eps, cfg.fused_rmsnorm)
        elif cfg.qk_norm:
            self.q_norm = PerHeadLayerNorm(cfg.n_heads, e)
            self.k_norm = PerHeadLayerNorm(cfg.n_kv_heads, e)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        doc_ids: Tensor | None,
        span_ids: Tensor | None,
        kv_cache: KVCache | None,
        cache_pos: int | Tensor,
    ) -> Tensor:
        cfg = self.cfg
        q = rearrange(self.wq(x), "b t (h e) -> b t h e", e=cfg.head_dim)  # (B, T, H, E)
        k = rearrange(self.wk(x), "b t (k e) -> b t k e", e=cfg.head_dim)  # (B, T, K, E)
        v = rearrange(self.wv(x), "b t (k e) -> b k t e", e=cfg.head_dim)  # (B, K, T, E)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rearrange(apply_rope(q, cos, sin), "b t h e -> b h t e")  # (B, H, T, E)
        k = rearrange(apply_rope(k, cos, sin), "b t k e -> b k t e")  # (B, K, T, E)
        k_doc, k_span = doc_ids, span_ids
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, k, v, cache_pos)  # (B, K, S, E), S = cache_pos + T or max_len
            k_doc = kv_cache.doc_ids[:, : k.shape[2]]
            k_span = None if span_ids is None else kv_cache.span_ids[:, : k.shape[2]]
        out = attention(q, k, v, doc_ids, k_doc, q_start=cache_pos, q_span=span_ids, k_span=k_span,
                        backend=cfg.attention)  # (B, H, T, E)
        return self.wo(rearrange(out, "b h t e -> b t (h e)"))

    def reset_parameters(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)
        if self.q_norm is not None:
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=std)
        nn.init.normal_(self.w3.weight, std=std)
        nn.init.normal_(self.w2.weight, std=out_std)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.norm_reorder = cfg.norm_reorder
        self.attention = Attention(cfg, layer_id)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.fused_rmsnorm)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.fused_rmsnorm)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, doc_ids: Tensor | None, span_ids: Tensor | None,
                kv_cache: KVCache | None = None, cache_pos: int | Tensor = 0) -> Tensor:
        if self.norm_reorder:  # Chameleon swin-norm: normalise what each sublayer writes, not what it reads
            x = x + self.attention_norm(self.attention(x, cos, sin, doc_ids, span_ids, kv_cache, cache_pos))
            return x + self.ffn_norm(self.feed_forward(x))
        x = x + self.attention(self.attention_norm(x), cos, sin, doc_ids, span_ids, kv_cache, cache_pos)
        return x + self.feed_forward(self.ffn_norm(x))


def code_digit_rows(factors: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
    """(prod(factors), len(factors)) int64: the digits of every code (mixed radix, least significant first, as
    vector-quantize-pytorch's FSQ numbers its codes), each offset to its table's rows in one stacked table."""
    basis = torch.tensor([math.prod(factors[:i]) for i in range(len(factors))], device=device)
    digits = (torch.arange(math.prod(factors), device=device)[:, None] // basis) % torch.tensor(factors, device=device)
    return digits + torch.tensor([0, *itertools.accumulate(factors)][:-1], device=device)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.grid_positions:
            cfg.check_grid()
        self.grid_embeddings = nn.Embedding(cfg.grid_size, cfg.dim) if cfg.grid_positions else None
        self.code_factor_in = self.code_factor_out = None
        if cfg.code_factors:
            cfg.check_code_factors()
            # (K, n_factors): each code's row in every digit table (rebuilt by init_weights, like the RoPE tables)
            self.register_buffer("code_digits", code_digit_rows(cfg.code_factors), persistent=False)
            self.code_factor_in = nn.Embedding(sum(cfg.code_factors), cfg.dim)
            self.code_factor_out = None if cfg.tie_embeddings else nn.Embedding(sum(cfg.code_factors), cfg.dim)
        # per digit table: (what the sums were formed from, the sums), reused without gradients (module docstring)
        self._factored: dict[int, tuple[tuple, Tensor]] = {}
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.fused_rmsnorm)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, E)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def _with_code_factors(self, weight: Tensor, table: nn.Embedding | None) -> Tensor:
        """(V, D) ``weight`` with each code row plus the sum of its digits' vectors in ``table`` (None: as is)."""
        if table is None:
            return weight
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._factor(weight, table)
        # decoding calls this twice per token: reuse the sums while neither parameter has changed
        made_from = (weight.data_ptr(), weight._version, table.weight.data_ptr(), table.weight._version,
                     weight.dtype, weight.device)
        kept = self._factored.get(id(table))
        if kept is None or kept[0] != made_from:
            kept = (made_from, self._factor(weight, table))
            self._factored[id(table)] = kept
        return kept[1]

    def _factor(self, weight: Tensor, table: nn.Embedding) -> Tensor:
        lo, hi = self.cfg.grid_token_range
        factored = weight[lo:hi] + F.embedding(self.code_digits, table.weight).sum(1)  # (K, D)
        return torch.cat([weight[:lo], factored.to(weight.dtype), weight[hi:]])

    @property
    def embedding_weight(self) -> Tensor:
        """(V, D): the input embedding (per-token vectors, plus digit vectors with ``code_factors``)."""
        return self._with_code_factors(self.tok_embeddings.weight, self.code_factor_in)

    @property
    def output_weight(self) -> Tensor:
        """(V, D): the unembedding (the embedding matrix itself when tied)."""
        if self.output is None:
            return self.embedding_weight
        return self._with_code_factors(self.output.weight, self.code_factor_out)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The documented init (module docstring); also rebuilds the RoPE tables (meta-device construction)."""
        cfg = self.cfg
        if self.rope_cos.device.type != "meta":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
            if cfg.code_factors:
                self.code_digits.copy_(code_digit_rows(cfg.code_factors, self.code_digits.device))
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=cfg.init_std)
        if self.grid_embeddings is not None:
            nn.init.normal_(self.grid_embeddings.weight, std=cfg.init_std)
        for table in (self.code_factor_in, self.code_factor_out):
            if table is not None:
                nn.init.normal_(table.weight, std=cfg.init_std)
        for block in self.layers:
            block.attention.reset_parameters(cfg.init_std, out_std)
            block.feed_forward.reset_parameters(cfg.init_std, out_std)
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=cfg.init_std)

    def forward(
        self,
        tokens: Tensor,
        doc_ids: Tensor | None = None,
        positions: Tensor | None = None,
        *,
        span_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_pos: int | Tensor = 0,
    ) -> Tensor:
        """tokens (B, T) int64 -> hidden states (B, T, D) after the final norm.

        doc_ids (B, T): packed-document ids (None = one document per row); positions (B, T): RoPE positions
        (None = 0..T-1, or continuing the cache); span_ids (B, T): optional bidirectional spans (0 = none);
        kv_cache/cache_pos: append the new tokens at slot ``cache_pos`` (int, or 0-d int64 tensor: static shapes)
        and attend to the cached prefix.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (B, T) integer ids, got shape {tuple(tokens.shape)}")
        b, t = tokens.shape
        for name, ids in (("doc_ids", doc_ids), ("positions", positions), ("span_ids", span_ids)):
            if ids is not None and ids.shape != tokens.shape:
                raise ValueError(f"{name} has shape {tuple(ids.shape)}, expected {tuple(tokens.shape)} like tokens")
        if kv_cache is not None:
            doc_ids, positions = kv_cache.prepare(doc_ids, positions, span_ids, cache_pos, t)
        elif positions is None:
            if t > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {t} exceeds max_seq_len {self.cfg.max_seq_len}")
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, E)
        x = F.embedding(tokens, self.embedding_weight)  # (B, T, D)
        if self.grid_embeddings is not None:
            cell, nxt = grid_index(tokens, self.cfg, None if kv_cache is None else kv_cache.grid_carry(cache_pos))
            if kv_cache is not None:
                kv_cache.grid_next.copy_(nxt)
            x = x + self.grid_embeddings(cell.clamp(min=0)) * (cell >= 0).unsqueeze(-1).to(x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, doc_ids, span_ids, kv_cache, cache_pos)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (B, T, D) -> logits (B, T, V) in the activation dtype."""
        return F.linear(hidden, self.output_weight)

    def loss(self, hidden: Tensor, targets: Tensor, loss_mask: Tensor) -> LossOutput:
        """Cross-entropy (+ z-loss) of next-token ``targets`` (B, T) where ``loss_mask`` (B, T) is True.

        With ``fused_ce`` the (B*T, V) logits are never materialised (vocabulary chunks; see kernels.fused_ce).
        Targets under the mask may hold anything (e.g. -100); targets inside it must lie in [0, vocab_size).
        """
        b, t, d = hidden.shape
        if targets.shape != (b, t) or loss_mask.shape != (b, t):
            raise ValueError(f"targets {tuple(targets.shape)} and loss_mask {tuple(loss_mask.shape)} must be "
                             f"(B, T) = {(b, t)}")
        mask = loss_mask.bool().reshape(-1)  # (N,)
        flat_targets = targets.reshape(-1)
        _check_targets(flat_targets, mask, t, self.cfg.vocab_size)
        # The output layer runs only on the masked-in rows: conditions (a prompt's audio, an image to caption)
        # are about half of a task mixture's tokens, and the head over the vocabulary costs as much as the blocks.
        rows = mask.nonzero().squeeze(1)  # (M,)
        h = hidden.reshape(b * t, d).index_select(0, rows)  # (M, D)
        picked = flat_targets.index_select(0, rows)  # (M,)
        if self.cfg.fused_ce:
            out = linear_lse(h, self.output_weight, picked, chunk_size=self.cfg.ce_chunk_size)
        else:
            out = naive_linear_lse(h, self.output_weight, picked)
        count = max(rows.numel(), 1)
        picked_ce = out.lse - out.target_logit  # (M,)
        ce = picked_ce.sum() / count
        z_loss = out.lse.pow(2).sum() / count
        token_ce = hidden.new_zeros(b * t, dtype=torch.float32).index_copy_(0, rows, picked_ce.detach().float())
        correct = torch.zeros(b * t, dtype=torch.bool, device=hidden.device)
        correct.index_copy_(0, rows, out.argmax == picked)
        return LossOutput(
            loss=ce + self.cfg.z_loss_weight * z_loss,
            ce=ce,
            z_loss=z_loss,
            token_loss=token_ce.reshape(b, t),
            correct=correct.reshape(b, t),
        )

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embeddings else n

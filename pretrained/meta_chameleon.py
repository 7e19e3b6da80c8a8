"""Meta's original Chameleon layout (as Meta and Anole release it) -> what the Hugging Face path gives.

    <root>/models/7b/consolidated.pth         (bigger models: consolidated.00.pth, .01, ... tensor-parallel shards)
    <root>/models/7b/params.json              ({"model": {"dim", "n_layers", "n_heads", ...}, ...})
    <root>/tokenizer/text_tokenizer.json      (tokenizers-library JSON)
    <root>/tokenizer/vqgan.ckpt + vqgan.yaml  (the image VQGAN, decoder included)

``read_meta_chameleon(root)`` returns HF-named LM tensors and an HF ``ChameleonConfig``-style dict, which
``transformer.importers`` turns into our Transformer exactly as it does an HF folder (``import_meta_lm`` does
that), and the VQGAN as a ``ChameleonVQTokenizer`` that, unlike the HF port's, decodes.

Differences from the HF layout, resolved the way transformers' ``convert_chameleon_weights_to_hf.py`` does:

- RoPE pairs: Meta rotates interleaved pairs (e0, e1), (e2, e3), ... of each head; HF (and we) rotate halves
  (e_i, e_{i+E/2}). The rows of ``wq`` / ``wk`` are reordered within each head, 0, 2, 4, ..., 1, 3, 5, ..., which
  leaves q.k unchanged.
- QK-norm: Meta has one ``LayerNorm(E)`` per tensor-parallel shard, shared by that shard's heads (its norm runs
  before RoPE, in the interleaved order); HF has a weight and bias per head. Each shard's are repeated over its
  heads, their entries reordered like the rows above (a LayerNorm over E commutes with a permutation of E).
- Shards: column-parallel weights (wq, wk, wv, w1, w3, output) join along rows, row-parallel ones (wo, w2) and the
  embedding along columns; the replicated RMSNorm weights are averaged, as the converter does.
- Vocabulary: ``<reserved08707>`` is HF's image placeholder ``<image>`` in ``vocabulary_map`` (the tokenizer file
  itself is left as it is).

Pickled files are read with ``torch.load(weights_only=True)`` only (memory-mapped); nothing is downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from anyloom.tokenizers.image_import_chameleon import (
    ChameleonVQTokenizer,
    read_chameleon_vqgan,
    read_torch_checkpoint,
)
from anyloom.transformer.importers import ImportedLM, lm_from_tensors
from anyloom.weights import read_json

IMAGE_PLACEHOLDER = ("<reserved08707>", "<image>")  # Meta's reserved name -> HF's (the converter renames it)
IGNORED = ("rope.freqs",)  # a RoPE table Meta's loader drops on loading (Anole's file stores None there)

ROWS, COLS, REPLICATED = 0, 1, None  # how tensor-parallel shards of a weight join

# Meta name -> (HF name, how shards join); per-layer names lack the "layers.{i}." / "model.layers.{i}." prefix.
LAYER_KEYS: dict[str, tuple[str, int | None]] = {
    "attention.wq.weight": ("self_attn.q_proj.weight", ROWS),
    "attention.wk.weight": ("self_attn.k_proj.weight", ROWS),
    "attention.wv.weight": ("self_attn.v_proj.weight", ROWS),
    "attention.wo.weight": ("self_attn.o_proj.weight", COLS),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", ROWS),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", COLS),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", ROWS),
    "attention_norm.weight": ("input_layernorm.weight", REPLICATED),
    "ffn_norm.weight": ("post_attention_layernorm.weight", REPLICATED),
}
QK_NORM_KEYS: dict[str, str] = {  # one LayerNorm(E) per shard -> a weight / bias per head
    "attention.q_normalization.weight": "self_attn.q_norm.weight",
    "attention.q_normalization.bias": "self_attn.q_norm.bias",
    "attention.k_normalization.weight": "self_attn.k_norm.weight",
    "attention.k_normalization.bias": "self_attn.k_norm.bias",
}
TOP_KEYS: dict[str, tuple[str, int | None]] = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", COLS),
    "norm.weight": ("model.norm.weight", REPLICATED),
    "output.weight": ("lm_head.weight", ROWS),
}


@dataclass
class MetaChameleon:
    hf_config: dict[str, Any]  # an HF ChameleonConfig-style dict of the text model (keys: see _hf_config)
    tensors: dict[str, torch.Tensor]  # HF-named LM tensors (model.embed_tokens.weight, ..., lm_head.weight)
    tokenizer_file: Path  # the text tokenizer JSON (tokenizers-library format), unmodified
    vq: ChameleonVQTokenizer | None  # from tokenizer/vqgan.ckpt + vqgan.yaml, with its decoder; None if absent
    skipped: list[str]  # "<file>:<key>" of entries not used (rope.freqs, the VQGAN's loss.* tensors)


@dataclass(frozen=True)
class MetaParams:
    """``params.json`` of one model, with Meta's defaults (``ModelArgs``) where a key is absent."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int  # SwiGLU hidden width, from multiple_of / ffn_dim_multiplier unless given
    norm_eps: float
    rope_theta: float
    max_seq_len: int
    swin_norm: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# ------------------------------------------------------------------------------------------- files


def is_meta_chameleon(folder: str | Path) -> bool:
    """Whether ``folder`` looks like Meta's layout: ``tokenizer/text_tokenizer.json`` and ``models/*/params.json``."""
    folder = Path(folder)
    return (folder / "tokenizer" / "text_tokenizer.json").is_file() and any(folder.glob("models/*/params.json"))


def model_folder(root: Path, size: str | None = None) -> Path:
    """``root/models/<size>``: the only folder under ``models/`` unless ``size`` names one."""
    models = root / "models"
    if not models.is_dir():
        raise FileNotFoundError(f"{root}: no models/ folder (expected Meta's Chameleon layout: models/<size>/"
                                "consolidated.pth + params.json, tokenizer/text_tokenizer.json, vqgan.ckpt, "
                                "vqgan.yaml)")
    found = sorted(d.name for d in models.iterdir() if d.is_dir())
    if size is not None:
        if size not in found:
            raise FileNotFoundError(f"{models}: no folder {size!r} (found {found})")
        return models / size
    if len(found) != 1:
        what = "no model folder" if not found else f"several model folders {found}"
        raise ValueError(f"{models}: {what}; expected exactly one (pass size= to choose)")
    return models / found[0]


def shard_files(folder: Path) -> list[Path]:
    """``consolidated.pth``, or ``consolidated.00.pth`` ... ``consolidated.NN.pth`` in rank order (no gaps)."""
    single = folder / "consolidated.pth"
    numbered: dict[int, Path] = {}
    for f in folder.glob("consolidated.*.pth"):
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", f.name)
        if m:
            numbered[int(m.group(1))] = f
    names = sorted(f.name for f in numbered.values())
    if single.is_file() and numbered:
        raise ValueError(f"{folder}: both consolidated.pth and numbered shards {names}; expected one or the other")
    if single.is_file():
        return [single]
    if not numbered:
        raise FileNotFoundError(f"{folder}: no consolidated.pth or consolidated.NN.pth")
    if sorted(numbered) != list(range(len(numbered))):
        raise ValueError(f"{folder}: shards {names} are not numbered 00..{len(numbered) - 1:02d} without gaps")
    return [numbered[i] for i in range(len(numbered))]


def _get(p: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path, default: Any = ...) -> Any:
    if key not in p or p[key] is None:
        if default is ...:
            raise ValueError(f"{where}: missing '{key}'")
        return default
    value = p[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{where}: '{key}' = {value!r} has the wrong type")
    return value


def read_params(path: Path) -> MetaParams:
    """``params.json``: its ``model`` section over the top level (as Meta's loader merges them)."""
    raw = read_json(path, f"{path}: no such file (the model's hyperparameters)")
    model = raw.get("model", {})
    if not isinstance(model, dict):
        raise ValueError(f"{path}: 'model' must be a mapping of hyperparameters")
    p = {k: v for k, v in raw.items() if k != "model"} | model
    if not _get(p, "qk_normalization", bool, path, False):
        raise ValueError(f"{path}: 'qk_normalization' is false or absent; Chameleon (and its HF and anyloom ports) "
                         "normalise q and k per head, so this is not a Chameleon checkpoint we can convert")
    dim, n_heads = _get(p, "dim", int, path), _get(p, "n_heads", int, path)
    if dim % n_heads or (dim // n_heads) % 2:
        raise ValueError(f"{path}: 'dim' {dim} must be n_heads {n_heads} times an even head dim")
    n_kv_heads = _get(p, "n_kv_heads", int, path, n_heads)
    if n_heads % n_kv_heads:
        raise ValueError(f"{path}: 'n_heads' {n_heads} is not a multiple of 'n_kv_heads' {n_kv_heads}")
    explicit = next((k for k in ("ffn_dim", "hidden_dim") if p.get(k) is not None), None)
    if explicit:
        ffn_dim = _get(p, explicit, int, path)
    else:  # Meta's FeedForward: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of
        multiple_of = _get(p, "multiple_of", int, path, 256)
        hidden = int(2 * 4 * dim / 3)
        multiplier = _get(p, "ffn_dim_multiplier", (int, float), path, None)
        if multiplier is not None:
            hidden = int(multiplier * hidden)
        ffn_dim = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    rope_theta = float(_get(p, "rope_theta", (int, float), path, 10000.0))
    return MetaParams(
        dim=dim,
        n_layers=_get(p, "n_layers", int, path),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=_get(p, "vocab_size", int, path),
        ffn_dim=ffn_dim,
        norm_eps=float(_get(p, "norm_eps", (int, float), path, 1e-5)),
        rope_theta=rope_theta,
        # the converter's rule (Chameleon v1: 4096, or 16384 with a larger RoPE base) unless the file says
        max_seq_len=_get(p, "max_seq_len", int, path, 16384 if rope_theta > 10000.0 else 4096),
        swin_norm=_get(p, "swin_norm", bool, path, False),
    )


def read_vocabulary(path: Path) -> dict[str, int]:
    """Token name -> id of a tokenizers-library JSON (``model.vocab`` plus ``added_tokens``), with HF's
    ``<image>`` for ``<reserved08707>``."""
    data = read_json(path, f"{path}: no such file (Chameleon's text tokenizer)")
    vocab = data.get("model", {}).get("vocab") if isinstance(data, dict) else None
    if not isinstance(vocab, dict):
        raise ValueError(f"{path}: no 'model.vocab' mapping of token -> id (expected a BPE/WordLevel tokenizer)")
    names = dict(vocab)
    for token in data.get("added_tokens") or []:
        names.setdefault(token["content"], token["id"])
    old, new = IMAGE_PLACEHOLDER
    if old in names and new not in names:
        names[new] = names.pop(old)
    return names


# ------------------------------------------------------------------------------------------ tensors


def _interleaved_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of wq / wk from interleaved RoPE pairs to halves, within each head: 0, 2, 4, ..., 1, 3, 5, ..."""
    return rearrange(w, "(h e two) d -> (h two e) d", h=heads, two=2)  # (H*E, D)


def _per_head_norm(parts: list[torch.Tensor], heads: int) -> torch.Tensor:
    """One (E,) LayerNorm vector per shard -> (heads, E): repeated over the shard's heads, reordered like wq."""
    w = rearrange(torch.stack(parts), "s (e two) -> s (two e)", two=2)  # (S, E)
    return w.repeat_interleave(heads // len(parts), dim=0)  # (H, E)


def _join(parts: list[torch.Tensor], how: int | None) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if how is REPLICATED:
        return torch.stack(parts).float().mean(0).to(parts[0].dtype)
    return torch.cat(parts, dim=how)


def _expected_shapes(p: MetaParams) -> dict[str, tuple[int, ...]]:
    """Meta name (per-layer ones without ``layers.{i}.``) -> merged shape that ``params.json`` implies."""
    e = p.head_dim
    return {
        "attention.wq.weight": (p.n_heads * e, p.dim),
        "attention.wk.weight": (p.n_kv_heads * e, p.dim),
        "attention.wv.weight": (p.n_kv_heads * e, p.dim),
        "attention.wo.weight": (p.dim, p.n_heads * e),
        "feed_forward.w1.weight": (p.ffn_dim, p.dim),
        "feed_forward.w2.weight": (p.dim, p.ffn_dim),
        "feed_forward.w3.weight": (p.ffn_dim, p.dim),
        "attention_norm.weight": (p.dim,),
        "ffn_norm.weight": (p.dim,),
        **{k: (e,) for k in QK_NORM_KEYS},  # per shard
        "tok_embeddings.weight": (p.vocab_size, p.dim),
        "norm.weight": (p.dim,),
        "output.weight": (p.vocab_size, p.dim),
    }


def convert_meta_state(shards: list[dict[str, Any]], files: list[Path], p: MetaParams
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Meta's (possibly sharded) consolidated state dicts -> HF-named tensors, and the "<file>:<key>" skipped.

    Every key of every shard is accounted for: a missing one, an unknown one or a shape that disagrees with
    ``params.json`` fails naming the file and the key."""
    n = len(shards)
    if p.n_heads % n or p.n_kv_heads % n:
        raise ValueError(f"{files[0].parent}: {n} shards do not divide n_heads {p.n_heads} / n_kv_heads {p.n_kv_heads}")
    expected = _expected_shapes(p)
    used: set[str] = set()
    skipped: list[str] = []

    def parts(key: str, base: str) -> list[torch.Tensor]:
        out = []
        for shard, file in zip(shards, files):
            if key not in shard:
                raise KeyError(f"{file}: missing '{key}'")
            if not isinstance(shard[key], torch.Tensor):
                raise ValueError(f"{file}: '{key}' is a {type(shard[key]).__name__}, expected a tensor")
            out.append(shard[key])
        used.add(key)
        if base in QK_NORM_KEYS:
            bad = [(f, tuple(t.shape)) for f, t in zip(files, out) if tuple(t.shape) != expected[base]]
            if bad:
                raise ValueError(f"{bad[0][0]}: '{key}' has shape {bad[0][1]}; params.json implies {expected[base]} "
                                 "(one LayerNorm over the head dim per shard)")
        return out

    def joined(key: str, base: str, how: int | None) -> torch.Tensor:
        pieces = parts(key, base)
        try:
            t = _join(pieces, how)
        except RuntimeError as e:
            raise ValueError(f"{files[0].parent}: the shards of '{key}' do not fit together "
                             f"({[tuple(x.shape) for x in pieces]}: {e})") from e
        if tuple(t.shape) != expected[base]:
            where = files[0] if n == 1 else f"{files[0].parent} ({n} shards joined)"
            raise ValueError(f"{where}: '{key}' has shape {tuple(t.shape)}; params.json implies {expected[base]}")
        return t

    out: dict[str, torch.Tensor] = {}
    for i in range(p.n_layers):
        for base, (hf, how) in LAYER_KEYS.items():
            t = joined(f"layers.{i}.{base}", base, how)
            if base == "attention.wq.weight":
                t = _interleaved_to_half(t, p.n_heads)
            elif base == "attention.wk.weight":
                t = _interleaved_to_half(t, p.n_kv_heads)
            out[f"model.layers.{i}.{hf}"] = t
        for base, hf in QK_NORM_KEYS.items():
            heads = p.n_heads if ".q_" in base else p.n_kv_heads
            out[f"model.layers.{i}.{hf}"] = _per_head_norm(parts(f"layers.{i}.{base}", base), heads)
    for base, (hf, how) in TOP_KEYS.items():
        out[hf] = joined(base, base, how)

    for shard, file in zip(shards, files):
        unknown = sorted(k for k in shard if k not in used and k not in IGNORED)
        if unknown:
            raise KeyError(f"{file}: {len(unknown)} unexpected entries (e.g. {unknown[:4]}); "
                           "not a Chameleon checkpoint of this params.json")
        skipped += [f"{file.name}:{k}" for k in IGNORED if k in shard]
    return out, skipped


# -------------------------------------------------------------------------------------------- entry


def _hf_config(p: MetaParams, vocab: dict[str, int], tokenizer_file: Path) -> dict[str, Any]:
    for name in ("<s>", "</s>"):
        if name not in vocab:
            raise ValueError(f"{tokenizer_file}: no '{name}' token (Chameleon's begin / end of sequence)")
    too_big = {k: v for k, v in vocab.items() if not 0 <= v < p.vocab_size}
    if too_big:
        name = next(iter(too_big))
        raise ValueError(f"{tokenizer_file}: token {name!r} has id {too_big[name]}, outside params.json's vocab_size "
                         f"{p.vocab_size}")
    return {
        "model_type": "chameleon",
        "vocab_size": p.vocab_size,
        "hidden_size": p.dim,
        "intermediate_size": p.ffn_dim,
        "num_hidden_layers": p.n_layers,
        "num_attention_heads": p.n_heads,
        "num_key_value_heads": p.n_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": p.norm_eps,
        "rope_theta": p.rope_theta,
        "max_position_embeddings": p.max_seq_len,
        "swin_norm": p.swin_norm,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": vocab["<s>"],
        "eos_token_id": vocab["</s>"],
        "pad_token_id": vocab.get("<pad>"),
        "vocabulary_map": vocab,
    }


def read_meta_chameleon(folder: str | Path, size: str | None = None) -> MetaChameleon:
    """Read Meta's Chameleon layout rooted at ``folder`` (module docstring); ``size`` picks ``models/<size>``
    when there are several (Meta's download has ``7b`` and ``30b`` side by side)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder (expected Meta's Chameleon layout)")
    model_dir = model_folder(root, size)
    params = read_params(model_dir / "params.json")
    tokenizer_file = root / "tokenizer" / "text_tokenizer.json"
    hf_config = _hf_config(params, read_vocabulary(tokenizer_file), tokenizer_file)

    files = shard_files(model_dir)
    shards = []
    for f in files:
        loaded = read_torch_checkpoint(f)
        if not isinstance(loaded, dict):
            raise ValueError(f"{f}: expected a state dict (name -> tensor), got a {type(loaded).__name__}")
        shards.append(loaded)
    tensors, skipped = convert_meta_state(shards, files, params)

    ckpt, yaml = root / "tokenizer" / "vqgan.ckpt", root / "tokenizer" / "vqgan.yaml"
    vq = None
    if ckpt.is_file() != yaml.is_file():
        present, absent = (ckpt, yaml) if ckpt.is_file() else (yaml, ckpt)
        raise FileNotFoundError(f"{absent}: missing beside {present.name} (the VQGAN needs both)")
    if ckpt.is_file():
        vqgan = read_chameleon_vqgan(ckpt, yaml)
        vq = vqgan.tokenizer
        skipped += [f"{ckpt.name}:{k}" for k in vqgan.skipped]
    return MetaChameleon(hf_config=hf_config, tensors=tensors, tokenizer_file=tokenizer_file, vq=vq, skipped=skipped)


def import_meta_lm(folder: str | Path, dtype: torch.dtype = torch.float32, size: str | None = None,
                   **overrides: Any) -> ImportedLM:
    """The language model of Meta's Chameleon layout as our Transformer (``import_hf_lm``'s counterpart);
    ``overrides`` set ModelConfig fields. The VQGAN is read and checked too; take it from ``read_meta_chameleon``."""
    meta = read_meta_chameleon(folder, size)
    lm = lm_from_tensors(meta.hf_config, meta.tensors, "chameleon", str(folder), dtype, **overrides)
    lm.skipped.extend(meta.skipped)
    return lm

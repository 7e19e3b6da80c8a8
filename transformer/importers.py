"""Import language models saved in Hugging Face format (``config.json`` + ``*.safetensors``) into our Transformer.

Supported: Llama (``LlamaForCausalLM``), Chameleon (``ChameleonForConditionalGeneration``: the LM part; its VQ
image encoder is not ours to load here) and Emu3 (``Emu3ForConditionalGeneration`` / ``Emu3ForCausalLM``: the
text model). All three share the Llama layout, and HF's RoPE uses the same "rotate half" pairing as ours, so
q/k weights copy over without permutation. Differences are mapped faithfully through ``ModelConfig``:

- Chameleon's QK-norm is a LayerNorm over the head dim with a weight and bias per head ->
  ``qk_norm=True, qk_norm_type="layernorm_per_head"``; its ``swin_norm`` -> ``norm_reorder``.
- Llama and Emu3 have no QK-norm -> ``qk_norm=False``.

What we do not model is refused with the config key named (biases in projections, RoPE scaling, a head dim
other than hidden_size / num_attention_heads, an activation other than SiLU). Note that HF's Chameleon forward
sets the logits of image-code ids to the dtype minimum (text-only generation); our ``logits`` do not — callers
that want that constrain decoding themselves.

Only safetensors and JSON are read; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open

from anyloom.transformer.model import ModelConfig, Transformer
from anyloom.weights import hf_weight_files, read_json

Family = Literal["llama", "chameleon", "emu3"]


@dataclass
class ImportedLM:
    model: Transformer
    config: ModelConfig
    family: str
    hf_config: dict[str, Any]  # the text model's HF config (for special token ids etc.)
    skipped: list[str]  # checkpoint tensors not used (e.g. the VQ model), counted for the report
    file_config: dict[str, Any] = field(default_factory=dict)  # the whole config.json (Emu3 nests hf_config in it)


def _read_config(folder: Path) -> dict[str, Any]:
    return read_json(folder / "config.json", f"{folder}: no config.json (expected a Hugging Face-format model folder)")


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in hf_weight_files(folder):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise KeyError(f"{where}: config.json has no '{key}'")
    return cfg[key]


def model_config_from_hf(
    hf: dict[str, Any], family: Family, where: str = "config.json", **overrides: Any
) -> ModelConfig:
    """Our ModelConfig for an HF text-model config dict; unsupported options fail naming the key."""
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{where}: '{key}': true is not supported (our projections have no bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: 'hidden_act' is {hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: RoPE scaling ({rope.get('rope_type') or hf.get('rope_scaling')}) is not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    dim = _require(hf, "hidden_size", where)
    heads = _require(hf, "num_attention_heads", where)
    if hf.get("head_dim") not in (None, dim // heads):
        raise ValueError(f"{where}: 'head_dim' {hf['head_dim']} != hidden_size / num_attention_heads {dim // heads}")
    chameleon = family == "chameleon"
    cfg = ModelConfig(
        vocab_size=_require(hf, "vocab_size", where),
        dim=dim,
        n_layers=_require(hf, "num_hidden_layers", where),
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_dim=_require(hf, "intermediate_size", where),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        qk_norm=chameleon,
        qk_norm_type="layernorm_per_head" if chameleon else "rms",
        norm_reorder=bool(hf.get("swin_norm", False)) if chameleon else False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    return replace(cfg, **overrides)


_LAYER_MAP = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.q_norm.weight": "attention.q_norm.weight",
    "self_attn.q_norm.bias": "attention.q_norm.bias",
    "self_attn.k_norm.weight": "attention.k_norm.weight",
    "self_attn.k_norm.bias": "attention.k_norm.bias",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def convert_state_dict(tensors: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF Llama-layout tensors under ``prefix`` (e.g. ``model.``) -> our names; returns (state_dict, skipped)."""
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in tensors.items():
        if key == "lm_head.weight" or key.endswith(".lm_head.weight"):  # Emu3 saves text_model.lm_head
            out["output.weight"] = value
            continue
        if not key.startswith(prefix):
            skipped.append(key)
            continue
        rest = key[len(prefix):]
        if rest == "embed_tokens.weight":
            out["tok_embeddings.weight"] = value
        elif rest == "norm.weight":
            out["norm.weight"] = value
        elif rest.startswith("layers."):
            _, idx, name = rest.split(".", 2)
            if name not in _LAYER_MAP:
                raise KeyError(f"checkpoint tensor '{key}' has no counterpart in our Transformer")
            out[f"layers.{idx}.{_LAYER_MAP[name]}"] = value
        else:
            skipped.append(key)
    return out, skipped


def _text_prefix(tensors: dict[str, torch.Tensor], folder: Path) -> str:
    """The key prefix of the language model: whatever precedes ``embed_tokens.weight`` outside the VQ model."""
    for key in tensors:
        if key.endswith("embed_tokens.weight") and "vq" not in key:
            return key[: -len("embed_tokens.weight")]
    raise KeyError(f"{folder}: no '*embed_tokens.weight' tensor: not a Llama-layout language model")


def import_hf_lm(
    folder: str | Path, family: Family, dtype: torch.dtype | None = None, **overrides: Any
) -> ImportedLM:
    """Load an HF-format LM folder of the given family (in ``dtype``; default: the checkpoint's own, bf16 for the
    released 7B models); ``overrides`` set ModelConfig fields (e.g. attention)."""
    folder = Path(folder)
    hf = file_config = _read_config(folder)
    where = str(folder / "config.json")
    if family == "emu3" and "text_config" in hf:
        hf = hf["text_config"]  # Emu3ForConditionalGeneration nests the LM config
        where += ":text_config"
    model_type = hf.get("model_type", "")
    if family not in model_type:
        raise ValueError(f"{where}: model_type {model_type!r} is not a {family} model")
    imported = lm_from_tensors(hf, _read_tensors(folder), family, str(folder), dtype, **overrides)
    imported.file_config = file_config
    return imported


def lm_from_tensors(hf: dict[str, Any], tensors: dict[str, torch.Tensor], family: Family, source: str,
                    dtype: torch.dtype | None = None, **overrides: Any) -> ImportedLM:
    """Our Transformer from an HF text-model config dict and HF-named tensors (from safetensors, or converted from
    another layout such as Meta's consolidated Chameleon weights), in ``dtype`` (default: the tensors' own)."""
    cfg = model_config_from_hf(hf, family, f"{source}: config", **overrides)
    state, skipped = convert_state_dict(tensors, _text_prefix(tensors, Path(source)))
    dtype = dtype or state["tok_embeddings.weight"].dtype
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # rebuilds RoPE tables; every parameter is then overwritten below
    model.to(dtype)  # before loading: a 7B model in bf16 never exists in fp32 as well
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"{source}: checkpoint does not match the config: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    return ImportedLM(model, cfg, family, hf, skipped)


def import_llama(folder: str | Path, **overrides: Any) -> ImportedLM:
    """A ``LlamaForCausalLM`` folder (config.json + safetensors)."""
    return import_hf_lm(folder, "llama", **overrides)


def import_chameleon(folder: str | Path, **overrides: Any) -> ImportedLM:
    """The LM of a ``ChameleonForConditionalGeneration`` folder (its VQ model's tensors land in ``skipped``)."""
    return import_hf_lm(folder, "chameleon", **overrides)


def import_emu3(folder: str | Path, **overrides: Any) -> ImportedLM:
    """The text model of an ``Emu3ForConditionalGeneration`` (or ``Emu3ForCausalLM``) folder."""
    return import_hf_lm(folder, "emu3", **overrides)

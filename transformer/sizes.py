"""Named model sizes. ``model_config(name, vocab_size)`` gives the ModelConfig; recipes may override any field.

Parameter counts (``param_count``, exact, embeddings included, at vocab 65,536 unless noted) are checked by
tests/test_transformer.py against the models themselves (built on the meta device, so no memory is used):

    name        dim  layers heads kv  ffn    tied   params @ V=65,536    @ V=4,096
    debug        64     2     4    2   192   no        8,487,296          622,976  (every test uses it)
    world-small 128     4     4    4   352   no       17,581,440        1,852,800  (an earlier world recipe)
    world-tiny  256     4     4    4   704   no       36,768,512        5,311,232
    150M        768    16    12    4  2048   yes     151,022,336      103,836,416
    1B         2048    16    32    8  8192   yes   1,107,365,888      981,536,768  (Llama-3.2-1B shape)
    7B         4096    32    32   32 11008   no    7,013,150,720    6,509,834,240  (Llama-2 / Chameleon-7B)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from anyloom.transformer.model import ModelConfig, Transformer

SIZES: dict[str, ModelConfig] = {
    "debug": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=512),
    "world-small": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=352, max_seq_len=1024),
    "world-tiny": ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=704, max_seq_len=2048),
    "150M": ModelConfig(dim=768, n_layers=16, n_heads=12, n_kv_heads=4, ffn_dim=2048, max_seq_len=4096,
                        tie_embeddings=True),
    "1B": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, max_seq_len=8192,
                      rope_theta=500000.0, tie_embeddings=True),
    "7B": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, max_seq_len=4096),
}


def model_config(name: str, vocab_size: int, **overrides: Any) -> ModelConfig:
    """The named size with ``vocab_size`` and any other field overridden."""
    if name not in SIZES:
        raise KeyError(f"unknown model size {name!r}; choose one of {', '.join(SIZES)}")
    return replace(SIZES[name], vocab_size=vocab_size, **overrides)


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters, counted on a meta-device model (no memory allocated)."""
    with torch.device("meta"):
        return Transformer(cfg).num_params()

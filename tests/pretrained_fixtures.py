"""Tiny random released-format checkpoints, built offline with transformers and the tokenizers library, for the
import tests: Llama, Chameleon and Emu3 folders in Hugging Face layout with a tokenizer.json of their own.

Every id layout differs from anyloom's (image codes among the text ids, markers in the middle), so a renumbering
mistake changes the outputs. Norm weights are randomised (ones at init would hide a misplaced norm).
"""

from __future__ import annotations

from pathlib import Path

import torch

V = 64  # ids of every tiny model
WORDS = ["two", "red", "circles", "one", "blue", "star", "a", "green", "square", "and", "three", "small", "big"]
CODES = 8  # image codebook of the tiny VQs
REPO = Path(__file__).resolve().parents[1]
IMAGE = 16  # picture size; both tiny VQs downsample by 2 -> an 8x8 grid


def randomise_norms(model: torch.nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                center = 1.0 if name.endswith("weight") else 0.0
                p.copy_(center + 0.3 * torch.randn(p.shape, generator=g))


def write_tokenizer(path: Path, vocab: dict[str, int], specials: list[str]) -> None:
    """A word-level tokenizers-library file: whitespace and punctuation split, ``specials`` as added tokens."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>" if "<unk>" in vocab else specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.save(str(path))


def _fill(named: dict[str, int]) -> dict[str, int]:
    """``named`` plus filler pieces up to V ids."""
    vocab = dict(named)
    used = set(vocab.values())
    for i in range(V):
        if i not in used:
            vocab[f"w{i}"] = i
    return vocab


def text_kwargs(**extra):
    """A tiny text model's transformers config fields."""
    return dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, **extra)


def llama(folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    named = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 20 + i for i, w in enumerate(WORDS)}}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**text_kwargs(bos_token_id=1, eos_token_id=2))).eval()
    randomise_norms(model)
    model.save_pretrained(folder)
    write_tokenizer(folder / "tokenizer.json", _fill(named), ["<unk>", "<s>", "</s>"])
    return model


def chameleon(folder: Path):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    codes = {"IMGIMG" + "".join(chr(65 + int(d)) for d in str(c)) + "Z": 40 + c for c in range(CODES)}
    named = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<racm3:break>": 4, "<eoss>": 5, "<image>": 6,
             **{w: 7 + i for i, w in enumerate(WORDS)}, **codes}
    vocab = _fill(named)
    cfg = ChameleonConfig(**text_kwargs(pad_token_id=3), vocabulary_map=vocab, image_token_id=6,
                          vq_config=dict(embed_dim=8, num_embeddings=CODES, base_channels=32, channel_multiplier=[1, 1],
                                         latent_channels=8, resolution=IMAGE))
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(cfg).eval()
    randomise_norms(model)
    model.save_pretrained(folder)
    write_tokenizer(folder / "tokenizer.json", vocab, ["<unk>", "<s>", "</s>", "<pad>", "<racm3:break>", "<eoss>",
                                                       "<image>"])
    return model


EMU3_VQ = dict(codebook_size=CODES, embed_dim=8, latent_channels=8, double_latent=False, in_channels=3, out_channels=3,
               temporal_downsample_factor=1, base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1,
               attn_resolutions=[], hidden_size=32, num_attention_heads=1)
EMU3_SPECIALS = ["<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<|image start|>", "<|image end|>",
                 "<|image token|>", "<|extra_200|>", "<|extra_201|>", "<image>"]


def emu3(folder: Path):
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    codes = {f"<|visual token {c:06d}|>": 48 + c for c in range(CODES)}
    named = {**{s: i for i, s in enumerate(EMU3_SPECIALS)}, "*": 9, **{str(d): 10 + d for d in range(10)},
             **{w: 20 + i for i, w in enumerate(WORDS)}, **codes}
    vocab = _fill(named)
    cfg = Emu3Config(
        text_config=text_kwargs(pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vq_config=EMU3_VQ,
        vocabulary_map=vocab,
    )
    torch.manual_seed(0)
    model = Emu3ForConditionalGeneration(cfg).eval()
    randomise_norms(model)
    model.save_pretrained(folder)
    write_tokenizer(folder / "tokenizer.json", vocab, EMU3_SPECIALS)
    return model

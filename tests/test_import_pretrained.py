"""Released checkpoints as runs: import tiny Llama / Chameleon / Emu3 checkpoints, then generate as the originals do.

Greedy text equals transformers' greedy ``generate`` restricted to what our grammar allows (text ids and eos,
eos not first), token for token; Emu3 pictures decode as transformers' ``decode_image_tokens``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import anyloom
from anyloom.generation.pipeline import PipelineError
from anyloom.pretrained.importer import CheckpointImportError, import_checkpoint, main
from anyloom.sequences.interleave import parse_stream

pytest.importorskip("transformers")  # a dev dependency: the reference implementation
import pretrained_fixtures as fx  # noqa: E402

PROMPT = "two red circles and one blue star"


class _TextOnly:
    """transformers logits processor: only the file ids of our text range and eos; eos not as the first token."""

    def __init__(self, allowed: list[int], eos: int, prompt_len: int):
        self.allowed, self.eos, self.prompt_len = torch.tensor(allowed), eos, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool)
        keep[self.allowed] = True
        keep[self.eos] = input_ids.shape[1] > self.prompt_len
        return scores.masked_fill(~keep, float("-inf"))


def _hf_greedy(model, pipe, prompt: str, n: int) -> list[int]:
    """transformers' greedy continuation of <bos> + prompt, in file ids, under the same restriction as ours."""
    from transformers import LogitsProcessorList

    tok = pipe.text_tokenizer
    bos = int(pipe.vocab_rows[pipe.vocab.bos])
    eos = int(pipe.vocab_rows[pipe.vocab.eos])
    ids = torch.tensor([[bos, *tok.encode_file_ids(prompt)]])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=eos, eos_token_id=eos,
                         logits_processor=LogitsProcessorList([_TextOnly(tok.file_ids.tolist(), eos, ids.shape[1])]))
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each family imported once: (hf model, run dir, pipeline with ``vocab_rows`` attached)."""
    out = {}
    for family, build in (("llama", fx.llama), ("chameleon", fx.chameleon), ("emu3", fx.emu3)):
        src = tmp_path_factory.mktemp(f"{family}_src")
        model = build(src)
        run = tmp_path_factory.mktemp(f"{family}_run")
        kwargs = {"image_size": fx.IMAGE} if family == "emu3" else {}
        report = import_checkpoint(family, src, run, overwrite=True, **kwargs)
        pipe = anyloom.load(run, device="cpu")
        pipe.vocab_rows = np.asarray(report.rows)
        out[family] = (model, run, pipe, report)
    return out


@pytest.mark.parametrize("family", ["llama", "chameleon", "emu3"])
def test_greedy_text_equals_transformers(imported, family):
    model, run, pipe, report = imported[family]
    got = pipe.generate(text=PROMPT, to="text", temperature=0, max_new_tokens=12)
    expected = _hf_greedy(model, pipe, PROMPT, 12)
    eos = int(pipe.vocab_rows[pipe.vocab.eos])
    expected_text = expected[:expected.index(eos)] if eos in expected else expected
    assert [int(pipe.vocab_rows[t]) for t in got.ids] == expected_text
    assert got.finished == (eos in expected)
    assert report.text_ids == pipe.text_tokenizer.vocab_size


def test_import_layouts(imported):
    _, _, llama, report = imported["llama"]
    assert llama.image_tokenizer is None and report.image_codes == 0 and "pad" in report.new_rows
    _, _, cham, report = imported["chameleon"]
    assert cham.vocab.image_codebook_size == fx.CODES and cham.vocab.image_grid == (8, 8)
    assert not cham.vocab.image_row_end and cham.vocab.image_prefix == ()
    _, _, emu, report = imported["emu3"]
    v, tok = emu.vocab, emu.text_tokenizer
    assert v.image_row_end and v.image_grid == (8, 8)
    assert [tok.piece(t) for t in v.image_prefix] == ["8", "*", "8", "<|image token|>"]
    assert [tok.piece(t) for t in v.image_suffix] == ["<|extra_201|>"]
    # the unified special tokens sit on the checkpoint's rows of its own markers
    rows = emu.vocab_rows
    assert [int(rows[v.special(n)]) for n in ("bos", "eos", "pad", "boi", "eoi", "row_end")] == [1, 2, 0, 3, 4, 6]


def test_emu3_picture_decodes_as_transformers(imported):
    model, run, pipe, _ = imported["emu3"]
    out = pipe.generate(text=PROMPT, to="image", seed=0)
    assert out.image.size == (fx.IMAGE, fx.IMAGE)
    v, rows = pipe.vocab, pipe.vocab_rows
    h, w = v.image_grid
    span = [v.boi, *np.asarray(v.image_prefix).tolist()]
    body = np.concatenate([out.codes.numpy() + v.image_offset, np.full((h, 1), v.row_end)], axis=1).reshape(-1)
    stream = [*span, *body.tolist(), *v.image_suffix, v.eoi]
    assert parse_stream([v.bos, *stream, v.eos], v, strict=True).segments[0].codes.tolist() == out.codes.tolist()
    file_ids = torch.tensor([rows[body].tolist() + [int(rows[t]) for t in (*v.image_suffix, v.eoi, v.eos)]])
    with torch.no_grad():
        ref = model.model.decode_image_tokens(image_tokens=file_ids, height=h, width=w)
        ours = pipe.image_tokenizer.decode_raw(out.codes[None])
    # fp32 rounding through a deep conv decoder: up to ~1e-4 apart depending on the CPU's conv kernels
    assert (ours - ref.reshape(ours.shape)).abs().max() <= 5e-4


def test_chameleon_hf_has_no_decoder_and_says_so(imported):
    _, _, pipe, report = imported["chameleon"]
    assert not report.image_decoder
    with pytest.raises(PipelineError, match="cannot draw the picture: .*vqgan"):
        pipe.generate(text=PROMPT, to="image", seed=0)


def test_extra_safetensors_file_changes_nothing(tmp_path, imported):
    src = tmp_path / "src"
    fx.llama(src)
    save_file({"lora_A": torch.randn(3, 3)}, str(src / "adapter_model.safetensors"))
    report = import_checkpoint("llama", src, tmp_path / "run")
    _, run, _, _ = imported["llama"]
    ours = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    theirs = load_file(str(run / "export" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert report.skipped_tensors == 0


def test_import_errors_are_clear(tmp_path, capsys):
    src = tmp_path / "src"
    fx.llama(src)
    (src / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json does not exist"):
        import_checkpoint("llama", src, tmp_path / "run")
    assert main(["--from", "emu3", "--src", str(src), "--run", str(tmp_path / "r2")]) == 2
    assert "is not a emu3 model" in capsys.readouterr().err
    (tmp_path / "run" / "export").mkdir(parents=True)
    with pytest.raises(CheckpointImportError, match="--overwrite"):
        import_checkpoint("llama", src, tmp_path / "run")


def _meta_chameleon(root):
    """A tiny Chameleon in Meta's original layout (as Anole releases it), with a VQGAN whose 8 codes are the 8
    image-code tokens of its vocabulary; returns the transformers model it was written from."""
    import copy

    import test_meta_chameleon as meta

    from anyloom.tokenizers.image_import_chameleon import ChameleonVQConfig, ChameleonVQTokenizer

    hf = meta._hf_chameleon(swin_norm=False, shards=1)
    config = copy.deepcopy(meta.VQ_YAML)
    config["model"]["params"]["n_embed"] = 8
    torch.manual_seed(2)
    vq = ChameleonVQTokenizer(ChameleonVQConfig.from_taming(config["model"]["params"], "vqgan.yaml"))
    meta._write_meta(root, hf, 1, False, meta._vqgan_state(meta._hf_vq()[0]))
    meta._write_vqgan(root / "tokenizer", dict(vq.state_dict()), config)
    return hf


def test_anole_meta_layout_imports_generates_text_and_draws(tmp_path):
    hf = _meta_chameleon(tmp_path / "anole")
    report = import_checkpoint("anole", tmp_path / "anole", tmp_path / "run")
    assert report.image_decoder and report.image_codes == 8
    pipe = anyloom.load(tmp_path / "run", device="cpu")
    pipe.vocab_rows = np.asarray(report.rows)
    prompt = "two red circles on the left"
    got = pipe.generate(text=prompt, to="text", temperature=0, max_new_tokens=10)
    expected = _hf_greedy(hf, pipe, prompt, 10)
    eos = int(pipe.vocab_rows[pipe.vocab.eos])
    expected = expected[:expected.index(eos)] if eos in expected else expected
    assert [int(pipe.vocab_rows[t]) for t in got.ids] == expected
    picture = pipe.generate(text=prompt, to="image", seed=0)
    assert picture.image.size == (16, 16) and picture.codes.shape == (8, 8)
    # the same VQGAN attached to a Hugging Face-format import (whose port has no decoder) draws the same picture
    hf_folder = tmp_path / "hf"
    hf.save_pretrained(hf_folder)
    (hf_folder / "tokenizer.json").write_bytes((tmp_path / "anole" / "tokenizer" / "text_tokenizer.json").read_bytes())
    import_checkpoint("chameleon", hf_folder, tmp_path / "run_hf", vqgan=tmp_path / "anole" / "tokenizer")
    again = anyloom.load(tmp_path / "run_hf", device="cpu").generate(text=prompt, to="image", seed=0)
    assert np.array_equal(np.asarray(again.image), np.asarray(picture.image))


@pytest.mark.parametrize("family", ["chameleon", "emu3"])
def test_image_to_text_reads_the_picture_in_the_models_layout(imported, family):
    """A picture prompt is encoded by the imported VQ into the model's own span (Emu3's with its size text and
    row ends): the prompt parses, and the reply is text."""
    _, _, pipe, _ = imported[family]
    pixels = np.zeros((fx.IMAGE, fx.IMAGE, 3), np.uint8)
    pixels[4:12, 4:12] = (220, 40, 40)
    ids = pipe.prompt_ids([Image.fromarray(pixels)], to="text")
    parsed = parse_stream(ids + [pipe.vocab.eos], pipe.vocab, strict=True).segments
    assert parsed[0].codes.shape == pipe.vocab.image_grid
    out = pipe.generate(image=pixels, to="text", max_new_tokens=5)
    assert isinstance(out.text, str) and 1 <= len(out.ids) <= 5

"""A released checkpoint -> an anyloom run directory (``make import``).

    python scripts/import.py --from chameleon --src path/to/chameleon-7b --run runs/chameleon
    python scripts/import.py --from anole --src path/to/Anole-7b-v0.1 --run runs/anole

writes ``<run>/export/`` (``model.safetensors`` + ``config.json`` + ``vocab.json``, with ``text_tokenizer/`` and
``image_tokenizer/`` inside), ``<run>/recipe.yaml`` (the family's generation defaults) and ``<run>/import.json``
(what was read, how the ids were renumbered, what was left out). ``anyloom.load(<run>)``, ``make generate`` and a
training recipe's ``init.from`` then take it like a trained run.

The ids are renumbered into the unified vocabulary's layout (text, image codes, special tokens; see
``anyloom.sequences.vocab``) by permuting the rows of the embedding and the output head: the imported model computes
exactly what the original computes, its logits in another order. Special tokens the checkpoint lacks (audio
markers; pad for Llama) get new rows (the mean embedding, zero output rows); constrained decoding never lets the
model write one it was not trained on. Sources: Hugging Face folders (``config.json``, ``model.safetensors`` or
the shards its index names, ``tokenizer.json``) for Chameleon, Emu3 and Llama; Meta's original Chameleon layout
for Anole (``pretrained/meta_chameleon.py``). Nothing is downloaded, and pickled files are read with
``weights_only=True`` only.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from anyloom.pretrained.families import FAMILIES, IdLayout, LayoutError, id_layout
from anyloom.sequences.vocab import SPECIAL_NAMES, Vocabulary
from anyloom.tokenizers.text_hf import HFTextTokenizer, runs_of
from anyloom.transformer.importers import ImportedLM, import_hf_lm, lm_from_tensors
from anyloom.weights import save_weights

# classifier-free guidance scale of each family's own image generation (Chameleon's inference code and Emu3's
# model card use these); recipe.yaml of the run, overridable per call
CFG_SCALE = {"chameleon": 3.0, "anole": 3.0, "emu3": 4.0}
EMU3_IMAGE_SIZE = 512  # Emu3's VQ is size-agnostic; its pictures are drawn at this size unless --image-size says


class CheckpointImportError(ValueError):
    """A checkpoint that cannot become a run: names the file and what is missing or inconsistent."""


@dataclass
class ImportReport:
    run: str
    family: str
    source: str
    vocab_size: int  # ids of the unified vocabulary
    text_ids: int
    image_codes: int
    image_grid: list[int]
    new_rows: list[str]  # unified special tokens the checkpoint had no row for
    dropped_rows: int  # checkpoint rows no token names (embedding padding)
    skipped_tensors: int  # checkpoint tensors that are not the LM's (the VQ model's, mostly)
    image_decoder: bool  # whether pictures can be drawn (Chameleon's HF port has no VQ decoder)
    seconds: float
    # where the checkpoint's ids went: text ids as [lo, hi) runs of checkpoint ids, the checkpoint id of each image
    # code, of each special token
    id_map: dict[str, Any] = field(default_factory=dict)
    rows: list[int] = field(default_factory=list, repr=False)  # unified id -> checkpoint id (-1: new); not saved


@dataclass
class _Source:
    """What the family-specific readers hand over: the LM, the tokenizer file, the image tokenizer, the names."""

    lm: ImportedLM
    tokenizer_file: Path
    image_tokenizer: Any | None
    vocabulary_map: dict[str, int]


def _read_hf(family: str, src: Path, image_size: int | None, vqgan: Path | None) -> _Source:
    lm = import_hf_lm(src, family)
    image = None
    if family == "emu3":
        from anyloom.tokenizers.image_import_emu3 import import_emu3_vq

        size = image_size or EMU3_IMAGE_SIZE
        image = import_emu3_vq(src, image_size=(size, size))
    elif family == "chameleon":
        if vqgan is not None:
            from anyloom.tokenizers.image_import_chameleon import import_chameleon_vqgan

            image = import_chameleon_vqgan(vqgan / "vqgan.ckpt", vqgan / "vqgan.yaml")
        else:
            from anyloom.tokenizers.image_import_chameleon import import_chameleon_vq

            image = import_chameleon_vq(src)
    return _Source(lm, src / "tokenizer.json", image, dict(lm.file_config.get("vocabulary_map") or {}))


def _read_anole(src: Path) -> _Source:
    from anyloom.pretrained.meta_chameleon import read_meta_chameleon

    meta = read_meta_chameleon(src)
    lm = lm_from_tensors(meta.hf_config, meta.tensors, "chameleon", str(src))
    lm.skipped.extend(meta.skipped)
    return _Source(lm, meta.tokenizer_file, meta.vq, dict(meta.hf_config.get("vocabulary_map") or {}))


def _unified(layout: IdLayout, text: HFTextTokenizer, image: Any | None) -> Vocabulary:
    grid = tuple(image.grid) if image is not None and layout.image_codes else (1, 1)
    return Vocabulary.build(
        text.vocab_size, len(layout.image_codes), 0, 0, grid, image_row_end=layout.row_end,
        image_prefix=tuple(text.to_text_ids(layout.image_prefix)),
        image_suffix=tuple(text.to_text_ids(layout.image_suffix)),
    )


def source_rows(vocab: Vocabulary, layout: IdLayout, text: HFTextTokenizer) -> np.ndarray:
    """(vocab.size,) the checkpoint row of every unified id; -1 where the checkpoint has none."""
    rows = np.full(vocab.size, -1, dtype=np.int64)
    rows[: vocab.text_size] = text.file_ids
    if layout.image_codes:
        lo, hi = vocab.image_range
        rows[lo:hi] = layout.image_codes
    for name in SPECIAL_NAMES:
        if name in layout.specials:
            rows[vocab.special(name)] = layout.specials[name]
    return rows


def renumber(state: dict[str, torch.Tensor], rows: np.ndarray) -> dict[str, torch.Tensor]:
    """The embedding and output rows in the unified order; rows the checkpoint lacks: the mean embedding (a token
    of average meaning) and a zero output row."""
    index = torch.as_tensor(np.clip(rows, 0, None))
    fresh = torch.as_tensor(rows < 0)
    out = dict(state)
    for key, filler in (("tok_embeddings.weight", "mean"), ("output.weight", "zero")):
        if key not in state:
            continue  # tied embeddings: one matrix
        weight = state[key]
        if int(rows.max()) >= weight.shape[0]:
            raise CheckpointImportError(f"the tokenizer names id {int(rows.max())} but {key} has "
                                        f"{weight.shape[0]} rows")
        new = weight[index].clone()
        new[fresh] = weight.mean(0) if filler == "mean" else 0.0
        out[key] = new
    return out


def import_checkpoint(family: str, src: str | Path, run: str | Path, *, image_size: int | None = None,
                      vqgan: str | Path | None = None, overwrite: bool = False) -> ImportReport:
    """Read a ``family`` checkpoint from ``src`` and write the run directory ``run`` (module docstring)."""
    t0 = time.time()
    if family not in FAMILIES:
        raise CheckpointImportError(f"--from {family!r}: expected one of {', '.join(FAMILIES)}")
    src, run = Path(src), Path(run)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder (expected the checkpoint's folder)")
    export = run / "export"
    if export.exists() and not overwrite:
        raise CheckpointImportError(f"{export} exists; pass --overwrite to replace it")
    if vqgan is not None and family != "chameleon":
        raise CheckpointImportError("--vqgan gives Chameleon's Hugging Face import Meta's VQGAN (with its decoder); "
                                    f"{family} brings its own")
    if family == "anole":
        source = _read_anole(src)
    else:
        source = _read_hf(family, src, image_size, Path(vqgan) if vqgan else None)
    if not source.tokenizer_file.is_file():
        raise FileNotFoundError(f"{source.tokenizer_file} does not exist: the checkpoint's text tokenizer (a "
                                f"tokenizers-library JSON) is needed to read and write text")
    from tokenizers import Tokenizer

    try:
        tok_file = Tokenizer.from_file(str(source.tokenizer_file))
    except Exception as e:  # the library raises a bare Exception for a malformed file
        raise CheckpointImportError(f"{source.tokenizer_file}: not a tokenizers-library JSON file ({e})") from e
    names = {**source.vocabulary_map, **tok_file.get_vocab(with_added_tokens=True)}
    where = str(source.tokenizer_file)
    grid = tuple(source.image_tokenizer.grid) if source.image_tokenizer is not None else None

    def encode(text: str) -> list[int]:
        return tok_file.encode(text, add_special_tokens=False).ids

    try:
        layout = id_layout(family, source.lm.hf_config, names, where, grid, encode)
    except LayoutError as e:
        raise CheckpointImportError(str(e)) from e
    image = source.image_tokenizer if layout.image_codes else None
    if image is not None and int(image.codebook_size) != len(layout.image_codes):
        raise CheckpointImportError(f"{where}: {len(layout.image_codes)} image-code tokens, but the VQ has "
                                    f"{int(image.codebook_size)} codes")
    rows_in_file = source.lm.config.vocab_size
    named = {i for i in names.values() if 0 <= i < rows_in_file}
    taken = set(layout.image_codes) | set(layout.specials.values())
    text_file_ids = sorted(named - taken)
    text = HFTextTokenizer(source.tokenizer_file.read_bytes(), text_file_ids, source=where)
    vocab = _unified(layout, text, image)
    rows = source_rows(vocab, layout, text)
    state = renumber(source.lm.model.state_dict(), rows)
    config = replace(source.lm.config, vocab_size=vocab.size)

    if export.exists():
        shutil.rmtree(export)
    save_weights(export, state, config, vocab.to_dict(), metadata={"source": str(src), "family": family})
    text.save(export / "text_tokenizer")
    if image is not None:
        image.save(export / "image_tokenizer")
    section = {"generation": {"image_cfg_scale": CFG_SCALE[family]}} if image is not None else {}
    (run / "recipe.yaml").write_text(f"# imported from {src} ({family}); the generation defaults of the family\n"
                                     + (yaml.safe_dump(section) if section else ""))
    decoder = image is not None and getattr(image, "decoder", None) is not None
    report = ImportReport(
        run=str(run), family=family, source=str(src), vocab_size=vocab.size, text_ids=vocab.text_size,
        image_codes=vocab.image_codebook_size, image_grid=list(vocab.image_grid) if image is not None else [],
        new_rows=[n for n in SPECIAL_NAMES if n not in layout.specials], dropped_rows=rows_in_file - len(
            set(rows[rows >= 0].tolist())), skipped_tensors=len(source.lm.skipped), image_decoder=decoder,
        seconds=round(time.time() - t0, 1),
        id_map={"text": runs_of(text.file_ids), "image": list(layout.image_codes), "special": dict(layout.specials)},
        rows=rows.tolist())
    saved = {k: v for k, v in asdict(report).items() if k != "rows"}
    (run / "import.json").write_text(json.dumps(saved, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="family", required=True, choices=FAMILIES, help="the checkpoint's family")
    p.add_argument("--src", required=True, help="the checkpoint's folder")
    p.add_argument("--run", required=True, help="the run directory to write (runs/<name>)")
    p.add_argument("--image-size", type=int, help=f"Emu3: picture size in pixels (default {EMU3_IMAGE_SIZE})")
    p.add_argument("--vqgan", help="Chameleon (HF): a folder with Meta's vqgan.ckpt + vqgan.yaml, for pictures")
    p.add_argument("--overwrite", action="store_true", help="replace <run>/export when it exists")
    a = p.parse_args(argv)
    try:
        report = import_checkpoint(a.family, a.src, a.run, image_size=a.image_size, vqgan=a.vqgan,
                                   overwrite=a.overwrite)
    except (CheckpointImportError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pictures = "" if not report.image_codes else (
        f", {report.image_codes} image codes on a {report.image_grid[0]}x{report.image_grid[1]} grid"
        + ("" if report.image_decoder else " (no VQ decoder: pass --vqgan to draw pictures)"))
    print(f"imported {report.family} from {report.source} -> {report.run}: {report.vocab_size} ids "
          f"({report.text_ids} text{pictures}) in {report.seconds:.1f} s; anyloom.load({report.run!r})")
    return 0

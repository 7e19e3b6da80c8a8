"""How a run's image tokenizer spells the world's colours and shapes: are its codes shared across colours or shapes?

    python scripts/world_code_usage.py --run runs/world                  # test and compositional splits
    python scripts/world_code_usage.py --run runs/world_validation --splits test compositional_val

The LM draws a picture of an unseen colour x shape pair from the codes training showed it. This script encodes the
run's training pictures and each split's pictures with the run's image tokenizer and reports, over the object cells
of the code grid (cells that overlap an object's box):

- ``unseen_with_colour`` / ``unseen_with_shape``: the share of a split's object cells whose code no training picture
  of that colour (shape) holds. On unseen pairs, a high share with the shape means each code carries its colour: the
  LM must draw the shape with codes it never saw in that shape.
- ``pictures_with_unseen_shape_code``: the share of a split's pictures holding at least one such cell;
- ``digit_information``: for each FSQ digit (mixed radix, least significant first, as the LM's code factors number
  them), its entropy and its mutual information with the colour and with the shape over training object cells, in
  nats. A digit that carried the colour alone would have about H(colour) of it.

Writes ``<run>/code_usage.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml

from anyloom.data.document import ImageSegment
from anyloom.data.manifest import read_manifest
from anyloom.progress import progress
from anyloom.recipes import build_recipe
from anyloom.tokenizers.image_vq import ImageVQTokenizer
from anyloom.world.dataset import build_world


def entropy(values: list) -> float:
    n = len(values)
    return -sum(c / n * math.log(c / n) for c in Counter(values).values())


def mutual_information(pairs: list[tuple]) -> float:
    n = len(pairs)
    joint, left, right = Counter(pairs), Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    return sum(c / n * math.log(c * n / (left[a] * right[b])) for (a, b), c in joint.items())


def object_cells(boxes: list[list[float]], grid: tuple[int, int], size: tuple[int, int]) -> list[int]:
    """Flat indices of the grid cells that overlap any (x0, y0, x1, y1) box in pixels. Overlap, not the region
    head's cell-centre rule (``world.regions.box_cells``): a sliver of an object already changes a cell's code."""
    ch, cw = size[0] / grid[0], size[1] / grid[1]
    cells = set()
    for x0, y0, x1, y1 in boxes:
        for r in range(max(0, int(y0 // ch)), min(grid[0], int(math.ceil(y1 / ch)))):
            for c in range(max(0, int(x0 // cw)), min(grid[1], int(math.ceil(x1 / cw)))):
                cells.add(r * grid[1] + c)
    return sorted(cells)


def encode_split(tokenizer: ImageVQTokenizer, manifest: Path, limit: int, batch: int = 256) -> list[tuple[dict, list]]:
    """(meta, object-cell codes) per picture of the manifest's first ``limit`` items (0: all); documents without a
    picture or without the world's colour and shape (none in a world's manifests) are left out."""
    items = [doc for doc in read_manifest(manifest).documents
             if doc.first(ImageSegment) is not None and "color" in doc.meta]
    items = items[:limit] if limit else items
    out = []
    for start in progress(range(0, len(items), batch), desc=Path(manifest).stem):
        chunk = items[start:start + batch]
        pixels = np.stack([doc.first(ImageSegment).pixels for doc in chunk])
        codes = tokenizer.encode_uint8(pixels).codes.flatten(1).tolist()
        for doc, row in zip(chunk, codes):
            cells = object_cells(doc.meta["boxes"], tokenizer.grid, tokenizer.image_size)
            out.append((doc.meta, [row[i] for i in cells]))
    return out


def code_usage(tokenizer: ImageVQTokenizer, world, splits: list[str], train_limit: int) -> dict:
    train = encode_split(tokenizer, world.split("train"), train_limit)
    with_colour, with_shape = defaultdict(set), defaultdict(set)
    for meta, codes in train:
        with_colour[meta["color"]].update(codes)
        with_shape[meta["shape"]].update(codes)
    result: dict = {"train_pictures": len(train)}
    for split in splits:
        pictures = encode_split(tokenizer, world.split(split), 0)
        cells = [(meta, code) for meta, codes in pictures for code in codes]
        result[split] = {
            "pictures": len(pictures), "object_cells": len(cells),
            "unseen_with_colour": sum(c not in with_colour[m["color"]] for m, c in cells) / len(cells),
            "unseen_with_shape": sum(c not in with_shape[m["shape"]] for m, c in cells) / len(cells),
            "pictures_with_unseen_shape_code": float(np.mean(
                [any(c not in with_shape[m["shape"]] for c in codes) for m, codes in pictures])),
        }
    factors = tokenizer.cfg.quantizer.fsq_levels if tokenizer.cfg.quantizer.kind == "fsq" else ()
    cells = [(meta, code) for meta, codes in train for code in codes]
    info = {"colour_entropy": entropy([m["color"] for m, _ in cells]),
            "shape_entropy": entropy([m["shape"] for m, _ in cells]),
            "code": {"colour": mutual_information([(c, m["color"]) for m, c in cells]),
                     "shape": mutual_information([(c, m["shape"]) for m, c in cells])}}
    for d, base in enumerate(factors):
        radix = math.prod(factors[:d])
        digits = [(c // radix) % base for _, c in cells]
        info[f"digit_{d}"] = {"entropy": entropy(digits),
                              "colour": mutual_information([(x, m["color"]) for x, (m, _) in zip(digits, cells)]),
                              "shape": mutual_information([(x, m["shape"]) for x, (m, _) in zip(digits, cells)])}
    result["digit_information"] = info
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory of a world recipe (its image tokenizer and world)")
    p.add_argument("--splits", nargs="+", default=["test", "compositional"])
    p.add_argument("--train-items", type=int, default=0, help="training pictures read (0: all)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    run = Path(a.run)
    if not (run / "recipe.yaml").is_file():
        raise SystemExit(f"{run} is not a run directory (no recipe.yaml); train one with `make train`")
    recipe = build_recipe(yaml.safe_load((run / "recipe.yaml").read_text()) or {})
    if recipe.data.source != "world":
        raise SystemExit(f"{run}: data.source is {recipe.data.source!r}; this script reads the world's colours and "
                         "shapes")
    folder = run / "stages" / "image_tokenizer" / "tokenizer"
    if not folder.is_dir():
        raise SystemExit(f"{run}: no image tokenizer at {folder} (train the run first)")
    tokenizer = ImageVQTokenizer.load(folder).eval()
    result = code_usage(tokenizer, build_world(recipe.world), a.splits, a.train_items)
    (run / "code_usage.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Text -> image with and without classifier-free guidance, saved side by side as one PNG.

    python examples/text_to_image.py                 # any directory; --run, --out
"""

from __future__ import annotations

from common import load_run, parse_args
from PIL import Image

args = parse_args(__doc__)
pipe = load_run(args.run)
captions = ["one red circle", "two blue squares", "three yellow triangles"]
rows = []
for scale in (1.0, 3.0):  # 1.0 = no guidance
    # one batch per scale: the prompts are left-padded together and share one seeded generator
    rows.append([out.image for out in pipe.generate_batch(captions, to="image", cfg_scale=scale, seed=0)])

w, h = rows[0][0].size
grid = Image.new("RGB", (w * len(captions), h * len(rows)))
for r, images in enumerate(rows):
    for c, image in enumerate(images):
        grid.paste(image, (c * w, r * h))
out = args.out
out.mkdir(parents=True, exist_ok=True)
grid.save(out / "text_to_image.png")
print(f"columns: {captions}; rows: cfg_scale 1.0, 3.0 -> {out / 'text_to_image.png'}")

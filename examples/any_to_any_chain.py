"""A chain through every modality: text -> image -> caption -> speech -> transcript.

Each step feeds the previous output back as a prompt segment (a PIL image, an AudioSegment).

    python examples/any_to_any_chain.py --run runs/world --out runs/world/samples/examples
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anyloom.data.document import AudioSegment
from anyloom.decoders.audio import write_wav
from anyloom.generation.pipeline import load

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--run", default="runs/world")
p.add_argument("--out", default="runs/world/samples/examples")
p.add_argument("--caption", default="two green stars")
args = p.parse_args()

pipe = load(args.run)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

image = pipe.generate(args.caption, to="image", seed=0)
image.image.save(out / "chain_image.png")
caption = pipe.generate([image.image], to="text")  # image -> text (greedy by default)
speech = pipe.generate(caption.text or args.caption, to="audio", seed=0)
write_wav(out / "chain_speech.wav", speech.wave, speech.sample_rate)
heard = pipe.generate(AudioSegment(speech.wave, speech.sample_rate), to="text")  # speech -> text

print(f"prompt:     {args.caption!r}")
print(f"image:      {out / 'chain_image.png'} (codes {tuple(image.codes.shape)})")
print(f"caption:    {caption.text!r}")
print(f"speech:     {out / 'chain_speech.wav'} ({len(speech.wave) / speech.sample_rate:.2f} s)")
print(f"transcript: {heard.text!r}")
(out / "chain.txt").write_text(f"{args.caption}\n{caption.text}\n{heard.text}\n")

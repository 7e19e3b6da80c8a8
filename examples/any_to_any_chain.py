"""A chain through every modality: text -> image -> caption -> speech -> transcript.

Each step feeds the previous output back as the next prompt, by keyword (image=, audio=).

    python examples/any_to_any_chain.py                 # any directory; --run, --out
"""

from __future__ import annotations

from common import load_run, parse_args

from anyloom.decoders.audio import write_wav

args = parse_args(__doc__, lambda p: p.add_argument("--caption", default="two green stars"))
pipe = load_run(args.run)
out = args.out
out.mkdir(parents=True, exist_ok=True)

image = pipe.generate(text=args.caption, to="image", seed=0)
image.image.save(out / "chain_image.png")
caption = pipe.generate(image=image.image, to="text")  # image -> text (greedy by default)
speech = pipe.generate(text=caption.text or args.caption, to="audio", seed=0)
write_wav(out / "chain_speech.wav", speech.wave, speech.sample_rate)
heard = pipe.generate(audio=(speech.wave, speech.sample_rate), to="text")  # speech -> text
for note in image.warnings + caption.warnings + speech.warnings + heard.warnings:
    print(f"warning: {note}")

print(f"prompt:     {args.caption!r}")
print(f"image:      {out / 'chain_image.png'} (codes {tuple(image.codes.shape)})")
print(f"caption:    {caption.text!r}")
print(f"speech:     {out / 'chain_speech.wav'} ({len(speech.wave) / speech.sample_rate:.2f} s)")
print(f"transcript: {heard.text!r}")
(out / "chain.txt").write_text(f"{args.caption}\n{caption.text}\n{heard.text}\n")

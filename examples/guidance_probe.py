"""Research access below the API: what does the caption change in the first image code's distribution?

Uses the pipeline's parts directly (tokenizer, vocabulary, model) and the engine's ``prefill``: the next-token
distribution after ``<bos> caption <boi>`` vs after the unconditional ``<bos> <boi>``, restricted to image codes,
and the KL divergence between them (large = the caption steers the image; that is what guidance amplifies).
Then it streams one generation token by token through the ``on_step`` callback.

    python examples/guidance_probe.py                 # any directory; --run, --out
"""

from __future__ import annotations

import json

import torch
from common import load_run, parse_args

from anyloom.generation.engine import left_pad, new_cache, prefill

args = parse_args(__doc__)
pipe = load_run(args.run)
v = pipe.vocab
captions = ["one red circle", "four blue stars"]
prompts = [pipe.prompt_ids(c, to="image") for c in captions] + [[v.bos, v.boi]]
batch = left_pad(prompts, v.pad, pipe.device)
with torch.no_grad():
    kv = new_cache(pipe.model, len(prompts), batch.tokens.shape[1])
    logits = prefill(pipe.model, batch.tokens, batch.doc_ids, batch.positions, kv)  # (3, V)
lo, hi = v.image_range
logp = torch.log_softmax(logits[:, lo:hi], dim=-1)  # (3, K_img) over image codes only
report = {}
for i, caption in enumerate(captions):
    kl = torch.sum(logp[i].exp() * (logp[i] - logp[-1])).item()
    top = torch.topk(logp[i], 3)
    report[caption] = {"kl_to_unconditional": kl, "top_codes": top.indices.tolist()}
    print(f"{caption!r}: KL(cond || uncond) over the first image code = {kl:.4f}; top codes {top.indices.tolist()}")

stream = []
pipe.generate(text=captions[0], to="image", on_step=lambda e: stream.append(v.describe(int(e.tokens[0]))))
print("streamed:", " ".join(stream))
report["streamed"] = stream
out = args.out
out.mkdir(parents=True, exist_ok=True)
(out / "guidance_probe.json").write_text(json.dumps(report, indent=2) + "\n")

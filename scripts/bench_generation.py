"""Decode speed: our static-KV-cache engine vs Hugging Face ``generate`` on the same weights.

    python scripts/bench_generation.py                      # batch 1 and 16, writes runs/bench/generation.json
    python scripts/bench_generation.py --batches 1 --new 64

A random ``LlamaForCausalLM`` (world-sized by default) is saved as safetensors, imported through
``anyloom.transformer.importers.import_llama`` and both models decode greedily from the same prompts:

- ``hf``: ``model.generate(do_sample=False)`` with its default dynamic cache;
- ``engine``: ``prefill`` + ``decode_one_token`` steps on the static cache (attending to the filled prefix, as
  eager ``generate`` does), greedy argmax (same work as HF);
- ``constrained``: the full ``anyloom.generation.engine.generate`` path (grammar mask, per-modality sampling
  tables, stop conditions) on the same model, with a vocabulary laid over its ids.

With ``--compile`` both of ours also run with the decode step compiled (``compiled_decode_step``; columns
``engine+c`` and ``constrained+c``). The first call of each batch size builds the graph: its extra time over the
best timed call is reported as ``compile_s``, and ``break_even_steps`` = compile_s / (per-step time saved), the
number of decode steps after which compiling has paid for itself.

With ``--run runs/<name>`` it times a trained run's pipeline instead: ``--batch`` copies of ``--prompt`` to a
picture and to speech (``generate_batch``, the run's own sampling, guidance and reranking), with the decode step
reading the whole static cache (``static``, as a compiled step does) and the filled prefix (eager ``generate``),
and checks that both give the same codes. ``--run ... --precision fp32 native_bf16`` times the same calls with the
LM loaded at each ``generation.precision`` instead (the calls interleaved, each precision's pipeline loaded once;
the samples differ, so only the time is compared).

Tokens/s counts generated tokens (batch x new tokens) over the wall time of the whole call (prefill included),
best of ``--repeats`` rounds in which the calls take turns. The first greedy tokens of ``engine`` and ``hf`` are
compared as a parity check.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from anyloom.generation.config import PRECISIONS
from anyloom.generation.constraints import GrammarConfig, StreamGrammar
from anyloom.generation.engine import CACHE_BUCKET, compiled_decode_step, decode_one_token, generate, new_cache, prefill
from anyloom.generation.sampling import GREEDY, ModalitySampling
from anyloom.sequences.vocab import Vocabulary
from anyloom.transformer.importers import import_llama


def hf_llama(folder: Path, vocab_size: int, dim: int, layers: int, heads: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=int(8 * dim / 3 + 63) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


@torch.no_grad()
def run_engine(model, prompts: torch.Tensor, new: int, step=decode_one_token, slots: int = 0,
               static: bool = False) -> torch.Tensor:
    """Greedy decode on the static cache (``slots`` long, at least prompt + new): the same work as HF greedy
    generate. The slot goes in as ``generate`` passes it: an int in eager mode (attention over the filled prefix),
    a 0-d tensor with ``static`` (the whole cache: what the compiled ``step`` needs)."""
    b, t = prompts.shape
    kv = new_cache(model, b, max(slots, t + new))
    positions = torch.arange(t).expand(b, t)
    logits = prefill(model, prompts, torch.zeros_like(prompts), positions, kv)
    out = torch.empty(b, new, dtype=torch.long)
    pos: int | torch.Tensor = torch.tensor(t) if static else t
    for i in range(new):
        token = logits.argmax(-1)
        out[:, i] = token
        if i + 1 < new:
            logits = step(model, token[:, None], kv, pos)
            pos = pos + 1
    return out


def interleaved_best_times(calls: dict, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Each call's best wall time over ``repeats`` rounds, the calls taking turns within a round (so that a slow
    spell of a shared machine hits all of them, not one), and each call's last output."""
    best = dict.fromkeys(calls, float("inf"))
    outs: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outs


def best_time(fn, repeats: int) -> tuple[float, object]:
    """One call's best wall time over ``repeats`` runs, and its last output."""
    times, outs = interleaved_best_times({"call": fn}, repeats)
    return times["call"], outs["call"]


def pipeline_rows(run: str, prompt: str, batch: int, repeats: int) -> list[dict]:
    """A run's text->image and text->speech calls with the decode step on the whole cache vs the filled prefix."""
    from anyloom.generation import engine
    from anyloom.generation.pipeline import load

    pipe = load(run, device="cpu")
    decode = engine.decode_n_tokens
    rows = []
    for to in ("image", "audio"):
        times, codes = {}, {}
        for static in (True, False):
            engine.decode_n_tokens = partial(decode, static=static)
            try:
                times[static], outs = best_time(partial(pipe.generate_batch, [prompt] * batch, to=to, seed=0), repeats)
            finally:
                engine.decode_n_tokens = decode
            codes[static] = [o.codes for o in outs]
        same = all(torch.equal(x, y) for x, y in zip(codes[True], codes[False]))
        rows.append({"to": to, "batch": batch, "whole_cache_s": times[True], "prefix_s": times[False],
                     "prefix_speedup": times[True] / times[False], "same_codes": same})
        print(f"{to:>6} x {batch}: whole cache {times[True]:.2f} s, filled prefix {times[False]:.2f} s "
              f"({times[True] / times[False]:.2f}x), same codes: {same}")
    return rows


def precision_rows(run: str, prompt: str, batch: int, repeats: int, precisions: list[str]) -> list[dict]:
    """A run's text->image and text->speech calls with the LM at each ``generation.precision``, interleaved."""
    from dataclasses import replace

    from anyloom.generation.pipeline import load

    base = load(run, device="cpu")  # the run's own generation settings; its pipeline serves its own precision
    pipes = {p: base if p == base.config.precision
             else load(run, device="cpu", config=replace(base.config, precision=p)) for p in precisions}
    rows = []
    for to in ("image", "audio"):
        times = {p: float("inf") for p in precisions}
        for pipe in pipes.values():
            pipe.generate_batch([prompt] * 2, to=to, seed=1)  # warm-up
        for _ in range(repeats):
            for p, pipe in pipes.items():
                t, _ = best_time(partial(pipe.generate_batch, [prompt] * batch, to=to, seed=0), 1)
                times[p] = min(times[p], t)
        first = precisions[0]
        row = {"to": to, "batch": batch, **{f"{p}_s": t for p, t in times.items()},
               **{f"{p}_speedup_vs_{first}": times[first] / t for p, t in times.items() if p != first}}
        rows.append(row)
        print(f"{to:>6} x {batch}: " + ", ".join(f"{p} {t:.2f} s ({times[first] / t:.2f}x)" for p, t in times.items()))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time the compiled decode step")
    p.add_argument("--out", default="runs/bench/generation.json")
    p.add_argument("--run", help="time this trained run's pipeline instead (module docstring)")
    p.add_argument("--prompt", default="two red circles", help="with --run: the text prompt")
    p.add_argument("--batch", type=int, default=32, help="with --run: prompts per call")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS,
                   help="with --run: time these generation.precision settings against each other instead")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.precision and not a.run:
        p.error("--precision compares a trained run's pipeline: give --run runs/<name>")
    if a.run:
        rows = (precision_rows(a.run, a.prompt, a.batch, a.repeats, a.precision) if a.precision
                else pipeline_rows(a.run, a.prompt, a.batch, a.repeats))
        out = Path(a.out if a.out != p.get_default("out") else "runs/bench/generation_pipeline.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"config": vars(a), "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
        print(f"wrote {out}")
        return 0
    # a world-like id space: 512 text ids, 1024 image codes, 4 x 1024 audio codes, specials
    vocab = Vocabulary.build(512, 1024, 1024, 4, (8, 8))
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_llama(Path(tmp), vocab.size, a.dim, a.layers, a.heads, seed=0)
        ours = import_llama(tmp, attention="sdpa").model.eval()
    grammar = StreamGrammar(vocab, GrammarConfig(max_audio_frames=1 << 20))
    results = {"config": vars(a), "vocab_size": vocab.size, "torch": torch.__version__, "rows": []}
    print(f"{'batch':>5} {'hf tok/s':>10} {'engine tok/s':>13} {'ratio':>6} {'constrained tok/s':>18} {'ratio':>6}"
          f"  parity")
    compiled_rows = []
    for b in a.batches:
        g = torch.Generator().manual_seed(b)
        prompts = torch.randint(0, vocab.text_size, (b, a.prompt_len), generator=g)
        prompts[:, 0] = vocab.bos
        n = b * a.new

        hf_call = partial(hf.generate, prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=a.new,
                          min_new_tokens=a.new, do_sample=False, pad_token_id=vocab.pad)
        constrained = partial(generate, ours, prompts.tolist(), grammar, a.new, ModalitySampling.uniform(GREEDY))
        calls = {"hf": hf_call, "engine": partial(run_engine, ours, prompts, a.new), "constrained": constrained}
        if a.compile:
            slots = -(-(a.prompt_len + a.new) // CACHE_BUCKET) * CACHE_BUCKET  # the cache generate() makes
            calls["engine_c"] = partial(run_engine, ours, prompts, a.new, compiled_decode_step(ours), slots,
                                        static=True)
            calls["constrained_c"] = partial(constrained, compile="always")
            start = time.perf_counter()
            first_out = calls["engine_c"]()  # builds the graph for this batch size (constrained_c reuses it)
            t_first = time.perf_counter() - start
        times, outs = interleaved_best_times(calls, a.repeats)
        t_hf, t_engine, t_con = times["hf"], times["engine"], times["constrained"]
        engine_out = outs["engine"]
        # parity: greedy tokens agree until fp32 reassociation flips a near-tie (count the agreeing prefix)
        hf_new = outs["hf"][:, a.prompt_len:]
        agree = (hf_new == engine_out).cumprod(dim=1).sum(dim=1).float().mean().item()
        row = {"batch": b, "new_tokens": a.new, "hf_tokens_per_s": n / t_hf, "engine_tokens_per_s": n / t_engine,
               "constrained_tokens_per_s": n / t_con, "engine_vs_hf": t_hf / t_engine,
               "constrained_vs_hf": t_hf / t_con, "greedy_agreeing_prefix_mean": agree}
        results["rows"].append(row)
        print(f"{b:>5} {n / t_hf:>10.0f} {n / t_engine:>13.0f} {t_hf / t_engine:>6.2f} {n / t_con:>18.0f} "
              f"{t_hf / t_con:>6.2f}  {agree:.0f}/{a.new} tokens agree")
        if a.compile:
            t_ec, t_cc, ec_out = times["engine_c"], times["constrained_c"], outs["engine_c"]
            saved_per_step = (t_engine - t_ec) / (a.new - 1)
            compile_s = t_first - t_ec
            row.update(engine_compiled_tokens_per_s=n / t_ec, engine_compiled_vs_hf=t_hf / t_ec,
                       constrained_compiled_tokens_per_s=n / t_cc, constrained_compiled_vs_hf=t_hf / t_cc,
                       compile_s=compile_s,
                       break_even_steps=compile_s / saved_per_step if saved_per_step > 0 else None,
                       compiled_tokens_equal_eager=bool((ec_out == engine_out).all() and (first_out == ec_out).all()))
            compiled_rows.append(row)
    if compiled_rows:
        print(f"\n{'batch':>5} {'engine+c tok/s':>15} {'ratio':>6} {'constrained+c tok/s':>20} {'ratio':>6} "
              f"{'compile s':>10} {'break-even steps':>17}  tokens == eager")
        for r in compiled_rows:
            be = r["break_even_steps"]
            print(f"{r['batch']:>5} {r['engine_compiled_tokens_per_s']:>15.0f} {r['engine_compiled_vs_hf']:>6.2f} "
                  f"{r['constrained_compiled_tokens_per_s']:>20.0f} {r['constrained_compiled_vs_hf']:>6.2f} "
                  f"{r['compile_s']:>10.1f} {'never' if be is None else f'{be:.0f}':>17}  "
                  f"{r['compiled_tokens_equal_eager']}")
    results["decode_tokens_per_s_vs_hf_generate"] = {str(r["batch"]): r["engine_vs_hf"] for r in results["rows"]}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

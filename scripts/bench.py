"""`make bench`: every speed/memory benchmark in one table, as same-run ratios; writes runs/bench/bench.json.

    python scripts/bench.py            # all parts
    python scripts/bench.py --quick    # smaller and fewer steps: a smoke run (~2-3 min on 1 thread); noisier numbers
    python scripts/bench.py --quick --threads 1
    python scripts/bench.py --only transformer generation

Each part runs in its own process (so one part's memory and threads do not colour another's) and writes its own
JSON under runs/bench/; this script gathers the headline ratios (names are the DESIGN.md contract):

- ``train_tokens_per_s_vs_hf_llama``: LM training tokens/s, ours vs HF LlamaForCausalLM, identical config, same run
- ``decode_tokens_per_s_vs_hf_generate``: KV-cache decode tokens/s vs HF generate on the same weights (batch 1, 16),
  the decode step compiled (``_eager``: not compiled)
- ``fused_ce_peak_memory_ratio``: loss peak memory, naive / fused, at vocabulary 65,536
- ``packing_loader_tokens_per_s``: the packing loader over world-shaped token shards
- ``image_tokenizer_*`` / ``audio_tokenizer_*``: encode/decode throughput of the world default tokenizers
On a CUDA machine the transformer part adds attention TFLOP/s vs SDPA (and xformers when installed).
Also writes runs/bench/throughput.png (bars of the ratios).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("runs/bench")
PARTS = ("transformer", "generation", "sequences", "tokenizers")


def _run(cmd: list[str]) -> str:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def part_transformer(quick: bool, threads: int) -> dict:
    args = [sys.executable, "scripts/bench_transformer.py", "--threads", str(threads)]
    quick_args = ["--steps", "2", "--batch", "2", "--ce-tokens", "1024", "--no-compile"]
    _run(args + (quick_args if quick else ["--steps", "6"]))
    data = json.loads((OUT / "transformer.json").read_text())
    train, ce = data["train"], data["fused_ce"]
    compiled = "train_tokens_per_s_vs_hf_llama" in train  # --quick skips torch.compile: the eager model is ours
    out = {"fused_ce_peak_memory_ratio": ce["fused_ce_peak_memory_ratio"], "fused_ce_tokens": ce["tokens"],
           "train_tokens_per_s_vs_hf_llama": train["train_tokens_per_s_vs_hf_llama" if compiled
                                                   else "train_tokens_per_s_vs_hf_llama_eager"],
           "train_ours_variant": "compiled" if compiled else "eager",
           "train_tokens_per_s_ours": train["ours_compiled_tokens_per_s" if compiled else "ours_eager_tokens_per_s"],
           "train_tokens_per_s_hf_llama": train["hf_llama_tokens_per_s"]}
    if compiled:  # the eager ratio too (in --quick it is the headline already)
        out["train_tokens_per_s_vs_hf_llama_eager"] = train["train_tokens_per_s_vs_hf_llama_eager"]
    if "attention" in data:
        out["attention"] = data["attention"]
    return out


def part_generation(quick: bool, threads: int) -> dict:
    """Decode vs HF generate: the engine with its decode step compiled (weights frozen into the graph on the CPU;
    the one-off compile is reported as ``decode_compile_s_b<batch>``, not timed) and eager (``..._eager``)."""
    _run([sys.executable, "scripts/bench_generation.py", "--new", "32" if quick else "128", "--threads", str(threads),
          "--repeats", "1" if quick else "3", "--compile", "--out", str(OUT / "generation.json")])
    data = json.loads((OUT / "generation.json").read_text())
    out: dict = {}
    for key, column in (("decode_tokens_per_s_vs_hf_generate", "engine_compiled_vs_hf"),
                        ("decode_tokens_per_s_vs_hf_generate_eager", "engine_vs_hf")):
        ratios = {str(row["batch"]): row[column] for row in data["rows"]}
        out[key] = ratios
        out.update({f"{key}_b{b}": r for b, r in ratios.items()})
    for row in data["rows"]:
        out[f"decode_tokens_per_s_b{row['batch']}"] = row["engine_compiled_tokens_per_s"]
        out[f"decode_compile_s_b{row['batch']}"] = row["compile_s"]
    return out


def part_sequences(quick: bool, threads: int) -> dict:
    stdout = _run([sys.executable, "scripts/bench_sequences.py", "--threads", str(threads),
                   "--items", "1000" if quick else "4000",
                   "--batches", "50" if quick else "200"])
    data = json.loads(stdout.strip().splitlines()[-1])
    (OUT / "sequences.json").write_text(json.dumps(data, indent=2) + "\n")
    rates = data["mixture_from_shards_tokens_per_s"]  # by wall clock and by the process's CPU time
    return {"packing_loader_tokens_per_s": rates["wall"], "packing_loader_tokens_per_cpu_s": rates["cpu"]}


def part_tokenizers(quick: bool, threads: int) -> dict:
    """Encode/decode throughput of the world default tokenizers (speed does not depend on training)."""
    import numpy as np
    import torch

    from anyloom.decoders.vocoder import MelVocoder, VocodedMelTokenizer
    from anyloom.recipes import load_recipe
    from anyloom.tokenizers.audio_mel import MelTokenizer
    from anyloom.tokenizers.image_vq import ImageVQTokenizer

    torch.set_num_threads(threads)
    recipe = load_recipe("world")
    image = ImageVQTokenizer(recipe.image_tokenizer.model).eval()
    audio = MelTokenizer(recipe.audio_tokenizer.mel).eval()
    n_img, seconds = (64, 4) if quick else (256, 16)
    images = torch.rand(n_img, 3, 32, 32) * 2 - 1
    waves = torch.from_numpy(np.random.default_rng(0).uniform(-0.3, 0.3, (8, 16000 * seconds // 8)).astype("float32"))

    def rate(fn, count: float) -> float:
        fn()  # warm-up (k-means init, allocator)
        start = time.perf_counter()
        fn()
        return count / (time.perf_counter() - start)

    # the world's neural vocoder (untrained weights: its speed does not depend on them) on the same codes
    vocoded = VocodedMelTokenizer(audio, MelVocoder(recipe.vocoder.model, recipe.audio_tokenizer.mel.features).eval())
    with torch.no_grad():
        codes = image.encode(images).codes
        acodes = audio.encode(waves, 16000).codes
        griffin_lim = rate(lambda: audio.decode(acodes), seconds)
        neural = rate(lambda: vocoded.decode(acodes), seconds)
        return {
            "image_tokenizer_encode_images_per_s": rate(lambda: image.encode(images), n_img),
            "image_tokenizer_decode_images_per_s": rate(lambda: image.decode(codes), n_img),
            "audio_tokenizer_encode_seconds_per_s": rate(lambda: audio.encode(waves, 16000), seconds),
            "audio_tokenizer_decode_seconds_per_s": griffin_lim,
            "audio_vocoder_decode_seconds_per_s": neural,
            "audio_vocoder_vs_griffin_lim": neural / griffin_lim,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--threads", type=int, default=2, help="torch threads in every part (the machine has 2 cores)")
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    import platform

    import torch

    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {a.threads} "
                     f"threads, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
                     "torch": torch.__version__, "quick": a.quick}
    failures = {}
    for part in a.only:
        start = time.time()
        try:
            results.update(globals()[f"part_{part}"](a.quick, a.threads))
        except Exception as e:  # one broken part must not hide the others' numbers; it is reported and fails the run
            failures[part] = str(e)
        print(f"{part}: {time.time() - start:.0f} s", flush=True)
    results["failed_parts"] = failures
    (OUT / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    from anyloom.evaluation.plots import plot_throughput

    try:
        plot_throughput(results, OUT / "throughput.png")
    except ValueError as e:  # every ratio-producing part failed: the failures below say why
        print(f"no throughput.png: {e}", file=sys.stderr)
    print(f"\n{'metric':<48} value")
    for k, v in results.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            print(f"{k:<48} {v:,.3f}")
    print(f"\nwrote {OUT / 'bench.json'} and {OUT / 'throughput.png'}")
    for part, err in failures.items():
        print(f"error: part '{part}' failed: {err}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

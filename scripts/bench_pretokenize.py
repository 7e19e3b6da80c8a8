"""Reading data at scale: documents/s and peak memory of the data stage (``prepare_data``) and of
``pretokenize_manifest`` on 1k to 100k documents.

    python scripts/bench_pretokenize.py                            # 1k, 10k, 100k documents; 0 and 2 workers
    python scripts/bench_pretokenize.py --sizes 1000 10000 --workers 0 2

Writes synthetic JSONL manifests in a temporary folder: each document a short caption and a 32x32 PNG picture,
every 4th also a 0.3-1.0 s 16 kHz WAV. The media are a pool (``--pictures``, ``--clips``) that the lines reference
over and over, so that writing 100k files does not dominate the run; every reference is still read and decoded.
The tokenizers are the world recipe's (sentencepiece BPE trained on the captions, image VQ, mel VQ) with random
weights: the throughput of the real classes, not of trained ones.

The data stage reads each manifest once (pictures fitted to 32x32, recordings at 16 kHz) and writes its prepared
copy, in a fresh process per size. Each (size, workers) pair runs ``pretokenize_manifest`` in a fresh process,
so every peak is its own: the main process's peak RSS (``ru_maxrss``) and the largest peak RSS of one worker
(``VmHWM``, sampled every 0.5 s; the sum over all processes is in the JSON). The outputs of the runs of one size
are compared file by file. On a machine that other jobs share, CPU seconds (of every process, in the JSON) are
steadier than wall-clock documents/s. Prints a markdown table and writes JSON (``--out``, default
runs/bench/pretokenize.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
SHAPES = ("circle", "square", "triangle", "star", "heart", "ring")
COUNTS = ("one", "two", "three", "four")
RATE = 16000


def write_media(root: Path, pictures: int, clips: int, seed: int = 0) -> None:
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "media").mkdir(parents=True, exist_ok=True)
    for i in range(pictures):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "media" / f"p{i}.png")
    for i in range(clips):
        t = np.arange(int(rng.uniform(0.3, 1.0) * RATE)) / RATE
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.05 * rng.standard_normal(t.shape)
        sf.write(root / "media" / f"a{i}.wav", wave.astype(np.float32), RATE, subtype="PCM_16")


def caption(rng: np.random.Generator) -> str:
    return f"{rng.choice(COUNTS)} {rng.choice(COLORS)} {rng.choice(SHAPES)}s on a {rng.choice(COLORS)} background"


def write_manifest(path: Path, n: int, pictures: int, clips: int, seed: int = 0) -> None:
    rng = np.random.default_rng([seed, n])
    with open(path, "w") as f:
        for i in range(n):
            segments: list[dict[str, str]] = [{"text": caption(rng)}, {"image": f"media/p{i % pictures}.png"}]
            if i % 4 == 0:
                segments.append({"audio": f"media/a{(i // 4) % clips}.wav"})
            f.write(json.dumps({"id": f"d{i}", "segments": segments}) + "\n")


def save_tokenizers(folder: Path) -> None:
    """The world recipe's tokenizers, untrained (the mel VQ's codebook random instead of k-means on a batch)."""
    import dataclasses

    import torch

    from anyloom.recipes import load_recipe
    from anyloom.tokenizers.audio_mel import MelTokenizer
    from anyloom.tokenizers.image_vq import ImageVQTokenizer
    from anyloom.tokenizers.text import TextTokenizer

    recipe = load_recipe("world")
    rng = np.random.default_rng(0)
    TextTokenizer.train([caption(rng) for _ in range(2000)], config=recipe.text_tokenizer).save(folder / "text")
    torch.manual_seed(0)
    ImageVQTokenizer(recipe.image_tokenizer.model).eval().save(folder / "image")
    # k-means initialisation would fit the codebook to the first batch it encodes: untrained, that batch decides
    mel = dataclasses.replace(recipe.audio_tokenizer.mel, kmeans_init=False)
    MelTokenizer(mel).eval().save(folder / "audio")
    (folder / "pretokenize.json").write_text(json.dumps(dataclasses.asdict(recipe.sequences.pretokenize)))


class TreeMemory:
    """Samples the memory of this process's descendants (the workers and their fork server) in a thread: the
    largest peak RSS of one of them (the kernel's VmHWM, exact while it lives) and the largest sum of the RSS of
    this process and all of them (shared pages counted in each)."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.other_peak_kib, self.sum_peak_kib = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while True:
            pids = _tree(me)
            self.sum_peak_kib = max(self.sum_peak_kib, sum(_kib(pid, "VmRSS") for pid in pids))
            self.other_peak_kib = max([self.other_peak_kib, *(_kib(pid, "VmHWM") for pid in pids if pid != me)])
            if self._stop.wait(self.every_s):
                return


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and its descendants, with the children they have reaped (the fork
    server reaps the workers)."""
    ticks = 0
    for pid in _tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass  # the process ended between listing and reading
    return 0


def run_one(spec: dict) -> dict:
    """One measurement, in this (fresh) process: pretokenize the manifest, return speed and memory."""
    import torch

    from anyloom.sequences.pretokenize import PretokenizeConfig, pretokenize_manifest
    from anyloom.tokenizers.registry import load_tokenizer

    folder = Path(spec["tokenizers"])
    toks = {m: load_tokenizer(m, folder / m) for m in ("text", "image", "audio")}
    config = PretokenizeConfig(**{**json.loads((folder / "pretokenize.json").read_text()),
                                  "num_workers": spec["workers"]})
    with TreeMemory() as memory:
        start, cpu = time.perf_counter(), tree_cpu_s(os.getpid())
        result = pretokenize_manifest(spec["manifest"], spec["out"], **toks, config=config)
        seconds = time.perf_counter() - start
        time.sleep(0.5)  # the fork server reaps the workers: then their CPU time is in its children's
        cpu = tree_cpu_s(os.getpid()) - cpu
    assert result.built == len(result.shards.index["shards"]), "the output folder was not empty"
    return {"stage": "pretokenize", "documents": len(result.shards), "workers": spec["workers"],
            "seconds": round(seconds, 2),
            "docs_per_s": round(len(result.shards) / seconds, 1), "cpu_s": round(cpu, 1),
            "docs_per_cpu_s": round(len(result.shards) / cpu, 1), "torch_threads": torch.get_num_threads(),
            "main_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "worker_peak_rss_mib": round(memory.other_peak_kib / 1024, 1),
            "sum_peak_rss_mib": round(memory.sum_peak_kib / 1024, 1)}


def run_prepare(spec: dict) -> dict:
    """One data-stage measurement, in this (fresh) process: prepare the manifest, return speed and memory."""
    from anyloom.data.prepare import DataConfig, prepare_data

    cfg = DataConfig(source="manifest", train=spec["manifest"], val_fraction=0.05, test_fraction=0.05,
                     root=spec["out"])
    start, cpu = time.perf_counter(), tree_cpu_s(os.getpid())
    data = prepare_data(cfg, (32, 32), RATE, log=lambda _: None)
    seconds = time.perf_counter() - start
    n = sum(data.counts.values())
    return {"stage": "data", "documents": n, "seconds": round(seconds, 2), "docs_per_s": round(n / seconds, 1),
            "cpu_s": round(tree_cpu_s(os.getpid()) - cpu, 1),
            "main_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def folder_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def table(rows: list[dict], workers: list[int]) -> str:
    head = ["documents"]
    for w in workers:
        head += [f"{w} workers: docs/s", "peak RSS, main", "peak RSS, a worker"]
    lines = ["| " + " | ".join(head) + " | same files |", "|" + "---:|" * len(head) + "---|"]
    prepared = {r["documents"]: r for r in rows if r["stage"] == "data"}
    rows = [r for r in rows if r["stage"] == "pretokenize"]
    for n in sorted({r["documents"] for r in rows}):
        by_w = {r["workers"]: r for r in rows if r["documents"] == n}
        cells = [f"{n:,}"]
        for w in workers:
            r = by_w.get(w)
            if r is None:
                cells += ["", "", ""]
                continue
            cells += [f"{r['docs_per_s']:,.0f}", f"{r['main_peak_rss_mib']:,.0f} MiB",
                      f"{r['worker_peak_rss_mib']:,.0f} MiB" if r["workers"] else "-"]
        same = {r["digest"] for r in by_w.values()}
        lines.append("| " + " | ".join(cells) + f" | {'yes' if len(same) == 1 else 'NO'} |")
    lines += ["", "| documents | data stage: docs/s | peak RSS |", "|---:|---:|---:|"]
    lines += [f"| {n:,} | {r['docs_per_s']:,.0f} | {r['main_peak_rss_mib']:,.0f} MiB |"
              for n, r in sorted(prepared.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="documents per manifest")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values to compare")
    p.add_argument("--pictures", type=int, default=1000, help="distinct PNG files the manifests reference")
    p.add_argument("--clips", type=int, default=100, help="distinct WAV files the manifests reference")
    p.add_argument("--out", default="runs/bench/pretokenize.json")
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON spec: run one measurement in this process
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(run_prepare(spec) if spec.get("stage") == "data" else run_one(spec)))
        return 0

    command = " ".join(["python scripts/bench_pretokenize.py", *(argv if argv is not None else sys.argv[1:])])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_media(root, args.pictures, args.clips)
        save_tokenizers(root / "tokenizers")
        print(f"media and tokenizers: {time.perf_counter() - t0:.1f} s", flush=True)
        for n in args.sizes:
            manifest = root / f"manifest-{n}.jsonl"
            write_manifest(manifest, n, args.pictures, args.clips)
            prepared = root / f"prepared-{n}"
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(
                {"stage": "data", "manifest": str(manifest), "out": str(prepared)})], check=True,
                stdout=subprocess.PIPE, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            shutil.rmtree(prepared)
            rows.append(row)
            print(json.dumps(row), flush=True)
            for w in args.workers:
                out = root / f"tokens-{n}-{w}"
                spec = {"manifest": str(manifest), "out": str(out), "workers": w,
                        "tokenizers": str(root / "tokenizers")}
                load = os.getloadavg()[0]
                done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True,
                                      stdout=subprocess.PIPE, text=True)
                row = {**json.loads(done.stdout.strip().splitlines()[-1]), "digest": folder_digest(out),
                       "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}
                shutil.rmtree(out)
                rows.append(row)
                print(json.dumps(row), flush=True)
            manifest.unlink()

    import torch

    result = {"date": time.strftime("%Y-%m-%d"), "command": command,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                         f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}",
              "torch": torch.__version__, "python": platform.python_version(),
              "pictures": args.pictures, "clips": args.clips, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows, args.workers))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make generate`: any-to-any generation from a trained run, writing PNG / WAV / TXT and a summary.json.

    python scripts/generate.py --run runs/world --prompt "two red circles" --to image
    python scripts/generate.py --run runs/world --prompt "one blue star" --to audio          # text -> speech
    python scripts/generate.py --run runs/world --image scene.png --to text                  # image -> text
    python scripts/generate.py --run runs/world --audio speech.wav --to text                 # speech -> text
    python scripts/generate.py --run runs/world --image scene.png --to audio                 # image -> speech
    python scripts/generate.py --run runs/world --audio speech.wav --to image                 # speech -> image
    python scripts/generate.py --run runs/world --prompts prompts.json                       # many, interleaved

``--prompts`` reads a JSON list of ``{"segments": [{"text": ...}, {"image": "a.png"}, {"audio": "b.wav"}, ...],
"to": "image" | "audio" | "text"}`` (optional ``"seed"``), segment paths relative to the JSON file; segments
may interleave in any order. Without ``--to``, a text-only prompt makes an image and anything else makes text.
Outputs go to ``--out`` (default ``<run>/samples/generate/``): ``NNN_<to>.png|wav|txt`` and ``summary.json``;
numbering continues after the files already there, and summary.json lists every output in the folder.
Bad prompts and missing files are reported with the file / entry and exit code 2, before anything runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from anyloom.config import ConfigError, to_dict
from anyloom.generation.constraints import GrammarError
from anyloom.generation.pipeline import (
    TARGETS,
    GeneratedAudio,
    GeneratedImage,
    GeneratedReply,
    GeneratedText,
    OutOfDomainWarning,
    PipelineError,
    as_segment,
    load,
)
from anyloom.progress import progress
from anyloom.sequences.vocab import VocabularyError

EXTENSIONS = {"image": "png", "audio": "wav", "text": "txt"}
REPLY_TARGETS = (*TARGETS, "any")  # any: the model's own mixed reply (text, pictures, speech)
ENTRY_KEYS = {"segments", "to", "seed"}


class PromptError(ValueError):
    """A prompt file or command line that cannot be turned into requests; the message names where."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (runs/<name>) or export folder")
    p.add_argument("--prompt", help="text of the prompt")
    p.add_argument("--image", help="an image file to condition on")
    p.add_argument("--audio", help="an audio file (WAV/FLAC/...) to condition on")
    p.add_argument("--prompts", help="a JSON file of prompts (see above)")
    p.add_argument("--to", choices=REPLY_TARGETS, help="what to generate (default: image for text, else text; any: "
                                                       "the model's own mix of text, pictures and speech)")
    p.add_argument("--out", help="output folder (default: <run>/samples/generate)")
    p.add_argument("--num", type=int, default=1, help="samples per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, help="default: the recipe's generation.seed")
    p.add_argument("--temperature", type=float, help="for the target modality (0 = greedy)")
    p.add_argument("--top-k", type=int, help="for the target modality (0 = off)")
    p.add_argument("--top-p", type=float, help="for the target modality (1 = off)")
    p.add_argument("--min-p", type=float, help="for the target modality: keep tokens >= min_p x the top one (0 = off)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance for image/audio targets (1 = off)")
    p.add_argument("--candidates", type=int, help="outputs sampled per prompt, the best-scored one kept (default: the "
                                                    "recipe's generation.<to>_candidates)")
    p.add_argument("--image-decoder", choices=["vq", "diffusion"],
                   help="pictures through the image tokenizer's decoder or the run's diffusion decoder (default: the "
                        "recipe's generation.image_decoder)")
    p.add_argument("--vocoder", choices=["auto", "griffin_lim", "neural"],
                   help="speech through the audio tokenizer's own decode (Griffin-Lim for mel codes) or the run's "
                        "neural vocoder; auto: neural where the run has one (default: the recipe's generation.vocoder)")
    p.add_argument("--max-text-tokens", type=int)
    p.add_argument("--max-audio-seconds", type=float)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """Validated requests from a prompts JSON file; paths are made relative to the file."""
    if not path.is_file():
        raise PromptError(f"prompts file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PromptError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, list) or not data:
        raise PromptError(f"{path}: expected a non-empty JSON list of prompts")
    requests = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise PromptError(f"{where}: expected an object with 'segments' and 'to', got {entry!r}")
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise PromptError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(ENTRY_KEYS))})")
        segments = entry.get("segments")
        if not isinstance(segments, list) or not segments:
            raise PromptError(f"{where}: 'segments' must be a non-empty list")
        to = entry.get("to")
        if to not in REPLY_TARGETS:
            raise PromptError(f"{where}: 'to' is {to!r}; expected one of {', '.join(REPLY_TARGETS)}")
        resolved = []
        for j, seg in enumerate(segments):
            if not isinstance(seg, dict) or len(seg) != 1 or next(iter(seg)) not in TARGETS:
                raise PromptError(f"{where}, segment {j}: expected one of {{'text'|'image'|'audio': ...}}, got {seg!r}")
            (key, value), = seg.items()
            if not isinstance(value, str) or not value.strip():
                raise PromptError(f"{where}, segment {j}: {key!r} needs a non-empty string")
            if key != "text":
                file = (path.parent / value).resolve()
                if not file.is_file():
                    raise PromptError(f"{where}, segment {j}: {key} file {file} does not exist")
                value = str(file)
            resolved.append({key: value})
        seed = entry.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise PromptError(f"{where}: 'seed' must be an integer, got {seed!r}")
        requests.append({"segments": resolved, "to": to, "seed": seed})
    return requests


def requests_from_args(a: argparse.Namespace) -> list[dict[str, Any]]:
    if a.prompts:
        if a.prompt or a.image or a.audio:
            raise PromptError("--prompts cannot be combined with --prompt / --image / --audio")
        return read_prompt_file(Path(a.prompts))
    segments: list[dict[str, str]] = []
    for key, value in (("image", a.image), ("audio", a.audio)):
        if value:
            if not Path(value).is_file():
                raise PromptError(f"--{key}: file {value} does not exist")
            segments.append({key: str(Path(value).resolve())})
    if a.prompt is not None:
        if not a.prompt.strip():
            raise PromptError("--prompt is empty")
        segments.append({"text": a.prompt})
    if not segments:
        raise PromptError("nothing to condition on: give --prompt, --image, --audio or --prompts")
    to = a.to or ("image" if all("text" in s for s in segments) else "text")
    return [{"segments": segments, "to": to, "seed": None}]


def earlier_outputs(out: Path) -> list[dict[str, Any]]:
    """The output records of earlier calls into the same folder (summary.json), so one summary lists every file."""
    path = out / "summary.json"
    if not path.is_file():
        return []
    try:
        outputs = json.loads(path.read_text()).get("outputs", [])
    except (json.JSONDecodeError, AttributeError):
        print(f"warning: {path} is not a summary written by this script; starting a new one", file=sys.stderr)
        return []
    return [o for o in outputs if isinstance(o, dict) and (out / str(o.get("file", ""))).is_file()]


def next_index(out: Path, earlier: list[dict[str, Any]]) -> int:
    """One past the highest NNN_ prefix in the folder (files or earlier records): new outputs never overwrite."""
    taken = [int(f.name.split("_", 1)[0]) for f in out.iterdir() if f.name.split("_", 1)[0].isdigit()]
    taken += [int(o["index"]) for o in earlier if isinstance(o.get("index"), int)]
    return max(taken, default=-1) + 1


def write_output(out: Path, index: int, result: Any) -> dict[str, Any]:
    """``NNN_<kind>.<ext>``, or for a mixed reply ``NNN_any.txt`` (its text) and ``NNN_any_K.png|wav`` per span in
    order; returns the summary record's fields."""
    if isinstance(result, GeneratedReply):
        name = f"{index:03d}_any.txt"
        (out / name).write_text(result.text + "\n")
        files = [name] + [save_output(out, f"{index:03d}_any_{k}", part)["file"]
                          for k, part in enumerate(result.segments) if not isinstance(part, GeneratedText)]
        return {"file": name, "files": files, "text": result.text, "finished": result.finished}
    return save_output(out, f"{index:03d}_{_kind(result)}", result)


def save_output(out: Path, stem: str, result: Any) -> dict[str, Any]:
    """One picture, sound or text as ``out/<stem>.<ext>``; its record's fields."""
    from anyloom.decoders.audio import write_wav

    name = f"{stem}.{EXTENSIONS[_kind(result)]}"
    if isinstance(result, GeneratedImage):
        result.image.save(out / name)
        return {"file": name, "codes": result.codes.tolist()}
    if isinstance(result, GeneratedAudio):
        write_wav(out / name, result.wave, result.sample_rate)
        return {"file": name, "seconds": round(len(result.wave) / result.sample_rate, 3),
                "frames": int(result.codes.shape[1])}
    (out / name).write_text(result.text + "\n")
    return {"file": name, "text": result.text, "finished": result.finished}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _kind(result: Any) -> str:
    return {GeneratedImage: "image", GeneratedAudio: "audio", GeneratedText: "text"}[type(result)]


def describe(segments: list[dict[str, str]], width: int = 60) -> str:
    """A prompt in one short line for messages: texts cut to ``width`` characters, files by name."""
    parts = []
    for seg in segments:
        (key, value), = seg.items()
        if key == "text":
            parts.append(repr(value if len(value) <= width else value[:width] + "..."))
        else:
            parts.append(f"{key} {Path(value).name}")
    return " + ".join(parts)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        if a.num < 1:
            raise PromptError(f"--num must be >= 1, got {a.num}")
        if a.candidates is not None and a.candidates < 1:
            raise PromptError(f"--candidates must be >= 1, got {a.candidates}")
        requests = requests_from_args(a)
        for req in requests:  # every file read (and refused by name) before the model is loaded
            req["loaded"] = [as_segment(s) for s in req["segments"]]
        pipe = load(a.run, device=a.device)
    except (PromptError, PipelineError, FileNotFoundError, ConfigError, VocabularyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = pipe.config
    if a.max_text_tokens is not None:
        config = replace(config, max_text_tokens=a.max_text_tokens)
    if a.max_audio_seconds is not None:
        config = replace(config, max_audio_seconds=a.max_audio_seconds)
    pipe.config = config
    out = Path(a.out) if a.out else Path(a.run) / "samples" / "generate"
    out.mkdir(parents=True, exist_ok=True)
    options = {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "min_p": a.min_p,
               "cfg_scale": a.cfg_scale, "candidates": a.candidates, "image_decoder": a.image_decoder,
               "vocoder": a.vocoder}
    summary: dict[str, Any] = {"run": str(a.run), "config": to_dict(config), "options": options,
                               "outputs": earlier_outputs(out)}
    jobs = [(r, k) for r in requests for k in range(a.num)]
    index = next_index(out, summary["outputs"])  # earlier calls' files in the folder are kept, never overwritten
    written = 0
    for req, k in progress(jobs, desc="generate"):
        seed = (req["seed"] if req["seed"] is not None else a.seed if a.seed is not None else config.seed) + k
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():  # printed below, once per output, as the summary records them
                warnings.simplefilter("ignore", OutOfDomainWarning)
                result = pipe.generate(req["loaded"], to=req["to"], seed=seed, **options)
        except (PipelineError, FileNotFoundError, GrammarError, ValueError) as e:
            print(f"error: prompt {describe(req['segments'])}: {e}", file=sys.stderr)
            return 2
        for note in result.warnings:
            print(f"warning: prompt {describe(req['segments'])}: {note}", file=sys.stderr)
        record = {"index": index, "to": req["to"], "prompt": req["segments"], "seed": seed, "options": options,
                  "seconds": round(time.perf_counter() - start, 3), **write_output(out, index, result),
                  **({"warnings": result.warnings} if result.warnings else {})}
        summary["outputs"].append(record)
        print(f"[{index}] {req['to']}: {out / record['file']}" + (f"  {record['text']!r}" if "text" in record else ""))
        index += 1
        written += 1
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    total = len(summary["outputs"])
    print(f"wrote {_count(written, 'output')} and {out / 'summary.json'} ({_count(total, 'output')} in the folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

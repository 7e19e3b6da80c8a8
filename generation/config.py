"""The generation slice of a recipe (``generation:``): per-modality sampling defaults, guidance, reranking, lengths,
seed.

The defaults are starting points, not tuned values: text greedy (captions and transcripts are judged exactly),
images and speech sampled with a nucleus, classifier-free guidance on for image and audio spans (the task mixture
trains the unconditional model through condition dropout). Any of them can be overridden per call. ``compile``
picks whether the decode step runs under ``torch.compile`` (``anyloom.generation.engine.use_compile``).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from anyloom.config import added_field
from anyloom.generation.cfg import GuidanceConfig
from anyloom.generation.engine import COMPILE_MODES, CompileMode
from anyloom.generation.sampling import ModalitySampling, SamplingConfig

ImageDecoderKind = Literal["vq", "diffusion"]
# the LM's weights and KV cache at generation: fp32; bf16; native_bf16, bf16 where the device multiplies it natively
# (a CUDA GPU with bf16, a CPU with AMX tiles or AVX-512 BF16) and fp32 elsewhere. An export saved in bf16 runs in
# bf16 whatever this says (it never existed in fp32)
Precision = Literal["fp32", "bf16", "native_bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
VocoderKind = Literal["auto", "griffin_lim", "neural"]


@dataclass(frozen=True)
class ScorerSpec:
    """One reranking term: a scorer's name (``anyloom.generation.scorers``: built in or a plug-in) and its weight."""

    name: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        from anyloom.generation.scorers import scorer_names

        if self.name not in scorer_names():
            near = difflib.get_close_matches(self.name, scorer_names(), n=1, cutoff=0.5)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"scorer {self.name!r} is unknown{hint}; known: {', '.join(scorer_names())}")
        if not math.isfinite(self.weight):
            raise ValueError(f"scorer {self.name!r}: weight must be a finite number, got {self.weight}")


@dataclass(frozen=True)
class GenerationConfig:
    text: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    image: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.9))
    audio: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.8, top_p=0.9))
    image_cfg_scale: float = 2.0  # 1 = no guidance
    audio_cfg_scale: float = 1.5
    # reranking (generation/scorers.py): sample this many candidates per prompt and keep the one with the highest
    # weighted sum of the listed scorers; 1 = the first sample, no reranking
    image_candidates: int = 1
    image_scorers: tuple[ScorerSpec, ...] = (ScorerSpec("lm_reverse"),)
    audio_candidates: int = 1
    audio_scorers: tuple[ScorerSpec, ...] = (ScorerSpec("lm_reverse"),)
    # text from an image or speech prompt: the greedy text and text_candidates - 1 texts sampled at
    # text_candidate_temperature (a text-only prompt keeps its greedy text); the default scorers are a noisy channel,
    # log p(text | prompt) + 0.3 * log p(prompt | text)
    text_candidates: int = 1
    text_candidate_temperature: float = 1.5
    text_scorers: tuple[ScorerSpec, ...] = (ScorerSpec("lm_forward"), ScorerSpec("lm_reverse", 0.3))
    # a mixed reply (to="any"): sample this many replies and keep one of the form most of them take (the kinds of
    # their picture and speech spans, in order), the one whose spans score highest under the image and audio
    # scorers above (each span's scores standardised over the candidates); 1 = the first sample, no reranking
    reply_candidates: int = added_field(1)
    max_text_tokens: int = 48  # a generated text ends at eos or after this many tokens
    max_audio_seconds: float = 4.0  # a generated audio span is closed after this long
    seed: int = 0
    # how image codes become pixels: "vq", the image tokenizer's own decoder; "diffusion", the diffusion decoder a
    # run trained (the diffusion_decoder stage, decoders/diffusion.py) refining that decode (seeded by the request)
    image_decoder: ImageDecoderKind = added_field("vq")
    # how speech codes become a wave: "griffin_lim", the audio tokenizer's own decode (Griffin-Lim for the mel
    # tokenizer, a waveform codec's decoder otherwise); "neural", the vocoder a run trained for its mel tokenizer
    # (the vocoder stage, decoders/vocoder.py); "auto", the neural one where the run has it (it wins on every
    # measure: docs/BENCHMARKS.md, "Neural vocoder")
    vocoder: VocoderKind = added_field("auto", neutral="griffin_lim")
    # compile the decode step: "auto" does on CUDA only. On the CPU a compiled step decodes at ~2.3x HF generate,
    # but each (rows, cache length) costs ~10 s to build, more than an evaluation's calls of many shapes save;
    # "always" pays for long runs of one shape (docs/BENCHMARKS.md "Generation")
    compile: CompileMode = "auto"
    # the LM's precision (Precision above; load() applies it). On a 2-core CPU with AVX-512 BF16, bf16 sampled the
    # world's pictures 1.2x faster than fp32, with other samples and scores (docs/BENCHMARKS.md, "Generation")
    precision: Precision = added_field("fp32")

    def __post_init__(self) -> None:
        if self.max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {self.max_text_tokens}")
        if self.text_candidate_temperature <= 0:
            raise ValueError(f"text_candidate_temperature must be > 0, got {self.text_candidate_temperature}")
        for name in ("image_scorers", "audio_scorers", "text_scorers"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty: list at least one scorer (e.g. [{{name: lm_reverse}}])")
        for name in ("image_candidates", "audio_candidates", "text_candidates", "reply_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_audio_seconds <= 0:
            raise ValueError(f"max_audio_seconds must be > 0, got {self.max_audio_seconds}")
        GuidanceConfig(self.image_cfg_scale, self.audio_cfg_scale)  # validates the scales
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile={self.compile!r}: expected one of {', '.join(COMPILE_MODES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")

    def scorers(self, to: str) -> tuple[ScorerSpec, ...]:
        """The reranking terms of target modality ``to``."""
        return {"text": self.text_scorers, "image": self.image_scorers, "audio": self.audio_scorers}[to]

    def candidates(self, to: str) -> int:
        return {"text": self.text_candidates, "image": self.image_candidates, "audio": self.audio_candidates}[to]

    def lm_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the LM generates in on ``device`` (``precision``)."""
        from anyloom.device import native_bf16

        bf16 = self.precision == "bf16" or (self.precision == "native_bf16" and native_bf16(device))
        return torch.bfloat16 if bf16 else torch.float32

    @property
    def sampling(self) -> ModalitySampling:
        return ModalitySampling(text=self.text, image=self.image, audio=self.audio)

    @property
    def guidance(self) -> GuidanceConfig:
        return GuidanceConfig(image_scale=self.image_cfg_scale, audio_scale=self.audio_cfg_scale)

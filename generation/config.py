"""The generation slice of a recipe (``generation:``): per-modality sampling defaults, guidance, lengths, seed.

The defaults are starting points, not tuned values: text greedy (captions and transcripts are judged exactly),
images and speech sampled with a nucleus, classifier-free guidance on for image and audio spans (the task mixture
trains the unconditional model through condition dropout). Any of them can be overridden per call. ``compile``
picks whether the decode step runs under ``torch.compile`` (``anyloom.generation.engine.use_compile``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from anyloom.generation.cfg import GuidanceConfig
from anyloom.generation.engine import COMPILE_MODES, CompileMode
from anyloom.generation.sampling import ModalitySampling, SamplingConfig


@dataclass(frozen=True)
class GenerationConfig:
    text: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    image: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.9))
    audio: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.8, top_p=0.9))
    image_cfg_scale: float = 2.0  # 1 = no guidance
    audio_cfg_scale: float = 1.5
    # self-reranking (generation/rerank.py): sample this many images per prompt and keep the one under which the
    # model finds the prompt most likely (image -> prompt direction); 1 = the first sample, no reranking
    image_candidates: int = 1
    # who picks among image candidates: "model" (the LM's image -> prompt direction, above) or "matcher" (the run's
    # image-text matcher, generation/matcher.py, trained in the image_matcher stage: it looks at the decoded pixels)
    image_reranker: Literal["model", "matcher"] = "model"
    # ... minus this weight times log of the candidate's round-trip error through the image tokenizer (the mean squared
    # pixel change of decode(encode(picture)), generation/rerank.py): a picture the tokenizer cannot reproduce lies
    # off the pictures it was trained on, and most such candidates are malformed (0 = the reranker's score alone)
    image_round_trip_weight: float = 0.0
    # ... plus this weight times the matcher's region consistency of the candidate (generation/matcher.py: the least
    # sure object's log-probability of the shape / colour the picture's objects hold most; needs a matcher trained
    # with region_keys): a picture with one object unlike the others scores low (0 = not used)
    image_region_weight: float = 0.0
    # the same for speech: the candidate under which the model's speech -> text direction finds the prompt most likely
    audio_candidates: int = 1
    # ... plus this weight times the candidate's own mean log-likelihood per frame, log p(speech | prompt) / frames:
    # of utterances that all map back to the prompt, the one the model finds most typical (0 = the reverse score alone)
    audio_likelihood_weight: float = 0.0
    # text from an image or speech prompt: 1 = the greedy text alone; n > 1 adds n - 1 texts sampled at
    # text_candidate_temperature and keeps the one with the highest log p(text | prompt) + text_channel_weight *
    # log p(prompt | text), the reverse direction judging how well the text explains the prompt (a noisy channel)
    text_candidates: int = 1
    text_candidate_temperature: float = 1.5
    text_channel_weight: float = 0.3
    max_text_tokens: int = 48  # a generated text ends at eos or after this many tokens
    max_audio_seconds: float = 4.0  # a generated audio span is closed after this long
    seed: int = 0
    # compile the decode step: "auto" does where it was measured to pay (CUDA; on CPU the one-off compile of tens
    # of seconds outweighs the per-token saving for generation lengths we use; docs/BENCHMARKS.md "Generation")
    compile: CompileMode = "auto"

    def __post_init__(self) -> None:
        if self.max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {self.max_text_tokens}")
        for name in ("audio_likelihood_weight", "image_round_trip_weight", "image_region_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.text_candidate_temperature <= 0 or self.text_channel_weight < 0:
            raise ValueError(f"text_candidate_temperature must be > 0 and text_channel_weight >= 0, got "
                             f"{self.text_candidate_temperature} and {self.text_channel_weight}")
        for name in ("image_candidates", "audio_candidates", "text_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_audio_seconds <= 0:
            raise ValueError(f"max_audio_seconds must be > 0, got {self.max_audio_seconds}")
        GuidanceConfig(self.image_cfg_scale, self.audio_cfg_scale)  # validates the scales
        if self.image_reranker not in ("model", "matcher"):
            raise ValueError(f"image_reranker must be 'model' or 'matcher', got {self.image_reranker!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile={self.compile!r}: expected one of {', '.join(COMPILE_MODES)}")

    @property
    def sampling(self) -> ModalitySampling:
        return ModalitySampling(text=self.text, image=self.image, audio=self.audio)

    @property
    def guidance(self) -> GuidanceConfig:
        return GuidanceConfig(image_scale=self.image_cfg_scale, audio_scale=self.audio_cfg_scale)

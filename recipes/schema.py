"""The shape of a recipe: one typed section per component, each component reading only its own slice.

Components own their config dataclasses; this file only composes them. To add a section, import the
component's config class and add one field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from anyloom.config import added_field
from anyloom.data.openmoji import OpenMojiConfig
from anyloom.data.prepare import DataConfig
from anyloom.evaluation.run_eval import EvalConfig
from anyloom.generation.config import GenerationConfig
from anyloom.sequences.config import SequenceConfig
from anyloom.tokenizers.text import TextTokenizerConfig
from anyloom.training.audio_tokenizer import AudioTokenizerStageConfig
from anyloom.training.diffusion_decoder import DiffusionDecoderStageConfig
from anyloom.training.image_tokenizer import ImageTokenizerStageConfig
from anyloom.training.init import InitConfig
from anyloom.training.matcher import MatcherStageConfig
from anyloom.training.optim import OptimConfig
from anyloom.training.parallel import ParallelConfig
from anyloom.training.run import RunConfig
from anyloom.training.train_config import TrainConfig
from anyloom.training.vocoder import VocoderStageConfig
from anyloom.transformer.model import ModelConfig
from anyloom.world.dataset import WorldConfig

# The stages of the chain behind `make train`, in the only order they can run (training/chain.py).
STAGES = ("data", "text_tokenizer", "image_tokenizer", "diffusion_decoder", "image_matcher", "audio_tokenizer",
          "vocoder", "pretokenize", "lm", "export", "eval")
Stage = Literal["data", "text_tokenizer", "image_tokenizer", "diffusion_decoder", "image_matcher", "audio_tokenizer",
                "vocoder", "pretokenize", "lm", "export", "eval"]
# The default chain; the diffusion decoder is an optional research stage (recipes/diffusion_decoder.yaml). The neural
# vocoder is in it: it trains where the audio tokenizer is a mel tokenizer (and says it is skipped elsewhere).
DEFAULT_STAGES = tuple(s for s in STAGES if s != "diffusion_decoder")


@dataclass(frozen=True)
class PipelineConfig:
    stages: tuple[Stage, ...] = DEFAULT_STAGES  # a subset runs only those stages (each needs its predecessors' outputs)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: empty; nothing to run")
        order = [STAGES.index(s) for s in self.stages]
        if order != sorted(set(order)):
            raise ValueError(f"stages must be distinct and in pipeline order {STAGES}, got {self.stages}")


@dataclass(frozen=True)
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)  # where the run directory goes, seed, device
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # which stages `make train` runs
    optim: OptimConfig = field(default_factory=OptimConfig)  # the LM's optimizer and lr schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # the LM training loop
    model: ModelConfig = field(default_factory=ModelConfig)  # the LM's architecture and kernels
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # FSDP2, activation checkpointing, compile
    # the audio tokenizer (mel RVQ or waveform codec) and its training
    audio_tokenizer: AudioTokenizerStageConfig = field(default_factory=AudioTokenizerStageConfig)
    text_tokenizer: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)  # BPE size, extra corpus
    sequences: SequenceConfig = field(default_factory=SequenceConfig)  # span layout, task mixture, pre-tokenization
    diffusion_decoder: DiffusionDecoderStageConfig = field(default_factory=DiffusionDecoderStageConfig)  # image decoder
    vocoder: VocoderStageConfig = added_field(VocoderStageConfig())  # the mel tokenizer's neural vocoder
    image_tokenizer: ImageTokenizerStageConfig = field(default_factory=ImageTokenizerStageConfig)  # image VQ + training
    # the image-text matcher that scores text->image candidates (the "matcher" scorer of generation.image_scorers)
    image_matcher: MatcherStageConfig = field(default_factory=MatcherStageConfig)
    # where the documents come from (the world, OpenMoji or the user's manifests) and how they reach the tokenizers
    data: DataConfig = field(default_factory=DataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)  # data.source world: sizes, seed, speech, hold-out
    openmoji: OpenMojiConfig = field(default_factory=OpenMojiConfig)  # data.source openmoji: emoji pictures, names
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out evaluation after training
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # sampling per modality, CFG scales, lengths
    # start from an existing model (an imported checkpoint, an exported run): its weights, vocabulary, tokenizers
    init: InitConfig = added_field(InitConfig())

"""What the web demo does with one request, apart from the page: inputs in the user's terms -> a typed answer.

The page (``demo/app.py``) only lays out widgets; everything a request means is here, so it is tested without a
browser: the prompt from a text, an uploaded picture and an uploaded or recorded sound; the target; the sampling
settings; the answer as a picture, a sound or a text, with the reranked candidates and their scores; and a readable
message, never a traceback, for a corrupt picture, an empty recording or a prompt the model cannot take.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anyloom.generation.constraints import GrammarError
from anyloom.generation.pipeline import (
    GeneratedAudio,
    GeneratedImage,
    GeneratedReply,
    GeneratedText,
    OutOfDomainWarning,
    Pipeline,
    PipelineError,
    as_audio_segment,
    as_image_segment,
)

# the page's words for the targets -> the pipeline's ("reply": the model's own mix of text, picture and speech)
TARGETS = {"text": "text", "picture": "image", "speech": "audio", "reply": "any"}


@dataclass
class Settings:
    temperature: float = 1.0
    top_p: float = 0.9
    cfg_scale: float = 2.0
    candidates: int = 4
    seed: int = 0
    image_decoder: str = "vq"  # or "diffusion", where the run has a diffusion decoder
    vocoder: str = "griffin_lim"  # or "neural", where the run has a neural vocoder


@dataclass
class Answer:
    """One request's result: one of picture / sound / text (a mixed reply: its text and its first picture and sound),
    or only ``message`` when it was refused."""

    picture: Image.Image | None = None
    sound: tuple[int, np.ndarray] | None = None  # (sample_rate, wave)
    text: str | None = None
    gallery: list[tuple[Image.Image, str]] = field(default_factory=list)  # picture candidates, "score -12.3"
    scores: list[tuple[str, float]] = field(default_factory=list)  # every candidate: (what it is, its score)
    message: str = ""  # what went wrong (refusals), or the warnings of an out-of-domain prompt

    @property
    def refused(self) -> bool:
        return self.picture is None and self.sound is None and self.text is None


class DemoSession:
    """A loaded run and what the demo does with a request (:meth:`answer`)."""

    def __init__(self, pipe: Pipeline, run: str | Path):
        self.pipe = pipe
        self.run = Path(run)

    @property
    def targets(self) -> list[str]:
        """The targets this run can produce (a run without an audio tokenizer cannot speak; a mixed reply needs a
        picture or speech to mix in)."""
        picture, speech = self.pipe.image_tokenizer is not None, self.pipe.audio_tokenizer is not None
        have = {"text": True, "picture": picture, "speech": speech, "reply": picture or speech}
        return [t for t, ok in have.items() if ok]

    @property
    def defaults(self) -> Settings:
        """The run's own generation settings (its recipe's ``generation:`` section), as the page's starting values."""
        cfg = self.pipe.config
        return Settings(temperature=cfg.image.temperature, top_p=cfg.image.top_p or 1.0,
                        cfg_scale=cfg.image_cfg_scale, candidates=max(cfg.image_candidates, 1), seed=cfg.seed,
                        image_decoder=cfg.image_decoder, vocoder=self.pipe.vocoder_kind(cfg.vocoder))

    @property
    def image_decoders(self) -> list[str]:
        return ["vq", "diffusion"] if self.pipe.diffusion is not None else ["vq"]

    @property
    def vocoders(self) -> list[str]:
        return ["griffin_lim", "neural"] if self.pipe.vocoder is not None else ["griffin_lim"]

    def preview(self, picture: str | None) -> tuple[Image.Image | None, str]:
        """An uploaded picture to show beside the upload, or why it cannot be used."""
        if not picture:
            return None, ""
        try:
            return Image.fromarray(as_image_segment(picture).pixels), ""
        except (PipelineError, FileNotFoundError) as e:
            return None, f"⚠️ {_shown(e, picture)}"

    def prompt(self, text: str | None, picture: str | None, sound: str | None) -> list[Any]:
        """The prompt's segments (picture, sound, text in that order); a bad upload raises PipelineError."""
        segments: list[Any] = []
        if picture:
            segments.append(as_image_segment(picture))
        if sound:
            segments.append(as_audio_segment(sound))
        if text and text.strip():
            segments.append(text.strip())
        if not segments:
            raise PipelineError("type a prompt, or upload a picture or a recording")
        return segments

    def answer(self, text: str | None, target: str, picture: str | None = None, sound: str | None = None,
               settings: Settings | None = None, on_step: Callable[[Any], None] | None = None) -> Answer:
        """Generate ``target`` ("text" / "picture" / "speech" / "reply") from the inputs; refusals become
        ``message``. A reply samples ``settings.candidates`` replies and keeps one (``Pipeline.reply``); its pictures
        and speech sample with the run's settings."""
        import warnings

        settings = settings or self.defaults
        try:
            if target not in TARGETS:
                raise PipelineError(f"choose what to make: {', '.join(TARGETS)}")
            if target not in self.targets:
                raise PipelineError(f"this run cannot make {target}: it has no {TARGETS[target]} tokenizer")
            segments = self.prompt(text, picture, sound)
            to = TARGETS[target]
            options = dict(seed=int(settings.seed), candidates=max(1, int(settings.candidates)),
                           cfg_scale=float(settings.cfg_scale) if to != "text" else None, keep_candidates=True,
                           on_step=on_step)
            if to == "any":
                del options["keep_candidates"]  # one reply is kept; the others are not decoded
                options.update(vocoder=settings.vocoder)
            elif to != "text":  # text is greedy by the run's settings: captions and transcripts are judged exactly
                options.update(temperature=float(settings.temperature), top_p=float(settings.top_p))
            if to == "image":
                options.update(image_decoder=settings.image_decoder)
            if to == "audio":
                options.update(vocoder=settings.vocoder)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OutOfDomainWarning)  # shown on the page instead (out.warnings)
                out = self.pipe.generate(segments, to=to, **options)
        except (PipelineError, GrammarError, FileNotFoundError, ValueError) as e:
            return Answer(message=f"⚠️ {_shown(e, picture, sound)}")
        return _answer_of(out)


def _shown(error: Exception, *uploads: str | None) -> str:
    """The error's text with each upload's server-side path shortened to its file name (the name the user chose)."""
    text = str(error)
    for path in uploads:
        if path:
            text = text.replace(str(path), Path(path).name)
    return text


def _answer_of(out: Any) -> Answer:
    notes = " ".join(f"⚠️ {w}" for w in out.warnings)
    if isinstance(out, GeneratedReply):
        pictures, sounds = out.of(GeneratedImage), out.of(GeneratedAudio)
        scores = [("kept reply", out.score)] if out.score is not None else []
        return Answer(picture=pictures[0].image if pictures else None,
                      sound=(sounds[0].sample_rate, sounds[0].wave) if sounds else None, text=out.text,
                      scores=scores, message=notes)
    candidates = out.candidates or [out]
    scores = [(_label(c, i), c.score) for i, c in enumerate(candidates) if c.score is not None]
    if isinstance(out, GeneratedImage):
        gallery = [(c.image, f"#{i + 1}: score {c.score:.2f}" if c.score is not None else f"#{i + 1}")
                   for i, c in enumerate(candidates)]
        return Answer(picture=out.image, gallery=gallery, scores=scores, message=notes)
    if isinstance(out, GeneratedAudio):
        return Answer(sound=(out.sample_rate, out.wave), scores=scores, message=notes)
    assert isinstance(out, GeneratedText)
    return Answer(text=out.text, scores=scores, message=notes)


def _label(candidate: Any, i: int) -> str:
    if isinstance(candidate, GeneratedText):
        return f"#{i + 1}: {candidate.text!r}"
    if isinstance(candidate, GeneratedAudio):
        return f"#{i + 1}: {len(candidate.wave) / candidate.sample_rate:.1f} s of speech"
    return f"#{i + 1}: picture"

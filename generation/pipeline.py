"""The research API: load a trained run, turn segments into a prompt, generate, get typed outputs back.

    import anyloom.generation.pipeline as gp
    pipe = gp.load("runs/world")
    out = pipe.generate(text="two red circles", to="image")           # GeneratedImage(image=PIL.Image, codes)
    out = pipe.generate(image="scene.png", to="text")                 # GeneratedText(text, ids); or a PIL image / array
    out = pipe.generate(text="one blue star", to="audio", seed=3)     # GeneratedAudio(wave, sample_rate, codes)
    out = pipe.generate(audio="speech.wav", to="text")                # or audio=(wave, sample_rate)
    out = pipe.generate([{"image": "a.png"}, {"text": "and then"}], to="text")  # an interleaved prompt
    out.warnings                                                      # why the answer may be out of domain
    pipe.model, pipe.vocab, pipe.text_tokenizer, pipe.image_tokenizer, pipe.audio_tokenizer  # for experiments

What ``load`` accepts (the first match wins):

- a run directory ``runs/<name>/`` holding ``export/`` (``model.safetensors`` + ``config.json`` + ``vocab.json``,
  written by ``scripts/export.py``) and the tokenizers of its stages;
- an export folder itself (those three files).

Each tokenizer is looked up, in order, in ``<export>/<stage>/``, ``<run>/stages/<stage>/tokenizer/`` (where
``make train`` puts it), ``<run>/stages/<stage>/export/`` and ``<run>/stages/<stage>/`` with stage =
``text_tokenizer`` / ``image_tokenizer`` / ``audio_tokenizer``; a folder counts when it holds the tokenizer's
files (``text.model``; ``config.json`` + ``model.safetensors`` whose ``kind`` names a known image or audio
tokenizer). A modality the vocabulary does not have needs no tokenizer.
Explicit folders can be passed instead (``load(path, image_tokenizer="...")``).
The image-text matcher that the ``matcher`` scorer uses (``generation.image_scorers``) is looked up
in ``<export>/image_matcher/`` and ``<run>/stages/image_matcher/matcher/`` (or passed as ``image_matcher=``).

Prompts are built like the training templates (``anyloom.sequences.mixture``): ``<bos>``, the condition
segments, then the target's opening marker (``<boi>`` / ``<boa>``) for images and audio; the unconditional twin
for classifier-free guidance is ``<bos>`` + that marker (condition dropout trains exactly that).

Inputs far from the training data still get an answer, with a reason in ``warnings`` (also issued as an
:class:`OutOfDomainWarning`): words the text tokenizer never saw in training, pictures whose size or aspect ratio is
far from the training pictures'. A prompt that cannot fit the model's context is refused in its own units (seconds
of audio, tokens of text) before anything is sampled.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from anyloom.config import ConfigError, build
from anyloom.data.document import AudioSegment, ImageSegment, TextSegment
from anyloom.device import pick_device
from anyloom.generation.cfg import GuidanceConfig
from anyloom.generation.config import GenerationConfig
from anyloom.generation.constraints import GrammarConfig, StreamGrammar
from anyloom.generation.engine import StepEvent, generate
from anyloom.generation.sampling import SamplingConfig
from anyloom.generation.scorers import Candidates, Scorer, ScorerError, build_scorer
from anyloom.sequences.interleave import AudioIds, ImageIds, TextIds, TokSegment, encode_document, parse_stream
from anyloom.sequences.vocab import Vocabulary
from anyloom.tokenizers import registry
from anyloom.tokenizers.base import DecoderUnavailableError
from anyloom.tokenizers.registry import TokenizerFolderError, holds_tokenizer, holds_weights
from anyloom.transformer.model import ModelConfig, Transformer
from anyloom.weights import load_weights

Target = Literal["text", "image", "audio"]
TARGETS: tuple[str, ...] = ("text", "image", "audio")
STAGES = {"text": "text_tokenizer", "image": "image_tokenizer", "audio": "audio_tokenizer"}
EXPORT_FILES = ("model.safetensors", "config.json", "vocab.json")
RENDER_BATCH = 256  # pictures decoded per call of the image tokenizer's decoder
# a plain string with one of these endings and no spaces is taken for a file path given as text, and refused
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff")
# what a mixed reply (to="any") can be asked for
REPLY_OPTIONS = {"seed", "temperature", "cfg_scale", "max_text_tokens", "max_new_tokens", "max_audio_seconds",
                 "vocoder", "on_step", "candidates", "keep_first"}
SIZE_FACTOR = 2.0  # a picture more than this much larger or smaller than the training pictures gets a warning
ASPECT_TOLERANCE = 0.1  # ... and one whose aspect ratio differs by more than this share


class PipelineError(ValueError):
    """A run or export folder that cannot be loaded, or a prompt that cannot be encoded; names what is wrong."""


class RunNotFoundError(PipelineError, FileNotFoundError):
    """The run directory or export folder given to :func:`load` does not exist."""


class OutOfDomainWarning(UserWarning):
    """An input far from the training data: the answer is given, but it means little."""


@dataclass
class GeneratedText:
    text: str
    ids: list[int]  # text-tokenizer ids (no special tokens)
    finished: bool  # the model ended it (False: it reached max_text_tokens, where eos is forced)
    score: float | None = None  # with reranking: the kept text's weighted sum of the text scorers
    warnings: list[str] = field(default_factory=list)  # why the prompt is out of the training data's domain
    # keep_candidates=True: every distinct candidate with its score, best first (the kept one first of all)
    candidates: list[GeneratedText] = field(default_factory=list, repr=False)
    # keep_first=True: the first sample, before reranking (the output itself when nothing was reranked)
    first: Any = field(default=None, repr=False)


@dataclass
class GeneratedImage:
    image: Image.Image
    codes: torch.Tensor  # (h, w) image-tokenizer codes
    score: float | None = None  # with reranking: the kept candidate's weighted sum of the image scorers
    warnings: list[str] = field(default_factory=list)  # why the prompt is out of the training data's domain
    # keep_candidates=True: every candidate, decoded, with its score, best first (the kept one first of all)
    candidates: list[GeneratedImage] = field(default_factory=list, repr=False)
    # keep_first=True: the first sample, before reranking (the output itself when nothing was reranked)
    first: Any = field(default=None, repr=False)


@dataclass
class GeneratedAudio:
    wave: np.ndarray  # (T,) float32 mono in [-1, 1]
    sample_rate: int
    codes: torch.Tensor  # (Q, F) audio-tokenizer codes
    score: float | None = None  # with reranking: the kept utterance's weighted sum of the audio scorers
    warnings: list[str] = field(default_factory=list)  # why the prompt is out of the training data's domain
    # keep_candidates=True: every candidate, decoded, with its score, best first (the kept one first of all)
    candidates: list[GeneratedAudio] = field(default_factory=list, repr=False)
    # keep_first=True: the first sample, before reranking (the output itself when nothing was reranked)
    first: Any = field(default=None, repr=False)


@dataclass
class GeneratedReply:
    """``to="any"``: the model's own mixed reply, its segments in order (text, pictures and speech, each decoded)."""

    segments: list[GeneratedText | GeneratedImage | GeneratedAudio]
    ids: list[int]  # the generated stream (unified ids)
    finished: bool  # the model ended it (False: it reached the token budget, where eos is forced)
    warnings: list[str] = field(default_factory=list)
    # with reranking (reply_candidates > 1): the kept reply's summed standardised span scores (None: not reranked)
    score: float | None = None
    # keep_first=True: the first sampled reply, before reranking (the reply itself when nothing was reranked)
    first: Any = field(default=None, repr=False)

    @property
    def text(self) -> str:
        """The reply's text segments, joined."""
        return " ".join(s.text for s in self.segments if isinstance(s, GeneratedText))

    def of(self, kind: type) -> list[Any]:
        """The segments of one type (``GeneratedImage`` ...), in order."""
        return [s for s in self.segments if isinstance(s, kind)]


Generated = GeneratedText | GeneratedImage | GeneratedAudio
SegmentLike = str | Image.Image | TextSegment | ImageSegment | AudioSegment | dict
Segment = TextSegment | ImageSegment | AudioSegment
ImageLike = str | Path | Image.Image | np.ndarray | ImageSegment
AudioLike = str | Path | tuple[np.ndarray, int] | AudioSegment


@dataclass
class _Codes:
    """A reranked candidate before decoding: only the kept one is turned into a picture or a wave (the vocoder is most
    of a speech candidate's cost), and the matcher's pictures are decoded for scoring only."""

    codes: torch.Tensor  # image (h, w) or audio (Q, F) codes


# ---- loading ------------------------------------------------------------------------------------------------


def _is_export(folder: Path) -> bool:
    return all((folder / f).is_file() for f in EXPORT_FILES)


def find_export(path: Path) -> Path:
    """The LM export folder of a run directory (``<run>/export``) or the folder itself."""
    if not path.exists():
        raise RunNotFoundError(f"{path} does not exist (expected a run directory made by `make train`, or an export "
                               f"folder)")
    for candidate in (path, path / "export"):
        if _is_export(candidate):
            return candidate
    missing = [f for f in EXPORT_FILES if not (path / "export" / f).exists()]
    raise PipelineError(
        f"{path}: neither an export folder ({', '.join(EXPORT_FILES)}) nor a run directory with one in export/ "
        f"(missing there: {', '.join(missing)}); run `python scripts/export.py --run {path}` after training"
    )


def tokenizer_candidates(export: Path, stage: str) -> list[Path]:
    """The folders ``load`` looks in, in order, for the tokenizer of ``stage`` (module docstring)."""
    run = export.parent if export.name == "export" else export
    stage_dir = run / "stages" / stage
    return [export / stage, stage_dir / "tokenizer", stage_dir / "export", stage_dir]


def load_tokenizer(modality: str, folder: str | Path, device: torch.device | str = "cpu") -> Any:
    """One exported tokenizer folder (:func:`anyloom.tokenizers.registry.load_tokenizer`); errors as PipelineError."""
    try:
        return registry.load_tokenizer(modality, folder, device)
    except TokenizerFolderError as e:
        raise PipelineError(str(e)) from e


def _check_tokenizer(modality: str, tok: Any, vocab: Vocabulary, where: Path) -> None:
    if modality == "text":
        got, want = {"vocab_size": tok.vocab_size}, {"vocab_size": vocab.text_size}
    elif modality == "image":
        got = {"codebook_size": int(tok.codebook_size), "grid": tuple(tok.grid)}
        want = {"codebook_size": vocab.image_codebook_size, "grid": vocab.image_grid}
    else:
        got = {"codebook_size": int(tok.codebook_size), "num_codebooks": int(tok.num_codebooks)}
        want = {"codebook_size": vocab.audio_codebook_size, "num_codebooks": vocab.audio_num_codebooks}
    for key in got:
        if got[key] != want[key]:
            raise PipelineError(f"{where}: the {modality} tokenizer has {key}={got[key]} but the model's vocabulary "
                                f"expects {want[key]}; the folder belongs to another run")


def _find_diffusion_decoder(export: Path) -> Path | None:
    run = export.parent if export.name == "export" else export
    places = (export / "diffusion_decoder", run / "stages" / "diffusion_decoder" / "decoder")
    return next((folder for folder in places if holds_weights(folder)), None)


def _find_vocoder(export: Path) -> Path | None:
    run = export.parent if export.name == "export" else export
    places = (export / "vocoder", run / "stages" / "vocoder" / "vocoder")
    return next((folder for folder in places if holds_weights(folder)), None)


def _load_vocoder(folder: Path, tokenizer: Any, device: torch.device) -> Any:
    """The neural vocoder in ``folder``, checked against the run's audio tokenizer (a mel tokenizer with the same
    mel features)."""
    from anyloom.decoders.vocoder import MelVocoder
    from anyloom.tokenizers.audio_mel import MelTokenizer

    try:
        vocoder = MelVocoder.load(folder, device=device)
    except (ValueError, FileNotFoundError, ConfigError) as e:
        raise PipelineError(f"{folder}: not a vocoder folder ({e})") from e
    if not isinstance(tokenizer, MelTokenizer):
        raise PipelineError(f"{folder}: a neural vocoder reads mel frames, but this run's audio tokenizer is a "
                            f"{type(tokenizer).__name__}, which decodes waves itself")
    try:
        vocoder.check_features(tokenizer.cfg.features, "the run's audio tokenizer")
    except ValueError as e:
        raise PipelineError(f"{folder}: {e}; the folder belongs to another run") from e
    return vocoder


def _find_matcher(export: Path) -> Path | None:
    run = export.parent if export.name == "export" else export
    places = (export / "image_matcher", run / "stages" / "image_matcher" / "matcher")
    return next((folder for folder in places if holds_weights(folder)), None)


def load_lm(export: Path, device: str | torch.device = "cpu") -> tuple[Transformer, Vocabulary]:
    """The LM of an export folder (``model.safetensors`` + ``config.json`` + ``vocab.json``) in eval mode on
    ``device``, and its vocabulary; no tokenizers (``load`` adds them)."""
    saved = load_weights(export, device="cpu")
    if saved.vocab is None:
        raise PipelineError(f"{export}: no vocab.json; the model's id space is unknown")
    vocab = Vocabulary.from_dict(saved.vocab, source=str(export / "vocab.json"))
    try:
        model_cfg = build(ModelConfig, saved.config, prefix=str(export / "config.json"))
    except ConfigError as e:
        raise PipelineError(str(e)) from e
    if model_cfg.vocab_size < vocab.size:
        raise PipelineError(f"{export}: the model's vocab_size {model_cfg.vocab_size} is smaller than the "
                            f"vocabulary ({vocab.size} ids)")
    # built on the meta device and materialised in the weights' own dtype: a bf16 7B export never exists in fp32
    dtype = saved.state_dict["tok_embeddings.weight"].dtype if "tok_embeddings.weight" in saved.state_dict \
        else torch.float32
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # the RoPE tables (and any buffer); every parameter is overwritten below
    model.to(dtype)
    missing, unexpected = model.load_state_dict(saved.state_dict, strict=False)
    if missing or unexpected:
        raise PipelineError(f"{export / 'model.safetensors'}: weights do not match config.json: missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval(), vocab


def load(
    path: str | Path,
    *,
    device: str = "auto",
    config: GenerationConfig | None = None,
    text_tokenizer: str | Path | None = None,
    image_tokenizer: str | Path | None = None,
    audio_tokenizer: str | Path | None = None,
    image_matcher: str | Path | None = None,
    diffusion_decoder: str | Path | None = None,
    vocoder: str | Path | None = None,
) -> Pipeline:
    """A :class:`Pipeline` from a run directory or an export folder (module docstring: what is looked up where).

    ``config`` defaults to the run's recipe ``generation:`` section when ``<run>/recipe.yaml`` has one.
    """
    path, vocoder_folder = Path(path), vocoder
    export = find_export(path)
    dev = pick_device(device)
    model, vocab = load_lm(export, dev)

    explicit = {"text": text_tokenizer, "image": image_tokenizer, "audio": audio_tokenizer}
    needed = {"text": True, "image": vocab.image_codebook_size > 0, "audio": vocab.audio_codebook_size > 0}
    tokenizers: dict[str, Any] = {}
    for modality, stage in STAGES.items():
        if explicit[modality] is not None:
            folder = Path(explicit[modality])
        else:
            found = [c for c in tokenizer_candidates(export, stage) if holds_tokenizer(c, modality)]
            if not found:
                if needed[modality]:
                    tried = ", ".join(str(c) for c in tokenizer_candidates(export, stage))
                    raise PipelineError(f"no {modality} tokenizer for {path}: looked in {tried}")
                tokenizers[modality] = None
                continue
            folder = found[0]
        tok = load_tokenizer(modality, folder, dev)
        _check_tokenizer(modality, tok, vocab, folder)
        tokenizers[modality] = tok
    if config is None:
        config = _recipe_generation_config(export)
    if config.lm_dtype(dev) == torch.bfloat16:  # generation.precision (a bf16 export is bf16 already)
        model.to(torch.bfloat16)
    matcher = None
    folder = Path(image_matcher) if image_matcher is not None else _find_matcher(export)
    if folder is not None:
        from anyloom.matcher.model import ImageTextMatcher

        try:
            matcher = ImageTextMatcher.load(folder, device=dev)
        except (ValueError, FileNotFoundError) as e:
            raise PipelineError(f"{folder}: not an image-text matcher folder ({e})") from e
        if tokenizers["text"] is not None and matcher.cfg.text_vocab != tokenizers["text"].vocab_size:
            raise PipelineError(f"{folder}: the matcher reads {matcher.cfg.text_vocab} text ids but the text tokenizer "
                                f"has {tokenizers['text'].vocab_size}; the folder belongs to another run")
        image_tok = tokenizers["image"]
        if image_tok is not None and tuple(matcher.cfg.image_size) != tuple(image_tok.image_size):
            raise PipelineError(f"{folder}: the matcher reads {tuple(matcher.cfg.image_size)} pictures but the image "
                                f"tokenizer decodes {tuple(image_tok.image_size)}; the folder belongs to another run")
    diffusion = None
    folder = Path(diffusion_decoder) if diffusion_decoder is not None else _find_diffusion_decoder(export)
    if folder is not None and tokenizers["image"] is not None:
        from anyloom.decoders.diffusion import DiffusionDecoder

        try:
            diffusion = DiffusionDecoder.load(folder, device=dev)
        except (ValueError, FileNotFoundError, ConfigError) as e:
            raise PipelineError(f"{folder}: not a diffusion decoder folder ({e})") from e
        if tuple(diffusion.cfg.image_size) != tuple(tokenizers["image"].image_size):
            raise PipelineError(f"{folder}: the diffusion decoder makes {tuple(diffusion.cfg.image_size)} pictures "
                                f"but the image tokenizer decodes {tuple(tokenizers['image'].image_size)}; the folder "
                                f"belongs to another run")
    vocoder = None
    folder = Path(vocoder_folder) if vocoder_folder is not None else _find_vocoder(export)
    if folder is not None and tokenizers["audio"] is not None:
        vocoder = _load_vocoder(folder, tokenizers["audio"], dev)
    pipe = Pipeline(model, vocab, tokenizers["text"], tokenizers["image"], tokenizers["audio"], config, matcher,
                    diffusion, vocoder)
    pipe.image_decoder(config.image_decoder)  # a recipe that asks for a decoder the run lacks: refused now
    pipe.vocoder_kind(config.vocoder)
    for to in TARGETS:  # every listed scorer can serve this pipeline: refused now, not after minutes of sampling
        if to == "text" or tokenizers[to] is not None:
            try:
                pipe.scorers(to)
            except PipelineError as e:
                where = f"{export / 'image_matcher'} and <run>/stages/image_matcher/matcher"
                raise PipelineError(f"{path}: {e}" + (f" (looked in {where})" if matcher is None else "")) from e
    return pipe


def _recipe_generation_config(export: Path) -> GenerationConfig:
    import yaml

    run = export.parent if export.name == "export" else export
    recipe = run / "recipe.yaml"
    if recipe.is_file():
        section = (yaml.safe_load(recipe.read_text()) or {}).get("generation")
        if section:
            return build(GenerationConfig, section, prefix=f"{recipe}: generation")
    return GenerationConfig()


# ---- the pipeline -----------------------------------------------------------------------------------------------


class Pipeline:
    """A model, its vocabulary and its tokenizers; ``generate`` turns segments into a typed output."""

    def __init__(
        self,
        model: Transformer,
        vocab: Vocabulary,
        text_tokenizer: Any,
        image_tokenizer: Any | None,
        audio_tokenizer: Any | None,
        config: GenerationConfig | None = None,
        matcher: Any | None = None,
        diffusion: Any | None = None,
        vocoder: Any | None = None,
    ) -> None:
        self.model = model
        self.vocoder = vocoder  # a MelVocoder (decoders/vocoder.py) for the mel tokenizer, or None: vocoder="neural"
        self.matcher = matcher  # an ImageTextMatcher (matcher/model.py) or None; scorers may use it
        self.diffusion = diffusion  # a DiffusionDecoder (decoders/diffusion.py) or None: image_decoder="diffusion"
        self.vocab = vocab
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer
        self.audio_tokenizer = audio_tokenizer
        self.config = config or GenerationConfig()

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    # ---- prompts -------------------------------------------------------------------------------------------
    def segments(self, *, text: str | None = None, image: ImageLike | None = None,
                 audio: AudioLike | None = None) -> list[Segment]:
        """A prompt from keyword inputs, in the order image, audio, text: ``text`` a string, ``image`` a file path,
        PIL image, (H, W[, 3|4]) uint8 array or ImageSegment, ``audio`` a file path, ``(wave, sample_rate)`` or an
        AudioSegment."""
        out: list[Segment] = []
        if image is not None:
            out.append(as_image_segment(image))
        if audio is not None:
            out.append(as_audio_segment(audio))
        if text is not None:
            if not isinstance(text, str):
                raise PipelineError(f"text= expects a string, got {type(text).__name__}")
            out.append(TextSegment(text))
        if not out:
            raise PipelineError("nothing to generate from: pass text=, image= or audio=")
        return out

    def tokenize_segment(self, segment: SegmentLike) -> TokSegment:
        """One user segment -> its tokenizer's codes: str / TextSegment, PIL image / ImageSegment (H, W, 3)
        uint8, AudioSegment (wave, sample_rate), or a manifest-style dict ``{"text"|"image"|"audio": ...}``
        (image and audio values are file paths)."""
        segment = as_segment(segment)
        if isinstance(segment, TextSegment):
            if not segment.text.strip():
                raise PipelineError("empty text segment")
            return TextIds(np.asarray(self.text_tokenizer.encode(segment.text), dtype=np.int64))
        if isinstance(segment, ImageSegment):
            tok = self._need("image")
            pixels = _resize(segment.pixels, tuple(tok.image_size), segment.path)
            x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)  # (1, 3, H, W)
            with torch.no_grad():
                codes = tok.encode(x.to(self.device)).codes[0]  # (h, w)
            return ImageIds(codes.cpu().numpy())
        tok = self._need("audio")
        wave = torch.from_numpy(np.asarray(segment.wave, dtype=np.float32))[None]  # (1, T)
        with torch.no_grad():
            codes = tok.encode(wave.to(self.device), segment.sample_rate).codes[0]  # (Q, F)
        return AudioIds(codes.cpu().numpy())

    def prompt_segments(self, segments: SegmentLike | Sequence[SegmentLike]) -> list[TokSegment]:
        """A prompt (one segment or a sequence of them) -> its tokenized segments."""
        return [self.tokenize_segment(s) for s in _listed(segments)]

    def out_of_domain(self, segments: SegmentLike | Sequence[SegmentLike]) -> list[str]:
        """Why a prompt lies outside the training data (empty when nothing is noticed): words the text tokenizer
        never saw in training; pictures far from the training pictures' size or aspect ratio (they are resized)."""
        notes = []
        for segment in (as_segment(s) for s in _listed(segments)):
            if isinstance(segment, TextSegment):
                # a tokenizer that did not record its training words (an imported one) notices nothing here
                unseen = getattr(self.text_tokenizer, "unseen_words", lambda _: [])(segment.text)
                if unseen:
                    shown = ", ".join(repr(w) for w in unseen[:6]) + (", ..." if len(unseen) > 6 else "")
                    notes.append(f"{len(unseen)} word(s) never seen in training ({shown}): the answer is a guess "
                                 f"outside the training data")
            elif isinstance(segment, ImageSegment) and self.image_tokenizer is not None:
                note = _picture_note(segment, tuple(self.image_tokenizer.image_size))
                if note:
                    notes.append(note)
        return notes

    def prompt_ids(self, segments: SegmentLike | Sequence[SegmentLike], to: Target) -> list[int]:
        """``<bos>`` + the segments' spans (+ ``<boi>`` / ``<boa>`` when the target is an image / audio)."""
        return self._ids_of(self.prompt_segments(segments), to)

    def _ids_of(self, toks: list[TokSegment], to: Target) -> list[int]:
        return encode_document(toks, self.vocab, bos=True, eos=False).ids.tolist() + self._opener(to)

    def _opener(self, to: Target) -> list[int]:
        if to not in TARGETS:
            raise PipelineError(f"to={to!r}: expected one of {', '.join(TARGETS)}")
        if to != "text":
            self._need(to)
        return {"text": [], "image": [self.vocab.boi], "audio": [self.vocab.boa]}[to]

    def _need(self, modality: str) -> Any:
        tok = self.image_tokenizer if modality == "image" else self.audio_tokenizer
        if tok is None:
            raise PipelineError(f"this model has no {modality} tokenizer (its vocabulary has no {modality} codes)")
        return tok

    # ---- generation --------------------------------------------------------------------------------------------
    def generate(
        self,
        segments: SegmentLike | Sequence[SegmentLike] | None = None,
        to: Target | None = None,
        *,
        text: str | None = None,
        image: ImageLike | None = None,
        audio: AudioLike | None = None,
        **options: Any,
    ) -> Generated:
        """One prompt -> GeneratedImage / GeneratedAudio / GeneratedText.

        The prompt is given by keyword (``text=``, ``image=``, ``audio=``; :meth:`segments`) or, for interleaved
        prompts, as a list of segments. ``to`` defaults to an image for a text-only prompt and to text otherwise.
        Options: see :meth:`generate_batch`."""
        keywords = {k: v for k, v in (("text", text), ("image", image), ("audio", audio)) if v is not None}
        if segments is not None and keywords:
            raise PipelineError(f"give the prompt either as segments or by keyword ({', '.join(keywords)}=), not both")
        prompt = self.segments(**keywords) if keywords else segments
        if prompt is None:
            raise PipelineError("nothing to generate from: pass text=, image= or audio=")
        if to is None:
            to = "image" if all(isinstance(as_segment(s), TextSegment) for s in _listed(prompt)) else "text"
        return self.generate_batch([prompt], to, **options)[0]

    def reply(self, prompt: SegmentLike | Sequence[SegmentLike], **options: Any) -> GeneratedReply:
        """``to="any"`` for one prompt (:meth:`reply_batch`)."""
        return self.reply_batch([prompt], **options)[0]

    def reply_batch(self, prompts: Sequence[SegmentLike | Sequence[SegmentLike]], *, seed: int | None = None,
                    temperature: float | None = None, cfg_scale: float | None = None,
                    max_text_tokens: int | None = None, max_audio_seconds: float | None = None,
                    vocoder: str | None = None, on_step: Callable[[StepEvent], None] | None = None,
                    candidates: int | None = None, keep_first: bool = False) -> list[GeneratedReply]:
        """``to="any"``: the model continues each prompt with text and opens picture or speech spans itself (as many
        as fit the budget: ``max_text_tokens`` of text plus room for one picture and one utterance), constrained by
        the grammar so every reply parses; each span is decoded. The prompts decode as one left-padded batch.
        ``temperature`` sets the text's; pictures and speech sample with the config's, guided by ``cfg_scale``
        (default: the config's per modality) against the reply without the prompt; ``vocoder`` turns speech into
        waves. ``candidates`` (default: the config's ``reply_candidates``) samples that many replies per prompt from
        one prefill and keeps one (:meth:`_best_reply`); ``keep_first=True`` also returns each prompt's first sampled
        reply in ``first``."""
        cfg = replace(self.config, vocoder=self.vocoder_kind(vocoder or self.config.vocoder))
        n = cfg.reply_candidates if candidates is None else candidates
        if n < 1:
            raise PipelineError(f"candidates must be >= 1, got {n}")
        if max_text_tokens is not None:
            cfg = replace(cfg, max_text_tokens=max_text_tokens)
        if max_audio_seconds is not None:
            cfg = replace(cfg, max_audio_seconds=max_audio_seconds)
        if temperature is not None:
            cfg = replace(cfg, text=replace(cfg.text, temperature=temperature))
        toks, notes = self._read_prompts(prompts)
        ids = [self._ids_of(t, "text") for t in toks]
        has_image, has_audio = self.image_tokenizer is not None, self.audio_tokenizer is not None
        frames = max(1, int(round(cfg.max_audio_seconds * float(self.audio_tokenizer.frame_rate)))) if has_audio else 1
        grammar = StreamGrammar(self.vocab, GrammarConfig(allow_image=has_image, allow_audio=has_audio,
                                                          max_audio_frames=frames), device=self.device)
        budget = cfg.max_text_tokens + (grammar.image_span_cost if has_image else 0) + (
            grammar.audio_span_cost(frames) if has_audio else 0)
        for prompt, prompt_ids in zip(toks, ids):
            if len(prompt_ids) + budget > self.model.cfg.max_seq_len:
                raise PipelineError(self._too_long(prompt, len(prompt_ids), budget, "any"))
        guidance = GuidanceConfig(image_scale=cfg.image_cfg_scale if cfg_scale is None else cfg_scale,
                                  audio_scale=cfg.audio_cfg_scale if cfg_scale is None else cfg_scale)
        uncond = [[self.vocab.bos] for _ in ids] if guidance.active else None
        seed = cfg.seed if seed is None else seed
        out = generate(self.model, ids, grammar, budget, cfg.sampling,
                       torch.Generator(device=self.device).manual_seed(seed), guidance, uncond, on_step, cfg.compile,
                       samples=n)
        parsed = [parse_stream(stream, self.vocab, strict=True).segments for stream in out.sequences]

        def render(j: int, note: list[str]) -> GeneratedReply:
            parts: list[GeneratedText | GeneratedImage | GeneratedAudio] = []
            for seg in parsed[j]:
                if isinstance(seg, TextIds):
                    parts.append(GeneratedText(self.text_tokenizer.decode(seg.ids.tolist()), seg.ids.tolist(), True))
                else:
                    to = "image" if isinstance(seg, ImageIds) else "audio"
                    parts += self._render_many([torch.as_tensor(seg.codes, dtype=torch.long)], to, cfg.vocoder)
            stream = out.sequences[j]
            return GeneratedReply(parts, stream, bool(out.finished[j]) and len(stream) < budget, note)

        replies = []
        for i, (prompt_toks, note) in enumerate(zip(toks, notes)):  # prompt i's replies are rows i*n .. i*n + n-1
            kept, score = self._best_reply(parsed[i * n:(i + 1) * n], prompt_toks, cfg.vocoder) if n > 1 else (0, None)
            reply = replace(render(i * n + kept, note), score=score)
            if keep_first:
                reply = replace(reply, first=reply if kept == 0 else render(i * n, note))
            replies.append(reply)
        return replies

    def _read_prompts(self, prompts: Sequence[SegmentLike | Sequence[SegmentLike]]
                      ) -> tuple[list[list[TokSegment]], list[list[str]]]:
        """Each prompt's tokenized segments and its out-of-domain notes (each also warned, numbered in a batch). Files
        are read once; a path given as text is refused."""
        if not prompts:
            raise PipelineError("no prompts given")
        segments = [[as_segment(s) for s in _listed(p)] for p in prompts]
        notes = [self.out_of_domain(p) for p in segments]
        for i, prompt_notes in enumerate(notes):
            for note in prompt_notes:
                warnings.warn(f"prompt {i}: {note}" if len(segments) > 1 else note, OutOfDomainWarning, stacklevel=3)
        return [self.prompt_segments(p) for p in segments], notes

    def _best_reply(self, parsed: list[list[TokSegment]], toks: list[TokSegment], vocoder: str
                    ) -> tuple[int, float | None]:
        """Of several sampled replies to one prompt, the index of the one to keep and its score.

        The replies vote on their form (the kinds of their picture and speech spans, in order; ties go to the form
        sampled first), since which spans to open is the model's own decision. Among the replies of that form each
        span is scored by the config's scorers for its modality against the prompt (:meth:`score`), standardised
        over those replies so that pictures and speech weigh alike, and the reply with the highest sum is kept.
        Text segments are not scored. A form without spans, or held by one reply, keeps its first reply."""
        spans = [[s for s in segs if not isinstance(s, TextIds)] for segs in parsed]
        forms = [tuple("image" if isinstance(s, ImageIds) else "audio" for s in sp) for sp in spans]
        votes = {f: forms.count(f) for f in forms}
        form = max(votes, key=lambda f: (votes[f], -forms.index(f)))
        group = [j for j, f in enumerate(forms) if f == form]
        if len(group) == 1 or not form:
            return group[0], None
        total = np.zeros(len(group))
        for p, kind in enumerate(form):
            segs = [spans[j][p] for j in group]
            pool = Candidates(kind, [toks], [0] * len(group), segs, decode=lambda indices, segs=segs, kind=kind:
                              self._render_many([torch.as_tensor(segs[i].codes, dtype=torch.long) for i in indices],
                                                kind, vocoder))
            scores = self.score(pool).numpy()
            spread = scores.std()
            total += (scores - scores.mean()) / spread if spread > 0 else 0.0
        best = int(total.argmax())
        return group[best], float(total[best])

    def generate_batch(
        self,
        prompts: Sequence[SegmentLike | Sequence[SegmentLike]],
        to: Target = "image",
        *,
        seed: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        cfg_scale: float | None = None,
        max_text_tokens: int | None = None,
        max_new_tokens: int | None = None,
        max_audio_seconds: float | None = None,
        candidates: int | None = None,
        keep_candidates: bool = False,
        keep_first: bool = False,
        image_decoder: str | None = None,
        vocoder: str | None = None,
        on_step: Callable[[StepEvent], None] | None = None,
    ) -> list[Generated]:
        """Generate the ``to`` modality for every prompt, as one left-padded batch (``to="any"``: the model's own mixed
        replies, :meth:`reply_batch`).

        ``temperature`` / ``top_k`` / ``top_p`` / ``min_p`` / ``cfg_scale`` override the config for the target modality;
        ``seed`` (default: the config's) seeds the one torch.Generator the batch samples with. ``candidates``
        (default: the config's ``image_candidates`` / ``audio_candidates`` / ``text_candidates``) reranks: images
        and audio sample that many outputs per prompt and keep the one with the highest weighted sum of the
        config's scorers for the target (``generation/scorers.py``); text keeps the greedy output or one of
        ``candidates - 1`` sampled ones the same way (text from an image or speech prompt; a text-only prompt keeps
        its greedy output). ``keep_candidates=True`` also returns every candidate with its score in the result's
        ``candidates`` (best first; pictures and speech are then all decoded); ``keep_first=True`` the first sample,
        before reranking, in ``first`` (single-sample quality beside the reranked one). ``image_decoder`` ("vq" /
        "diffusion") overrides the config's for pictures (scorers always read the VQ decode), ``vocoder``
        ("griffin_lim" / "neural") the config's for speech. ``max_new_tokens``
        (transformers' name) caps a text at that many tokens before its end: ``max_text_tokens`` counts the end as
        well.
        """
        if max_new_tokens is not None:
            if max_text_tokens is not None and max_text_tokens != max_new_tokens + 1:
                raise PipelineError("give max_new_tokens or max_text_tokens, not both")
            max_text_tokens = max_new_tokens + 1
        if to == "any":  # the model's own mix: each span samples as configured, pictures draw with the VQ
            refused = {"top_k": top_k, "top_p": top_p, "min_p": min_p, "image_decoder": image_decoder,
                       "keep_candidates": keep_candidates or None}
            other = sorted(k for k, v in refused.items() if v is not None)
            if other:
                raise PipelineError(f"to='any' takes {', '.join(sorted(REPLY_OPTIONS))}; not {', '.join(other)}")
            return self.reply_batch(prompts, seed=seed, temperature=temperature, cfg_scale=cfg_scale,
                                    max_text_tokens=max_text_tokens, max_audio_seconds=max_audio_seconds,
                                    vocoder=vocoder, on_step=on_step, candidates=candidates, keep_first=keep_first)
        self._opener(to)  # an unknown target or a missing tokenizer: refused before anything runs
        cfg = self.config
        n = candidates if candidates is not None else cfg.candidates(to)
        if n < 1:
            raise PipelineError(f"candidates must be >= 1, got {n}")
        toks, notes = self._read_prompts(prompts)
        target_cfg: SamplingConfig = getattr(cfg, to)
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
        overrides = {k: v for k, v in given.items() if v is not None}
        cfg = replace(cfg, **{to: replace(target_cfg, **overrides)})
        if max_text_tokens is not None:
            cfg = replace(cfg, max_text_tokens=max_text_tokens)
        if max_audio_seconds is not None:
            cfg = replace(cfg, max_audio_seconds=max_audio_seconds)
        refine = to == "image" and self.image_decoder(image_decoder or cfg.image_decoder) == "diffusion"
        cfg = replace(cfg, vocoder=self.vocoder_kind(vocoder or cfg.vocoder))
        seed = cfg.seed if seed is None else seed
        results = self._generate(toks, to, n, cfg, seed, cfg_scale, on_step, keep_candidates, keep_first)
        if refine:
            results = self._refine(results, seed)
        return [replace(r, warnings=list(w)) if w else r for r, w in zip(results, notes)]

    def _generate(self, toks: list[list[TokSegment]], to: Target, n: int, cfg: GenerationConfig, seed: int,
                  cfg_scale: float | None, on_step: Callable[[StepEvent], None] | None, keep: bool = False,
                  keep_first: bool = False) -> list[Generated]:
        if to == "text":
            first = self._sample(toks, to, 1, cfg, seed, cfg_scale, on_step)
            rerank = [i for i, t in enumerate(toks) if any(not isinstance(s, TextIds) for s in t)]
            if n == 1 or not rerank:
                out = [replace(g, candidates=[g]) for g in first] if keep else first
            else:
                hot = replace(cfg, text=replace(cfg.text, temperature=cfg.text_candidate_temperature))
                sampled = self._sample([toks[i] for i in rerank], to, n - 1, hot, seed, cfg_scale, on_step)
                out = self._best_texts(first, sampled, toks, rerank, n - 1, keep)
            # the single sample of a text is its first (greedy by default) one
            return [replace(o, first=f) for o, f in zip(out, first)] if keep_first else out
        results = self._sample(toks, to, n, cfg, seed, cfg_scale, on_step, render=n == 1)
        if n == 1:
            out = [replace(g, candidates=[g]) for g in results] if keep else results
            return [replace(o, first=o) for o in out] if keep_first else out
        return self._best_candidates(results, toks, n, to, keep, keep_first, cfg.vocoder)

    def _sample(self, toks: list[list[TokSegment]], to: Target, n: int, cfg: GenerationConfig, seed: int,
                cfg_scale: float | None, on_step: Callable[[StepEvent], None] | None, render: bool = True
                ) -> list[Generated | _Codes]:
        """``n`` outputs per prompt (each prompt's side by side) from one left-padded batch, one prefill each;
        ``render=False`` leaves image and audio outputs as their codes (``_Codes``)."""
        ids = [self._ids_of(t, to) for t in toks]
        guidance: GuidanceConfig | None = None
        if to == "image":
            guidance = GuidanceConfig(image_scale=cfg.image_cfg_scale if cfg_scale is None else cfg_scale)
        elif to == "audio":
            guidance = GuidanceConfig(audio_scale=cfg.audio_cfg_scale if cfg_scale is None else cfg_scale)
        max_frames = 1
        if to == "audio":
            max_frames = max(1, int(round(cfg.max_audio_seconds * float(self.audio_tokenizer.frame_rate))))
        grammar = StreamGrammar(
            self.vocab,
            GrammarConfig(allow_image=False, allow_audio=False, stop_after_span=to != "text",
                          max_audio_frames=max_frames, min_text_tokens=1 if to == "text" else 0),
            device=self.device,
        )
        budget = {"text": cfg.max_text_tokens, "image": grammar.image_span_cost - 1,
                  "audio": grammar.audio_span_cost(max_frames) - 1}[to]
        for prompt, prompt_ids in zip(toks, ids):
            if len(prompt_ids) + budget > self.model.cfg.max_seq_len:
                raise PipelineError(self._too_long(prompt, len(prompt_ids), budget, to))
        uncond = [[self.vocab.bos, *self._opener(to)] for _ in ids] if guidance and guidance.active else None
        out = generate(
            self.model, ids, grammar, budget, cfg.sampling, torch.Generator(device=self.device).manual_seed(seed),
            guidance, uncond, on_step, cfg.compile, samples=n,
        )
        # the grammar forces eos in the last slot of the budget, so only an earlier eos is the model's own choice
        decoded = [self._decode(seq, to, done and len(seq) < budget) for seq, done in zip(out.sequences, out.finished)]
        if to == "text" or not render:
            return decoded
        return self._render_many([c.codes for c in decoded], to, cfg.vocoder)

    def _too_long(self, prompt: list[TokSegment], length: int, budget: int, to: Target) -> str:
        """Why a prompt does not fit the model's context, in the prompt's own units."""
        room = self.model.cfg.max_seq_len - budget  # prompt tokens that fit beside a reply of ``budget`` tokens
        context = (f"the model's context is {self.model.cfg.max_seq_len} tokens, {budget} of them kept for the {to} "
                   f"reply")
        audio = [s for s in prompt if isinstance(s, AudioIds)]
        if audio:
            q, rate = self.vocab.audio_num_codebooks, float(self.audio_tokenizer.frame_rate)
            seconds = sum(s.codes.shape[1] for s in audio) / rate
            other = length - sum(s.codes.size + 2 for s in audio)  # the prompt's tokens besides its audio spans
            fits = max(0.0, (room - other - 2 * len(audio)) / (q * rate))
            return (f"the prompt's audio is {seconds:.1f} s long; this model takes at most {fits:.1f} s of audio in "
                    f"this prompt ({context}); cut the recording")
        return f"the prompt is {length} tokens long; at most {room} fit ({context}); shorten it"

    def image_decoder(self, kind: str) -> str:
        """``kind`` checked against what this run has ("vq" always; "diffusion" when it trained one)."""
        if kind not in ("vq", "diffusion"):
            raise PipelineError(f"image_decoder={kind!r}: expected 'vq' or 'diffusion'")
        if kind == "diffusion" and self.diffusion is None:
            raise PipelineError("image_decoder='diffusion', but this run has no diffusion decoder (train one with the "
                                "diffusion_decoder stage: recipes/diffusion_decoder.yaml)")
        return kind

    def vocoder_kind(self, kind: str) -> str:
        """``kind`` checked against what this run has ("griffin_lim": the audio tokenizer's own decode, always;
        "neural" when the run trained a vocoder for its mel tokenizer; "auto": neural where there is one)."""
        if kind == "auto":
            return "neural" if self.vocoder is not None else "griffin_lim"
        if kind not in ("griffin_lim", "neural"):
            raise PipelineError(f"vocoder={kind!r}: expected 'auto', 'griffin_lim' or 'neural'")
        if kind == "neural" and self.vocoder is None:
            raise PipelineError("vocoder='neural', but this run has no neural vocoder (train one with the vocoder "
                                "stage: recipes/vocoder.yaml)")
        return kind

    def speech_decoder(self, kind: str) -> Any:
        """What turns speech codes into waves for vocoder ``kind``: the audio tokenizer itself, or the tokenizer whose
        decode goes through the neural vocoder (same codes, same ``AudioTokenizer`` contract)."""
        if self.vocoder_kind(kind) == "griffin_lim":
            return self.audio_tokenizer
        from anyloom.decoders.vocoder import VocodedMelTokenizer

        return VocodedMelTokenizer(self.audio_tokenizer, self.vocoder)

    def _refine(self, outputs: list[Any], seed: int) -> list[Any]:
        """Pictures redrawn by the diffusion decoder from their codes (seeded by ``seed``); a reranked output's
        candidates in one batch, the kept one being the first of them."""
        from anyloom.decoders.images import DiffusionImageDecoder

        decode = DiffusionImageDecoder(self.diffusion, seed=seed)
        out = []
        for o in outputs:
            group = o.candidates or [o]
            images = decode(self.image_tokenizer, torch.stack([c.codes for c in group]).to(self.device))
            group = [replace(c, image=im) for c, im in zip(group, images)]
            first = o.first
            if first is not None:  # keep_first: the first sample drawn the same way
                first = replace(first, image=decode(self.image_tokenizer, first.codes[None].to(self.device))[0])
            out.append(replace(o, image=group[0].image, candidates=group if o.candidates else [], first=first))
        return out

    def scorers(self, to: Target) -> list[Scorer]:
        """The config's scorers for target ``to``, built for this pipeline (PipelineError when one cannot serve it)."""
        specs = self.config.scorers(to)
        try:
            return [build_scorer(spec.name, self, to, where=f"generation.{to}_scorers") for spec in specs]
        except ScorerError as e:
            raise PipelineError(str(e)) from e

    def score(self, candidates: Candidates) -> torch.Tensor:
        """(N,) float64: each candidate's weighted sum of the config's scorers for its target, in the listed order."""
        total = torch.zeros(len(candidates), dtype=torch.float64)
        for spec, scorer in zip(self.config.scorers(candidates.to), self.scorers(candidates.to)):
            total += spec.weight * scorer(candidates)
        return total

    def _best_texts(self, first: list[GeneratedText], sampled: list[GeneratedText], toks: list[list[TokSegment]],
                    rerank: list[int], m: int, keep: bool = False) -> list[GeneratedText]:
        """For each prompt in ``rerank``: of its first text and its ``m`` sampled ones (duplicates scored once), the
        one with the highest score (:meth:`score`)."""
        pool: dict[int, list[GeneratedText]] = {}
        for j, i in enumerate(rerank):
            seen = {tuple(first[i].ids): first[i]}
            for g in sampled[j * m:(j + 1) * m]:
                seen.setdefault(tuple(g.ids), g)
            pool[i] = list(seen.values())
        flat = [(i, g) for i in rerank for g in pool[i]]
        texts = [TextIds(np.asarray(g.ids, dtype=np.int64)) for _, g in flat]
        scores = self.score(Candidates("text", toks, [i for i, _ in flat], texts)).tolist()
        best = list(first)
        scored: dict[int, list[GeneratedText]] = {i: [] for i in rerank}
        for (i, g), score in zip(flat, scores):
            scored[i].append(replace(g, score=score))
            if best[i].score is None or score > best[i].score:
                best[i] = replace(g, score=score)
        if keep:
            best = [replace(b, candidates=_best_first(scored.get(i, [b]))) for i, b in enumerate(best)]
        return best

    def _best_candidates(self, candidates: list[_Codes], toks: list[list[TokSegment]], n: int, to: Target,
                         keep: bool = False, keep_first: bool = False, vocoder: str | None = None
                         ) -> list[GeneratedImage | GeneratedAudio]:
        """Of each prompt's ``n`` consecutive candidates, the one with the highest score (:meth:`score`). Only the
        kept candidates are decoded, and those a scorer looks at (each one once)."""
        span = ImageIds if to == "image" else AudioIds
        pool = Candidates(to, toks, [i for i in range(len(toks)) for _ in range(n)],
                          [span(c.codes.cpu().numpy()) for c in candidates],
                          decode=lambda indices: self._render_many([candidates[j].codes for j in indices], to, vocoder))
        scores = self.score(pool).view(len(toks), n)
        kept = [i * n + k for i, k in enumerate(scores.argmax(dim=1).tolist())]
        best = [replace(out, score=float(scores[j // n, j % n])) for j, out in zip(kept, pool.outputs(kept))]
        if keep_first:  # each prompt's first sample (decoded once: the pool remembers what it decoded)
            firsts = [i * n for i in range(len(toks))]
            best = [replace(b, first=replace(f, score=float(scores[j // n, 0])))
                    for b, j, f in zip(best, firsts, pool.outputs(firsts))]
        if not keep:
            return best
        flat = scores.flatten().tolist()
        every = [replace(out, score=flat[j]) for j, out in enumerate(pool.outputs(list(range(len(candidates)))))]
        return [replace(b, candidates=_best_first(every[i * n:(i + 1) * n])) for i, b in enumerate(best)]

    def _decode(self, generated: list[int], to: Target, finished: bool) -> GeneratedText | _Codes:
        v = self.vocab
        if to == "text":
            text_ids = [t for t in generated if t < v.text_size]
            return GeneratedText(self.text_tokenizer.decode(text_ids), text_ids, finished)
        opener = self._opener(to)
        segments = parse_stream(opener + generated, v, strict=True).segments
        if len(segments) != 1:
            raise PipelineError(f"generated stream parsed into {len(segments)} segments, expected one {to} span")
        return _Codes(torch.as_tensor(segments[0].codes, dtype=torch.long))  # image (h, w), audio (Q, F)

    def _render_many(self, codes: list[torch.Tensor], to: Target, vocoder: str | None = None
                     ) -> list[GeneratedImage | GeneratedAudio]:
        """Codes -> pictures (the tokenizer's VQ decoder, RENDER_BATCH at a time: one picture per call was 3x slower)
        or waves (the audio tokenizer's decoder, or the neural vocoder when ``vocoder`` (default: the config's) is
        "neural"; one at a time: their lengths differ)."""
        if to == "image":
            from anyloom.decoders.images import decode_image_codes

            images = []
            for start in range(0, len(codes), RENDER_BATCH):
                chunk = torch.stack(codes[start:start + RENDER_BATCH]).to(self.device)
                try:
                    images += decode_image_codes(self.image_tokenizer, chunk)
                except DecoderUnavailableError as e:  # an imported tokenizer without a decoder says how to get one
                    raise PipelineError(f"cannot draw the picture: {e}") from e
            return [GeneratedImage(image, c) for image, c in zip(images, codes)]
        from anyloom.decoders.audio import decode_audio_codes

        speech = self.speech_decoder(vocoder or self.config.vocoder)
        out = []
        for c in codes:
            waves, sample_rate = decode_audio_codes(speech, c[None].to(self.device))
            out.append(GeneratedAudio(waves[0], sample_rate, c))
        return out


def _best_first(outputs: list[Any]) -> list[Any]:
    """Scored outputs, highest score first (a stable sort: ties keep the sampling order)."""
    return sorted(outputs, key=lambda g: -g.score)


def _listed(prompt: SegmentLike | Sequence[SegmentLike]) -> list[SegmentLike]:
    """One segment or a sequence of them -> a list."""
    if isinstance(prompt, (str, dict, Image.Image, TextSegment, ImageSegment, AudioSegment)):
        return [prompt]
    return list(prompt)


def as_segment(segment: SegmentLike) -> Segment:
    """A user segment as a Text/Image/AudioSegment (files read, dicts resolved); a plain string that looks like a
    picture or sound file is refused (pass it as ``image=`` / ``audio=``, or as ``TextSegment`` if it is text)."""
    if isinstance(segment, (TextSegment, ImageSegment, AudioSegment)):
        return segment
    if isinstance(segment, dict):
        if len(segment) != 1 or next(iter(segment)) not in TARGETS:
            raise PipelineError(f"a segment dict needs exactly one key of text / image / audio, got {sorted(segment)}")
        (key, value), = segment.items()
        if not isinstance(value, str):
            raise PipelineError(f"segment {key!r}: expected a string (text or a file path), got {value!r}")
        return {"text": TextSegment, "image": as_image_segment, "audio": as_audio_segment}[key](value)
    if isinstance(segment, str):
        name = segment.strip().lower()
        if name.endswith(IMAGE_SUFFIXES + AUDIO_SUFFIXES) and not any(c.isspace() for c in name):
            kind = "audio" if name.endswith(AUDIO_SUFFIXES) else "image"
            raise PipelineError(f"{segment!r} looks like a file path, not a text prompt: pass it as {kind}="
                                f"{segment!r} (or TextSegment({segment!r}) to mean the text)")
        return TextSegment(segment)
    if isinstance(segment, Image.Image):
        return as_image_segment(segment)
    raise PipelineError(f"cannot use {type(segment).__name__} as a prompt segment (expected text, a PIL image, "
                        "an ImageSegment / AudioSegment, or a {'text'|'image'|'audio': ...} dict)")


def as_image_segment(image: ImageLike) -> ImageSegment:
    """A picture from a file path, a PIL image or an (H, W), (H, W, 3) or (H, W, 4) uint8 array, as RGB."""
    if isinstance(image, ImageSegment):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        try:
            with Image.open(path) as im:
                return ImageSegment(np.asarray(im.convert("RGB")), path=str(path))
        except (OSError, Image.DecompressionBombError) as e:
            raise PipelineError(f"{path}: not a readable image ({e})") from e
    if isinstance(image, Image.Image):
        return ImageSegment(np.asarray(image.convert("RGB")))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise PipelineError(f"image=: expected an (H, W), (H, W, 3) or (H, W, 4) uint8 array, got "
                                f"{image.shape} {image.dtype}")
        return ImageSegment(np.asarray(Image.fromarray(image).convert("RGB")))
    raise PipelineError(f"image=: expected a file path, a PIL image or a uint8 array, got {type(image).__name__}")


def as_audio_segment(audio: AudioLike) -> AudioSegment:
    """Audio from a file path (any rate; channels averaged) or ``(wave, sample_rate)`` (wave (T,) or (T, C))."""
    if isinstance(audio, AudioSegment):
        return audio
    if isinstance(audio, (str, Path)):
        import soundfile as sf

        path = Path(audio)
        if not path.is_file():
            raise FileNotFoundError(f"audio file {path} does not exist")
        try:
            wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError) as e:
            raise PipelineError(f"{path}: not a readable audio file ({e})") from e
        if wave.shape[0] == 0:
            raise PipelineError(f"{path}: the audio file is empty")
        return AudioSegment(wave.mean(axis=1), int(sr), path=str(path))  # stereo -> mono
    if isinstance(audio, np.ndarray):
        raise PipelineError("audio=: an array needs its sample rate: pass audio=(wave, sample_rate)")
    if isinstance(audio, tuple) and len(audio) == 2 and isinstance(audio[1], (int, np.integer)):
        wave = np.asarray(audio[0], dtype=np.float32)
        if wave.ndim == 2:
            wave = wave.mean(axis=1)  # (T, C) -> mono
        if wave.ndim != 1 or wave.size == 0 or int(audio[1]) <= 0:
            raise PipelineError(f"audio=(wave, sample_rate): expected a non-empty (T,) or (T, C) wave and a positive "
                                f"rate, got {wave.shape} at {audio[1]}")
        return AudioSegment(wave, int(audio[1]))
    raise PipelineError(f"audio=: expected a file path or (wave, sample_rate), got {type(audio).__name__}")


def _picture_note(segment: ImageSegment, size: tuple[int, int]) -> str | None:
    """A warning for a picture far from the training pictures' ``size`` (H, W), or None."""
    h, w = segment.pixels.shape[:2]
    (th, tw), where = size, segment.path or "the picture"
    if (h, w) == (th, tw):
        return None
    aspect = abs(math.log((w / h) / (tw / th))) > math.log1p(ASPECT_TOLERANCE)
    scale = max(h / th, w / tw, th / h, tw / w) > SIZE_FACTOR
    if not (aspect or scale):
        return None
    how = "squashed (aspect ratio changed)" if aspect else "rescaled"
    return (f"{where} is {w}x{h}, far from the {tw}x{th} pictures the model was trained on; it was {how} to "
            f"{tw}x{th}, so the answer may mean little")


def _resize(pixels: np.ndarray, size: tuple[int, int], source: str | None) -> np.ndarray:
    pixels = np.array(pixels)  # a writable copy (torch.from_numpy refuses read-only PIL buffers)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise PipelineError(f"{source or 'image'}: expected (H, W, 3) uint8 RGB, got {pixels.shape} {pixels.dtype}")
    if tuple(pixels.shape[:2]) == tuple(size):
        return pixels
    im = Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.array(im)

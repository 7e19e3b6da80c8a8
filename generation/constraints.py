"""Modality-constrained decoding: a small state machine over the vocabulary that keeps every stream parseable.

The grammar (the same span layout ``anyloom.sequences.vocab.Vocabulary`` fixes and ``parse_stream`` reads):

- text: text ids; may open an image span (``boi``) or an audio span (``boa``) when allowed, or end (``eos``);
- image span: exactly ``h*w`` image codes (with a ``row_end`` after each row when the layout uses row ends,
  between the vocabulary's fixed prefix and suffix ids when it has them), then ``eoi`` is forced;
- audio span, ``flat`` pattern: frame-major levels ``q0 q1 .. q{Q-1}``, each slot only the codes of its level;
  ``eoa`` only at frame boundaries after at least one frame, forced at ``max_audio_frames``;
- audio span, ``delay`` pattern (MusicGen): steps of Q slots, level q delayed by q frames; slots before a
  level starts or after it ends hold ``audio_pad``. The model ends the audio by writing ``audio_pad`` at level
  0 (frame count F fixed there); the tail of the delay is then forced and ``eoa`` follows step F+Q-2.

State per row is three small integers (mode, offset in span, delay frame count), so the mask for a whole batch
is one gather from a precomputed table of "slot classes" (one (V,) boolean row each) plus the text row; every
step is vectorised over the batch. A token budget (tokens the engine may still write) closes spans in time:
a span is only opened when it can be finished, and audio ends early when the budget runs short, so streams
parse even when generation stops at ``max_new_tokens``.

Axis legend: B rows, V vocabulary, C slot classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anyloom.generation.sampling import AUDIO, IMAGE, TEXT
from anyloom.sequences.interleave import image_slot
from anyloom.sequences.vocab import Vocabulary

DONE = 3  # mode of a finished row: only pad follows


class GrammarError(ValueError):
    """A prompt that does not follow the stream grammar (e.g. an image span with the wrong number of codes)."""


@dataclass(frozen=True)
class GrammarConfig:
    allow_image: bool = True  # text may open an image span
    allow_audio: bool = True  # text may open an audio span
    stop_after_span: bool = False  # a row is finished when the span it is in (or opens) closes
    max_audio_frames: int = 256  # an audio span is closed after this many frames
    # eos is refused until a text row has written this many text tokens since the start or its last span:
    # asking for a caption must not return an empty one (after <eoi>, eos is also the end of a t2i document)
    min_text_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_audio_frames < 1:
            raise ValueError(f"max_audio_frames must be >= 1, got {self.max_audio_frames}")
        if self.min_text_tokens < 0:
            raise ValueError(f"min_text_tokens must be >= 0, got {self.min_text_tokens}")


@dataclass
class GrammarState:
    """Per-row state; all (B,) int64."""

    mode: torch.Tensor  # TEXT / IMAGE / AUDIO / DONE
    offset: torch.Tensor  # tokens written inside the current span (after boi / boa); in text: text tokens so far
    frames: torch.Tensor  # delay pattern: frame count once level 0 has ended, else -1

    def clone(self) -> GrammarState:
        return GrammarState(self.mode.clone(), self.offset.clone(), self.frames.clone())

    def repeat_rows(self, n: int) -> GrammarState:
        """Each row ``n`` times, side by side (row i -> rows i * n ... (i + 1) * n - 1)."""
        return GrammarState(*(x.repeat_interleave(n, 0) for x in (self.mode, self.offset, self.frames)))

    @property
    def done(self) -> torch.Tensor:
        return self.mode == DONE

    def modality(self) -> torch.Tensor:
        """Modality of the NEXT token (TEXT for done rows too: they only write pad): picks sampling / CFG."""
        return torch.where(self.mode == DONE, torch.full_like(self.mode, TEXT), self.mode)


class StreamGrammar:
    """The compiled grammar for one vocabulary: slot-class masks and vectorised ``mask`` / ``advance``."""

    def __init__(self, vocab: Vocabulary, config: GrammarConfig = GrammarConfig(), device: str | torch.device = "cpu"):
        self.vocab = vocab
        self.config = config
        self.device = torch.device(device)
        V = vocab.size
        self.has_image = vocab.image_codebook_size > 0
        self.has_audio = vocab.audio_codebook_size > 0 and vocab.audio_num_codebooks > 0
        self.Q = max(vocab.audio_num_codebooks, 1)
        # one level has no delay: the delay pattern with Q == 1 is the flat pattern
        self.delay = vocab.audio_pattern == "delay" and self.Q > 1
        self.span = vocab.image_span_length  # S tokens between boi and eoi

        def row(*ranges: tuple[int, int], ids: tuple[int, ...] = ()) -> torch.Tensor:
            m = torch.zeros(V, dtype=torch.bool)
            for lo, hi in ranges:
                m[lo:hi] = True
            for i in ids:
                m[i] = True
            return m

        classes: list[torch.Tensor] = [row(ids=(vocab.pad,))]  # class 0: done -> pad
        # image slots 0..S-1 (code, row_end or a fixed id of the layout), then slot S: eoi; one class per distinct
        # slot (a 1,024-code span has three), and image_class maps a slot to it
        slot_classes: dict[tuple[str, int], int] = {}
        image_class = []
        for k in range(self.span + 1) if self.has_image else ():
            slot = image_slot(vocab, k)
            key = (slot.kind, slot.token)
            if key not in slot_classes:
                slot_classes[key] = len(classes)
                ids = {"row_end": (vocab.row_end,), "end": (vocab.eoi,), "fixed": (slot.token,)}.get(slot.kind, ())
                classes.append(row(vocab.image_range) if slot.kind == "code" else row(ids=ids))
            image_class.append(slot_classes[key])
        self.image_class = torch.tensor(image_class or [0], dtype=torch.long, device=self.device)  # (S + 1,)
        # audio slot classes
        levels = [vocab.audio_range(q) for q in range(vocab.audio_num_codebooks)] if self.has_audio else []
        self.c_level = len(classes)
        classes.extend(row(levels[q]) for q in range(len(levels)))
        self.c_level0_or_eoa = len(classes)
        classes.append(row(levels[0], ids=(vocab.eoa,)) if levels else row())
        self.c_eoa = len(classes)
        classes.append(row(ids=(vocab.eoa,)))
        self.c_apad = len(classes)
        classes.append(row(ids=(vocab.audio_pad,)))
        self.c_level0_or_apad = len(classes)
        classes.append(row(levels[0], ids=(vocab.audio_pad,)) if levels else row())
        self.table = torch.stack(classes).to(self.device)  # (C, V)

        self.text_plain = row(vocab.text_range, ids=(vocab.eos,)).to(self.device)
        self.only_eos = row(ids=(vocab.eos,)).to(self.device)
        self.boi_row = row(ids=(vocab.boi,)).to(self.device)
        self.boa_row = row(ids=(vocab.boa,)).to(self.device)
        self.bos_row = row(ids=(vocab.bos,)).to(self.device)

    # ---- budgets ------------------------------------------------------------------------------------------
    @property
    def image_span_cost(self) -> int:
        """boi + S + eoi."""
        return self.span + 2

    @property
    def min_audio_span_cost(self) -> int:
        """boa + the shortest audio (one frame; with delay its Q-step tail) + eoa."""
        return (self.Q * self.Q if self.delay else self.Q) + 2

    def audio_span_cost(self, frames: int) -> int:
        """boa + F frames + eoa: the length of a complete audio span with ``frames`` frames."""
        body = (frames + self.Q - 1) * self.Q if self.delay else frames * self.Q
        return body + 2

    def tokens_to_close(self, state: GrammarState) -> torch.Tensor:
        """(B,) the fewest tokens each row needs to end its stream: close an open span, then eos if needed."""
        Q, k = self.Q, state.offset
        step, q = k // Q, k % Q
        after = 0 if self.config.stop_after_span else 1  # eos after a closed span
        need = torch.ones_like(k)  # text: eos
        need = torch.where(state.mode == IMAGE, self.span - k + 1 + after, need)
        if self.delay:
            min_frames = torch.where(q == 0, step.clamp(min=1), step + 1)
            frames = torch.where(state.frames >= 0, state.frames, min_frames)
            audio = (frames + Q - 1) * Q - k + 1
        else:
            audio = torch.where(q == 0, torch.where(step >= 1, 1, Q + 1), Q - q + 1)
        need = torch.where(state.mode == AUDIO, audio + after, need)
        return torch.where(state.done, 0, need)

    # ---- the mask -----------------------------------------------------------------------------------------
    def initial(self, batch: int) -> GrammarState:
        z = torch.zeros(batch, dtype=torch.long, device=self.device)
        return GrammarState(mode=z.clone(), offset=z.clone(), frames=z - 1)

    def mask(self, state: GrammarState, remaining: int | None = None, frame_limit: bool = True) -> torch.Tensor:
        """Allowed next ids (B, V) bool. ``remaining``: tokens the engine may still write, this one included;
        ``frame_limit=False`` lifts ``max_audio_frames`` (prompts may hold longer audio than we generate)."""
        budget = remaining if remaining is not None else 1 << 30
        cls = torch.zeros_like(state.mode)  # done rows -> class 0 (pad)
        img = state.mode == IMAGE
        cls = torch.where(img, self.image_class[state.offset.clamp(0, self.image_class.numel() - 1)], cls)
        in_audio = state.mode == AUDIO
        if self.has_audio and bool(in_audio.any()):  # most steps have no audio row: skip ~20 small ops
            cls = torch.where(in_audio, self._audio_class(state, budget, frame_limit), cls)
        allowed = self.table[cls]  # (B, V)
        text_row = self._text_row(budget)[None, :]  # (1, V)
        if self.config.min_text_tokens and budget > 1:
            too_short = ((state.mode == TEXT) & (state.offset < self.config.min_text_tokens))[:, None]  # (B, 1)
            text_row = torch.where(too_short, text_row & ~self.only_eos[None, :], text_row)
        return torch.where((state.mode == TEXT)[:, None], text_row, allowed)

    def _text_row(self, budget: int) -> torch.Tensor:
        if budget <= 1:
            return self.only_eos
        m = self.text_plain.clone()
        # an opened span must fit, and with stop_after_span it ends the row, else eos must still fit after it
        tail = 0 if self.config.stop_after_span else 1
        if self.config.allow_image and self.has_image and budget >= self.image_span_cost + tail:
            m |= self.boi_row
        if self.config.allow_audio and self.has_audio and budget >= self.min_audio_span_cost + tail:
            m |= self.boa_row
        return m

    def _audio_class(self, state: GrammarState, budget: int, frame_limit: bool) -> torch.Tensor:
        Q, k = self.Q, state.offset
        step, q = k // Q, k % Q
        level_cls = self.c_level + q
        at_limit = (step >= self.config.max_audio_frames) & frame_limit
        if not self.delay:
            # at a frame boundary: continuing costs a frame plus eoa
            must_end = at_limit | torch.tensor(budget < Q + 1, device=k.device)
            boundary = torch.where(step == 0, self.c_level, torch.where(must_end, self.c_eoa, self.c_level0_or_eoa))
            return torch.where(q == 0, boundary, level_cls)
        frames = state.frames
        open_ = frames < 0
        # F unknown: leading pads for levels that have not started, level 0 may continue or end
        must_end = at_limit | torch.tensor(budget < Q * Q + 1, device=k.device)
        lvl0 = torch.where(step == 0, self.c_level, torch.where(must_end, self.c_apad, self.c_level0_or_apad))
        unknown = torch.where(q == 0, lvl0, torch.where(step - q < 0, self.c_apad, level_cls))
        # F known: codes while the level's frame index is in [0, F), pads after, eoa after step F+Q-2
        frame_idx = step - q
        in_range = (frame_idx >= 0) & (frame_idx < frames)
        known = torch.where(in_range, level_cls, self.c_apad)
        known = torch.where(k >= (frames + Q - 1) * Q, self.c_eoa, known)
        return torch.where(open_, unknown, known)

    # ---- transitions --------------------------------------------------------------------------------------
    def advance(
        self,
        state: GrammarState,
        tokens: torch.Tensor,
        active: torch.Tensor | None = None,
        stop_after_span: bool | None = None,
    ) -> GrammarState:
        """The state after each row writes ``tokens`` (B,); rows where ``active`` is False keep their state.

        ``stop_after_span`` overrides the config (prompts pass False: a span closed inside the prompt, such as
        the image of an image->text prompt, must not finish the row).
        """
        v = self.vocab
        mode, offset, frames = state.mode, state.offset, state.frames
        stop = self.config.stop_after_span if stop_after_span is None else stop_after_span
        done_after_span = torch.full_like(mode, DONE if stop else TEXT)
        in_text, in_img, in_aud = mode == TEXT, mode == IMAGE, mode == AUDIO

        new_mode = mode.clone()
        new_mode = torch.where(in_text & (tokens == v.boi), IMAGE, new_mode)
        new_mode = torch.where(in_text & (tokens == v.boa), AUDIO, new_mode)
        new_mode = torch.where(in_text & (tokens == v.eos), DONE, new_mode)
        new_mode = torch.where(in_img & (tokens == v.eoi), done_after_span, new_mode)
        new_mode = torch.where(in_aud & (tokens == v.eoa), done_after_span, new_mode)
        opened = in_text & ((tokens == v.boi) | (tokens == v.boa))
        closed = (in_img & (tokens == v.eoi)) | (in_aud & (tokens == v.eoa))

        lo, hi = v.text_range
        wrote_text = in_text & (tokens >= lo) & (tokens < hi)
        new_offset = torch.where(in_img | in_aud | wrote_text, offset + 1, offset)
        new_offset = torch.where(opened | closed, 0, new_offset)
        new_frames = frames  # -1 outside audio spans (reset when a span opens or closes)
        if self.delay and bool(in_aud.any()):
            ends_level0 = in_aud & (frames < 0) & (offset % self.Q == 0) & (tokens == v.audio_pad)
            new_frames = torch.where(ends_level0, offset // self.Q, frames)
            new_frames = torch.where(opened | closed, -1, new_frames)
        if active is not None:
            new_mode = torch.where(active, new_mode, mode)
            new_offset = torch.where(active, new_offset, offset)
            new_frames = torch.where(active, new_frames, frames)
        return GrammarState(new_mode, new_offset, new_frames)

    def check_allowed(
        self, state: GrammarState, tokens: torch.Tensor, active: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Raise GrammarError naming the row when an active row's token is not allowed in its state.

        Used on prompts: in text, ``bos`` and both span openers are accepted whatever the config allows the
        model to open (a to-image prompt ends with ``boi``), and there is no token budget.
        """
        text_ok = self.text_plain | self.bos_row
        if self.has_image:
            text_ok = text_ok | self.boi_row
        if self.has_audio:
            text_ok = text_ok | self.boa_row
        allowed = torch.where((state.mode == TEXT)[:, None], text_ok[None, :], self.mask(state, frame_limit=False))
        ok = allowed.gather(1, tokens.clamp(0, self.vocab.size - 1)[:, None]).squeeze(1)
        ok &= (tokens >= 0) & (tokens < self.vocab.size)
        bad = active & ~ok
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            mode = ("text", "image span", "audio span", "finished stream")[int(state.mode[r])]
            raise GrammarError(
                f"prompt row {r}, token {int(positions[r])} of the prompt: {self.vocab.describe(int(tokens[r]))} "
                f"is not allowed here (inside the {mode}, {int(state.offset[r])} tokens into it)"
            )

    def state_after_prompts(self, prompts: torch.Tensor, valid: torch.Tensor) -> GrammarState:
        """Run the grammar over left-padded prompts (B, T) (``valid`` marks real tokens); checks each token."""
        state = self.initial(prompts.shape[0])
        start = (~valid).sum(dim=1)  # left padding per row
        for t in range(prompts.shape[1]):
            self.check_allowed(state, prompts[:, t], valid[:, t], t - start)
            state = self.advance(state, prompts[:, t], valid[:, t], stop_after_span=False)
        return state

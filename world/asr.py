"""The world's speech judge: the offline recogniser (``anyloom.evaluation.asr``) constrained by a JSGF grammar of
the world's captions, so its output is always a caption or the empty string (nothing recognised) and
``parse_caption`` reads every non-empty transcript."""

from __future__ import annotations

from anyloom.evaluation.asr import ASR_RATE, word_error_rate
from anyloom.evaluation.asr import SpeechJudge as _Recogniser
from anyloom.world.captions import caption_jsgf


class SpeechJudge(_Recogniser):
    """``transcribe`` mono waveforms into world captions (``grammar``: another JSGF grammar instead)."""

    def __init__(self, grammar: str | None = None) -> None:
        super().__init__(grammar or caption_jsgf())


__all__ = ["SpeechJudge", "word_error_rate", "ASR_RATE"]

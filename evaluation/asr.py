"""An offline speech recogniser as a judge: pocketsphinx (its bundled en-us acoustic model), nobody here trained it.

    SpeechJudge()                 the general US-English language model and dictionary: any English words
    SpeechJudge(grammar=jsgf)     constrained by a JSGF grammar: its output is a sentence of the grammar or ""

A judge remembers what it heard: the same waveform (same samples, same rate) is decoded once per judge, so an
evaluation's several looks at the original recordings cost one ASR pass. Waveforms are resampled to 16 kHz (the
model's rate) and padded with a little silence on both sides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from math import gcd

import numpy as np
from scipy.signal import resample_poly

ASR_RATE = 16000  # the rate of pocketsphinx's en-us acoustic model
PAD_SECONDS = 0.25  # silence on both sides: the decoder needs a little context for the first/last phone


class SpeechJudge:
    """``transcribe`` mono waveforms (float in [-1, 1]) into text."""

    def __init__(self, grammar: str | None = None) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError as e:
            raise RuntimeError("the speech judge needs the PyPI package 'pocketsphinx'") from e
        if grammar is None:
            self._decoder = Decoder(samprate=ASR_RATE, loglevel="FATAL")  # the default en-us LM and dictionary
        else:
            self._decoder = Decoder(lm=None, samprate=ASR_RATE, loglevel="FATAL")
            self._decoder.add_jsgf_string("grammar", grammar)
            self._decoder.activate_search("grammar")
        self._heard: dict[tuple[int, bytes], str] = {}  # (rate, digest of the samples) -> transcript

    def transcribe_one(self, wave: np.ndarray, sample_rate: int) -> str:
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"expected a mono waveform (T,), got shape {wave.shape}")
        key = (int(sample_rate), hashlib.blake2b(wave.tobytes(), digest_size=16).digest())
        if key not in self._heard:
            self._heard[key] = self._decode(wave, sample_rate)
        return self._heard[key]

    def _decode(self, wave: np.ndarray, sample_rate: int) -> str:
        if sample_rate != ASR_RATE:
            g = gcd(ASR_RATE, int(sample_rate))
            wave = resample_poly(wave, ASR_RATE // g, int(sample_rate) // g).astype(np.float32)
        pad = np.zeros(int(PAD_SECONDS * ASR_RATE), dtype=np.float32)
        pcm = np.clip(np.concatenate([pad, wave, pad]) * 32767.0, -32768, 32767).astype("<i2")
        self._decoder.start_utt()
        self._decoder.process_raw(pcm.tobytes(), full_utt=True)
        self._decoder.end_utt()
        hyp = self._decoder.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""

    def transcribe(self, waves: Sequence[np.ndarray], sample_rate: int) -> list[str]:
        """One transcript per waveform; "" where nothing was recognised."""
        return [self.transcribe_one(w, sample_rate) for w in waves]


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus WER (total edits / total reference words), via jiwer; empty hypotheses count as deletions."""
    import jiwer

    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("word_error_rate of nothing")
    if any(not r.strip() for r in refs):
        raise ValueError("a reference transcript is empty")
    out = jiwer.process_words(list(refs), [h if h.strip() else "" for h in hyps])
    return float(out.wer)


def grammar_judge(asr_grammar: str | None, where: str) -> SpeechJudge:
    """A judge constrained by the grammar of the plug-in ``asr_grammar`` (group ``anyloom.asr_grammars``), or the
    general model when None; ``where`` names the recipe key in errors."""
    from anyloom.plugins import load_plugin

    return SpeechJudge(load_plugin("anyloom.asr_grammars", asr_grammar, where=where)() if asr_grammar else None)


__all__ = ["SpeechJudge", "grammar_judge", "word_error_rate", "ASR_RATE"]

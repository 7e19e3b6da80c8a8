"""Self-reranking: score generated candidates by how well the same model maps them back to the prompt.

An any-to-any model is its own judge. For a text -> image request it also learned image -> text, so among N
sampled images the one under which the prompt's caption is most likely, log p(prompt | candidate), is the one
that shows the caption most clearly (DALL-E reranked with CLIP; here the reverse direction of the same model
plays CLIP's part, no second model). The score document is built exactly like a training document of the
reverse task (``anyloom.sequences.mixture``): ``<bos>`` candidate span, the prompt segments, ``<eos>``; only the
prompt's tokens (markers and ``<eos>`` included) are scored.

Captions are reranked the other way round, as a noisy channel: of the greedy caption and a few sampled ones, the
one with the highest log p(caption | image) + w * log p(image | caption) is kept; the second term is the
text -> image direction judging whether the caption explains the image (``generation/pipeline.py``).

Pictures also get a score of their own, with no prompt: the round-trip error through the image tokenizer,
how much decode(encode(picture)) changes it (``round_trip_error``). The tokenizer reproduces the kind of picture it
was trained on almost exactly; a sampled picture with a malformed object, a speck or two shapes run together is
off that manifold and changes more (an autoencoder's reconstruction error as an out-of-distribution score).

Axis legend: N candidates, T score-document length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from anyloom.matcher.model import to_unit
from anyloom.sequences.interleave import TokSegment, bidirectional_span_ids, encode_document
from anyloom.sequences.vocab import Vocabulary
from anyloom.transformer.model import Transformer


@torch.no_grad()
def document_log_likelihood(
    model: Transformer,
    vocab: Vocabulary,
    documents: Sequence[Sequence[TokSegment]],
    scored: Sequence[Sequence[bool]],
    batch_size: int = 64,
) -> torch.Tensor:
    """(N,) float64: for each document (``<bos>`` segments ``<eos>``, built like a training document), the sum of
    log p(token | tokens before it) over the segments flagged in ``scored`` (their markers, and ``<eos>`` when the
    last segment is scored, included). Unscored image spans are given bidirectionally, as in training. Documents
    are right-padded into batches of ``batch_size``; padding is never scored."""
    if len(documents) != len(scored):
        raise ValueError(f"{len(documents)} documents for {len(scored)} score masks")
    streams = [encode_document(doc, vocab, loss=flags) for doc, flags in zip(documents, scored)]
    device = model.tok_embeddings.weight.device
    scores = torch.zeros(len(streams), dtype=torch.float64)
    for start in range(0, len(streams), batch_size):
        chunk = streams[start:start + batch_size]
        t = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), t), vocab.pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), t, dtype=torch.bool)
        for row, s in enumerate(chunk):
            ids[row, : len(s)] = torch.from_numpy(s.ids)
            mask[row, : len(s)] = torch.from_numpy(s.loss_mask)
        ids, mask = ids.to(device), mask.to(device)
        inputs = ids[:, :-1]
        spans = bidirectional_span_ids(vocab, inputs, ~mask[:, :-1])  # the given spans, as in training
        logp = F.log_softmax(model.logits(model(inputs, span_ids=spans)).float(), dim=-1)  # (B, T-1, V)
        token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1): log p(token t+1 | tokens <= t)
        total = (token_logp * mask[:, 1:]).sum(dim=1)  # padding sits after each document: causal, never seen
        scores[start:start + len(chunk)] = total.double().cpu()
    return scores


def reverse_log_likelihood(
    model: Transformer,
    vocab: Vocabulary,
    candidates: Sequence[TokSegment],
    prompts: Sequence[Sequence[TokSegment]],
    batch_size: int = 64,
) -> torch.Tensor:
    """(N,) float64: sum of log p(prompt tokens | candidate) for each (candidate, prompt) pair.

    ``candidates[i]`` is the generated segment (e.g. ``ImageIds``), ``prompts[i]`` the segments it was generated
    from; the document is ``<bos>`` candidate, prompt segments, ``<eos>`` with the prompt's tokens scored.
    """
    if len(candidates) != len(prompts):
        raise ValueError(f"{len(candidates)} candidates for {len(prompts)} prompts")
    return document_log_likelihood(model, vocab, [[cand, *prompt] for cand, prompt in zip(candidates, prompts)],
                                   [[False] + [True] * len(prompt) for prompt in prompts], batch_size)


def per_frame_log_likelihood(
    model: Transformer,
    vocab: Vocabulary,
    spans: Sequence[TokSegment],
    prompts: Sequence[Sequence[TokSegment]],
    batch_size: int = 64,
) -> torch.Tensor:
    """(N,) float64: log p(span | prompt) of each generated audio span after its prompt, divided by the span's frames
    (its last code axis): the model's confidence in the utterance, comparable across lengths."""
    if len(spans) != len(prompts):
        raise ValueError(f"{len(spans)} spans for {len(prompts)} prompts")
    forward = document_log_likelihood(model, vocab, [[*p, s] for p, s in zip(prompts, spans)],
                                      [[False] * len(p) + [True] for p in prompts], batch_size)
    return forward / torch.tensor([s.codes.shape[-1] for s in spans], dtype=torch.float64)


ROUND_TRIP_FLOOR = 1e-6  # added to a round-trip error before its log (a picture reproduced exactly scores finite)


@torch.no_grad()
def round_trip_error(tokenizer, pixels: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """(N,) float64: mean squared change of each picture (N, H, W, 3) uint8 through ``tokenizer``'s encode then
    decode, in [-1, 1] units (0 = reproduced exactly)."""
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be (N, H, W, 3) uint8, got {pixels.shape} {pixels.dtype}")
    device = next(tokenizer.parameters()).device
    out = torch.empty(len(pixels), dtype=torch.float64)
    for start in range(0, len(pixels), batch_size):
        x = to_unit(pixels[start:start + batch_size]).to(device)  # (B, 3, H, W)
        y = tokenizer.decode(tokenizer.encode(x).codes).float()
        out[start:start + len(x)] = (y - x).square().mean(dim=(1, 2, 3)).double().cpu()
    return out


__all__ = ["ROUND_TRIP_FLOOR", "document_log_likelihood", "per_frame_log_likelihood", "reverse_log_likelihood",
           "round_trip_error"]

"""Held-out perplexity of the LM, per target modality: ``lm.loss.*``, ``lm.ppl.*`` and ``lm.acc.*`` in eval.json.

The documents are the test split's pre-tokenized items (``<run>/tokens/test``, written by the pretokenize
stage), each under every evaluated task template that applies to it (default t2i, i2t, t2a, a2t: so
``lm.ppl.image`` is the likelihood of an image given its caption, ``lm.ppl.text`` that of a caption given its
image or speech, ``lm.ppl.audio`` that of speech given its caption). Unlike training, no condition is dropped
and every document appears once, so the numbers are deterministic. They are packed into rows by the training
loader (document-masked attention; a document cut at a row end continues in the next row, as in training)
and scored by the model's own loss; the per-modality sums are the training loop's accumulator
(``training.lm``), so ``lm.loss.text`` means what ``loss_text`` in metrics.jsonl means, on held-out data.

Keys (``all`` also counts the special tokens a document trains on: image/audio markers and ``<eos>``):

- ``lm.loss.{all,text,image,audio}``: mean next-token cross-entropy in nats (no z-loss);
- ``lm.ppl.*`` = exp(``lm.loss.*``); ``lm.acc.{text,image,audio}``: greedy next-token accuracy;
- ``lm.tokens.{all,text,image,audio}``: target tokens scored; ``lm.batches``: packed batches scored.

A modality with no target token in the evaluated documents gets no keys.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyloom.progress import progress
from anyloom.sequences.interleave import TokenStream, bidirectional_span_ids
from anyloom.sequences.mixture import ItemSource, MixtureConfig, TaskMixture
from anyloom.sequences.packing import ListSource, PackedLoader
from anyloom.sequences.vocab import Vocabulary
from anyloom.training.lm import MODALITIES, accumulate_loss_sums, loss_metrics


@dataclass
class PerplexityReport:
    loss: dict[str, float]  # "all" and each modality present: mean cross-entropy (nats)
    accuracy: dict[str, float]  # each modality present: greedy next-token accuracy
    tokens: dict[str, int]  # "all" and each modality present: target tokens scored
    batches: int

    @property
    def perplexity(self) -> dict[str, float]:
        return {k: math.exp(v) for k, v in self.loss.items()}

    def as_eval(self) -> dict[str, float | int]:
        """Flat ``lm.*`` keys (the caller nests them into eval.json)."""
        out: dict[str, float | int] = {}
        for name, value in self.loss.items():
            out[f"lm.loss.{name}"] = value
            out[f"lm.ppl.{name}"] = math.exp(value)
        out.update({f"lm.acc.{name}": value for name, value in self.accuracy.items()})
        out.update({f"lm.tokens.{name}": value for name, value in self.tokens.items()})
        out["lm.batches"] = self.batches
        return out


def task_documents(items: ItemSource, vocab: Vocabulary, tasks: Sequence[str]) -> list[TokenStream]:
    """Every item under every template of ``tasks`` that applies to it, conditions kept (item-major order)."""
    if not tasks:
        raise ValueError("no task templates to evaluate the LM on (eval.lm_tasks is empty)")
    mixture = TaskMixture(items, vocab, MixtureConfig(tasks={t: 1.0 for t in tasks}, cfg_dropout=0.0))
    kinds = items.kinds() > 0  # (items, 3): which segment kinds each item has
    docs = []
    for index in range(len(mixture)):
        has = kinds[mixture.item_index(index)]
        docs += [mixture.document(index, t.name) for t in mixture.templates if has[list(t.needs)].all()]
    return docs


def lm_perplexity(
    model: nn.Module,
    documents: Sequence[TokenStream],
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int = 0,
    seed: int = 0,
    span_rule: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
) -> PerplexityReport:
    """Score ``documents`` packed into ``batch_size`` x ``seq_len`` rows (at most ``max_batches``; 0: all).

    ``model`` is a :class:`~anyloom.transformer.model.Transformer` (``forward`` + ``loss``). The documents are
    shuffled with ``seed`` so that a bounded number of batches samples every template; the incomplete last
    batch is dropped. When the documents hold fewer than ``batch_size`` rows, fewer rows are used. ``span_rule``:
    the vocabulary's bidirectional spans, as in training (``anyloom.sequences.packing``).
    """
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", seq_len)
    if seq_len > max_len:
        raise ValueError(f"eval.lm_seq_len={seq_len} exceeds the model's max_seq_len {max_len}")
    total = sum(len(d) for d in documents)
    rows = min(batch_size, (total - 1) // seq_len)
    if rows < 1:
        raise ValueError(f"the evaluated documents hold {total} tokens, fewer than one row of eval.lm_seq_len="
                         f"{seq_len} (+1); lower eval.lm_seq_len or evaluate more items (eval.lm_items)")
    loader = PackedLoader(ListSource(documents), seq_len, rows, seed=seed, shuffle=True, infinite=False,
                          span_rule=span_rule)
    n_batches = (total - 1) // (rows * seq_len)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    device = next(model.parameters()).device
    # the training loop's layout: [loss*n, z*n, n, then (loss, correct, count) per modality]
    sums = torch.zeros(3 + 3 * len(MODALITIES), dtype=torch.float64, device=device)
    batches = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in progress(loader, total=n_batches, desc="lm perplexity", unit="batch"):
                mb = vars(batch.to(device))
                batches += 1
                n = float(mb["loss_mask"].sum())
                if n:
                    hidden = model(mb["tokens"], doc_ids=mb["doc_ids"], positions=mb["positions"],
                                   span_ids=mb["span_ids"])
                    out = model.loss(hidden, mb["targets"], mb["loss_mask"])
                    accumulate_loss_sums(sums, out, mb, n, out.ce.detach() * n)  # cross-entropy without the z-loss term
                if batches == n_batches:
                    break
    finally:
        model.train(was_training)
    if not float(sums[2]):
        raise ValueError(f"{batches} batches held no target token: nothing to score")
    record = loss_metrics(sums.cpu())
    loss = {"all": record["loss"]}
    accuracy: dict[str, float] = {}
    tokens = {"all": int(sums[2])}
    for m, name in enumerate(MODALITIES):
        if f"loss_{name}" in record:
            loss[name], accuracy[name] = record[f"loss_{name}"], record[f"acc_{name}"]
            tokens[name] = int(sums[5 + 3 * m])
    return PerplexityReport(loss, accuracy, tokens, batches)


def vocabulary_tasks(vocab: Vocabulary, tasks: Sequence[str]) -> tuple[str, ...]:
    """The templates of ``tasks`` whose modalities the vocabulary has codes for (a run trained on pictures and
    texts only has no audio ids, so its t2a and a2t templates are left out)."""
    from anyloom.sequences.mixture import TEMPLATES

    has = {"text": True, "image": vocab.image_codebook_size > 0, "audio": vocab.audio_codebook_size > 0}
    return tuple(t for t in tasks if all(has[k] for k in TEMPLATES[t].condition + (TEMPLATES[t].target or "text",)))


def run_lm_perplexity(pipe: Any, tokens_dir: str | Path, cfg: Any) -> PerplexityReport:
    """The eval stage's entry: ``pipe`` a generation Pipeline (model + vocabulary), ``tokens_dir`` the split's
    token shards (``<run>/tokens/test``), ``cfg`` an EvalConfig (``lm_*`` fields)."""
    from anyloom.sequences.mixture import ItemList
    from anyloom.sequences.shards import ShardError, TokenShards

    try:
        shards = TokenShards(tokens_dir)
    except ShardError as e:
        raise FileNotFoundError(f"LM perplexity needs the test split's token shards: {e}. Run the pretokenize "
                                "stage (make train), or skip this metric with eval.perplexity=false") from e
    n = min(len(shards), cfg.lm_items) if cfg.lm_items else len(shards)
    items = ItemList([shards.item(i) for i in progress(range(n), desc="read test shards", unit="item")])
    docs = task_documents(items, pipe.vocab, vocabulary_tasks(pipe.vocab, cfg.lm_tasks))
    return lm_perplexity(pipe.model, docs, seq_len=cfg.lm_seq_len, batch_size=cfg.lm_batch_size,
                         max_batches=cfg.lm_batches, seed=cfg.seed,
                         span_rule=functools.partial(bidirectional_span_ids, pipe.vocab))

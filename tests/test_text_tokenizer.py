"""Text tokenizer: deterministic training, exact round trips (byte fallback), save/load."""

from __future__ import annotations

import random

import pytest

from anyloom.tokenizers.text import TextTokenizer, TextTokenizerConfig

WORDS = "one two three four red green blue yellow circle circles square squares triangle triangles".split()


def _captions(n: int = 300, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [f"{r.choice(WORDS[:4])} {r.choice(WORDS[4:8])} {r.choice(WORDS[8:])}" for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(_captions(), vocab_size=512)


def test_training_is_deterministic(tok):
    again = TextTokenizer.train(_captions(), vocab_size=512)
    assert again.model_bytes == tok.model_bytes
    assert again.fingerprint == tok.fingerprint


def test_small_corpus_caps_vocab_and_words_are_single_pieces(tok):
    assert 260 <= tok.vocab_size <= 512
    for word in WORDS:
        assert len(tok.encode(word)) == 1, (word, [tok.piece(i) for i in tok.encode(word)])


@pytest.mark.parametrize("text", ["three yellow triangles", "zebra ünïcödé 🐙 \t tabs", "", "UPPER case 123"])
def test_round_trip_any_string(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert 0 not in ids  # <unk> never appears: unseen characters fall back to bytes
    assert tok.decode(ids) == " ".join(text.split())  # sentencepiece normalises whitespace runs


def test_save_load(tok, tmp_path):
    tok.save(tmp_path / "text")
    back = TextTokenizer.load(tmp_path / "text")
    assert back.model_bytes == tok.model_bytes
    assert back.encode("two red squares") == tok.encode("two red squares")


def test_extra_corpus_and_errors(tmp_path):
    corpus = tmp_path / "extra.txt"
    corpus.write_text("the quick brown fox\njumps over the lazy dog\n" * 20)
    t = TextTokenizer.train(_captions(50), config=TextTokenizerConfig(vocab_size=400, corpus_path=str(corpus)))
    assert len(t.encode("quick")) == 1
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        TextTokenizer.train(["a"], config=TextTokenizerConfig(corpus_path=str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match="empty corpus"):
        TextTokenizer.train(["", "  "], vocab_size=300)
    with pytest.raises(ValueError, match="too small"):
        TextTokenizerConfig(vocab_size=100)
    with pytest.raises(FileNotFoundError, match="text.model"):
        TextTokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="out of range"):
        t.decode([t.vocab_size + 5])

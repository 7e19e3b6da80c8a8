"""Token shards, pre-tokenization (cache, resume, errors) and task mixtures, with tiny test-double tokenizers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anyloom.data.document import AudioSegment, Document, ImageSegment, TextSegment
from anyloom.sequences.interleave import AudioIds, ImageIds, TextIds, parse_stream
from anyloom.sequences.mixture import TEMPLATES, ItemList, MixtureConfig, TaskMixture, build_document
from anyloom.sequences.packing import PackedLoader
from anyloom.sequences.pretokenize import PretokenizeConfig, manifest_key, pretokenize, tokenizer_fingerprint
from anyloom.sequences.shards import ShardError, TokenShards
from anyloom.sequences.vocab import Vocabulary
from anyloom.tokenizers.base import AudioCodes, ImageCodes

# ---- test doubles: deterministic, exact functions of their input ----------------------------------------------


class CharText:
    """Text ids = bytes; a fixed fingerprint."""

    vocab_size = 256
    fingerprint = "chartext-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


class PatchImage(torch.nn.Module):
    """4x4 images -> 2x2 codes: mean of each 2x2 patch of the red channel, quantised to 16 levels (+ an offset)."""

    codebook_size = 16
    grid = (2, 2)
    image_size = (4, 4)

    def __init__(self, shift: int = 0, fail_after: int | None = None):
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift))
        self.calls = 0
        self.fail_after = fail_after

    def encode(self, images: torch.Tensor) -> ImageCodes:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        red = (images[:, 0] + 1) / 2  # (B, 4, 4) in [0, 1]
        patches = red.reshape(-1, 2, 2, 2, 2).mean(dim=(2, 4))  # (B, 2, 2)
        return ImageCodes(((patches * 15).round().long() + self.shift) % 16)


class FrameAudio(torch.nn.Module):
    """Frames of 4 samples; level q code = quantised mean of frame (q-th power) into 8 levels. Takes ``lengths``."""

    sample_rate = 16
    frame_rate = 4.0
    num_codebooks = 2
    codebook_size = 8

    def __init__(self):
        super().__init__()
        self.register_buffer("levels", torch.tensor(8))
        self.batches: list[int] = []

    def encode(self, wave: torch.Tensor, sample_rate: int, lengths: torch.Tensor | None = None) -> AudioCodes:
        self.batches.append(wave.shape[0])
        n_f = -(-wave.shape[1] // 4)
        w = torch.nn.functional.pad(wave, (0, n_f * 4 - wave.shape[1])).reshape(wave.shape[0], n_f, 4)
        m = (w.mean(-1) + 1) / 2  # (B, F) in [0, 1]
        codes = torch.stack([(m * 7).round(), ((m**2) * 7).round()], dim=1).long()  # (B, Q, F)
        frames = None if lengths is None else -(-lengths // 4)
        return AudioCodes(codes, frames)


def make_docs(n: int, seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        segs = [TextSegment(f"item {i}"), ImageSegment(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))]
        if i % 3:
            segs.append(AudioSegment(rng.uniform(-1, 1, int(rng.integers(3, 20))).astype(np.float32), 16))
        docs.append(Document(segs, id=f"doc-{i}"))
    return docs


def expected_item(doc: Document) -> list:
    """What the doubles must produce, computed one document at a time (no batching)."""
    out = []
    for seg in doc.segments:
        if isinstance(seg, TextSegment):
            out.append(TextIds(CharText().encode(seg.text)))
        elif isinstance(seg, ImageSegment):
            x = torch.from_numpy(seg.pixels.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1)[None]
            out.append(ImageIds(PatchImage().encode(x).codes[0].numpy()))
        else:
            out.append(AudioIds(FrameAudio().encode(torch.from_numpy(seg.wave)[None], 16).codes[0].numpy()))
    return out


VOCAB = Vocabulary.build(256, 16, 8, 2, (2, 2))
CFG = PretokenizeConfig(shard_size=4, batch_size=3)


# ---- pre-tokenization and shards --------------------------------------------------------------------------------


def test_pretokenize_stores_each_item_exactly(tmp_path):
    docs = make_docs(10) + [Document([], id="empty")]
    audio = FrameAudio()
    res = pretokenize(docs, tmp_path / "tok", text=CharText(), image=PatchImage(), audio=audio, config=CFG)
    assert (res.built, res.reused, res.skipped_empty) == (3, 0, 1)
    assert len(res.shards) == 10
    assert max(audio.batches) > 1  # clips of different lengths were batched (padded) together
    for i, doc in enumerate(docs[:10]):
        assert res.shards.item(i) == expected_item(doc), i
        assert res.shards.item_id(i) == f"doc-{i}"
    kinds = res.shards.kinds()
    assert kinds[:, 0].tolist() == [1] * 10 and kinds[:, 2].tolist() == [int(i % 3 != 0) for i in range(10)]
    # memory-mapped, re-openable, and a second call reuses everything
    again = pretokenize(docs, tmp_path / "tok", text=CharText(), image=PatchImage(), audio=FrameAudio(), config=CFG)
    assert (again.built, again.reused, again.stale_removed) == (0, 3, False)
    assert isinstance(TokenShards(tmp_path / "tok")._shards[0].codes, np.memmap)


def test_changed_tokenizer_invalidates_cache(tmp_path):
    docs = make_docs(6)
    a = pretokenize(docs, tmp_path / "tok", text=CharText(), image=PatchImage(0), audio=FrameAudio(), config=CFG)
    assert tokenizer_fingerprint(PatchImage(0)) != tokenizer_fingerprint(PatchImage(5))
    b = pretokenize(docs, tmp_path / "tok", text=CharText(), image=PatchImage(5), audio=FrameAudio(), config=CFG)
    assert b.stale_removed and b.built == 2 and b.key != a.key
    assert (b.shards.item(0)[1].codes == (a.shards.item(0)[1].codes + 5) % 16).all()
    with pytest.raises(ShardError, match="cache key"):
        TokenShards(tmp_path / "tok", expected_key=a.key)
    # changed data also invalidates
    c = pretokenize(
        make_docs(6, seed=1), tmp_path / "tok", text=CharText(), image=PatchImage(5), audio=FrameAudio(), config=CFG
    )
    assert c.stale_removed and c.key != b.key


def test_resume_after_interruption(tmp_path):
    docs = make_docs(12)
    # 12 docs, shard_size 4, batch_size 3: two image batches per shard; fail in the third shard
    with pytest.raises(KeyboardInterrupt):
        pretokenize(
            docs, tmp_path / "tok", text=CharText(), image=PatchImage(fail_after=5), audio=FrameAudio(), config=CFG
        )
    assert not (tmp_path / "tok" / "index.json").exists()
    image = PatchImage()
    res = pretokenize(docs, tmp_path / "tok", text=CharText(), image=image, audio=FrameAudio(), config=CFG)
    assert (res.reused, res.built) == (2, 1) and image.calls == 2  # only the unfinished shard was encoded
    clean = pretokenize(docs, tmp_path / "clean", text=CharText(), image=PatchImage(), audio=FrameAudio(), config=CFG)
    assert all(res.shards.item(i) == clean.shards.item(i) for i in range(12))


def test_bad_inputs_give_clear_errors(tmp_path):
    bad = [Document([ImageSegment(np.zeros((4, 4), np.uint8), path="img/7.png")], id="doc-7")]
    with pytest.raises(ValueError, match=r"document 'doc-7' \(img/7.png\): expected \(H, W, 3\) uint8"):
        pretokenize(bad, tmp_path / "a", text=CharText(), image=PatchImage(), data_key="x")
    noaudio = [Document([AudioSegment(np.zeros(8, np.float32), 16)], id="d")]
    with pytest.raises(ValueError, match="no audio tokenizer"):
        pretokenize(noaudio, tmp_path / "b", text=CharText(), image=PatchImage(), data_key="x")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "precious.txt").write_text("not a cache")
    with pytest.raises(FileExistsError, match="not a token cache"):
        pretokenize(make_docs(2), tmp_path / "c", text=CharText(), image=PatchImage(), audio=FrameAudio())
    with pytest.raises(ShardError, match="no index.json"):
        TokenShards(tmp_path / "c")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"segments": [{"text": "a"}]}\nnot json\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        manifest_key(manifest)


# ---- mixtures -----------------------------------------------------------------------------------------------------


def _item(rng: np.random.Generator, audio: bool = True) -> list:
    segs = [TextIds(rng.integers(0, 256, 3)), ImageIds(rng.integers(0, 16, (2, 2)))]
    return segs + ([AudioIds(rng.integers(0, 8, (2, 3)))] if audio else [])


@pytest.mark.parametrize("task", list(TEMPLATES))
def test_template_loss_masks(task):
    rng = np.random.default_rng(0)
    item = _item(rng)
    t = TEMPLATES[task]
    s = build_document(item, t, VOCAB)
    parsed = parse_stream(s.ids, VOCAB).segments
    trained = s.ids[s.loss_mask]
    if t.target is None:
        assert parsed == item and s.loss_mask[1:].all()
        return
    kinds = [type(x).__name__[:-3].lower() for x in parsed]
    assert kinds == [*t.condition, t.target]
    # exactly the target span (markers included) and eos are trained
    target_ids = build_document([parsed[-1]], TEMPLATES["interleaved"], VOCAB).ids[1:]
    assert trained.tolist() == target_ids.tolist()
    dropped = build_document(item, t, VOCAB, drop_condition=True)
    assert dropped.ids.tolist() == [VOCAB.bos] + target_ids.tolist()


def test_mixture_weights_dropout_and_applicability():
    rng = np.random.default_rng(0)
    items = ItemList([_item(rng, audio=i % 2 == 0) for i in range(40)] + [[TextIds([1])]])
    mix = TaskMixture(items, VOCAB, MixtureConfig(tasks={"t2i": 3.0, "t2a": 1.0, "i2t": 0.0}, cfg_dropout=0.25))
    assert len(mix) == 40 and mix.skipped_items == 1  # the text-only item fits no template
    draws = np.random.default_rng(1).random((4000, 2))
    counts = {"t2i": 0, "t2a": 0}
    drops = 0
    for k, d in enumerate(draws):
        idx = k % 40
        t, dropped = mix.choose(idx, d)
        counts[t.name] += 1
        drops += dropped
        if idx % 2:  # no audio: only t2i applies
            assert t.name == "t2i"
    # even items: 3:1; odd items: all t2i -> t2a share = 0.5 * 0.25
    assert abs(counts["t2a"] / 4000 - 0.125) < 0.02
    assert abs(drops / 4000 - 0.25) < 0.03
    with pytest.raises(ValueError, match="did you mean 't2i'"):
        MixtureConfig(tasks={"t2j": 1.0})
    with pytest.raises(ValueError, match="no item has"):
        TaskMixture(ItemList([[TextIds([1])]]), VOCAB, MixtureConfig(tasks={"t2i": 1.0}))


def test_end_to_end_shards_mixture_loader(tmp_path):
    res = pretokenize(
        make_docs(12), tmp_path / "tok", text=CharText(), image=PatchImage(), audio=FrameAudio(), config=CFG
    )
    mix = TaskMixture(res.shards, VOCAB, MixtureConfig(cfg_dropout=0.2))
    loader = PackedLoader(mix, seq_len=32, batch_size=2, seed=0)
    b = next(loader)
    # every complete document inside a row parses back into segments that some stored item holds
    stored = [seg for i in range(len(res.shards)) for seg in res.shards.item(i)]
    inner = 0
    for row, docs in zip(b.tokens.numpy(), b.doc_ids.numpy()):
        for d in np.unique(docs)[1:-1]:  # documents in the middle of a row are whole
            ids = row[docs == d]
            assert ids[0] == VOCAB.bos and ids[-1] == VOCAB.eos
            segs = parse_stream(ids, VOCAB).segments
            assert segs and all(any(seg == s for s in stored) for seg in segs)
            inner += 1
    assert inner > 0
    assert json.loads((tmp_path / "tok" / "index.json").read_text())["num_items"] == 12


@pytest.mark.parametrize("condition_loss", [False, True])
def test_mixture_stream_equals_reference_build(condition_loss):
    rng = np.random.default_rng(3)
    items = ItemList([_item(rng, audio=i % 3 > 0) for i in range(30)])
    mix = TaskMixture(items, VOCAB, MixtureConfig(cfg_dropout=0.5, condition_loss=condition_loss))
    draws = np.random.default_rng(4).random((len(mix), 2))
    seen = set()
    for i in range(len(mix)):
        template, dropped = mix.choose(i, draws[i])
        seen.add((template.name, dropped))
        got = mix.stream(i, draws[i])
        ref = build_document(items.item(mix.item_index(i)), template, VOCAB, drop_condition=dropped,
                             condition_loss=condition_loss)
        assert np.array_equal(got.ids, ref.ids) and np.array_equal(got.loss_mask, ref.loss_mask)
        # only the target span (+ markers, eos) is trained, unless condition_loss trains everything but <bos>
        assert got.loss_mask[1:].all() == (condition_loss or dropped or template.target is None)
        assert np.array_equal(got.modality, ref.modality) and got.ids.dtype == np.int64
        assert mix.length(i, draws[i]) == len(got)
    assert len(seen) >= 6
    doc = mix.document(0, "i2t")
    assert parse_stream(doc.ids, VOCAB).segments == [items.item(0)[1], items.item(0)[0]]


def test_mixture_rank_sharding_builds_only_own_documents():
    rng = np.random.default_rng(5)
    items = ItemList([_item(rng) for _ in range(30)])
    mix = TaskMixture(items, VOCAB, MixtureConfig(cfg_dropout=0.3))
    single = [next(ld) for ld in [PackedLoader(mix, 16, 4, seed=2)] for _ in range(6)]
    built = []

    class Counting(TaskMixture):
        def stream(self, index, draws):
            built.append(index)
            return super().stream(index, draws)

    counting = Counting(items, VOCAB, MixtureConfig(cfg_dropout=0.3))
    ranks = [PackedLoader(counting, 16, 1, rank=r, world_size=4, seed=2) for r in range(4)]
    for g in range(6):
        for r, loader in enumerate(ranks):
            before = len(built)
            b = next(loader)
            assert torch.equal(b.tokens[0], single[g].tokens[r]) and torch.equal(b.loss_mask[0], single[g].loss_mask[r])
            assert len(built) - before <= 4  # 17 tokens of ~20-token documents: never the whole global batch


def test_pretokenize_manifest_reuse_skips_and_invalidation(tmp_path, capsys):
    import soundfile as sf
    from PIL import Image

    from anyloom.sequences.pretokenize import pretokenize_manifest

    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        sf.write(tmp_path / f"{i}.wav", rng.uniform(-0.5, 0.5, 10 + i).astype(np.float32), 16, subtype="FLOAT")
        lines.append(
            json.dumps({"id": f"m{i}", "segments": [{"text": f"t{i}"}, {"image": f"{i}.png"}, {"audio": f"{i}.wav"}]})
        )
    lines.append(json.dumps({"segments": [{"image": "missing.png"}]}))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    kw = dict(text=CharText(), image=PatchImage(), audio=FrameAudio(), config=CFG)
    with pytest.raises(ValueError, match="m.jsonl:4"):
        pretokenize_manifest(manifest, tmp_path / "tok", **kw)
    res = pretokenize_manifest(manifest, tmp_path / "tok", strict=False, **kw)
    assert len(res.shards) == 3 and res.built == 1
    assert "m.jsonl:4" in capsys.readouterr().out
    assert res.shards.index["manifest_skipped"] == 1
    img = np.asarray(Image.open(tmp_path / "1.png").convert("RGB"))
    x = torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1)[None]
    assert res.shards.item(1)[1] == ImageIds(PatchImage().encode(x).codes[0].numpy())
    again = pretokenize_manifest(manifest, tmp_path / "tok", strict=False, **kw)
    assert (again.built, again.reused) == (0, 1)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "1.png")  # a changed file changes the key
    changed = pretokenize_manifest(manifest, tmp_path / "tok", strict=False, **kw)
    assert changed.stale_removed and changed.built == 1 and changed.key != res.key


def test_documents_restricted_to_tasks_serve_only_those(tmp_path):
    """A document's "tasks" (manifest key -> Document.tasks -> the shards' tasks.json -> TaskMixture): an instruction
    document that may serve only the interleaved task never becomes a captioning or text->image document."""
    from dataclasses import replace

    docs = make_docs(12)
    docs = [replace(d, tasks=("interleaved",)) if i % 3 == 0 else d for i, d in enumerate(docs)]
    res = pretokenize(docs, tmp_path / "tok", text=CharText(), image=PatchImage(), audio=FrameAudio(), config=CFG)
    tasks = res.shards.tasks()
    assert tasks == [("interleaved",) if i % 3 == 0 else None for i in range(12)]
    assert (TokenShards(tmp_path / "tok").tasks() == tasks)  # read back from disk
    mix = TaskMixture(res.shards, VOCAB, MixtureConfig(tasks={"t2i": 2.0, "i2t": 2.0, "interleaved": 0.1}))
    seen: dict[int, set[str]] = {i: set() for i in range(12)}
    for k, d in enumerate(np.random.default_rng(0).random((1200, 2))):
        seen[k % 12].add(mix.choose(k % 12, d)[0].name)
    for i in range(12):
        assert seen[i] == ({"interleaved"} if i % 3 == 0 else {"t2i", "i2t", "interleaved"}), i
    # shards without any restriction write no tasks.json; an unknown task name is refused with the item named
    plain = pretokenize(make_docs(3), tmp_path / "plain", text=CharText(), image=PatchImage(), audio=FrameAudio(),
                        config=CFG)
    assert plain.shards.tasks() == [None] * 3 and not list((tmp_path / "plain").rglob("tasks.json"))
    with pytest.raises(ValueError, match="doc-1: tasks names 'captioning'"):
        bad = [replace(d, tasks=("captioning",)) if i == 1 else d for i, d in enumerate(make_docs(3))]
        TaskMixture(pretokenize(bad, tmp_path / "bad", text=CharText(), image=PatchImage(), audio=FrameAudio(),
                                config=CFG).shards, VOCAB)
    with pytest.raises(ValueError, match="2 items but 1 task lists"):
        ItemList([[TextIds([1])], [TextIds([2])]], tasks=[None])


def test_manifest_tasks_key_is_read_checked_and_prepared(tmp_path):
    from anyloom.data.manifest import ManifestError, read_manifest

    good = {"id": "a", "segments": [{"text": "draw one red circle"}], "tasks": ["interleaved"]}
    (tmp_path / "m.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"segments": [{"text": "x"}]}) + "\n")
    docs = read_manifest(tmp_path / "m.jsonl").documents
    assert docs[0].tasks == ("interleaved",) and docs[1].tasks is None
    for bad in ([], "interleaved", [""], [3]):
        (tmp_path / "b.jsonl").write_text(json.dumps({**good, "tasks": bad}) + "\n")
        with pytest.raises(ManifestError, match=r"b.jsonl:1: 'tasks' must be a non-empty list"):
            read_manifest(tmp_path / "b.jsonl")
    # the data stage keeps the key in the manifests it writes
    from anyloom.data.prepare import DataConfig, prepare_data

    m = str(tmp_path / "m.jsonl")
    prepared = prepare_data(DataConfig(source="manifest", train=m, val=m, test=m, root=str(tmp_path / "prepared")))
    assert read_manifest(prepared.train).documents[0].tasks == ("interleaved",)


def test_instruction_documents_are_not_caption_pairs(tmp_path):
    """The image-text matcher's pairs (load_images(captioned=True)) leave out documents whose tasks allow neither
    text->image nor image->text: their text is not a caption of their picture."""
    from PIL import Image

    from anyloom.data.images import load_images

    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "p.png")
    lines = [{"segments": [{"text": "one red square"}, {"image": "p.png"}]},
             {"segments": [{"text": "draw one red square and say it"}, {"image": "p.png"}], "tasks": ["interleaved"]},
             {"segments": [{"text": "one red square"}, {"image": "p.png"}], "tasks": ["t2i", "interleaved"]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    pairs = load_images(tmp_path / "m.jsonl", (8, 8), captioned=True)
    assert pairs.captions == ["one red square", "one red square"] and pairs.skipped == 1
    # a trainer of pictures reads the one picture once; the repeats are counted
    pictures = load_images(tmp_path / "m.jsonl", (8, 8))
    assert len(pictures.pixels) == 1 and pictures.repeated == 2 and pictures.skipped == 0


def test_trainers_of_pictures_read_each_picture_once(tmp_path):
    """Documents that name a picture file again (instruction documents) add nothing to a picture trainer's data, in
    memory or streamed: first occurrences in document order, the repeats counted."""
    from PIL import Image

    from anyloom.data.images import PictureStream, load_images

    colours = {"a.png": (200, 30, 30), "b.png": (30, 200, 30), "c.png": (30, 30, 200)}
    for name, rgb in colours.items():
        Image.new("RGB", (8, 8), rgb).save(tmp_path / name)
    named = ["b.png", "a.png", "b.png", "c.png", "a.png"]
    lines = [{"segments": [{"text": f"doc {i}"}, {"image": n}]} for i, n in enumerate(named)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    pictures = load_images(tmp_path / "m.jsonl", (8, 8))
    assert [tuple(p[0, 0]) for p in pictures.pixels] == [colours["b.png"], colours["a.png"], colours["c.png"]]
    assert pictures.repeated == 2
    stream = PictureStream(tmp_path / "m.jsonl", (8, 8))
    assert len(stream) == 3 and stream.repeated == 2
    assert [tuple(stream[i][0, 0]) for i in range(3)] == [tuple(p[0, 0]) for p in pictures.pixels]
    # the captioned pairs keep every document: their texts differ
    assert load_images(tmp_path / "m.jsonl", (8, 8), captioned=True).captions == [f"doc {i}" for i in range(5)]

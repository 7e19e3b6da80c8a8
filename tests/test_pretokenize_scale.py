"""Pre-tokenization at scale: streamed input, worker processes and resumption give the files of a plain build."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_seq_data import CFG, CharText, FrameAudio, PatchImage, expected_item, make_docs

from anyloom.config import fingerprint
from anyloom.data.document import Document, ImageSegment
from anyloom.sequences.pretokenize import PretokenizeConfig, cache_key, pretokenize, pretokenize_manifest


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: two builds are the same when these are equal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def build(documents, out: Path, image: PatchImage | None = None, **config):
    return pretokenize(documents, out, text=CharText(), image=image or PatchImage(), audio=FrameAudio(),
                       config=replace(CFG, **config), data_key="docs")


def cut_after(docs: list[Document], n: int) -> Iterator[Document]:
    """A stream that breaks after ``n`` documents (a crash or ^C while reading a manifest)."""
    yield from docs[:n]
    raise RuntimeError("stream cut")


def test_stream_is_read_shard_by_shard_and_equals_the_list(tmp_path):
    docs = make_docs(10) + [Document([], id="empty")]
    done_when_read: list[int] = []

    def stream() -> Iterator[Document]:
        for doc in docs:  # shards finished on disk when each document is asked for
            done_when_read.append(sum((p / "done.json").is_file() for p in (tmp_path / "stream").glob("shard_*")))
            yield doc

    res = build(stream(), tmp_path / "stream")
    # document r (shard r // 4) is read only once every earlier shard is written: one shard in memory at a time
    assert done_when_read == [r // CFG.shard_size for r in range(len(docs))]
    assert (res.built, res.reused, res.skipped_empty, len(res.shards)) == (3, 0, 1, 10)
    assert all(res.shards.item(i) == expected_item(doc) for i, doc in enumerate(docs[:10]))
    assert files(tmp_path / "stream") == files(build(docs, tmp_path / "list").shards.root)
    with pytest.raises(ValueError, match="pass data_key="):
        pretokenize(iter(docs), tmp_path / "nokey", text=CharText(), image=PatchImage(), audio=FrameAudio())


def test_interrupted_stream_resumes_to_the_uninterrupted_result(tmp_path):
    docs = make_docs(14)  # shard_size 4: shards of 4, 4, 4, 2 documents
    with pytest.raises(RuntimeError, match="stream cut"):
        build(cut_after(docs, 10), tmp_path / "tok")
    assert not (tmp_path / "tok" / "index.json").exists()
    assert sorted(p.name for p in (tmp_path / "tok").glob("shard_*")) == ["shard_00000", "shard_00001"]
    image = PatchImage()
    res = build(iter(docs), tmp_path / "tok", image=image)
    # the two finished shards are read past, not encoded: 4 + 2 images in batches of 3 = 3 calls
    assert (res.built, res.reused, image.calls) == (2, 2, 3)
    assert files(tmp_path / "tok") == files(build(iter(docs), tmp_path / "clean").shards.root)
    again = build(iter(docs), tmp_path / "tok")
    assert (again.built, again.reused) == (0, 4)


def test_workers_write_the_same_files_in_document_order(tmp_path):
    docs = make_docs(17) + [Document([], id="empty")] + make_docs(5, seed=1)  # 23 documents, 6 shards
    serial = build(iter(docs), tmp_path / "serial")
    parallel = build(iter(docs), tmp_path / "parallel", num_workers=2)
    assert parallel.key == serial.key
    assert (parallel.built, parallel.reused, parallel.skipped_empty) == (6, 0, 1)
    assert [e["name"] for e in json.loads((tmp_path / "parallel" / "index.json").read_text())["shards"]] == [
        f"shard_{s:05d}" for s in range(6)
    ]
    assert files(tmp_path / "parallel") == files(tmp_path / "serial")  # codes, ids, markers, index, build.json
    # a worker's error reaches the caller with the document's name
    bad = docs[:9] + [Document([ImageSegment(np.zeros((4, 4), np.uint8), path="img/7.png")], id="doc-7")]
    with pytest.raises(ValueError, match=r"document 'doc-7' \(img/7.png\): expected \(H, W, 3\) uint8"):
        build(iter(bad), tmp_path / "bad", num_workers=2)


def test_num_workers_changes_no_key():
    # the keys of caches built before num_workers existed (same tokenizers, data key and shard size)
    old = {PretokenizeConfig(): "6a237e5347a6f576", CFG: "78553dbfded276a0"}
    for config, key in old.items():
        for n in (0, 1, 3):
            assert cache_key(CharText(), None, None, "data", replace(config, num_workers=n)) == key
    assert fingerprint(PretokenizeConfig()) == fingerprint({"shard_size": 1024, "batch_size": 64})
    assert fingerprint(PretokenizeConfig(num_workers=2)) != fingerprint(PretokenizeConfig())  # a recipe change
    with pytest.raises(ValueError, match="num_workers"):
        PretokenizeConfig(num_workers=-1)


def test_manifest_is_streamed_and_reports_skips(tmp_path, capsys):
    from PIL import Image

    lines = []
    for i in range(5):
        Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"id": f"m{i}", "segments": [{"text": f"t{i}"}, {"image": f"{i}.png"}]}))
        lines += [json.dumps({"segments": [{"image": f"missing{i}-{j}.png"}]}) for j in range(5)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    kw = dict(text=CharText(), image=PatchImage(), config=replace(CFG, shard_size=2), strict=False)
    res = pretokenize_manifest(tmp_path / "m.jsonl", tmp_path / "tok", **kw)
    assert [res.shards.item_id(i) for i in range(len(res.shards))] == [f"m{i}" for i in range(5)]
    assert res.built == 3 and res.shards.index["manifest_skipped"] == 25
    out = capsys.readouterr().out
    assert out.count("pretokenize: skipped") == 20 and "m.jsonl:2: missing file" in out
    assert "... 5 more skipped (25 in all: 25 missing file)" in out
    again = pretokenize_manifest(tmp_path / "m.jsonl", tmp_path / "tok", **kw)
    assert (again.built, again.reused) == (0, 3) and capsys.readouterr().out == ""


def test_workers_refuse_a_tokenizer_that_cannot_be_pickled(tmp_path):
    class LocalText(CharText):  # a class defined in a function cannot be sent to another process
        pass

    with pytest.raises(TypeError, match="num_workers=2 sends the tokenizers to worker processes"):
        pretokenize(make_docs(3), tmp_path / "tok", text=LocalText(), image=PatchImage(), audio=FrameAudio(),
                    config=replace(CFG, num_workers=2), data_key="docs")

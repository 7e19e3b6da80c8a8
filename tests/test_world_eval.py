"""The evaluation harness itself: a judge-perfect model scores 100%, a random one scores about chance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anyloom.data.manifest import read_manifest
from anyloom.world.captions import COLORS, NUMBER_WORDS, SHAPES, parse_caption
from anyloom.world.evaluate import evaluate_world, items_from_documents
from anyloom.world.render import render_scene


class PerfectModel:
    """Renders the asked-for scene, and reads images / speech back from the items it was built from."""

    def __init__(self, items):
        self.caption_of_image = {it.pixels.tobytes(): it.caption for it in items}
        self.caption_of_wave = {it.wave.tobytes(): it.caption for it in items}
        self.wave_of_caption = {it.caption: it.wave for it in items}
        self.rng = np.random.default_rng(0)

    def text_to_image(self, captions):
        return [render_scene(self.rng, parse_caption(c)).pixels for c in captions]

    def image_to_text(self, images):
        return [self.caption_of_image[p.tobytes()] for p in images]

    def speech_to_text(self, waves, sample_rate):
        return [self.caption_of_wave[w.tobytes()] for w in waves]

    def text_to_speech(self, captions):
        return [self.wave_of_caption[c] for c in captions], 16000


class RandomModel:
    def __init__(self):
        self.rng = np.random.default_rng(1)

    def _caption(self):
        count = int(self.rng.integers(1, 5))
        color, shape = self.rng.choice(COLORS), self.rng.choice(SHAPES)
        return f"{NUMBER_WORDS[count - 1]} {color} {shape}{'s' if count > 1 else ''}"

    def text_to_image(self, captions):
        return [self.rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in captions]

    def image_to_text(self, images):
        return [self._caption() for _ in images]

    def speech_to_text(self, waves, sample_rate):
        return [self._caption() for _ in waves]

    def text_to_speech(self, captions):
        return [self.rng.normal(0, 0.1, 16000).astype(np.float32) for _ in captions], 16000


@pytest.fixture(scope="module")
def items(tiny_world):
    return items_from_documents(read_manifest(tiny_world.test).documents)


def test_perfect_model_scores_perfectly(items):
    scores = evaluate_world(PerfectModel(items), {"test": items}, directions=("t2i", "i2t", "a2t"))
    assert scores["t2i"]["attr_acc"] == 1.0 and scores["t2i"]["unreadable"] == 0.0
    assert scores["i2t"]["exact"] == 1.0 and scores["a2t"]["wer"] == 0.0


def test_eval_batch_size_sets_the_prompts_per_call(items):
    """eval.batch_size reaches every direction (0 in EvalConfig: each direction's own, 32 or 64)."""
    from anyloom.evaluation.run_eval import EvalConfig

    sizes: dict[str, list[int]] = {}

    class Counting(PerfectModel):
        def text_to_image(self, captions):
            sizes.setdefault("t2i", []).append(len(captions))
            return super().text_to_image(captions)

        def image_to_text(self, images):
            sizes.setdefault("i2t", []).append(len(images))
            return super().image_to_text(images)

    n = len(items)
    assert n > 3
    plain = evaluate_world(Counting(items), {"test": items}, directions=("t2i", "i2t"))
    assert max(sizes["t2i"]) == min(n, 32) and max(sizes["i2t"]) == min(n, 64)  # each direction's default
    sizes.clear()
    small = evaluate_world(Counting(items), {"test": items}, directions=("t2i", "i2t"), batch_size=3)
    assert max(sizes["t2i"]) == max(sizes["i2t"]) == 3 and sum(sizes["i2t"]) == n
    assert small["i2t"] == plain["i2t"]  # the same answers however they are batched
    with pytest.raises(ValueError, match="batch_size must be >= 0"):
        EvalConfig(batch_size=-1)


def test_random_model_scores_about_chance(items):
    scores = evaluate_world(RandomModel(), {"test": items, "compositional": items}, directions=("t2i", "i2t", "a2t"))
    assert scores["t2i"]["attr_acc"] == 0.0  # noise is never read as a scene
    assert scores["i2t"]["exact"] < 0.2  # chance is 1 / (4 counts x 8 colours x 4 shapes)
    assert scores["i2t"]["count_acc"] < 0.6 and scores["a2t"]["wer"] > 0.5
    assert set(scores["compositional"]) == {"t2i", "i2t", "a2t"}


# ---- LM perplexity per modality (evaluation/lm_perplexity.py) ------------------------------------------------


def _tiny_items(n: int = 12, seed: int = 0):
    from anyloom.sequences.interleave import AudioIds, ImageIds, TextIds

    rng = np.random.default_rng(seed)
    return [[TextIds(rng.integers(0, 20, int(rng.integers(3, 7)))), ImageIds(rng.integers(0, 16, (2, 3))),
             AudioIds(rng.integers(0, 8, (2, int(rng.integers(4, 9)))))] for _ in range(n)]


@pytest.fixture(scope="module")
def lm_setup():
    import torch

    from anyloom.evaluation.lm_perplexity import task_documents
    from anyloom.sequences.mixture import ItemList
    from anyloom.sequences.vocab import Vocabulary
    from anyloom.transformer.model import Transformer
    from anyloom.transformer.sizes import model_config

    vocab = Vocabulary.build(20, 16, 8, 2, (2, 3))  # 20 + 16 + 2*8 + 9 specials = 61 ids <= dim 64
    docs = task_documents(ItemList(_tiny_items()), vocab, ("t2i", "i2t", "t2a", "a2t"))
    torch.manual_seed(0)
    model = Transformer(model_config("debug", vocab.size, max_seq_len=64, attention="sdpa"))
    return vocab, docs, model


PPL_ARGS = {"seq_len": 48, "batch_size": 2, "seed": 3}


def _scored_targets(docs):
    """(inputs, targets, modality) of every scored position, from the same loader lm_perplexity builds."""
    from anyloom.sequences.packing import ListSource, PackedLoader

    loader = PackedLoader(ListSource(docs), PPL_ARGS["seq_len"], PPL_ARGS["batch_size"], seed=PPL_ARGS["seed"],
                          shuffle=True, infinite=False)
    xs, ys, ms = [], [], []
    for b in loader:
        xs.append(b.tokens[b.loss_mask].numpy())
        ys.append(b.targets[b.loss_mask].numpy())
        ms.append(b.modality[b.loss_mask].numpy())
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ms)


def test_task_documents_score_only_the_targets(lm_setup):
    vocab, docs, _ = lm_setup
    assert len(docs) == 12 * 4  # every item has text, image and audio: all four templates apply
    t2i = docs[0]  # item-major, templates in lm_tasks order
    assert t2i.modality[t2i.loss_mask].tolist() == [3] + [1] * 6 + [3, 3]  # <boi>, 2x3 codes, <eoi>, <eos>
    i2t = docs[1]
    assert set(i2t.modality[i2t.loss_mask].tolist()) == {0, 3}  # caption tokens and <eos>


def test_perplexity_random_model_is_finite_and_exp_of_loss(lm_setup):
    from anyloom.evaluation.lm_perplexity import lm_perplexity

    _, docs, model = lm_setup
    report = lm_perplexity(model, docs, **PPL_ARGS)
    flat = report.as_eval()
    _, _, mods = _scored_targets(docs)
    assert flat["lm.tokens.all"] == len(mods) and report.batches >= 3
    for m, name in enumerate(("text", "image", "audio")):
        assert flat[f"lm.tokens.{name}"] == int((mods == m).sum()) > 0
        assert np.isfinite(flat[f"lm.loss.{name}"]) and flat[f"lm.ppl.{name}"] == pytest.approx(
            np.exp(flat[f"lm.loss.{name}"]), rel=1e-12)
        assert 0.0 <= flat[f"lm.acc.{name}"] <= 1.0
    assert flat["lm.ppl.all"] == pytest.approx(np.exp(flat["lm.loss.all"]), rel=1e-12)
    # an untrained model is close to uniform over the 61 ids
    assert 30 < flat["lm.ppl.all"] < 120


def _bigram_model(model, log_prob):
    """A copy of ``model`` that predicts ``softmax(log_prob[x])`` after token x (blocks write nothing)."""
    import copy

    import torch

    m = copy.deepcopy(model)
    d, v = m.cfg.dim, m.cfg.vocab_size
    h = 1.0 / np.sqrt(1.0 / d + m.cfg.norm_eps)  # RMSNorm of a one-hot row
    with torch.no_grad():
        for block in m.layers:
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()
        m.tok_embeddings.weight.copy_(torch.eye(v, d))  # residual stream = one-hot of the input token
        m.output.weight.zero_()
        m.output.weight[:, :v] = torch.from_numpy(log_prob.T / h).float()  # logits[y] = log_prob[x, y]
    return m


def test_perplexity_golden_values(lm_setup):
    """Uniform logits give exactly ln V; a bigram model fit on the true next tokens gives its cross-entropy."""
    import torch

    from anyloom.evaluation.lm_perplexity import lm_perplexity

    vocab, docs, model = lm_setup
    v = vocab.size
    uniform = _bigram_model(model, np.zeros((v, v)))
    report = lm_perplexity(uniform, docs, **PPL_ARGS)
    for name in ("all", "text", "image", "audio"):
        assert report.loss[name] == pytest.approx(np.log(v), abs=1e-5)
        assert report.perplexity[name] == pytest.approx(v, rel=1e-4)

    xs, ys, mods = _scored_targets(docs)
    counts = np.full((v, v), 0.1)  # smoothed bigram counts of the scored (input, target) pairs
    np.add.at(counts, (xs, ys), 1.0)
    log_prob = np.log(counts / counts.sum(axis=1, keepdims=True))
    biased = lm_perplexity(_bigram_model(model, log_prob), docs, **PPL_ARGS)
    token_ce = -log_prob[xs, ys]
    assert biased.loss["all"] == pytest.approx(token_ce.mean(), abs=1e-4)
    for m, name in enumerate(("text", "image", "audio")):
        assert biased.loss[name] == pytest.approx(token_ce[mods == m].mean(), abs=1e-4)
        assert biased.perplexity[name] < report.perplexity[name] - 5  # knowing the next token helps
    assert torch.equal(model.output.weight, lm_setup[2].output.weight)  # the fixture model is untouched


def test_perplexity_bounds_and_errors(lm_setup):
    from anyloom.evaluation.lm_perplexity import lm_perplexity
    from anyloom.evaluation.run_eval import EvalConfig

    _, docs, model = lm_setup
    assert lm_perplexity(model, docs, **PPL_ARGS, max_batches=2).batches == 2
    with pytest.raises(ValueError, match="max_seq_len"):
        lm_perplexity(model, docs, seq_len=65, batch_size=1)
    with pytest.raises(ValueError, match="fewer than one row"):
        lm_perplexity(model, docs[:1], seq_len=64, batch_size=1)
    with pytest.raises(ValueError, match="lm_tasks: unknown"):
        EvalConfig(lm_tasks=("t2x",))


def test_run_lm_perplexity_reads_the_runs_token_shards(lm_setup, tmp_path):
    """The eval stage's glue: <run>/tokens/test shards -> items -> documents -> lm.* keys; a missing folder says so."""
    from types import SimpleNamespace

    from anyloom.evaluation.lm_perplexity import lm_perplexity, run_lm_perplexity
    from anyloom.evaluation.run_eval import EvalConfig
    from anyloom.sequences.shards import write_index, write_shard

    vocab, docs, model = lm_setup
    items = _tiny_items()
    write_shard(tmp_path / "test" / "shard_00000", items[:7], [str(i) for i in range(7)], "k")
    write_shard(tmp_path / "test" / "shard_00001", items[7:], [str(i) for i in range(7, 12)], "k")
    write_index(tmp_path / "test", "k", [7, 5], {})
    cfg = EvalConfig(lm_items=10, lm_seq_len=48, lm_batch_size=2, seed=3)
    got = run_lm_perplexity(SimpleNamespace(model=model, vocab=vocab), tmp_path / "test", cfg)
    want = lm_perplexity(model, docs[: 10 * 4], **PPL_ARGS)  # the first 10 items, every template
    assert got.loss == pytest.approx(want.loss) and got.tokens == want.tokens
    with pytest.raises(FileNotFoundError, match="pretokenize"):
        run_lm_perplexity(SimpleNamespace(model=model, vocab=vocab), tmp_path / "missing", cfg)


def test_text_to_image_draws_one_image_per_item_and_logs_them():
    from types import SimpleNamespace

    from PIL import Image

    from anyloom.evaluation.run_eval import PipelineModel

    calls = []

    class FakePipe:  # each image encodes (seed, row) in its pixels
        diffusion = "a diffusion decoder"  # so the calls' codes are recorded for it
        def generate_batch(self, captions, to, seed):
            calls.append((list(captions), to, seed))
            return [SimpleNamespace(image=Image.new("RGB", (4, 4), (seed, row, 0)), codes=torch.full((2, 2), row))
                    for row in range(len(captions))]

    model = PipelineModel(FakePipe(), seed=5)
    first = model.text_to_image(["one red circle", "one red circle", "two blue stars"])
    second = model.text_to_image(["one red circle"])
    assert model.text_to_image([]) == []
    # a repeated caption is drawn again (no cache per caption), every call with its own seed
    assert calls == [(["one red circle", "one red circle", "two blue stars"], "image", 5),
                     (["one red circle"], "image", 6)]
    assert [tuple(im[0, 0]) for im in first + second] == [(5, 0, 0), (5, 1, 0), (5, 2, 0), (6, 0, 0)]
    assert [c for c, _ in model.images] == ["one red circle", "one red circle", "two blue stars", "one red circle"]
    assert all(img is logged for img, (_, logged) in zip(first + second, model.images))
    assert [c[:, 0, 0].tolist() for c in model.codes] == [[0, 1, 2], [0]]  # each call's codes, for a redraw


def test_decoders_side_by_side_on_the_same_codes(tiny_world, tmp_path):
    """eval.json's ``decoders``: reconstructions through both decoders, and the text->image evaluation's recorded
    codes redrawn by the diffusion decoder and judged."""
    from test_generation_pipeline import build_tiny_run

    from anyloom.data.manifest import read_manifest
    from anyloom.decoders.diffusion import DiffusionDecoder, DiffusionDecoderConfig
    from anyloom.decoders.images import DiffusionImageDecoder
    from anyloom.evaluation.run_eval import PipelineModel, decoder_scores
    from anyloom.generation.pipeline import load
    from anyloom.world.evaluate import eval_text_to_image
    from anyloom.world.judge import judge_image

    run = build_tiny_run(tmp_path / "tiny")
    torch.manual_seed(0)
    DiffusionDecoder(DiffusionDecoderConfig(image_size=(16, 16), block_out_channels=(8, 16), norm_num_groups=4,
                                            inference_steps=2)).save(run / "stages" / "diffusion_decoder" / "decoder")
    pipe = load(run, device="cpu")
    items = items_from_documents(read_manifest(tiny_world.test, image_size=(16, 16)).documents)[:6]
    model = PipelineModel(pipe, seed=2)
    vq = eval_text_to_image(model, items)  # the batches evaluate_world uses
    out = decoder_scores(pipe, items, model.codes, world=True, seed=2)
    assert out["images"] == 6 and out["ddim_steps"] == 2
    assert set(out["vq"]) == {"psnr", "ssim", "judge_agreement", "seconds_per_image"}
    redraw = DiffusionImageDecoder(pipe.diffusion, seed=2)
    drawn = [np.asarray(im) for codes in model.codes for im in redraw(pipe.image_tokenizer, codes)]
    seen = [judge_image(d) for d in drawn]
    hits = sum(s is not None and (s.count, s.color, s.shape) == (it.count, it.color, it.shape)
               for s, it in zip(seen, items))
    assert out["diffusion"]["t2i_attr_acc"] == hits / len(items) and 0 <= vq["attr_acc"] <= 1
    from anyloom.evaluation.decoders import RedrawnPictures

    with pytest.raises(RuntimeError, match="more text->image calls than were recorded"):
        RedrawnPictures(pipe, []).text_to_image(["one red circle"])
    with pytest.raises(RuntimeError, match="recorded 6 pictures for a call of 2 captions"):
        RedrawnPictures(pipe, model.codes).text_to_image(["one red circle"] * 2)


def test_single_sample_scores_replay_the_first_samples(tiny_world, tmp_path):
    """eval.json's single_sample: the same evaluation, answered by each output's first sample (before reranking)."""
    from dataclasses import replace

    from test_generation_pipeline import build_tiny_run

    from anyloom.evaluation.run_eval import FirstSamples, PipelineModel
    from anyloom.generation.pipeline import load
    from anyloom.world.evaluate import eval_image_to_text, eval_text_to_image
    from anyloom.world.judge import judge_image

    pipe = load(build_tiny_run(tmp_path / "tiny"), device="cpu")
    pipe.config = replace(pipe.config, image_candidates=3, text_candidates=2, max_text_tokens=6)
    items = items_from_documents(read_manifest(tiny_world.test, image_size=(16, 16)).documents)[:5]
    model = PipelineModel(pipe, seed=1, single_sample=True)
    since = {d: len(c) for d, c in model.firsts.items()}
    eval_text_to_image(model, items)
    single = eval_text_to_image(FirstSamples(model, since), items)
    firsts = [img for call in model.firsts["t2i"] for img in call]
    seen = [judge_image(f) for f in firsts]
    hits = sum(s is not None and (s.count, s.color, s.shape) == (it.count, it.color, it.shape)
               for s, it in zip(seen, items))
    assert single["attr_acc"] == hits / len(items) and len(firsts) == len(items)
    since = {d: len(c) for d, c in model.firsts.items()}
    eval_image_to_text(model, items)
    texts = eval_image_to_text(FirstSamples(model, since), items)
    assert texts["n"] == len(items)
    with pytest.raises(RuntimeError, match="more calls than were recorded"):
        FirstSamples(model, {d: len(c) for d, c in model.firsts.items()}).image_to_text([firsts[0]])


def test_mixed_replies_are_judged_by_picture_and_speech(tiny_world):
    """eval.json's ``any``: replies with a right picture, with the caption spoken, and both."""
    from types import SimpleNamespace

    from PIL import Image

    from anyloom.world.evaluate import eval_mixed_replies

    items = items_from_documents(read_manifest(tiny_world.test).documents)[:4]

    class Replies:  # item 0: picture and speech right; 1: the picture only; 2: wrong speech only; 3: text only
        def reply(self, captions):
            out = []
            for i, it in enumerate(items[:len(captions)]):
                picture = SimpleNamespace(image=Image.fromarray(it.pixels))
                speech = SimpleNamespace(wave=it.wave, sample_rate=it.sample_rate)
                wrong = SimpleNamespace(wave=items[(i + 1) % 4].wave, sample_rate=it.sample_rate)
                segments = [[picture, speech], [picture], [wrong], [SimpleNamespace(text="x")]][i]
                out.append(SimpleNamespace(segments=segments))
            return out

    class Ears:  # the transcript of a recording is the caption of the item it came from
        def transcribe(self, waves, sample_rate):
            return [next(it.caption for it in items if it.wave is w) for w in waves]

    score = eval_mixed_replies(Replies(), items, Ears())
    assert score == {"with_picture": 0.5, "with_speech": 0.5, "picture_acc": 0.5, "speech_exact": 0.25,
                     "both": 0.25, "n": 4}


def test_mixed_reply_prompts_are_phrased_by_reply_prompt():
    from types import SimpleNamespace

    from anyloom.evaluation.run_eval import EvalConfig, PipelineModel

    asked = []

    class FakePipe:
        def generate_batch(self, prompts, to, seed):
            asked.append((prompts, to, seed))
            return [SimpleNamespace(segments=[]) for _ in prompts]

    model = PipelineModel(FakePipe(), seed=4, reply_prompt="draw {caption} and say it")
    model.reply(["two red circles", "one blue star"])
    model.reply(["one green square"])
    assert asked == [(["draw two red circles and say it", "draw one blue star and say it"], "any", 4),
                     (["draw one green square and say it"], "any", 6)]  # a batch's seed: the replies asked before
    PipelineModel(FakePipe()).reply(["two red circles"])
    assert asked[-1][0] == ["two red circles"]  # the default asks with the caption alone
    with pytest.raises(ValueError, match="must contain"):
        EvalConfig(reply_prompt="draw it")


def test_mixed_replies_single_sample_replays_the_first_replies():
    """With reply reranking, eval.json's single_sample.any judges each prompt's first sampled reply."""
    from types import SimpleNamespace

    from anyloom.evaluation.run_eval import FirstSamples, PipelineModel

    class RerankingPipe:
        def generate_batch(self, prompts, to, seed, keep_first=False):
            assert keep_first
            return [SimpleNamespace(segments=["kept", p], first=SimpleNamespace(segments=["first", p]))
                    for p in prompts]

    model = PipelineModel(RerankingPipe(), seed=2, single_sample=True)
    since = {d: len(c) for d, c in model.firsts.items()}
    assert [r.segments for r in model.reply(["a", "b"])] == [["kept", "a"], ["kept", "b"]]
    assert [r.segments for r in FirstSamples(model, since).reply(["a", "b"])] == [["first", "a"], ["first", "b"]]


def test_mixed_reply_samples_are_written_in_the_replys_order(tmp_path):
    from types import SimpleNamespace

    import soundfile as sf
    from PIL import Image

    from anyloom.evaluation.run_eval import write_replies

    picture = SimpleNamespace(image=Image.new("RGB", (8, 8), (255, 0, 0)))
    speech = SimpleNamespace(wave=np.zeros(1600, dtype=np.float32), sample_rate=16000)
    reply = SimpleNamespace(text="here", segments=[SimpleNamespace(text="here"), picture, speech])
    write_replies([("draw one red circle and say it", reply)], tmp_path)
    assert (tmp_path / "any_0.txt").read_text() == "prompt: draw one red circle and say it\nreply: here\n"
    assert Image.open(tmp_path / "any_0_0.png").size == (8, 8)
    assert sf.info(str(tmp_path / "any_0_1.wav")).frames == 1600

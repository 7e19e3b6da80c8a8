"""The research API, scripts/generate.py and examples/ on a tiny run built from real (untrained) components.

The run has the layout ``load`` documents: a sentencepiece text tokenizer trained on captions, an ImageVQTokenizer
and a MelTokenizer with tiny configs (random weights: outputs are noise, but every shape, id range and file
format is the real one), and a random-weight LM export. Untrained weights cannot test quality; that is what
``make eval`` on a trained run measures.
"""

from __future__ import annotations

import json
import runpy
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from anyloom.data.document import AudioSegment
from anyloom.generation.config import GenerationConfig, ScorerSpec
from anyloom.generation.pipeline import GeneratedAudio, GeneratedImage, GeneratedText, PipelineError, load
from anyloom.sequences.vocab import Vocabulary
from anyloom.tokenizers.audio_mel import MelFeatureConfig, MelTokenizer, MelTokenizerConfig
from anyloom.tokenizers.image_quantizers import QuantizerConfig
from anyloom.tokenizers.image_vq import ImageVQConfig, ImageVQTokenizer
from anyloom.tokenizers.text import TextTokenizer
from anyloom.transformer.model import ModelConfig, Transformer
from anyloom.weights import save_weights

REPO_ROOT = Path(__file__).resolve().parents[1]

CAPTIONS = [f"{n} {c} {s}" for n in ("one", "two", "three") for c in ("red", "blue") for s in ("circles", "stars")]


def build_tiny_run(root: Path, audio_pattern: str = "delay") -> Path:
    """runs/<tiny>/ with stages/{text,image,audio}_tokenizer/tokenizer and export/ (the LM): make train's layout."""
    torch.manual_seed(0)
    stages = root / "stages"
    text = TextTokenizer.train(CAPTIONS * 20, vocab_size=300)
    text.save(stages / "text_tokenizer" / "tokenizer")
    qcfg = QuantizerConfig(codebook_size=32, kmeans_init=False, dead_code_threshold=0.0)
    image_cfg = ImageVQConfig(image_size=(16, 16), patch=1, channels=(8, 8, 16), dec_blocks=(1, 1, 1), latent_dim=8,
                              norm_groups=4, quantizer=qcfg)
    image = ImageVQTokenizer(image_cfg).eval()
    image.save(stages / "image_tokenizer" / "tokenizer")
    feats = MelFeatureConfig(n_fft=256, win_length=256, hop_length=160, n_mels=16)
    audio = MelTokenizer(MelTokenizerConfig(features=feats, channels=16, res_blocks=1, code_dim=8, num_codebooks=2,
                                            codebook_size=16, kmeans_init=False, griffin_lim_iters=2)).eval()
    audio.save(stages / "audio_tokenizer" / "tokenizer")
    vocab = Vocabulary.from_tokenizers(text, image, audio, audio_pattern=audio_pattern)
    cfg = ModelConfig(vocab_size=vocab.size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=1024)
    model = Transformer(cfg)
    save_weights(root / "export", model.state_dict(), cfg, vocab.to_dict())
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # latency-bound tiny decoding; see test_generation.py
    yield build_tiny_run(tmp_path_factory.mktemp("runs") / "tiny")
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(tiny_run):
    return load(tiny_run, device="cpu", config=GenerationConfig(max_audio_seconds=0.3))


def test_load_reaches_every_part(pipe, tiny_run):
    assert pipe.vocab.size == pipe.model.cfg.vocab_size
    assert pipe.text_tokenizer.vocab_size == pipe.vocab.text_size
    assert tuple(pipe.image_tokenizer.grid) == pipe.vocab.image_grid == (4, 4)
    assert pipe.audio_tokenizer.num_codebooks == 2
    again = load(tiny_run / "export", device="cpu")  # the export folder alone finds the run's stages too
    assert torch.equal(again.model.output.weight, pipe.model.output.weight)


def test_every_direction_gives_typed_outputs(pipe):
    img = pipe.generate("two red circles", to="image", seed=1)
    assert isinstance(img, GeneratedImage) and img.image.size == (16, 16) and img.codes.shape == (4, 4)
    assert int(img.codes.max()) < 32
    speech = pipe.generate("one blue star", to="audio", seed=1)
    assert isinstance(speech, GeneratedAudio) and speech.sample_rate == 16000 and speech.wave.ndim == 1
    frames = speech.codes.shape[1]
    assert speech.codes.shape[0] == 2 and 1 <= frames <= round(0.3 * pipe.audio_tokenizer.frame_rate)
    assert speech.wave.shape[0] > 0 and np.isfinite(speech.wave).all()
    caption = pipe.generate([img.image], to="text", max_text_tokens=8)
    assert isinstance(caption, GeneratedText) and len(caption.ids) <= 7  # the 8th token is eos at the latest
    assert caption.finished == (len(caption.ids) < 7)
    assert caption.text == pipe.text_tokenizer.decode(caption.ids)
    heard = pipe.generate(AudioSegment(speech.wave, speech.sample_rate), to="text", max_text_tokens=8)
    assert isinstance(heard, GeneratedText)
    assert isinstance(pipe.generate([img.image], to="audio"), GeneratedAudio)  # image -> speech
    assert isinstance(pipe.generate(AudioSegment(speech.wave, 16000), to="image"), GeneratedImage)  # speech -> image
    # the same seed gives the same image; batching gives each prompt its own row
    again = pipe.generate("two red circles", to="image", seed=1)
    assert torch.equal(again.codes, img.codes)
    batch = pipe.generate_batch(["two red circles", "three blue stars"], to="image", seed=1, temperature=0.0)
    greedy = pipe.generate("three blue stars", to="image", temperature=0.0)
    assert torch.equal(batch[1].codes, greedy.codes)


def test_streaming_callback_sees_every_token(pipe):
    seen = []
    out = pipe.generate("one red circle", to="image", on_step=lambda e: seen.append(int(e.tokens[0])))
    v = pipe.vocab
    assert seen[-1] == v.eoi and [v.image_code(t) for t in seen[:-1]] == out.codes.flatten().tolist()


def test_self_reranking_keeps_the_candidate_that_maps_back_to_the_prompt_best(pipe, tiny_run):
    from anyloom.generation.rerank import reverse_log_likelihood
    from anyloom.sequences.interleave import ImageIds, encode_document

    prompts = ["two red circles", "three blue stars"]
    n = 3
    pool = pipe.generate_batch([p for p in prompts for _ in range(n)], to="image", seed=4)  # the same draws
    best = pipe.generate_batch(prompts, to="image", seed=4, candidates=n)
    toks = [pipe.prompt_segments(p) for p in prompts]
    for i, b in enumerate(best):
        # the score is log p(prompt | image) of the i2t document, computed here by one full forward
        scores = []
        for g in pool[i * n:(i + 1) * n]:
            doc = encode_document([ImageIds(g.codes.numpy()), *toks[i]], pipe.vocab, loss=[False, True])
            ids = torch.from_numpy(doc.ids)[None]
            with torch.no_grad():
                logp = torch.log_softmax(pipe.model.logits(pipe.model(ids[:, :-1])).double(), -1)[0]
            picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
            scores.append(float(picked[torch.from_numpy(doc.loss_mask[1:])].sum()))
        k = int(np.argmax(scores))
        assert torch.equal(b.codes, pool[i * n + k].codes)
        assert b.score == pytest.approx(scores[k], abs=1e-4)
    # keep_candidates: every candidate decoded with its score, best first, the kept one first of all
    kept = pipe.generate_batch(prompts, to="image", seed=4, candidates=n, keep_candidates=True)
    for i, k in enumerate(kept):
        assert torch.equal(k.codes, best[i].codes) and torch.equal(k.candidates[0].codes, k.codes)
        assert [c.score for c in k.candidates] == sorted((c.score for c in k.candidates), reverse=True)
        assert sorted(c.codes.flatten().tolist() for c in k.candidates) == sorted(
            g.codes.flatten().tolist() for g in pool[i * n:(i + 1) * n])
        assert all(c.image.size == k.image.size for c in k.candidates)
    ragged = reverse_log_likelihood(pipe.model, pipe.vocab, [ImageIds(g.codes.numpy()) for g in pool[:2]],
                                    [toks[0], pipe.prompt_segments("one red circle and more words")], batch_size=2)
    alone = reverse_log_likelihood(pipe.model, pipe.vocab, [ImageIds(pool[0].codes.numpy())], [toks[0]])
    assert ragged[0].item() == pytest.approx(alone[0].item(), abs=1e-4)  # right padding changes nothing
    # the config's image_candidates applies to images only: other targets still generate
    reranking = replace(pipe.config, image_candidates=n)
    cfg_pipe = load(tiny_run, device="cpu", config=reranking)
    assert isinstance(cfg_pipe.generate([best[0].image], to="text", max_text_tokens=4), GeneratedText)
    assert torch.equal(cfg_pipe.generate_batch(prompts, to="image", seed=4)[1].codes, best[1].codes)
    with pytest.raises(ValueError, match="image_candidates"):
        GenerationConfig(image_candidates=0)


def test_speech_reranking_keeps_the_utterance_that_maps_back_to_the_prompt_best(pipe, tiny_run):
    from anyloom.generation.rerank import reverse_log_likelihood
    from anyloom.sequences.interleave import AudioIds

    prompts = ["two red circles", "three blue stars"]
    n = 3
    pool = pipe.generate_batch([p for p in prompts for _ in range(n)], to="audio", seed=2, max_audio_seconds=0.2)
    best = pipe.generate_batch(prompts, to="audio", seed=2, max_audio_seconds=0.2, candidates=n)
    toks = [pipe.prompt_segments(p) for p in prompts]
    scores = reverse_log_likelihood(pipe.model, pipe.vocab, [AudioIds(g.codes.numpy()) for g in pool],
                                    [toks[i // n] for i in range(len(pool))]).view(len(prompts), n)
    assert len({tuple(g.codes.flatten().tolist()) for g in pool[:n]}) > 1  # the candidates differ
    for i, b in enumerate(best):
        k = int(scores[i].argmax())
        assert torch.equal(b.codes, pool[i * n + k].codes) and b.score == pytest.approx(float(scores[i, k]), abs=1e-4)
        # only the kept utterance is vocoded, after the pick: the same wave as the candidate decoded on its own
        assert b.sample_rate == pool[i * n + k].sample_rate and np.array_equal(b.wave, pool[i * n + k].wave)
    assert pipe.generate_batch(prompts[:1], to="audio", seed=2, max_audio_seconds=0.2)[0].score is None
    # with audio_likelihood_weight w: + w * log p(speech | prompt) per frame, scored here by one full forward each
    from anyloom.sequences.interleave import encode_document

    w = 5.0
    scorers = (ScorerSpec("lm_reverse"), ScorerSpec("lm_forward_per_frame", w))
    typical = load(tiny_run, device="cpu", config=replace(pipe.config, audio_scorers=scorers))
    picked = typical.generate_batch(prompts, to="audio", seed=2, max_audio_seconds=0.2, candidates=n)
    for i, b in enumerate(picked):
        total = []
        for k, g in enumerate(pool[i * n:(i + 1) * n]):
            doc = encode_document([*toks[i], AudioIds(g.codes.numpy())], pipe.vocab,
                                  loss=[False] * len(toks[i]) + [True])
            ids = torch.from_numpy(doc.ids)[None]
            with torch.no_grad():
                logp = torch.log_softmax(pipe.model.logits(pipe.model(ids[:, :-1])).double(), -1)[0]
            own = float(logp.gather(-1, ids[0, 1:, None])[:, 0][torch.from_numpy(doc.loss_mask[1:])].sum())
            total.append(float(scores[i, k]) + w * own / g.codes.shape[-1])
        k = int(np.argmax(total))
        assert torch.equal(b.codes, pool[i * n + k].codes) and b.score == pytest.approx(total[k], abs=1e-3)
    with pytest.raises(ValueError, match="did you mean 'lm_forward_per_frame'"):
        ScorerSpec("lm_forward_perframe")
    with pytest.raises(ValueError, match="audio_scorers is empty"):
        GenerationConfig(audio_scorers=())
    with pytest.raises(PipelineError, match="'round_trip' scorer scores image candidates, not audio"):
        load(tiny_run, device="cpu", config=replace(pipe.config, audio_scorers=(ScorerSpec("round_trip"),)))


def test_matcher_reranking_keeps_the_image_the_matcher_scores_highest(pipe, tiny_run, tmp_path):
    from anyloom.matcher.model import ImageTextMatcher, MatcherConfig

    torch.manual_seed(1)
    matcher = ImageTextMatcher(MatcherConfig(image_size=(16, 16), channels=(8, 8, 8), hidden=16, dim=16,
                                             text_vocab=pipe.text_tokenizer.vocab_size))
    folder = matcher.save(tmp_path / "matcher")
    cfg = replace(pipe.config, image_scorers=(ScorerSpec("matcher"),))
    with pytest.raises(PipelineError, match="no image matcher"):
        load(tiny_run, device="cpu", config=cfg)  # the tiny run has no image_matcher stage
    mpipe = load(tiny_run, device="cpu", config=cfg, image_matcher=folder)
    prompts, n = ["two red circles", "three blue stars"], 4
    pool = mpipe.generate_batch([p for p in prompts for _ in range(n)], to="image", seed=5)  # the same draws
    best = mpipe.generate_batch(prompts, to="image", seed=5, candidates=n)
    texts = [pipe.text_tokenizer.encode(p) for p in prompts for _ in range(n)]
    scores = matcher.similarity(np.stack([np.asarray(g.image) for g in pool]), texts).view(len(prompts), n)
    assert len(set(scores[0].tolist())) == n  # distinct candidates, distinct scores
    for i, b in enumerate(best):
        k = int(scores[i].argmax())
        assert torch.equal(b.codes, pool[i * n + k].codes) and b.score == pytest.approx(float(scores[i, k]), abs=1e-5)
    # with image_round_trip_weight w: - w * log(round-trip error), each error recomputed here picture by picture
    from anyloom.generation.rerank import ROUND_TRIP_FLOOR, round_trip_error

    w, tok = 2.0, pipe.image_tokenizer
    errors = []
    for g in pool:
        x = torch.from_numpy(np.asarray(g.image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        with torch.no_grad():
            errors.append(float((tok.decode(tok.encode(x).codes) - x).square().mean()))
    errors = torch.tensor(errors, dtype=torch.float64).view(len(prompts), n)
    assert torch.allclose(round_trip_error(tok, np.stack([np.asarray(g.image) for g in pool])).view(len(prompts), n),
                          errors, rtol=1e-4)
    total = scores.double() - w * torch.log(errors + ROUND_TRIP_FLOOR)
    assert not torch.equal(total.argmax(1), scores.argmax(1))  # the second term changes a pick here
    with_round_trip = replace(cfg, image_scorers=(ScorerSpec("matcher"), ScorerSpec("round_trip", w)))
    round_trip = load(tiny_run, device="cpu", config=with_round_trip, image_matcher=folder)
    for i, b in enumerate(round_trip.generate_batch(prompts, to="image", seed=5, candidates=n)):
        k = int(total[i].argmax())
        assert torch.equal(b.codes, pool[i * n + k].codes) and b.score == pytest.approx(float(total[i, k]), abs=1e-3)
    with pytest.raises(ValueError, match="uint8"):
        round_trip_error(tok, np.zeros((2, 16, 16, 3), dtype=np.float32))
    # pictures are decoded many per call: each one as it looks decoded alone (float rounding: at most one level)
    from anyloom.decoders.images import decode_image_codes

    for g in pool[:3]:
        alone = np.asarray(decode_image_codes(pipe.image_tokenizer, g.codes[None])[0], dtype=np.int16)
        assert np.abs(np.asarray(g.image, dtype=np.int16) - alone).max() <= 1
    # a prompt without text (speech -> image) cannot be matched: the model's own score picks for it
    speech = mpipe.generate("one blue star", to="audio", seed=1)
    assert isinstance(mpipe.generate(AudioSegment(speech.wave, 16000), to="image", candidates=2), GeneratedImage)
    with pytest.raises(ValueError, match="scorer 'clip' is unknown"):
        ScorerSpec("clip")
    with pytest.raises(PipelineError, match="region head"):  # the world's scorer needs the world's matcher head
        load(tiny_run, device="cpu", config=replace(cfg, image_scorers=(ScorerSpec("world_regions"),)),
             image_matcher=folder)
    for i, changed in enumerate(({"text_vocab": pipe.text_tokenizer.vocab_size + 7}, {"image_size": (32, 32)})):
        other = ImageTextMatcher(replace(matcher.cfg, **changed))
        with pytest.raises(PipelineError, match="belongs to another run"):
            load(tiny_run, device="cpu", config=cfg, image_matcher=other.save(tmp_path / f"other{i}"))
    # the world's scorer reads the region head the world's matcher carries: the pick is its consistency's argmax,
    # and a weighted sum adds it to the matcher's score in the listed order
    from anyloom.matcher.model import HeadSpec
    from anyloom.world.regions import RegionOptions

    torch.manual_seed(2)
    regions = RegionOptions(keys=("shape", "color"), values=(("circle", "star"), ("blue", "red")), channels=8,
                            contact=True, colorblind=("shape",))
    world_matcher = ImageTextMatcher(replace(matcher.cfg), HeadSpec("world_regions", regions))
    world_folder = world_matcher.save(tmp_path / "world_matcher")
    pixels = np.stack([np.asarray(g.image) for g in pool])
    consistency = ImageTextMatcher.load(world_folder).head.consistency(pixels).double().view(len(prompts), n)
    similarity = ImageTextMatcher.load(world_folder).similarity(pixels, texts).double().view(len(prompts), n)
    assert len(set(consistency[0].tolist())) == n
    for scorers, expected in (((ScorerSpec("world_regions"),), consistency),
                              ((ScorerSpec("matcher"), ScorerSpec("world_regions", 2.0)),
                               similarity + 2.0 * consistency)):
        wpipe = load(tiny_run, device="cpu", config=replace(cfg, image_scorers=scorers), image_matcher=world_folder)
        for i, b in enumerate(wpipe.generate_batch(prompts, to="image", seed=5, candidates=n)):
            k = int(expected[i].argmax())
            assert torch.equal(b.codes, pool[i * n + k].codes)
            assert b.score == pytest.approx(float(expected[i, k]), abs=1e-4)


def test_a_scorer_is_a_small_contract(pipe, tiny_run, monkeypatch):
    """A dataset's own scorer: a class built with the pipeline, called with the candidates, (N,) scores; the pick is
    the highest weighted score, and the pictures it looked at are decoded once."""
    from anyloom.generation import scorers

    class Brightness:
        targets = ("image",)

        def __init__(self, pipeline):
            self.calls = 0

        def __call__(self, candidates):
            return torch.from_numpy(candidates.pixels().reshape(len(candidates), -1).mean(1)).double()

    monkeypatch.setitem(scorers.BUILTIN, "brightness", Brightness)  # as an installed package's entry point would
    bright = load(tiny_run, device="cpu", config=replace(pipe.config, image_scorers=(ScorerSpec("brightness", 2.0),)))
    n = 3
    pool = bright.generate_batch(["two red circles"] * n, to="image", seed=5)  # the same draws
    best = bright.generate("two red circles", to="image", seed=5, candidates=n)
    means = [np.asarray(g.image, dtype=np.float64).mean() for g in pool]
    k = int(np.argmax(means))
    assert torch.equal(best.codes, pool[k].codes) and best.score == pytest.approx(2.0 * means[k])
    with pytest.raises(PipelineError, match="scores image candidates, not text"):
        load(tiny_run, device="cpu", config=replace(pipe.config, text_scorers=(ScorerSpec("brightness"),)))


def test_noisy_channel_caption_reranking(pipe):
    """Text from an image: the greedy caption and ``n - 1`` sampled ones, the highest log p(text | image) +
    w * log p(image | text) kept, both terms checked here by full forwards; a text-only prompt keeps its greedy
    text."""
    from anyloom.sequences.interleave import TextIds, encode_document

    assert [(s.name, s.weight) for s in pipe.config.text_scorers] == [("lm_forward", 1.0), ("lm_reverse", 0.3)]
    w, n, hot, seed = 0.3, 5, pipe.config.text_candidate_temperature, 3
    image = pipe.generate("two red circles", to="image", seed=0).image
    prompts = [[image], "two red"]
    greedy = pipe.generate_batch(prompts, to="text", max_text_tokens=5)
    pool = pipe.generate_batch([[image]] * (n - 1), to="text", temperature=hot, seed=seed, max_text_tokens=5)
    got = pipe.generate_batch(prompts, to="text", max_text_tokens=5, candidates=n, seed=seed)
    assert got[1].ids == greedy[1].ids and got[1].score is None  # nothing to rerank by
    image_ids = pipe.prompt_segments([image])[0]

    def logp(segments, scored):  # sum of log p over the scored segments' tokens, one full forward
        doc = encode_document(segments, pipe.vocab, loss=scored)
        ids = torch.from_numpy(doc.ids)[None]
        with torch.no_grad():
            lp = torch.log_softmax(pipe.model.logits(pipe.model(ids[:, :-1])).double(), -1)[0]
        return float(lp.gather(-1, ids[0, 1:, None])[:, 0][torch.from_numpy(doc.loss_mask[1:])].sum())

    texts = list(dict.fromkeys(tuple(g.ids) for g in [greedy[0], *pool]))
    assert len(texts) > 1  # sampling at the candidate temperature found other captions
    scores = [logp([image_ids, TextIds(np.array(t))], [False, True]) + w * logp([TextIds(np.array(t)), image_ids],
                                                                               [False, True]) for t in texts]
    k = int(np.argmax(scores))
    assert tuple(got[0].ids) == texts[k] and got[0].score == pytest.approx(scores[k], abs=1e-3)
    for bad in ({"text_candidates": 0}, {"text_candidate_temperature": 0.0}):
        with pytest.raises(ValueError, match="text_c"):
            GenerationConfig(**bad)


def test_bad_requests_get_clear_errors(pipe, tmp_path):
    with pytest.raises(PipelineError, match="to='video'"):
        pipe.generate("a red circle", to="video")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        pipe.generate([{"image": str(tmp_path / "nope.png")}], to="text")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(PipelineError, match="bad.png: not a readable image"):
        pipe.generate([{"image": str(tmp_path / "bad.png")}], to="text")
    with pytest.raises(PipelineError, match="exactly one key"):
        pipe.generate([{"txt": "a"}], to="image")
    with pytest.raises(PipelineError, match="empty text"):
        pipe.generate("  ", to="image")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "missing")
    with pytest.raises(PipelineError, match="neither an export folder"):
        load(tmp_path)


def test_load_refuses_a_tokenizer_of_another_run(tiny_run, tmp_path):
    words = " ".join(f"word{i}" for i in range(200))
    other = TextTokenizer.train(CAPTIONS + [words] * 5, vocab_size=420)
    assert other.vocab_size != TextTokenizer.load(tiny_run / "stages" / "text_tokenizer" / "tokenizer").vocab_size
    other.save(tmp_path / "text")
    with pytest.raises(PipelineError, match="vocab_size"):
        load(tiny_run, device="cpu", text_tokenizer=tmp_path / "text")


@dataclass
class ScriptResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_script(capsys):
    """scripts/generate.py's main() in this process (a subprocess would re-import torch and diffusers)."""
    main = runpy.run_path(str(REPO_ROOT / "scripts" / "generate.py"), run_name="generate_script")["main"]

    def call(args: list[str]) -> ScriptResult:
        capsys.readouterr()
        code = main(args)
        out = capsys.readouterr()
        return ScriptResult(code, out.out, out.err)

    return call


def test_generate_script_all_directions(tiny_run, tmp_path, run_script):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "in.png")
    sf.write(str(tmp_path / "in.wav"), np.sin(np.linspace(0, 400, 8000)).astype(np.float32) * 0.3, 16000)
    prompts = [
        {"segments": [{"text": "two red circles"}], "to": "image"},
        {"segments": [{"text": "one blue star"}], "to": "audio"},
        {"segments": [{"image": "in.png"}], "to": "text"},
        {"segments": [{"audio": "in.wav"}], "to": "text"},
        {"segments": [{"image": "in.png"}], "to": "audio"},
        {"segments": [{"audio": "in.wav"}, {"text": "and"}], "to": "image"},
    ]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "out"
    r = run_script(["--run", str(tiny_run), "--prompts", str(tmp_path / "prompts.json"), "--out", str(out),
                     "--max-audio-seconds", "0.3", "--max-text-tokens", "6"])
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    kinds = [item["to"] for item in summary["outputs"]]
    assert kinds == ["image", "audio", "text", "text", "audio", "image"]
    for item in summary["outputs"]:
        assert (out / item["file"]).is_file()
    assert Image.open(out / summary["outputs"][0]["file"]).size == (16, 16)
    wave, sr = sf.read(str(out / summary["outputs"][1]["file"]))
    assert sr == 16000 and wave.shape[0] > 0
    # a second call into the same folder keeps the first call's files and continues the numbering
    first = {item["file"]: (out / item["file"]).read_bytes() for item in summary["outputs"]}
    r = run_script(["--run", str(tiny_run), "--prompt", "three blue stars", "--to", "image", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [item["index"] for item in summary["outputs"]] == list(range(7))
    assert summary["outputs"][6]["file"] == "006_image.png" and (out / "006_image.png").is_file()
    assert all((out / name).read_bytes() == data for name, data in first.items())
    # the single-prompt form, with its default output folder <run>/samples/generate
    r = run_script(["--run", str(tiny_run), "--prompt", "three blue stars", "--to", "image"])
    assert r.returncode == 0, r.stderr
    assert (tiny_run / "samples" / "generate" / "summary.json").is_file()


def test_generate_script_bad_input(tiny_run, tmp_path, run_script):
    r = run_script(["--run", str(tiny_run), "--image", str(tmp_path / "none.png"), "--to", "text"])
    assert r.returncode == 2 and "none.png" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "p.json").write_text('[{"segments": [{"text": "a"}], "to": "smell"}]')
    r = run_script(["--run", str(tiny_run), "--prompts", str(tmp_path / "p.json")])
    assert r.returncode == 2 and "p.json" in r.stderr and "smell" in r.stderr and "Traceback" not in r.stderr
    r = run_script(["--run", str(tmp_path / "no_run"), "--prompt", "x", "--to", "image"])
    assert r.returncode == 2 and "no_run" in r.stderr


EXAMPLES = sorted(p for p in (REPO_ROOT / "examples").glob("*.py") if p.name != "common.py")  # common: their helper


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_run(example, tiny_run, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(example.parent))  # as `python examples/x.py` puts examples/ on the path
    monkeypatch.setattr(sys, "argv", [str(example), "--run", str(tiny_run), "--out", str(tmp_path)])
    runpy.run_path(str(example), run_name="__main__")
    assert any(tmp_path.iterdir()), f"{example.name} wrote nothing to --out"


def test_image_decoder_choice_vq_or_diffusion(tmp_path):
    """generation.image_decoder / image_decoder=: the same codes through the VQ decoder or the run's diffusion
    decoder (seeded by the request); scorers pick the same candidate either way; a run without one refuses."""
    from anyloom.decoders.diffusion import DiffusionDecoder, DiffusionDecoderConfig
    from anyloom.decoders.images import DiffusionImageDecoder

    run = build_tiny_run(tmp_path / "tiny")
    with pytest.raises(PipelineError, match="no diffusion decoder"):
        load(run, device="cpu").generate("two red circles", to="image", image_decoder="diffusion")
    torch.manual_seed(0)
    decoder = DiffusionDecoder(DiffusionDecoderConfig(image_size=(16, 16), block_out_channels=(8, 16),
                                                      norm_num_groups=4, inference_steps=2))
    decoder.save(run / "stages" / "diffusion_decoder" / "decoder")
    pipe = load(run, device="cpu")
    vq = pipe.generate("two red circles", to="image", seed=3, candidates=2, keep_candidates=True)
    diff = pipe.generate("two red circles", to="image", seed=3, candidates=2, keep_candidates=True,
                         image_decoder="diffusion")
    assert torch.equal(vq.codes, diff.codes) and vq.score == diff.score  # the same candidate kept
    expected = DiffusionImageDecoder(pipe.diffusion, seed=3)(pipe.image_tokenizer,
                                                             torch.stack([c.codes for c in diff.candidates]))
    assert np.array_equal(np.asarray(diff.image), np.asarray(expected[0]))
    assert [np.asarray(c.image).tolist() for c in diff.candidates] == [np.asarray(e).tolist() for e in expected]
    assert not np.array_equal(np.asarray(diff.image), np.asarray(vq.image))
    by_recipe = load(run, device="cpu", config=GenerationConfig(image_decoder="diffusion"))
    again = by_recipe.generate("two red circles", to="image", seed=3, candidates=2)
    assert np.array_equal(np.asarray(again.image), np.asarray(diff.image))


def test_mixed_modal_reply_parses_into_decoded_segments(tmp_path):
    """to="any": the model opens picture and speech spans itself; the reply is its segments in order, decoded,
    and encoding them again gives the generated stream."""
    from anyloom.generation.pipeline import GeneratedReply
    from anyloom.sequences.interleave import AudioIds, ImageIds, TextIds, encode_document

    pipe = load(build_tiny_run(tmp_path / "tiny"), device="cpu", config=GenerationConfig(max_audio_seconds=0.2,
                                                                                           max_text_tokens=6))
    v = pipe.vocab
    with torch.no_grad():  # random weights seldom open spans: make the markers likely so every branch runs
        pipe.model.output.weight[v.boi].copy_(pipe.model.norm.weight * 0.6)
        pipe.model.output.weight[v.boa].copy_(pipe.model.norm.weight * 0.6)
    kinds = set()
    for seed in range(6):
        reply = pipe.generate(text="two red circles", to="any", seed=seed)
        assert isinstance(reply, GeneratedReply)
        segments = []
        for part in reply.segments:
            if isinstance(part, GeneratedText):
                segments.append(TextIds(np.asarray(part.ids, dtype=np.int64)))
            elif isinstance(part, GeneratedImage):
                assert part.image.size == (16, 16)
                segments.append(ImageIds(part.codes.numpy()))
            else:
                assert isinstance(part, GeneratedAudio) and part.wave.size > 0
                segments.append(AudioIds(part.codes.numpy()))
            kinds.add(type(part).__name__)
        again = encode_document(segments, v, bos=False, eos=reply.finished).ids.tolist()
        assert again == reply.ids[:len(again)] and len(reply.ids) - len(again) <= 1  # an eos forced by the budget
    assert {"GeneratedImage", "GeneratedAudio"} <= kinds, kinds


def test_make_generate_to_any_writes_the_reply_in_order(tmp_path):
    from generate import main as generate_main

    run = build_tiny_run(tmp_path / "tiny")
    pipe = load(run, device="cpu")
    v = pipe.vocab
    with torch.no_grad():
        pipe.model.output.weight[v.boi].copy_(pipe.model.norm.weight * 0.6)
    from anyloom.weights import save_weights

    save_weights(run / "export", pipe.model.state_dict(), pipe.model.cfg, v.to_dict())
    out = tmp_path / "out"
    assert generate_main(["--run", str(run), "--prompt", "two red circles", "--to", "any", "--seed", "1",
                          "--max-text-tokens", "4", "--max-audio-seconds", "0.2", "--out", str(out)]) == 0
    record = json.loads((out / "summary.json").read_text())["outputs"][0]
    assert record["to"] == "any" and record["files"][0] == "000_any.txt"
    assert all((out / f).is_file() for f in record["files"]) and any(f.endswith(".png") for f in record["files"])
    with pytest.raises(PipelineError, match="to='any' takes .*not top_k"):
        pipe.generate(text="x", to="any", top_k=4)


def test_mixed_reply_reranking_votes_on_the_form_then_scores_the_spans(pipe, monkeypatch):
    """Of several replies, the form most of them take wins (ties: the first sampled), and within it the reply whose
    spans score highest, each modality's scores standardised over that form's replies."""
    from anyloom.sequences.interleave import AudioIds, ImageIds, TextIds

    def picture(k):
        return ImageIds(np.full((4, 4), k, dtype=np.int64))

    def speech(k):
        return AudioIds(np.full((2, 3), k, dtype=np.int64))

    words = TextIds(np.asarray([5], dtype=np.int64))
    parsed = [[picture(0), speech(0)], [picture(1)], [words, picture(2), words, speech(2)], [picture(3), speech(3)],
              [words]]
    seen = {}

    def score(candidates):
        seen[candidates.to] = [int(s.codes.flat[0]) for s in candidates.segments]
        # pictures: 1, 2, 0 -> standardised 0, +1.22, -1.22; speech: 0, 10, 5 -> -1.22, +1.22, 0
        return torch.tensor({"image": [1.0, 2.0, 0.0], "audio": [0.0, 10.0, 5.0]}[candidates.to], dtype=torch.float64)

    monkeypatch.setattr(pipe, "score", score)
    kept, total = pipe._best_reply(parsed, [], "griffin_lim")
    assert seen == {"image": [0, 2, 3], "audio": [0, 2, 3]}  # the text segments neither vote nor score
    assert kept == 2 and total == pytest.approx(2 * 1.5 ** 0.5)
    assert pipe._best_reply([[speech(0)], [picture(1)], [picture(2), speech(2)]], [], "griffin_lim") == (0, None)
    assert pipe._best_reply([[words], [picture(1)], [words]], [], "griffin_lim") == (0, None)  # no spans: the first


def test_mixed_reply_candidates_come_from_one_call(tmp_path):
    from anyloom.generation.pipeline import GeneratedReply

    pipe = load(build_tiny_run(tmp_path / "tiny"), device="cpu",
                config=GenerationConfig(max_audio_seconds=0.2, max_text_tokens=4, reply_candidates=3))
    v = pipe.vocab
    with torch.no_grad():
        pipe.model.output.weight[v.boi].copy_(pipe.model.norm.weight * 0.6)
    reply = pipe.generate(text="two red circles", to="any", seed=2, keep_first=True)
    assert isinstance(reply, GeneratedReply) and isinstance(reply.first, GeneratedReply)
    assert reply.of(GeneratedImage) and (reply.score is None or np.isfinite(reply.score))
    single = pipe.generate(text="two red circles", to="any", seed=2, candidates=1, keep_first=True)
    assert single.first.ids == single.ids and single.score is None
    with pytest.raises(PipelineError, match="candidates must be >= 1"):
        pipe.generate(text="x", to="any", candidates=0)


def test_keep_first_returns_the_sample_before_reranking(pipe):
    out = pipe.generate("two red circles", to="image", seed=4, candidates=3, keep_first=True, keep_candidates=True)
    same = [c for c in out.candidates if torch.equal(c.codes, out.first.codes)]
    assert same and same[0].score == out.first.score and out.first.image is not None
    single = pipe.generate("two red circles", to="image", seed=4, keep_first=True)
    assert torch.equal(single.first.codes, single.codes) and single.first.image is single.image
    text = pipe.generate([out.image], to="text", candidates=3, keep_first=True, max_text_tokens=6)
    greedy = pipe.generate([out.image], to="text", max_text_tokens=6)
    assert text.first.ids == greedy.ids  # a text's single sample is its greedy one


def test_bench_generation_times_a_runs_pipeline_on_the_whole_cache_and_the_prefix(tiny_run, tmp_path):
    """scripts/bench_generation.py --run: both ways of reading the cache give the same codes (fixed seed)."""
    from bench_generation import main as bench_main

    out = tmp_path / "pipeline.json"
    assert bench_main(["--run", str(tiny_run), "--batch", "2", "--repeats", "1", "--threads", "1",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["to"] for r in rows] == ["image", "audio"] and all(r["same_codes"] for r in rows)
    assert all(r["whole_cache_s"] > 0 and r["prefix_s"] > 0 for r in rows)
    assert bench_main(["--run", str(tiny_run), "--batch", "2", "--repeats", "1", "--threads", "1",
                       "--precision", "fp32", "bf16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["to"] for r in rows] == ["image", "audio"] and all(r["bf16_speedup_vs_fp32"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        bench_main(["--precision", "bf16"])  # compares a run's pipeline: --run is needed


def test_mixed_replies_in_a_batch_are_each_prompts_own(tmp_path):
    """generate_batch(to="any") decodes the prompts as one left-padded batch: greedy, each reply is the one its prompt
    gets alone."""
    from anyloom.generation.pipeline import GeneratedReply
    from anyloom.generation.sampling import SamplingConfig

    greedy = SamplingConfig(temperature=0.0)
    pipe = load(build_tiny_run(tmp_path / "tiny"), device="cpu",
                config=GenerationConfig(text=greedy, image=greedy, audio=greedy, max_audio_seconds=0.2,
                                        max_text_tokens=4))
    with torch.no_grad():
        pipe.model.output.weight[pipe.vocab.boi].copy_(pipe.model.norm.weight * 0.6)
    prompts = ["two red circles", "one blue star and two more"]
    batch = pipe.generate_batch(prompts, to="any", seed=0)
    alone = [pipe.generate(text=p, to="any", seed=0) for p in prompts]
    assert all(isinstance(r, GeneratedReply) for r in batch)
    assert [r.ids for r in batch] == [r.ids for r in alone] and any(r.of(GeneratedImage) for r in batch)
    with pytest.raises(PipelineError, match="not image_decoder"):
        pipe.generate_batch(prompts, to="any", image_decoder="vq")


def test_generation_precision_puts_the_lm_in_bf16_where_asked(tiny_run, monkeypatch):
    from anyloom import device as devices

    with pytest.raises(ValueError, match="precision='fp16': expected one of fp32, bf16, native_bf16"):
        GenerationConfig(precision="fp16")
    cpu = torch.device("cpu")
    for amx, avx512_bf16, want in ((False, False, torch.float32), (False, True, torch.bfloat16),
                                   (True, False, torch.bfloat16)):
        monkeypatch.setattr(devices, "cpu_has_amx", lambda amx=amx: amx)
        monkeypatch.setattr(devices, "cpu_has_avx512_bf16", lambda on=avx512_bf16: on)
        assert GenerationConfig(precision="native_bf16").lm_dtype(cpu) == want
    assert GenerationConfig(precision="bf16").lm_dtype(cpu) == torch.bfloat16  # asked for: whatever the CPU has
    assert GenerationConfig().lm_dtype(cpu) == torch.float32  # the default
    fp32 = load(tiny_run, device="cpu", config=GenerationConfig(max_audio_seconds=0.3))
    bf16 = load(tiny_run, device="cpu", config=GenerationConfig(max_audio_seconds=0.3, precision="bf16"))
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    # the same greedy picture and caption (the tiny model's top tokens are far enough apart for bf16 rounding)
    a = fp32.generate("two red circles", to="image", temperature=0.0)
    b = bf16.generate("two red circles", to="image", temperature=0.0)
    agree = float((a.codes == b.codes).float().mean())
    assert agree >= 0.75, agree
    assert isinstance(bf16.generate([b.image], to="text", max_text_tokens=6), GeneratedText)
    assert isinstance(bf16.generate("one blue star", to="audio", seed=1), GeneratedAudio)

"""Decoders: VQ and codec wrappers (shapes, values, WAV round trip, bad input) and the diffusion decoder
(loss decreases, seeded sampling is deterministic, save/load, resume equals uninterrupted).

Tokenizers here are small exact test doubles, so the expected outputs can be written down."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from anyloom.config import ConfigError, build
from anyloom.decoders.audio import decode_audio_codes, write_wav
from anyloom.decoders.diffusion import DiffusionDecoder, DiffusionDecoderConfig
from anyloom.decoders.images import DiffusionImageDecoder, decode_image_codes
from anyloom.evaluation.decoders import compare_decoders
from anyloom.evaluation.image_metrics import psnr
from anyloom.tokenizers.base import AudioCodes, AudioTokenizer, ImageCodes, ImageTokenizer
from anyloom.tokenizers.image_vq import float_to_uint8
from anyloom.training.diffusion_decoder import (
    DiffusionDecoderStageConfig,
    train_diffusion_decoder_on_images,
)
from anyloom.training.metrics import read_metrics
from anyloom.training.optim import OptimConfig
from anyloom.training.run import RunDir

PALETTE = torch.tensor(
    [[-1, -1, -1], [1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [0.2, 0.2, 0.2], [-0.6, 0.4, 1.0]]
)


class PaletteTokenizer:
    """Average-pool each 4x4 patch and code it as the nearest palette colour; decode paints the patch."""

    def __init__(self, image_size: tuple[int, int] = (16, 16), patch: int = 4):
        self.image_size = image_size
        self.patch = patch
        self.grid = (image_size[0] // patch, image_size[1] // patch)
        self.codebook_size = len(PALETTE)

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def encode(self, images: torch.Tensor) -> ImageCodes:
        pooled = rearrange(F.avg_pool2d(images, self.patch), "b c h w -> b h w c")  # (B, h, w, 3)
        dist = (pooled[..., None, :] - PALETTE).square().sum(-1)  # (B, h, w, K)
        return ImageCodes(codes=dist.argmin(-1))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        img = rearrange(PALETTE[codes], "b h w c -> b c h w")
        return F.interpolate(img, scale_factor=self.patch, mode="nearest")


class ToneCodec:
    """Each frame is 80 samples of a sine: level 0 picks the amplitude, level 1 the frequency."""

    sample_rate = 8000
    frame_rate = 100.0
    num_codebooks = 2
    codebook_size = 16

    def encode(self, wave: torch.Tensor, sample_rate: int) -> AudioCodes:
        raise NotImplementedError("decode-only test double")

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        amp = (codes[:, 0].float() + 1) / 16  # (B, F)
        freq = 100.0 * (codes[:, 1].float() + 1)  # (B, F)
        t = torch.arange(80) / self.sample_rate  # (80,)
        wave = amp[..., None] * torch.sin(2 * torch.pi * freq[..., None] * t)  # (B, F, 80)
        return rearrange(wave, "b f s -> b (f s)")


def palette_images(n: int, seed: int) -> np.ndarray:
    """(n, 16, 16, 3) uint8 pictures made of 4x4 palette blocks plus fine detail the codes cannot carry."""
    g = torch.Generator().manual_seed(seed)
    tok = PaletteTokenizer()
    coarse = tok.decode(torch.randint(0, len(PALETTE), (n, 4, 4), generator=g))  # (n, 3, 16, 16)
    stripes = 0.3 * torch.sign(torch.sin(torch.arange(16) * 1.7)).view(1, 1, 1, 16)
    x = (coarse + stripes).clamp(-1, 1)
    return ((rearrange(x, "n c h w -> n h w c") + 1) * 127.5).round().to(torch.uint8).numpy()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


TINY = DiffusionDecoderConfig(
    image_size=(16, 16),
    block_out_channels=(8, 16),
    norm_num_groups=4,
    attention_levels=0,
    num_train_timesteps=100,
    inference_steps=3,
)


def test_test_doubles_honour_the_contracts():
    assert isinstance(PaletteTokenizer(), ImageTokenizer)
    assert isinstance(ToneCodec(), AudioTokenizer)


# -- images ------------------------------------------------------------------------------------------------


def test_decode_image_codes_paints_the_codebook_colours():
    tok = PaletteTokenizer()
    codes = torch.arange(16).remainder(8).view(1, 4, 4).repeat(2, 1, 1)
    codes[1] = 7 - codes[1]
    images = decode_image_codes(tok, codes)
    assert len(images) == 2 and all(isinstance(im, Image.Image) for im in images)
    assert images[0].size == (16, 16) and images[0].mode == "RGB"
    px = np.asarray(images[1])  # (16, 16, 3)
    expected = ((PALETTE[7 - 5] + 1) * 127.5).round().numpy()  # code at grid (1, 1) is 7 - 5
    np.testing.assert_array_equal(px[4:8, 4:8].reshape(-1, 3), np.tile(expected, (16, 1)))
    # a single (h, w) grid and an ImageCodes both work and agree
    one = decode_image_codes(tok, codes[0])
    assert len(one) == 1 and np.array_equal(np.asarray(one[0]), np.asarray(images[0]))
    assert np.array_equal(np.asarray(decode_image_codes(tok, ImageCodes(codes))[1]), px)


@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.full((1, 4, 4), 8), r"out of range: 16 value\(s\) outside \[0, 8\)"),
        (torch.full((1, 4, 4), -1), "out of range"),
        (torch.zeros(1, 4, 5, dtype=torch.long), r"grid \(4, 5\).*grid is \(4, 4\)"),
        (torch.zeros(1, 4, 4), "must be integers"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.long), r"\(B, h, w\) or \(h, w\)"),
    ],
)
def test_bad_image_codes_get_clear_errors(codes, message):
    with pytest.raises(ValueError, match=message):
        decode_image_codes(PaletteTokenizer(), codes)


# -- audio -------------------------------------------------------------------------------------------------


def test_decode_audio_codes_trims_padding_and_round_trips_through_wav(tmp_path):
    codec = ToneCodec()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (2, 2, 10), generator=g)
    waves, sample_rate = decode_audio_codes(codec, AudioCodes(codes, lengths=torch.tensor([10, 4])))
    assert sample_rate == 8000
    assert [w.shape for w in waves] == [(800,), (320,)] and all(w.dtype == np.float32 for w in waves)
    full = codec.decode(codes).numpy()
    np.testing.assert_allclose(waves[1], full[1, :320], atol=1e-6)
    path = write_wav(tmp_path / "out" / "a.wav", waves[0], sample_rate)
    back, sr = sf.read(str(path), dtype="float32")
    assert sr == 8000 and back.shape == (800,)
    np.testing.assert_allclose(back, waves[0], atol=1.0 / 32768 + 1e-6)
    # clipping, not wrapping, for values outside [-1, 1]
    path = write_wav(tmp_path / "loud.wav", np.array([2.0, -3.0, 0.5], dtype=np.float32), 8000)
    np.testing.assert_allclose(sf.read(str(path), dtype="float32")[0], [32767 / 32768, -1.0, 0.5], atol=1e-4)


@pytest.mark.parametrize(
    "codes, lengths, message",
    [
        (torch.zeros(1, 3, 5, dtype=torch.long), None, r"3 codebooks \(Q\), the codec has 2"),
        (torch.full((1, 2, 5), 16), None, r"outside \[0, 16\)"),
        (torch.zeros(1, 2, 0, dtype=torch.long), None, "no frames"),
        (torch.zeros(2, 2, 5, dtype=torch.long), torch.tensor([5, 6]), r"lengths must be in \[1, 5\]"),
        (torch.zeros(2, 2, 5, dtype=torch.long), torch.tensor([5]), "1 entries for a batch of 2"),
    ],
)
def test_bad_audio_codes_get_clear_errors(codes, lengths, message):
    with pytest.raises(ValueError, match=message):
        decode_audio_codes(ToneCodec(), codes, lengths)


def test_write_wav_refuses_bad_waves(tmp_path):
    with pytest.raises(ValueError, match="mono"):
        write_wav(tmp_path / "x.wav", np.zeros((2, 10)), 8000)
    with pytest.raises(ValueError, match="NaN"):
        write_wav(tmp_path / "x.wav", np.array([0.0, np.nan]), 8000)


# -- diffusion decoder ---------------------------------------------------------------------------------------


def _fixed_eval_loss(model: DiffusionDecoder, x: torch.Tensor, c: torch.Tensor) -> float:
    with torch.no_grad():
        return model.loss(x, c, generator=torch.Generator().manual_seed(123)).loss.item()


def test_diffusion_loss_decreases_and_sampling_is_seeded(tmp_path):
    torch.manual_seed(0)
    tok = PaletteTokenizer()
    x = torch.from_numpy(palette_images(8, seed=1)).permute(0, 3, 1, 2).float() / 127.5 - 1
    c = tok.decode(tok.encode(x).codes)
    model = DiffusionDecoder(TINY)
    model.residual_std.fill_(float((x - c).std()))
    before = _fixed_eval_loss(model, x, c)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        model.loss(x, c, generator=g).loss.backward()
        opt.step()
        opt.zero_grad()
    after = _fixed_eval_loss(model, x, c)
    assert after < 0.7 * before, (before, after)

    model.eval()
    a = model.sample(c[:3], generator=torch.Generator().manual_seed(5))
    b = model.sample(c[:3], generator=torch.Generator().manual_seed(5))
    other = model.sample(c[:3], generator=torch.Generator().manual_seed(6))
    assert a.shape == (3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert model.sample(c[:1], steps=2, generator=torch.Generator().manual_seed(5)).shape == (1, 3, 16, 16)

    folder = model.save(tmp_path / "dd")
    loaded = DiffusionDecoder.load(folder)
    assert loaded.cfg == TINY and float(loaded.residual_std) == float(model.residual_std)
    assert torch.equal(loaded.sample(c[:3], generator=torch.Generator().manual_seed(5)), a)


def test_diffusion_decoder_bad_inputs():
    model = DiffusionDecoder(TINY).eval()
    with pytest.raises(ValueError, match=r"cond must be \(B, 3, 16, 16\), got \(1, 3, 8, 8\)"):
        model.sample(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"steps must be in \[1, 100\]"):
        model.sample(torch.zeros(1, 3, 16, 16), steps=0)
    with pytest.raises(ValueError, match="does not divide"):
        DiffusionDecoderConfig(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ConfigError, match="did you mean 'model.prediction_type'"):
        build(DiffusionDecoderStageConfig, {"model": {"prediction_typ": "sample"}})
    big = DiffusionImageDecoder(DiffusionDecoder(DiffusionDecoderConfig(image_size=(32, 32), norm_num_groups=8)))
    with pytest.raises(ValueError, match=r"makes \(16, 16\) images but .* built for \(32, 32\)"):
        big(PaletteTokenizer(), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        DiffusionImageDecoder(model)(PaletteTokenizer(), torch.full((1, 4, 4), 9))


def _stage(**kw) -> DiffusionDecoderStageConfig:
    base = dict(
        model=TINY,
        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
        steps=4,
        batch_size=4,
        log_every=2,
        ckpt_every=2,
        sample_every=0,
        sample_images=2,
        val_images=2,
        device="cpu",
    )
    return DiffusionDecoderStageConfig(**{**base, **kw})


def test_training_loop_outputs_and_resume_equals_uninterrupted(tmp_path):
    tok = PaletteTokenizer()
    train, val = palette_images(16, seed=2), palette_images(2, seed=3)
    run_a = RunDir(tmp_path / "a")
    final_a = train_diffusion_decoder_on_images(_stage(), tok, train, val, run_a)

    records = read_metrics(run_a.path)
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    scored = [r for r in records if "val_psnr_vq" in r]
    assert len(scored) == 1 and scored[0]["step"] == 4
    cond = tok.decode(tok.encode(torch.from_numpy(val).permute(0, 3, 1, 2).float() / 127.5 - 1).codes)
    exact_vq = float(psnr(val, float_to_uint8(cond)).mean())
    assert scored[0]["val_psnr_vq"] == pytest.approx(exact_vq, rel=1e-6)
    grid = Image.open(run_a.samples / "diffusion_step_0000004.png")
    assert grid.size == (3 * 18, 2 * 18)
    assert json.loads((final_a / "config.json").read_text())["image_size"] == [16, 16]

    # interrupted after step 2: a fresh run directory holding only that checkpoint resumes to the same weights
    run_b = RunDir(tmp_path / "b")
    import shutil

    shutil.copytree(run_a.checkpoints / "step_0000002", run_b.checkpoints / "step_0000002")
    final_b = train_diffusion_decoder_on_images(_stage(), tok, train, val, run_b)
    a, b = DiffusionDecoder.load(final_a).state_dict(), DiffusionDecoder.load(final_b).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(run_b.path) if "loss" in r] == [4]

    # the trained decoder behind the shared (tokenizer, codes) -> images signature, deterministic per seed
    decoder = DiffusionImageDecoder(DiffusionDecoder.load(final_a), steps=2, seed=1)
    codes = tok.encode(cond).codes
    first, second = decoder(tok, codes), decoder(tok, codes)
    assert len(first) == 2 and first[0].size == (16, 16)
    assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(first, second))

    cmp = compare_decoders(tok, DiffusionDecoder.load(final_a), val, steps=2, batch_size=1)
    assert cmp.images == 2 and cmp.ddim_steps == 2
    assert cmp.vq.psnr == pytest.approx(exact_vq, rel=1e-9)
    assert 0 <= cmp.diffusion.judge_agreement <= 1 and cmp.diffusion.seconds_per_image > cmp.vq.seconds_per_image
    assert -1 <= cmp.diffusion.ssim <= 1 and cmp.vq.ssim > cmp.diffusion.ssim - 2  # both scored
    assert compare_decoders(tok, DiffusionDecoder.load(final_a), val, steps=2, judge=False).vq.judge_agreement is None


def test_max_seconds_stops_early_with_final_weights_and_samples(tmp_path):
    run = RunDir(tmp_path / "r")
    cfg = _stage(steps=50, max_seconds=1e-9, ckpt_every=0)
    final = train_diffusion_decoder_on_images(cfg, PaletteTokenizer(), palette_images(8, 5), palette_images(2, 6), run)
    records = read_metrics(run.path)
    assert [r["step"] for r in records if r.get("stopped_early")] == [1]
    assert (run.samples / "diffusion_step_0000001.png").exists() and DiffusionDecoder.load(final).cfg == TINY


def test_training_refuses_a_tokenizer_of_another_size(tmp_path):
    with pytest.raises(ValueError, match=r"image_size \(16, 16\) != the tokenizer's image_size \(32, 32\)"):
        train_diffusion_decoder_on_images(
            _stage(),
            PaletteTokenizer(image_size=(32, 32)),
            palette_images(4, 0),
            palette_images(2, 1),
            RunDir(tmp_path / "r"),
        )


def test_recipe_section_builds_and_typos_name_the_key():
    from anyloom.recipes import load_recipe

    recipe = load_recipe("diffusion_decoder", ["diffusion_decoder.steps=7"])
    assert recipe.diffusion_decoder.steps == 7 and recipe.run.name == "diffusion_decoder"
    assert recipe.diffusion_decoder.model.image_size == (32, 32)
    with pytest.raises(ConfigError, match="did you mean 'diffusion_decoder.model.inference_steps'"):
        load_recipe("diffusion_decoder", ["diffusion_decoder.model.inference_step=3"])


def test_the_trainer_reads_every_image_segment_and_refuses_other_sizes(tmp_path):
    from anyloom.data.images import load_images

    pixels = palette_images(2, seed=4)
    Image.fromarray(pixels[0]).save(tmp_path / "a.png")
    Image.fromarray(pixels[1]).save(tmp_path / "b.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "small.png")
    docs = [
        {"segments": [{"text": "a"}, {"image": "a.png"}]},
        {"segments": [{"text": "no image"}]},
        {"segments": [{"image": "b.png"}]},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    got = load_images(tmp_path / "m.jsonl", (16, 16))
    assert got.skipped == 1 and np.array_equal(got.pixels, pixels)
    assert len(load_images(tmp_path / "m.jsonl", (16, 16), limit=1).pixels) == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "x", "segments": [{"image": "small.png"}]}) + "\n")
    with pytest.raises(ValueError, match=r"small.png: image is 8x8, the tokenizer and decoder expect 16x16"):
        load_images(tmp_path / "bad.jsonl", (16, 16))

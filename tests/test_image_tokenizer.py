"""The world image tokenizer: contract, round trips, input checks, metrics, and a short training run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from anyloom.evaluation.image_metrics import code_change_rate, codebook_stats, psnr, ssim
from anyloom.tokenizers.base import ImageCodes, ImageTokenizer
from anyloom.tokenizers.image_quantizers import QuantizerConfig
from anyloom.tokenizers.image_vq import ImageVQConfig, ImageVQTokenizer, float_to_uint8, uint8_to_float


def tiny(kind: str = "vq", **kw) -> ImageVQConfig:
    q = {
        "vq": QuantizerConfig(kind="vq", codebook_size=32, codebook_dim=4, kmeans_init=False),
        "fsq": QuantizerConfig(kind="fsq", fsq_levels=(5, 4, 3)),
        "lfq": QuantizerConfig(kind="lfq", codebook_size=64),
    }[kind]
    base = dict(image_size=(16, 16), patch=1, channels=(8, 16), dec_blocks=(1, 1), latent_dim=8, norm_groups=4,
                quantizer=q)
    base.update(kw)
    return ImageVQConfig(**base)


def images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("kind", ["vq", "fsq", "lfq"])
def test_contract_and_code_round_trip(kind):
    torch.manual_seed(0)
    model = ImageVQTokenizer(tiny(kind)).eval()
    assert isinstance(model, ImageTokenizer)
    assert model.grid == (8, 8) and model.tokens_per_image == 64 and model.image_size == (16, 16)
    assert model.codebook_size == {"vq": 32, "fsq": 60, "lfq": 64}[kind]
    x = images()
    out = model.encode(x)
    assert isinstance(out, ImageCodes)
    assert out.codes.shape == (4, 8, 8) and out.codes.dtype == torch.int64
    assert 0 <= int(out.codes.min()) and int(out.codes.max()) < model.codebook_size
    # decode(codes) must rebuild exactly what the training forward pass feeds the decoder
    with torch.no_grad():
        fwd = model(x)
    assert torch.equal(fwd.codes, out.codes)
    dec = model.decode(out.codes)
    assert dec.shape == (4, 3, 16, 16)
    torch.testing.assert_close(dec, fwd.recon.clamp(-1, 1), atol=1e-5, rtol=0)
    assert dec.abs().max() <= 1.0


def test_downsample_factor_and_patch():
    cfg = tiny(patch=2, channels=(8, 16, 16), dec_blocks=(1, 1, 1), image_size=(32, 32))
    assert cfg.downsample == 8 and cfg.grid == (4, 4)
    model = ImageVQTokenizer(cfg).eval()
    assert model.encode(images(2, 32)).codes.shape == (2, 4, 4)
    assert model.decode(torch.zeros(2, 4, 4, dtype=torch.long)).shape == (2, 3, 32, 32)


def test_encoder_blocks_per_level():
    assert tiny(enc_blocks=2).encoder_blocks == (2, 2)
    cfg = tiny(enc_blocks=(2, 1))
    enc = ImageVQTokenizer(cfg).encoder
    # level 0: two ResBlocks; level 1: the stride-2 conv and one ResBlock
    assert [type(m).__name__ for m in enc.levels[0]] == ["ResBlock", "ResBlock"]
    assert [type(m).__name__ for m in enc.levels[1]] == ["Conv2d", "ResBlock"]
    assert ImageVQTokenizer(cfg).encode(images(2)).codes.shape == (2, 8, 8)
    with pytest.raises(ValueError, match="enc_blocks has 3 entries"):
        tiny(enc_blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="enc_blocks must be >= 1"):
        tiny(enc_blocks=(1, 0))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ImageVQTokenizer(tiny("vq", attention=True))
    model.train()
    model(images(8))  # one training pass moves the EMA codebook buffers away from their init
    model.eval()
    model.save(tmp_path / "tok")
    loaded = ImageVQTokenizer.load(tmp_path / "tok")
    x = images(3, seed=1)
    assert torch.equal(model.encode(x).codes, loaded.encode(x).codes)
    codes = model.encode(x).codes
    assert torch.equal(model.decode(codes), loaded.decode(codes))
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["kind"] == "image_vq"


def test_load_rejects_foreign_folder(tmp_path):
    from anyloom.weights import save_weights

    save_weights(tmp_path / "x", {"w": torch.zeros(1)}, {"kind": "audio_codec"})
    with pytest.raises(ValueError, match="expected 'image_vq'"):
        ImageVQTokenizer.load(tmp_path / "x")


def test_input_checks_and_resize():
    model = ImageVQTokenizer(tiny()).eval()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.encode(torch.full((1, 3, 16, 16), 200.0))
    with pytest.raises(TypeError, match="encode_uint8"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"codes must be \(B, 8, 8\)"):
        model.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        model.decode(torch.full((1, 8, 8), 32, dtype=torch.long))
    big = images(2, 32)
    resized = torch.nn.functional.interpolate(big, size=(16, 16), mode="bilinear", antialias=True)
    assert torch.equal(model.encode(big).codes, model.encode(resized).codes)


def test_uint8_and_pil_conversions():
    model = ImageVQTokenizer(tiny()).eval()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    x = uint8_to_float(rgb)
    assert x.shape == (1, 3, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert np.array_equal(float_to_uint8(x)[0], rgb)  # exact round trip of uint8 pixels
    gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    assert torch.equal(uint8_to_float(gray), uint8_to_float(np.repeat(gray[..., None], 3, -1)))
    rgba = np.concatenate([rgb, np.zeros((16, 16, 1), np.uint8)], -1)  # fully transparent -> white
    assert torch.equal(uint8_to_float(rgba), torch.ones(1, 3, 16, 16))
    with pytest.raises(TypeError, match="uint8"):
        uint8_to_float(rgb.astype(np.float32))
    # palette and grayscale PIL images give the same codes as their RGB conversion
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    as_rgb = np.asarray(pal.convert("RGB"))
    assert torch.equal(model.encode_pil(pal).codes, model.encode_uint8(as_rgb).codes)
    gray_im = Image.fromarray(gray, mode="L").resize((32, 32))
    codes = model.encode_pil([gray_im, Image.fromarray(rgb)]).codes
    assert codes.shape == (2, 8, 8)
    with pytest.raises(TypeError, match="PIL image"):
        model.encode_pil([rgb])


def test_psnr_golden():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = a.copy()
    b[0] += 51  # every pixel off by 0.2 -> MSE 0.04 -> 13.979 dB
    b[1, 0, 0, 0] = 255  # one of 192 values off by 1.0 -> MSE 1/192
    p = psnr(a, b)
    np.testing.assert_allclose(p, [10 * np.log10(1 / 0.04), 10 * np.log10(192)], rtol=1e-9)
    assert np.isinf(psnr(a, a)).all()


def test_ssim_golden():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(ssim(x, x), 1.0, rtol=1e-12)
    # constant images: variances vanish, SSIM reduces to the luminance term (2ab + c1) / (a^2 + b^2 + c1)
    a, b = 0.2, 0.6
    ca = np.full((1, 16, 16, 3), round(a * 255), np.uint8)
    cb = np.full((1, 16, 16, 3), round(b * 255), np.uint8)
    a, b = round(a * 255) / 255, round(b * 255) / 255
    expected = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    np.testing.assert_allclose(ssim(ca, cb), expected, rtol=1e-9)
    noisy = np.clip(x.astype(int) + rng.integers(-40, 41, x.shape), 0, 255).astype(np.uint8)
    s = ssim(x, noisy)
    assert (s < 0.99).all() and (s > 0).all()
    np.testing.assert_allclose(s, ssim(noisy, x), rtol=1e-12)  # symmetric


def test_codebook_stats_golden():
    s = codebook_stats(torch.tensor([[0, 1], [2, 3]]), 8)
    assert s.usage == 0.5 and s.used == 4
    assert abs(s.perplexity - 4.0) < 1e-9  # uniform over 4 codes
    s = codebook_stats(torch.tensor([5, 5, 5, 5]), 8)
    assert s.usage == 1 / 8 and abs(s.perplexity - 1.0) < 1e-12
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        codebook_stats(torch.tensor([8]), 8)


def test_code_change_rate_golden():
    assert code_change_rate(torch.zeros(3, 4, 4, dtype=torch.long)) == 0.0
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2  # every neighbour differs
    assert code_change_rate(checker[None]) == 1.0
    # one odd cell in the corner of a 3x3 map: 2 of its 12 neighbour pairs differ
    one = torch.zeros(1, 3, 3, dtype=torch.long)
    one[0, 0, 0] = 7
    assert code_change_rate(one.numpy()) == pytest.approx(2 / 12)
    with pytest.raises(ValueError, match=r"\(N, h, w\)"):
        code_change_rate(torch.zeros(4, 4))


def test_fsq_levels_follow_codes_and_carry_gradients():
    from anyloom.training.image_tokenizer import code_smoothness_loss

    torch.manual_seed(0)
    model = ImageVQTokenizer(tiny("fsq"))
    out = model(images(4))
    levels, codes = out.levels, out.codes  # (B, C, h, w), (B, h, w)
    assert levels.shape == (4, 3, *codes.shape[1:])
    assert levels.abs().max() <= 1.0
    flat_levels = levels.permute(0, 2, 3, 1).reshape(-1, 3)
    flat_codes = codes.reshape(-1)
    same_code = flat_codes[:, None] == flat_codes[None, :]
    same_levels = (flat_levels[:, None, :] == flat_levels[None, :, :]).all(-1)
    assert torch.equal(same_code, same_levels)  # a cell's levels are its code
    loss = code_smoothness_loss(levels)
    assert loss.item() > 0
    loss.backward()  # straight through the rounding into the encoder
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert code_smoothness_loss(torch.ones(2, 3, 4, 4)).item() == 0.0  # one code everywhere: no penalty
    # golden: levels change by 0.5 between the two columns of a 2x2 map, only horizontally -> 0.5 * (0.5 + 0)
    two = torch.tensor([[0.0, 0.5], [0.0, 0.5]]).expand(1, 1, 2, 2)
    assert code_smoothness_loss(two).item() == pytest.approx(0.25)
    assert ImageVQTokenizer(tiny("vq"))(images(2)).levels is None


# ------------------------------------------------------------------------------------------ training


def _manifest(folder, n: int, seed: int) -> str:
    """n 16x16 PNGs of one coloured square on a grey background, and a JSONL manifest naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        px = np.full((16, 16, 3), int(rng.integers(40, 200)), np.uint8)
        x, y, s = (int(v) for v in rng.integers(0, 8, 3))
        px[y : y + s + 4, x : x + s + 4] = rng.integers(0, 256, 3)
        Image.fromarray(px).save(folder / f"{i}.png")
        lines.append(json.dumps({"segments": [{"text": "a square"}, {"image": f"{i}.png"}]}))
    lines.append(json.dumps({"segments": [{"text": "no image here"}]}))  # counted as skipped
    (folder / "m.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "m.jsonl")


def _stage(**kw):
    from anyloom.training.image_tokenizer import ImageTokenizerStageConfig
    from anyloom.training.optim import OptimConfig

    base = dict(model=tiny("vq", patch=2), optim=OptimConfig(lr=1e-2, weight_decay=0.0, warmup_steps=5),
                steps=60, batch_size=16, log_every=5, eval_every=30, val_images=8, sample_every=30, ckpt_every=10,
                channels_last=False)
    base.update(kw)
    return ImageTokenizerStageConfig(**base)


def test_training_improves_and_skips_when_done(tmp_path):
    from anyloom.training.image_tokenizer import train_image_tokenizer
    from anyloom.training.metrics import read_metrics
    from anyloom.training.run import RunDir

    train, val = _manifest(tmp_path / "train", 24, 0), _manifest(tmp_path / "val", 8, 1)
    run = RunDir(tmp_path / "run")
    out = train_image_tokenizer(_stage(), train, val, run)
    records = read_metrics(run.path)
    assert records[0]["train_images"] == 24 and records[0]["train_skipped"] == 1
    psnrs = [r["val_psnr"] for r in records if "val_psnr" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(psnrs) == 2 and psnrs[1] > psnrs[0]
    assert np.mean(losses[-2:]) < 0.75 * np.mean(losses[:2])  # 0.56 -> 0.32 when written
    final = [r for r in records if "final_val_psnr" in r][0]
    model = ImageVQTokenizer.load(out)
    from anyloom.data.images import load_images
    from anyloom.training.image_tokenizer import quick_scores

    # the exported model reproduces the logged score, and reconstructs better than the untrained one
    val_px = load_images(val, (16, 16), strict=False).pixels
    assert abs(quick_scores(model, val_px).psnr - final["final_val_psnr"]) < 1e-6
    torch.manual_seed(0)
    assert final["final_val_psnr"] > quick_scores(ImageVQTokenizer(tiny("vq", patch=2)).eval(), val_px).psnr + 3.0
    assert sorted(p.name for p in run.samples.glob("*.png")) == ["recon_000030.png", "recon_000060.png",
                                                                   "recon_final.png"]
    n = len(read_metrics(run.path))
    assert train_image_tokenizer(_stage(), train, val, run) == out  # same fingerprint: nothing retrains
    assert len(read_metrics(run.path)) == n


def test_resume_equals_uninterrupted(tmp_path, monkeypatch, capsys):
    import anyloom.training.image_tokenizer as it
    from anyloom.training.run import RunDir
    from anyloom.weights import load_weights

    train, val = _manifest(tmp_path / "train", 16, 0), _manifest(tmp_path / "val", 8, 1)
    cfg = _stage(steps=12, eval_every=100, sample_every=0, ckpt_every=5, batch_size=8)
    full = load_weights(it.train_image_tokenizer(cfg, train, val, RunDir(tmp_path / "a"))).state_dict

    real = it.batch_indices

    def crash_after_checkpoint(n, b, seed, step):
        if step == 8:  # checkpoint at 5, then 3 more steps are lost
            raise KeyboardInterrupt
        return real(n, b, seed, step)

    monkeypatch.setattr(it, "batch_indices", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        it.train_image_tokenizer(cfg, train, val, RunDir(tmp_path / "b"))
    monkeypatch.setattr(it, "batch_indices", real)
    torch.manual_seed(123)  # the checkpoint restores the generator state; the caller's must not matter
    resumed = load_weights(it.train_image_tokenizer(cfg, train, val, RunDir(tmp_path / "b"))).state_dict
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # a checkpoint of another config is not mixed in: that run starts afresh, and says so
    other = _stage(steps=12, eval_every=100, sample_every=0, ckpt_every=5, batch_size=8, l2_weight=0.5)
    fresh = load_weights(it.train_image_tokenizer(other, train, val, RunDir(tmp_path / "c"))).state_dict
    capsys.readouterr()
    again = load_weights(it.train_image_tokenizer(other, train, val, RunDir(tmp_path / "b"))).state_dict
    assert "not resuming from" in capsys.readouterr().out
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)


def test_gan_and_ema(tmp_path):
    from anyloom.training.image_tokenizer import GANConfig, train_image_tokenizer
    from anyloom.training.metrics import read_metrics
    from anyloom.training.run import RunDir

    train, val = _manifest(tmp_path / "train", 16, 0), _manifest(tmp_path / "val", 8, 1)
    cfg = _stage(steps=8, eval_every=100, sample_every=0, ckpt_every=0, log_every=1, ema_decay=0.9, batch_size=8,
                 gan=GANConfig(enabled=True, start_step=4, channels=8, layers=2))
    run = RunDir(tmp_path / "run")
    out = train_image_tokenizer(cfg, train, val, run)
    records = [r for r in read_metrics(run.path) if "loss" in r]
    assert all("d_loss" not in r for r in records[:4]) and all("d_loss" in r for r in records[4:])
    assert all(np.isfinite(r["d_loss"]) and r["gan_weight"] > 0 for r in records[4:])
    # the export holds the EMA weights, not the last raw weights
    from safetensors.torch import load_file

    ckpt = load_file(str(run.checkpoints / "step_0000008" / "state.safetensors"))
    exported = ImageVQTokenizer.load(out).state_dict()
    k = "decoder.conv_out.weight"
    assert torch.equal(exported[k], ckpt["tensor.ema/decoder/conv_out/weight"])
    assert not torch.equal(exported[k], ckpt[f"model.tokenizer.{k}"])
    assert any(key.startswith("model.discriminator.") for key in ckpt)
    # buffers (the EMA-updated VQ codebook) are exported raw: averaging them again collapsed codebook usage
    buffers = [n for n, _ in ImageVQTokenizer(cfg.model).named_buffers() if n.endswith("embed")]
    assert buffers and not any(f"tensor.ema/{n.replace('.', '/')}" in ckpt for n in buffers)
    for n in buffers:
        assert torch.equal(exported[n], ckpt[f"model.tokenizer.{n}"]), n


def test_gradient_l1_golden_and_logged(tmp_path):
    from anyloom.training.image_tokenizer import gradient_l1, train_image_tokenizer
    from anyloom.training.metrics import read_metrics
    from anyloom.training.run import RunDir

    edge = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(1, 1, 4, 4)  # vertical edge between columns 1 and 2
    shifted = torch.tensor([0.0, 1.0, 1.0, 1.0]).expand(1, 1, 4, 4)  # the same edge one pixel to the left
    assert gradient_l1(edge, edge).item() == 0.0
    assert gradient_l1(edge + 0.3, edge).item() == pytest.approx(0.0, abs=1e-7)  # blind to a constant offset
    # dx rows differ by [1, -1, 0] -> mean 2/3; dy is zero in both -> 0.5 * (2/3 + 0)
    assert gradient_l1(shifted, edge).item() == pytest.approx(1 / 3)
    blurred = torch.tensor([0.0, 0.25, 0.75, 1.0]).expand(1, 1, 4, 4)  # per-pixel L1 0.125, edge term 1/6
    assert gradient_l1(blurred, edge).item() == pytest.approx(1 / 6)

    train, val = _manifest(tmp_path / "train", 16, 0), _manifest(tmp_path / "val", 8, 1)
    run = RunDir(tmp_path / "run")
    train_image_tokenizer(_stage(steps=3, eval_every=100, sample_every=0, ckpt_every=0, log_every=1, batch_size=4,
                                 edge_weight=0.5), train, val, run)
    records = [r for r in read_metrics(run.path) if "loss" in r]
    assert len(records) == 3 and all(r["edge"] > 0 for r in records)
    with pytest.raises(ValueError, match="edge_weight"):
        _stage(edge_weight=-1.0)


def test_code_smoothness_trains_and_is_logged(tmp_path):
    from anyloom.training.image_tokenizer import train_image_tokenizer
    from anyloom.training.metrics import read_metrics
    from anyloom.training.run import RunDir

    train, val = _manifest(tmp_path / "train", 16, 0), _manifest(tmp_path / "val", 8, 1)
    run = RunDir(tmp_path / "run")
    train_image_tokenizer(_stage(model=tiny("fsq", patch=2), steps=3, eval_every=100, sample_every=0, ckpt_every=0,
                                 log_every=1, batch_size=4, code_smoothness=0.1), train, val, run)
    records = read_metrics(run.path)
    assert [r["code_smoothness"] > 0 for r in records if "loss" in r] == [True] * 3
    final = [r for r in records if "final_val_code_change_rate" in r][0]
    assert 0.0 <= final["final_val_code_change_rate"] <= 1.0
    with pytest.raises(ValueError, match="code_smoothness acts on FSQ"):
        _stage(code_smoothness=0.1)  # the default test model quantizes with VQ
    with pytest.raises(ValueError, match="code_smoothness must be >= 0"):
        _stage(model=tiny("fsq"), code_smoothness=-1.0)


def test_rotate_hue_keeps_luma_and_turns_chroma():
    import math

    from anyloom.training.image_tokenizer import rotate_hue

    x = images(3)
    assert torch.allclose(rotate_hue(x, torch.zeros(3)), x, atol=1e-6)  # no turn: the same pictures
    gray = torch.full((1, 3, 4, 4), 0.2)
    assert torch.allclose(rotate_hue(gray, torch.tensor([2.0])), gray, atol=1e-6)  # no chroma: nothing turns
    luma = torch.tensor([0.299, 0.587, 0.114])
    mid = torch.zeros(1, 3, 1, 1)
    mid[0, 0] = 0.3  # a reddish mid-tone stays inside the RGB cube when turned: luma is exactly kept
    turned = rotate_hue(mid, torch.tensor([math.pi / 3]))
    y_before, y_after = (torch.dot(luma, (t + 1).flatten() / 2).item() for t in (mid, turned))
    assert y_after == pytest.approx(y_before, abs=1e-5)
    assert (turned - mid).abs().max() > 0.05  # the hue did turn
    back = rotate_hue(turned, torch.tensor([-math.pi / 3]))
    assert torch.allclose(back, mid, atol=1e-5)


def test_hue_swap_reads_the_turned_first_digit_with_the_other_digits(tmp_path):
    from anyloom.training.image_tokenizer import (
        ReconstructionObjective,
        hue_swap_reconstruction,
        train_image_tokenizer,
    )
    from anyloom.training.metrics import read_metrics
    from anyloom.training.run import RunDir

    torch.manual_seed(0)
    model = ImageVQTokenizer(tiny("fsq"))
    x = images(2)
    out = model(x)
    # from_levels inverts nothing new: a forward's own levels give the latent its decoder read
    q = model.quantizer.from_levels(out.levels)
    assert torch.allclose(model.decoder(q), out.recon, atol=1e-6)
    objective = ReconstructionObjective(_stage(model=tiny("fsq"), hue_swap=1.0))
    zero = hue_swap_reconstruction(model, x, out.levels, torch.zeros(2), objective)
    assert zero.item() == pytest.approx(objective(out.recon, x).total.item(), rel=1e-5)  # no turn: the plain term
    swap = hue_swap_reconstruction(model, x, out.levels, torch.tensor([1.0, 2.5]), objective)
    swap.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight through both encodings

    train, val = _manifest(tmp_path / "train", 16, 0), _manifest(tmp_path / "val", 8, 1)
    run = RunDir(tmp_path / "run")
    train_image_tokenizer(_stage(model=tiny("fsq", patch=2), steps=3, eval_every=100, sample_every=0, ckpt_every=0,
                                 log_every=1, batch_size=4, hue_swap=0.5), train, val, run)
    assert [r["hue_swap"] > 0 for r in read_metrics(run.path) if "loss" in r] == [True] * 3
    with pytest.raises(ValueError, match="hue_swap acts on FSQ"):
        _stage(hue_swap=1.0)  # the default test model quantizes with VQ
    with pytest.raises(ValueError, match="hue_swap must be >= 0"):
        _stage(model=tiny("fsq"), hue_swap=-1.0)


def test_edge_focus_weights_outlines_golden(tmp_path):
    from anyloom.training.image_tokenizer import edge_map, reconstruction_losses, train_image_tokenizer
    from anyloom.training.run import RunDir

    x = -torch.ones(1, 3, 8, 8)
    x[:, 1, :, 5:] = 1.0  # one channel jumps by 2 between columns 4 and 5
    m = edge_map(x, scale=0.5)
    assert m.shape == (1, 1, 8, 8)
    # both sides of the edge (columns 4, 5) and one more pixel each way from the 3x3 max (3, 6) are full edges
    assert torch.equal(m[0, 0, 0], torch.tensor([0.0, 0, 0, 1, 1, 1, 1, 0]))
    assert torch.equal(m[0, 0, :, 4], torch.ones(8))  # every row alike, borders included
    soft = x.clone()
    soft[:, 1, :, 5:] = -0.8  # a jump of 0.2 = 0.4 of the scale
    assert edge_map(soft, scale=0.5).max().item() == pytest.approx(0.4)
    assert edge_map(-torch.ones(2, 3, 8, 8), 0.5).abs().sum().item() == 0.0  # flat: no edge

    recon = x + 0.1
    plain = reconstruction_losses(recon, x, None)
    assert plain[0].item() == pytest.approx(0.1) and plain[1].item() == pytest.approx(0.01)
    # a uniform error is the same whatever the weights; an error only at the edge weighs more with focus
    weighted = reconstruction_losses(recon, x, 1.0 + 4.0 * m)
    assert weighted[0].item() == pytest.approx(0.1) and weighted[1].item() == pytest.approx(0.01)
    at_edge = x.clone()
    at_edge[:, :, :, 4] += 0.8
    l1_plain = reconstruction_losses(at_edge, x, None)[0].item()
    l1_focus = reconstruction_losses(at_edge, x, 1.0 + 4.0 * m)[0].item()
    assert l1_plain == pytest.approx(0.1)  # 0.8 on one column of 8
    assert l1_focus == pytest.approx(0.8 * 5 / (4 * 5 + 4 * 1))  # weights 5 on the 4 edge columns, 1 elsewhere

    train, val = _manifest(tmp_path / "train", 16, 0), _manifest(tmp_path / "val", 8, 1)
    out = train_image_tokenizer(_stage(steps=2, eval_every=100, sample_every=0, ckpt_every=0, batch_size=4,
                                       edge_focus=3.0), train, val, RunDir(tmp_path / "run"))
    assert (out / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="edge_focus"):
        _stage(edge_focus=-1.0)
    with pytest.raises(ValueError, match="edge_scale"):
        _stage(edge_scale=0.0)


def test_thin_focus_weights_one_pixel_gaps_golden():
    from anyloom.training.image_tokenizer import ReconstructionObjective
    from anyloom.world.focus import thin_map

    x = -torch.ones(1, 3, 8, 8)
    x[:, 0, :, 1:4] = 1.0  # an object in columns 1-3 ...
    x[:, 0, :, 5:7] = 1.0  # ... and one in 5-6: a 1-pixel background gap in column 4
    m = thin_map(x, scale=0.5)
    assert m.shape == (1, 1, 8, 8)
    # the gap (column 4) stands out from both neighbours; the step edges (columns 0/1, 3, 5, 6/7) do not
    assert torch.equal(m[0, 0, 3], torch.tensor([0.0, 0, 0, 0, 1, 0, 0, 0]))
    assert torch.equal(m[0, 0, :, 4], torch.ones(8))
    line = -torch.ones(1, 3, 8, 8)
    line[:, 2, 4, :] = -0.8  # a faint bright row: 0.2 above both neighbours = 0.4 of the scale
    assert thin_map(line, scale=0.5)[0, 0, 4, 3].item() == pytest.approx(0.4)
    assert thin_map(-torch.ones(2, 3, 8, 8), 0.5).abs().sum().item() == 0.0

    # an error in the gap weighs more with the thin plug-in than with the edge focus alone
    closed = x.clone()
    closed[:, 0, :, 4] = 1.0  # the reconstruction closes the gap
    edge_only = ReconstructionObjective(_stage(edge_focus=2.0, edge_scale=0.5))(closed, x).l1.item()
    thin_cfg = _stage(edge_focus=2.0, edge_scale=0.5, pixel_weights=[{"name": "world_thin", "weight": 6.0,
                                                                      "scale": 0.5}])
    thin = ReconstructionObjective(thin_cfg)(closed, x).l1.item()
    assert thin > edge_only > 0
    # only column 4 is wrong (by 2 in one of 3 channels); every other column is within a pixel of an edge (weight
    # 1 + 2), the gap weighs 1 + 2 + 6
    assert edge_only == pytest.approx(2 / 3 * 3 / (8 * 3))
    assert thin == pytest.approx(2 / 3 * 9 / (9 + 7 * 3))
    with pytest.raises(ValueError, match="weight"):
        _stage(pixel_weights=[{"name": "world_thin", "weight": -1.0}])
    with pytest.raises(ValueError, match="scale must be > 0"):
        _stage(pixel_weights=[{"name": "world_thin", "scale": 0.0}])


def test_step_benchmark_times_recipe_variants(capsys, monkeypatch):
    """scripts/bench_image_tokenizer.py: one JSON line per variant, relative to the first; recipe typos are named."""
    import bench_image_tokenizer as bench

    from anyloom.config import ConfigError

    small = "image_tokenizer.batch_size=2 image_tokenizer.model.channels=[16,16] image_tokenizer.model.norm_groups=4"
    argv = ["bench", "--threads", "1", "--warmup", "1", "--steps", "1", "--rounds", "2",
            "--variant", small, "--variant", small + " image_tokenizer.model.dec_blocks=[1,1]"]
    monkeypatch.setattr("sys.argv", argv)
    bench.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["variant"] for r in rows] == argv[-3::2]
    assert rows[0]["best_vs_first"] == 1.0 and all(r["best_ms"] > 0 for r in rows)
    monkeypatch.setattr("sys.argv", ["bench", "--variant", "image_tokenizer.model.chanels=[16,16]"])
    with pytest.raises(ConfigError, match="chanels"):
        bench.main()


@pytest.mark.parametrize(("mode", "amx", "avx512_bf16", "bf16"), [
    ("amx", True, False, True), ("amx", False, True, False), ("native_bf16", False, True, True)])
def test_cpu_bf16_precision_runs_convs_in_bf16_and_exports_fp32(tmp_path, monkeypatch, mode, amx, avx512_bf16, bf16):
    # amx: bf16 only with AMX tiles; native_bf16: with AMX tiles or AVX-512 BF16; fp32 on any other CPU. The CPU's
    # features are forced, so the test does not depend on the CPU it runs on
    import anyloom.training.image_tokenizer as it
    from anyloom import device as devices
    from anyloom.training.metrics import read_metrics
    from anyloom.training.run import RunDir

    monkeypatch.setattr(devices, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(devices, "cpu_has_avx512_bf16", lambda: avx512_bf16)
    seen: set[torch.dtype] = set()

    def record(module, args, out):
        if isinstance(module, torch.nn.Conv2d) and torch.is_grad_enabled():
            seen.add(out.dtype)

    train, val = _manifest(tmp_path / "train", 24, 0), _manifest(tmp_path / "val", 8, 1)
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        cfg = _stage(mixed_precision=mode, model=tiny("fsq", patch=2))
        out = it.train_image_tokenizer(cfg, train, val, RunDir(tmp_path / "run"))
    finally:
        handle.remove()
    assert seen == ({torch.bfloat16} if bf16 else {torch.float32})
    exported = ImageVQTokenizer.load(out)
    assert all(p.dtype == torch.float32 for p in exported.state_dict().values())
    records = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < 0.75 * np.mean(losses[:2])
    with pytest.raises(ValueError, match="mixed_precision"):
        _stage(mixed_precision="fp16")
    assert _stage(mixed_precision="bf16").bf16_autocast  # bf16 on whatever device the loop runs on
    monkeypatch.setattr(devices, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(devices, "cpu_has_avx512_bf16", lambda: False)
    assert not _stage(mixed_precision="native_bf16").bf16_autocast  # fp32 on a CPU without native bf16


def test_gap_focus_weights_narrow_background_gaps_golden():
    from anyloom.training.image_tokenizer import ReconstructionObjective
    from anyloom.world.focus import gap_map

    x = -torch.ones(1, 3, 12, 12)  # a dark background ...
    x[:, 0, 2:10, 2:5] = 1.0  # ... a red object in columns 2-4 ...
    x[:, 0, 2:10, 7:10] = 1.0  # ... and one in 7-9: a 2-pixel gap in columns 5-6
    m = gap_map(x, radius=2, threshold=0.35)
    assert m.shape == (1, 1, 12, 12)
    expected = torch.zeros(12, 12)
    expected[2:10, 5:7] = 1.0  # the gap, on the rows both objects span; nothing else (the border is 2 px away)
    assert torch.equal(m[0, 0], expected)
    assert torch.equal(gap_map(x, radius=1, threshold=0.35)[0, 0], expected)  # radius r closes gaps up to 2r wide
    wide = x.clone()
    wide[:, 0, 2:10, 7] = -1.0  # the gap is now 3 pixels wide (columns 5-7)
    assert gap_map(wide, radius=1, threshold=0.35).sum().item() == 0.0
    assert gap_map(wide, radius=2, threshold=0.35)[0, 0, 2:10, 5:8].sum().item() == 8 * 3
    faint = x.clone()
    faint[:, 0, 2:10, 7:10] = -0.8  # the second object is only 0.2 from the background: not an object
    assert gap_map(faint, radius=2, threshold=0.35).sum().item() == 0.0

    # an error in the gap weighs 1 + the plug-in's weight more than the same error elsewhere on the background
    bled = x.clone()
    bled[:, 0, 2:10, 5:7] = 0.0  # the reconstruction bleeds half-way into the gap
    plain = ReconstructionObjective(_stage())(bled, x).l1.item()
    gap = ReconstructionObjective(_stage(pixel_weights=[{"name": "world_gaps", "weight": 4.0}]))(bled, x).l1.item()
    assert plain == pytest.approx(16 / (12 * 12 * 3))
    assert gap == pytest.approx(16 * 5 / ((12 * 12 + 16 * 4) * 3))
    for bad in ({"weight": -1.0}, {"radius": 0}, {"threshold": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _stage(pixel_weights=[{"name": "world_gaps", **bad}])


def test_pixel_weight_plugins_are_named_checked_and_complete():
    from anyloom.config import ConfigError, build, fingerprint
    from anyloom.plugins import PluginError
    from anyloom.training.image_tokenizer import ImageTokenizerStageConfig

    with pytest.raises(PluginError, match=r"'world_gap' is not a known anyloom.pixel_weights plug-in \(did you mean "
                                          r"'world_gaps'\?\); known: world_gaps, world_thin"):
        _stage(pixel_weights=[{"name": "world_gap"}])
    with pytest.raises(ConfigError, match=r"unknown key 'pixel_weights\[0\]\.raduis' \(world_gaps\); did you mean "
                                          r"'pixel_weights\[0\]\.radius'"):
        build(ImageTokenizerStageConfig, {"pixel_weights": [{"name": "world_gaps", "raduis": 3}]}, "image_tokenizer")
    with pytest.raises(ConfigError, match=r"pixel_weights\[1\]\.radius: expected an integer"):
        build(ImageTokenizerStageConfig, {"pixel_weights": [{"name": "world_thin"}, {"name": "world_gaps",
                                                                                      "radius": "2"}]})
    # each entry is stored complete (options with their defaults): one setting, one fingerprint
    short = _stage(pixel_weights=[{"name": "world_gaps", "weight": 8}])
    assert short.pixel_weights == ({"name": "world_gaps", "weight": 8.0, "radius": 2, "threshold": 0.35},)
    assert fingerprint(short) == fingerprint(_stage(pixel_weights=list(short.pixel_weights)))
    assert fingerprint(_stage()) == fingerprint(_stage(pixel_weights=[]))  # none listed: the old fingerprint


def _old_pixel_weights(target, edge_focus, edge_scale, thin_focus, gap_focus, gap_radius, gap_threshold):
    """The weights as the stage computed them when thin_focus/gap_focus were its own settings (the reference)."""
    import torch.nn.functional as F

    from anyloom.training.image_tokenizer import edge_map

    def ridge(prev, mid, nxt):
        return torch.maximum(torch.minimum(prev - mid, nxt - mid), torch.minimum(mid - prev, mid - nxt))

    weights = 1.0 + edge_focus * edge_map(target, edge_scale)
    if thin_focus:
        rx = ridge(target[..., :, :-2], target[..., :, 1:-1], target[..., :, 2:]).amax(dim=1, keepdim=True)
        ry = ridge(target[..., :-2, :], target[..., 1:-1, :], target[..., 2:, :]).amax(dim=1, keepdim=True)
        thin = (torch.maximum(F.pad(rx, (1, 1)), F.pad(ry, (0, 0, 1, 1))) / edge_scale).clamp(0.0, 1.0)
        weights = weights + thin_focus * thin
    if gap_focus:
        b, c = target.shape[:2]
        border = torch.cat([target[..., 0, :], target[..., -1, :], target[..., :, 0], target[..., :, -1]], dim=-1)
        background = border.median(dim=-1).values.view(b, c, 1, 1)
        objects = ((target - background).pow(2).sum(dim=1, keepdim=True).sqrt() > gap_threshold).to(target.dtype)
        k, r = 2 * gap_radius + 1, gap_radius
        closed = -F.max_pool2d(-F.pad(F.max_pool2d(objects, k, stride=1, padding=r), (r,) * 4), k, stride=1)
        weights = weights + gap_focus * closed * (1.0 - objects)
    return weights


@pytest.mark.parametrize("edge_focus, thin, gap", [(8.0, 0.0, 8.0), (2.0, 6.0, 0.0), (0.0, 3.0, 5.0), (1.5, 2.5, 4.0)])
def test_pixel_weight_plugins_equal_the_old_formula_bit_for_bit(edge_focus, thin, gap):
    from anyloom.training.image_tokenizer import ReconstructionObjective, reconstruction_losses

    g = torch.Generator().manual_seed(0)
    x = -torch.ones(8, 3, 16, 16)  # plain backgrounds with random boxes, as the world draws them, plus noise
    for i in range(8):
        for _ in range(3):
            r, c, h, w = torch.randint(0, 12, (4,), generator=g).tolist()
            x[i, :, r : r + h % 5 + 1, c : c + w % 5 + 1] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    x = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    entries = ([{"name": "world_thin", "weight": thin, "scale": 0.3}] if thin else []) + (
        [{"name": "world_gaps", "weight": gap, "radius": 1, "threshold": 0.4}] if gap else [])
    got = ReconstructionObjective(_stage(edge_focus=edge_focus, edge_scale=0.3, pixel_weights=entries))
    expected = _old_pixel_weights(x, edge_focus, 0.3, thin, gap, 1, 0.4)
    assert torch.equal(got.pixel_weights(x), expected)
    recon = x.flip(-1)
    l1, l2 = reconstruction_losses(recon, x, expected)
    terms = got(recon, x)
    assert torch.equal(terms.l1, l1) and torch.equal(terms.l2, l2)


def test_image_set_loader_counts_skips_and_names_the_bad_file_and_line(tmp_path):
    from anyloom.data.images import load_images

    m = _manifest(tmp_path, 3, 0)  # 3 pictures, then a document without one
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "small.png")
    lines[1:1] = ["{not json", json.dumps({"segments": [{"image": "broken.png"}]}),
                  json.dumps({"segments": [{"text": "small"}, {"image": "small.png"}]})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    lenient = load_images(m, (16, 16), strict=False)
    # lines 2 and 3 are unreadable, line 7 has no image; small.png is resized, the rest kept in order
    assert lenient.skipped == 3 and lenient.pixels.shape == (4, 16, 16, 3) and lenient.pixels.dtype == np.uint8
    assert lenient.reasons[0].endswith("m.jsonl:2: malformed JSON: Expecting property name enclosed in double "
                                       "quotes at column 2")
    assert lenient.reasons[1] == f"{m}:3: corrupt image: {tmp_path / 'broken.png'}: not a recognised image format"
    assert len(lenient.reasons) == 2
    assert np.array_equal(load_images(m, (16, 16), strict=False, limit=2).pixels, lenient.pixels[:2])
    with pytest.raises(ValueError, match=r"m.jsonl:2: malformed JSON"):
        load_images(m, (16, 16))
    lines[1:3] = []
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"small.png: image is 8x8, the tokenizer and decoder expect 16x16"):
        load_images(m, (16, 16))
    lines[1:2] = []
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    strict = load_images(m, (16, 16), captioned=True)
    assert strict.skipped == 1 and strict.captions == ["a square"] * 3 and len(strict.ids) == len(strict.meta) == 3
    assert np.array_equal(strict.pixels, lenient.pixels[[0, 2, 3]])
    (tmp_path / "none.jsonl").write_text(json.dumps({"segments": [{"text": "no image"}]}) + "\n")
    with pytest.raises(ValueError, match="none.jsonl: no readable image segments"):
        load_images(tmp_path / "none.jsonl", (16, 16))


def test_reconstruct_batches_equal_one_batch_and_keep_the_mode():
    from anyloom.tokenizers.base import reconstruct

    torch.manual_seed(0)
    model = ImageVQTokenizer(tiny("fsq"))
    x = images(5)
    whole, batched = reconstruct(model, x, batch_size=5), reconstruct(model, x, batch_size=2, desc="test")
    assert model.training  # evaluated in eval mode, handed back as it came
    # the same codes; pixels equal up to the convolutions' batch-size-dependent kernels (oneDNN picks its algorithm
    # by batch shape, so sums may be ordered differently: ~1e-6)
    assert torch.equal(whole.codes, batched.codes)
    torch.testing.assert_close(whole.images, batched.images, rtol=0, atol=1e-5)
    model.eval()
    codes = model.encode(x).codes
    assert torch.equal(batched.codes, codes)
    torch.testing.assert_close(batched.images, model.decode(codes), rtol=0, atol=1e-5)


def test_streamed_pictures_train_exactly_like_pictures_in_memory(tmp_path):
    """loader: stream (pictures decoded batch by batch in loader processes) draws the same batches as loader:
    memory, so the two train bit-identical weights."""
    from anyloom.training.image_tokenizer import train_image_tokenizer
    from anyloom.training.run import RunDir
    from anyloom.weights import load_weights

    train, val = _manifest(tmp_path / "train", 16, 0), _manifest(tmp_path / "val", 8, 1)
    cfg = _stage(steps=6, eval_every=100, sample_every=0, ckpt_every=0, batch_size=8)
    memory = load_weights(train_image_tokenizer(cfg, train, val, RunDir(tmp_path / "a"))).state_dict
    for workers in (0, 2):
        streamed = _stage(steps=6, eval_every=100, sample_every=0, ckpt_every=0, batch_size=8, loader="stream",
                          workers=workers)
        got = load_weights(train_image_tokenizer(streamed, train, val, RunDir(tmp_path / f"s{workers}"))).state_dict
        for k in memory:
            assert torch.equal(memory[k], got[k]), (workers, k)


def test_picture_stream_reads_jsonl_and_shards_by_reference_and_reports_bad_pictures(tmp_path, capsys):
    from own_data import write_own_data

    from anyloom.data.images import PictureStream, collate_pictures, load_images
    from anyloom.training.image_tokenizer import train_image_tokenizer
    from anyloom.training.metrics import read_metrics
    from anyloom.training.run import RunDir

    own = write_own_data(tmp_path / "own", n=12)
    lenient = load_images(own["manifest"], (16, 16), strict=False)
    for source in (own["manifest"], own["shards"]):
        stream = PictureStream(source, (16, 16))
        assert len(stream) == 13  # 12 pictures and the truncated one: read only when asked for
        items = [stream[i] for i in range(len(stream))]
        bad = [x for x in items if isinstance(x, str)]
        assert len(bad) == 1 and "broken" in bad[0] and "corrupt image" in bad[0]
        good = np.stack([x for x in items if not isinstance(x, str)])
        assert np.array_equal(good, lenient.pixels)  # the same pixels as decoding the whole manifest
        batch = collate_pictures(items[4:7])
        assert batch.pixels.shape == (2, 3, 16, 16) and len(batch.unreadable) == 1
        assert torch.equal(batch.pixels, uint8_to_float(np.stack([x for x in items[4:7] if not isinstance(x, str)])))
    # training on it: the truncated picture is left out of the batches that draw it, counted and named once
    cfg = _stage(steps=4, eval_every=100, sample_every=0, ckpt_every=0, batch_size=8, loader="stream", workers=0,
                 model=tiny("vq", patch=2, image_size=(16, 16)))
    run = RunDir(tmp_path / "run")
    train_image_tokenizer(cfg, str(own["shards"]), own["manifest"], run)
    counts = [r["train_unreadable"] for r in read_metrics(run.path) if "train_unreadable" in r]
    assert counts and counts == sorted(counts) and counts[-1] >= 1
    assert "unreadable training picture" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no image segments"):
        (tmp_path / "text.jsonl").write_text(json.dumps({"segments": [{"text": "words only"}]}) + "\n")
        PictureStream(tmp_path / "text.jsonl", (16, 16))

"""Import pretrained audio codecs from Hugging Face-format folders (``config.json`` + ``*.safetensors``).

Nothing is downloaded: point these at a folder you already have (``save_pretrained`` output, or a hub
snapshot). Weights are read with safetensors only; the config is plain JSON.

- EnCodec (``model_type: "encodec"``, mono, no chunking: the 24 kHz family) -> :class:`WaveCodec` with the
  euclidean quantizer. The 48 kHz stereo model (chunked, volume-normalised) is refused with a clear error.
- DAC (``model_type: "dac"``) -> :class:`anyloom.tokenizers.audio_dac.DacCodec`.
- Mimi (``model_type: "mimi"``, the flat layout that ``save_pretrained`` and the kyutai/mimi hub folder use)
  -> :class:`anyloom.tokenizers.audio_mimi.MimiCodec`.

Parity with the transformers implementations (identical codes, decoded audio within 1e-4) is tested on tiny
random models in tests/test_audio_importers.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from anyloom.tokenizers.audio_codec import SeanetConfig, WaveCodec, WaveCodecConfig
from anyloom.tokenizers.audio_dac import DacCodec, DacCodecConfig
from anyloom.tokenizers.audio_mimi import MimiCodec, MimiCodecConfig, MimiTransformerConfig


def read_hf_folder(folder: str | Path, model_type: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, state dict) of a Hugging Face-format folder; checks ``model_type``."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face-format model folder)")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != model_type:
        raise ValueError(f"{config_file}: model_type is {config.get('model_type')!r}, expected {model_type!r}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (pytorch_model.bin is not read: unsafe)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    # older checkpoints store weight norm as weight_g / weight_v; current torch uses parametrizations
    renamed = {}
    for k, v in state.items():
        k = re.sub(r"\.weight_g$", ".parametrizations.weight.original0", k)
        k = re.sub(r"\.weight_v$", ".parametrizations.weight.original1", k)
        renamed[k] = v
    return config, renamed


def _take(
    state: dict[str, torch.Tensor], src: str, dst: str, out: dict[str, torch.Tensor],
    origin: dict[str, str] | None = None,
) -> None:
    """Move every tensor under ``src.`` to ``dst.``; ``origin`` records our key -> the checkpoint's key."""
    keys = [k for k in state if k.startswith(src + ".")]
    if not keys:
        raise KeyError(f"the checkpoint has no weights under {src!r}")
    for k in keys:
        out[dst + k[len(src):]] = state.pop(k)
        if origin is not None:
            origin[dst + k[len(src):]] = k


def seanet_state_dict(
    state: dict[str, torch.Tensor], s: SeanetConfig, out: dict[str, torch.Tensor],
    origin: dict[str, str] | None = None,
) -> None:
    """Move a SEANet encoder/decoder pair from the EnCodec/Mimi layout (``encoder.layers.<i>``, activations
    counted; an LSTM at the bottleneck when ``s.lstm_layers``) to our named modules in ``out``."""

    def conv(src: str, dst: str) -> None:  # EncodecConv1d / MimiConv1d: .conv and (group norm) .norm
        _take(state, src + ".conv", dst + ".conv", out, origin)
        if s.norm == "time_group_norm":
            _take(state, src + ".norm", dst + ".norm", out, origin)

    def unit(src: str, dst: str) -> None:  # block = [ELU, conv, ELU, conv]
        conv(f"{src}.block.1", f"{dst}.conv1")
        conv(f"{src}.block.3", f"{dst}.conv2")
        if s.conv_shortcut:
            conv(f"{src}.shortcut", f"{dst}.shortcut")

    i = 0
    conv(f"encoder.layers.{i}", "encoder.first")
    i += 1
    for r in range(len(s.ratios)):
        for j in range(s.num_residual_layers):
            unit(f"encoder.layers.{i}", f"encoder.stages.{r}.units.{j}")
            i += 1
        conv(f"encoder.layers.{i + 1}", f"encoder.stages.{r}.down")  # i is the ELU
        i += 2
    if s.lstm_layers:
        _take(state, f"encoder.layers.{i}.lstm", "encoder.lstm.lstm", out, origin)
        i += 1
    conv(f"encoder.layers.{i + 1}", "encoder.last")  # i is the ELU

    conv("decoder.layers.0", "decoder.first")
    i = 1
    if s.lstm_layers:
        _take(state, "decoder.layers.1.lstm", "decoder.lstm.lstm", out, origin)
        i += 1
    for r in range(len(s.ratios)):
        conv(f"decoder.layers.{i + 1}", f"decoder.stages.{r}.up")  # i is the ELU
        i += 2
        for j in range(s.num_residual_layers):
            unit(f"decoder.layers.{i}", f"decoder.stages.{r}.units.{j}")
            i += 1
    conv(f"decoder.layers.{i + 1}", "decoder.last")


# -- EnCodec -----------------------------------------------------------------------------------------------------
def encodec_config(hf: dict[str, Any], bandwidth: float | None = None) -> WaveCodecConfig:
    """Our codec config for an EnCodec ``config.json``; ``bandwidth`` (kbps) picks the number of codebooks."""
    if hf.get("audio_channels", 1) != 1:
        raise ValueError("EnCodec import: only mono models are supported (audio_channels must be 1)")
    if hf.get("normalize", False) or hf.get("chunk_length_s") is not None:
        raise ValueError("EnCodec import: chunked / volume-normalised models (the 48 kHz family) are not supported")
    ratios = tuple(hf.get("upsampling_ratios", (8, 5, 4, 2)))
    sample_rate = int(hf.get("sampling_rate", 24000))
    frame_rate = math.ceil(sample_rate / math.prod(ratios))
    codebook_size = int(hf.get("codebook_size", 1024))
    bits = int(math.log2(codebook_size))
    bandwidths = list(hf.get("target_bandwidths", [1.5, 3.0, 6.0, 12.0, 24.0]))
    total = int(1000 * bandwidths[-1] // (frame_rate * bits))
    if bandwidth is None:
        n_q = total
    else:
        if bandwidth not in bandwidths:
            raise ValueError(f"EnCodec import: bandwidth {bandwidth} is not one of the model's {bandwidths}")
        n_q = int(max(1, math.floor(bandwidth * 1000 / (frame_rate * bits))))
    hidden = int(hf.get("hidden_size", 128))
    if hf.get("codebook_dim") not in (None, hidden):
        raise ValueError("EnCodec import: codebook_dim != hidden_size is not supported")
    seanet = SeanetConfig(
        channels=1, num_filters=int(hf.get("num_filters", 32)), ratios=ratios,
        num_residual_layers=int(hf.get("num_residual_layers", 1)),
        residual_kernel_size=int(hf.get("residual_kernel_size", 3)),
        dilation_growth_rate=int(hf.get("dilation_growth_rate", 2)), kernel_size=int(hf.get("kernel_size", 7)),
        last_kernel_size=int(hf.get("last_kernel_size", 7)), compress=int(hf.get("compress", 2)),
        lstm_layers=int(hf.get("num_lstm_layers", 2)), causal=bool(hf.get("use_causal_conv", True)),
        pad_mode=hf.get("pad_mode", "reflect"), norm=hf.get("norm_type", "weight_norm"),
        trim_right_ratio=float(hf.get("trim_right_ratio", 1.0)),
        conv_shortcut=bool(hf.get("use_conv_shortcut", True)), hidden_size=hidden,
    )
    return WaveCodecConfig(sample_rate=sample_rate, seanet=seanet, quantizer="euclidean", num_codebooks=n_q,
                           codebook_size=codebook_size, quantizer_dropout=False)


def encodec_state_dict(state: dict[str, torch.Tensor], cfg: WaveCodecConfig) -> dict[str, torch.Tensor]:
    """EnCodec's module indices (``encoder.layers.<i>``, activations counted) -> our named modules."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    seanet_state_dict(state, cfg.seanet, out)

    embeds = [state.pop(f"quantizer.layers.{q}.codebook.embed") for q in range(cfg.num_codebooks)]
    out["quantizer.embed"] = torch.stack(embeds)  # (Q, K, D)
    # EMA statistics of training and the unused higher-bandwidth levels are not needed for inference
    leftover = [k for k in state if not re.match(r"quantizer\.layers\.\d+\.codebook\.", k)]
    if leftover:
        raise KeyError(f"EnCodec import: unexpected weights {leftover[:5]} ({len(leftover)} in all)")
    return out


def import_encodec(folder: str | Path, bandwidth: float | None = None) -> WaveCodec:
    """A Hugging Face EnCodec folder -> :class:`WaveCodec` (eval mode, fp32). ``bandwidth`` in kbps
    (one of the model's ``target_bandwidths``; default: the highest, i.e. every codebook)."""
    hf, state = read_hf_folder(folder, "encodec")
    cfg = encodec_config(hf, bandwidth)
    model = WaveCodec(cfg)
    model.load_state_dict(encodec_state_dict(state, cfg))
    return model.eval()


# -- DAC ----------------------------------------------------------------------------------------------------------
def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``<m>.parametrizations.weight.original0/1`` (g, v) -> ``<m>.weight = g * v / |v|`` (norm over all
    dims but the first, torch's default ``dim=0``)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".parametrizations.weight.original1"):
            continue
        if k.endswith(".parametrizations.weight.original0"):
            prefix = k[: -len(".parametrizations.weight.original0")]
            direction = state[prefix + ".parametrizations.weight.original1"]
            norm = direction.flatten(1).norm(dim=1).view(-1, *([1] * (direction.ndim - 1)))
            out[prefix + ".weight"] = v * direction / norm
        else:
            out[k] = v
    return out


def dac_config(hf: dict[str, Any], num_codebooks: int | None = None) -> DacCodecConfig:
    down = tuple(hf.get("downsampling_ratios", (2, 4, 8, 8)))
    up = tuple(hf.get("upsampling_ratios", (8, 8, 4, 2)))
    if math.prod(down) != math.prod(up):
        raise ValueError(f"DAC import: downsampling {down} and upsampling {up} ratios have different products")
    total = int(hf.get("n_codebooks", 9))
    n_q = total if num_codebooks is None else num_codebooks
    if not 1 <= n_q <= total:
        raise ValueError(f"DAC import: num_codebooks must be 1..{total}, got {n_q}")
    return DacCodecConfig(
        sample_rate=int(hf.get("sampling_rate", 16000)), encoder_hidden_size=int(hf.get("encoder_hidden_size", 64)),
        downsampling_ratios=down, decoder_hidden_size=int(hf.get("decoder_hidden_size", 1536)),
        upsampling_ratios=up, hidden_size=int(hf.get("hidden_size", 1024)), num_codebooks=n_q,
        codebook_size=int(hf.get("codebook_size", 1024)), codebook_dim=int(hf.get("codebook_dim", 8)),
    )


def import_dac(folder: str | Path, num_codebooks: int | None = None) -> DacCodec:
    """A Hugging Face DAC folder -> :class:`DacCodec` (eval mode, fp32); the first ``num_codebooks`` levels
    (default: all)."""
    hf, state = read_hf_folder(folder, "dac")
    cfg = dac_config(hf, num_codebooks)
    state = fold_weight_norm(state)
    level = re.compile(r"quantizer\.quantizers\.(\d+)\.")
    unused = [k for k in state if (m := level.match(k)) and int(m[1]) >= cfg.num_codebooks]
    for k in unused:
        del state[k]
    model = DacCodec(cfg)
    model.load_state_dict(state)  # strict: a missing or unexpected key is an error naming it
    return model.eval()



# -- Mimi ---------------------------------------------------------------------------------------------------------
def mimi_config(hf: dict[str, Any], num_codebooks: int | None = None) -> MimiCodecConfig:
    """Our codec config for a Mimi ``config.json`` (transformers' field names and defaults); ``num_codebooks``
    keeps the first levels (default: all; at least the semantic ones)."""
    def get(key: str, default: Any) -> Any:
        value = hf.get(key)
        return default if value is None else value

    if get("audio_channels", 1) != 1:
        raise ValueError("Mimi import: only mono models are supported (audio_channels must be 1)")
    if get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"Mimi import: hidden_act {hf['hidden_act']!r} is not supported (only 'gelu')")
    rope = get("rope_parameters", {}) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"Mimi import: rope_type {rope['rope_type']!r} is not supported (only 'default')")
    if isinstance(get("residual_kernel_size", 3), list):
        raise ValueError("Mimi import: a list of residual_kernel_size is not supported")
    ratios = tuple(get("upsampling_ratios", (8, 6, 5, 4)))
    sample_rate = int(get("sampling_rate", 24000))
    hop = math.prod(ratios)
    hidden = int(get("hidden_size", 512))
    # transformers' own arithmetic: the SEANet rate is rounded up, the code rate defaults to half of sr / hop
    encodec_frame_rate = math.ceil(sample_rate / hop)
    frame_rate = hf.get("frame_rate", hf.get("_frame_rate")) or sample_rate / (2 * hop)
    latent_stride = int(encodec_frame_rate / frame_rate)
    if frame_rate == encodec_frame_rate or latent_stride < 1:
        raise ValueError(f"Mimi import: frame_rate {frame_rate} equal to the SEANet rate {encodec_frame_rate} "
                         "(no down/upsampling) is not supported")
    if latent_stride * hop * frame_rate != sample_rate:
        raise ValueError(f"Mimi import: frame_rate {frame_rate} is not sampling_rate {sample_rate} / "
                         f"(hop {hop} * stride {latent_stride})")
    codebook_dim = int(get("codebook_dim", hidden))
    if int(get("vector_quantization_hidden_dimension", 256)) != codebook_dim:
        raise ValueError("Mimi import: vector_quantization_hidden_dimension must equal codebook_dim")
    if codebook_dim == hidden:
        raise ValueError("Mimi import: codebook_dim == hidden_size (quantizers without projections) is not supported")
    total, n_sem = int(get("num_quantizers", 32)), int(get("num_semantic_quantizers", 1))
    n_q = total if num_codebooks is None else num_codebooks
    if not n_sem <= n_q <= total:
        raise ValueError(f"Mimi import: num_codebooks must be {n_sem}..{total}, got {n_q}")
    heads = int(get("num_attention_heads", 8))
    seanet = SeanetConfig(
        channels=1, num_filters=int(get("num_filters", 64)), ratios=ratios,
        num_residual_layers=int(get("num_residual_layers", 1)),
        residual_kernel_size=int(get("residual_kernel_size", 3)),
        dilation_growth_rate=int(get("dilation_growth_rate", 2)), kernel_size=int(get("kernel_size", 7)),
        last_kernel_size=int(get("last_kernel_size", 3)), compress=int(get("compress", 2)), lstm_layers=0,
        causal=bool(get("use_causal_conv", True)), pad_mode=get("pad_mode", "constant"), norm="none",
        trim_right_ratio=float(get("trim_right_ratio", 1.0)), conv_shortcut=bool(get("use_conv_shortcut", False)),
        hidden_size=hidden,
    )
    transformer = MimiTransformerConfig(
        num_layers=int(get("num_hidden_layers", 8)), num_heads=heads,
        num_kv_heads=int(get("num_key_value_heads", heads)), head_dim=int(get("head_dim", hidden // heads)),
        intermediate_size=int(get("intermediate_size", 2048)), sliding_window=int(get("sliding_window", 250)),
        rope_theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))), norm_eps=float(get("norm_eps", 1e-5)),
        attention_bias=bool(get("attention_bias", False)),
    )
    return MimiCodecConfig(
        sample_rate=sample_rate, seanet=seanet, transformer=transformer, latent_stride=latent_stride,
        upsample_groups=int(get("upsample_groups", 512)), num_codebooks=n_q, num_semantic_codebooks=n_sem,
        codebook_size=int(get("codebook_size", 2048)), codebook_dim=codebook_dim,
    )


def mimi_state_dict(
    state: dict[str, torch.Tensor], cfg: MimiCodecConfig
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The Hugging Face Mimi layout -> (our state dict, our key -> checkpoint key). Transformers and
    down/upsampling keep their names; SEANet stacks are renamed; codebooks become (Q, K, d) entries."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    seanet_state_dict(state, cfg.seanet, out, origin)
    for name in ("encoder_transformer", "downsample", "upsample", "decoder_transformer"):
        _take(state, name, name, out, origin)
    levels = {"semantic": cfg.num_semantic_codebooks, "acoustic": cfg.num_codebooks - cfg.num_semantic_codebooks}
    for part, n in levels.items():
        if n == 0:
            continue
        src = f"quantizer.{part}_residual_vector_quantizer"
        for proj in ("input_proj", "output_proj"):
            _take(state, f"{src}.{proj}", f"quantizer.{part}.{proj}", out, origin)
        embeds = []
        for q in range(n):
            book = f"{src}.layers.{q}.codebook"
            if f"{book}.embed_sum" not in state or f"{book}.cluster_usage" not in state:
                raise KeyError(f"Mimi import: the checkpoint has no {book}.embed_sum / .cluster_usage")
            usage, total = state.pop(f"{book}.cluster_usage"), state.pop(f"{book}.embed_sum")
            shape = (cfg.codebook_size, cfg.codebook_dim)
            if tuple(total.shape) != shape or tuple(usage.shape) != shape[:1]:
                raise ValueError(f"Mimi import: {book}.embed_sum / .cluster_usage have shapes {tuple(total.shape)} / "
                                 f"{tuple(usage.shape)}, the config implies {shape} / {shape[:1]}")
            # the reference's entry, computed once: EMA sum / EMA count (clamped like MimiEuclideanCodebook)
            embeds.append(total / usage.clamp(min=1e-5)[:, None])
            origin[f"quantizer.{part}.embed"] = f"{book}.embed_sum"
        out[f"quantizer.{part}.embed"] = torch.stack(embeds)  # (Q, K, d)
    # training flags and the levels beyond num_codebooks are not needed
    book = re.compile(r"quantizer\.(semantic|acoustic)_residual_vector_quantizer\.layers\.\d+\.codebook\.")
    leftover = [k for k in state if not book.match(k)]
    if leftover:
        raise KeyError(f"Mimi import: unexpected weights {leftover[:5]} ({len(leftover)} in all)")
    return out, origin


def load_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: dict[str, str], what: str) -> None:
    """``load_state_dict`` whose errors name the checkpoint's key and the expected shape."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise KeyError(f"{what}: the checkpoint has no weight for {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [origin.get(k, k) for k in state if k not in expected]
    if unexpected:
        raise KeyError(f"{what}: unexpected weights {unexpected[:5]} ({len(unexpected)} in all)")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{what}: {origin.get(k, k)!r} has shape {tuple(v.shape)}, the config implies "
                             f"{tuple(expected[k].shape)}")
    model.load_state_dict(state)


def import_mimi(folder: str | Path, num_codebooks: int | None = None) -> MimiCodec:
    """A Hugging Face Mimi folder -> :class:`MimiCodec` (eval mode, fp32); the first ``num_codebooks`` levels
    (default: all; the released model has 32, Moshi uses 8)."""
    hf, state = read_hf_folder(folder, "mimi")
    cfg = mimi_config(hf, num_codebooks)
    mapped, origin = mimi_state_dict({k: v.float() for k, v in state.items()}, cfg)
    model = MimiCodec(cfg)
    load_checked(model, mapped, origin, f"Mimi import from {folder}")
    return model.eval()


__all__ = [
    "read_hf_folder", "encodec_config", "encodec_state_dict", "import_encodec", "fold_weight_norm", "dac_config",
    "import_dac", "mimi_config", "mimi_state_dict", "import_mimi", "seanet_state_dict",
]

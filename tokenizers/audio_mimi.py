"""A port of Kyutai's Mimi codec (Défossez et al. 2024, the Moshi paper) for imported weights, behind
``AudioTokenizer``.

    wave (B, T) --SEANet encoder--> (B, D, F') --transformer--> --downsample (stride s)--> z (B, D, F)
    z --split RVQ--> codes (B, Q, F): level 0.. from the *semantic* RVQ, the rest from the *acoustic* RVQ
    codes --lookup, sum, project--> z_q --upsample--> --transformer--> --SEANet decoder--> wave (B, F * hop * s)

The SEANet halves are :mod:`audio_codec`'s (plain causal convs, no LSTM, identity skips); what is new here:

- Transformers at the SEANet bottleneck: pre-norm LayerNorm layers, causal self-attention with rotary
  embeddings (rotate-half layout) restricted to a sliding window of ``sliding_window`` frames, a GELU MLP
  without biases, and a learnt per-channel *layer scale* on both residual branches.
- A strided conv (replicate padding, no bias) from the SEANet frame rate to the code rate, and its grouped
  transposed mirror in the decoder.
- A *split* residual quantizer: the semantic RVQ (distilled from WavLM in training) and the acoustic RVQ both
  quantize the same latent, each through its own 1x1 projection to ``codebook_dim``; decoding sums the two
  projected-back reconstructions. Codebooks are stored as EMA sums and counts; entry = sum / max(count, 1e-5).

Parameter names follow the Hugging Face layout where the modules are new (transformers, down/upsample), so
those weights load unrenamed; ``audio_importers.import_mimi`` maps the SEANet stacks and the codebooks.
With causal convs (the released model) batch encoding is exact per item: right padding never reaches earlier
frames.

Axis legend: B batch, T samples, C channels, D latent dim, d codebook dim, F frames, Q codebooks, K entries,
H heads, E head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F_
from einops import rearrange
from torch import nn

from anyloom.tokenizers.audio_codec import SConv1d, SConvTranspose1d, SeanetConfig, SeanetDecoder, SeanetEncoder
from anyloom.tokenizers.audio_common import prepare_wave
from anyloom.tokenizers.audio_module import AudioCodecModule
from anyloom.tokenizers.base import AudioCodes


def _mimi_seanet() -> SeanetConfig:
    return SeanetConfig(
        num_filters=64, ratios=(8, 6, 5, 4), last_kernel_size=3, lstm_layers=0, causal=True, pad_mode="constant",
        norm="none", conv_shortcut=False, hidden_size=512,
    )


@dataclass(frozen=True)
class MimiTransformerConfig:
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2048
    sliding_window: int = 250  # a frame attends to itself and the previous sliding_window - 1 frames
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attention_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")


@dataclass(frozen=True)
class MimiCodecConfig:
    sample_rate: int = 24000
    seanet: SeanetConfig = field(default_factory=_mimi_seanet)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)
    latent_stride: int = 2  # SEANet frames per code frame (25 Hz -> 12.5 Hz)
    upsample_groups: int = 512  # groups of the decoder's transposed conv (depthwise in the released model)
    num_codebooks: int = 32  # levels kept (semantic first); fewer than trained is a lower bitrate
    num_semantic_codebooks: int = 1
    codebook_size: int = 2048
    codebook_dim: int = 256

    def __post_init__(self) -> None:
        if not self.num_semantic_codebooks <= self.num_codebooks:
            raise ValueError(
                f"num_codebooks {self.num_codebooks} must keep the {self.num_semantic_codebooks} semantic level(s)"
            )
        if self.seanet.hidden_size % self.upsample_groups:
            raise ValueError(f"hidden_size {self.seanet.hidden_size} is not divisible by upsample_groups "
                             f"{self.upsample_groups}")

    @property
    def hop_length(self) -> int:
        return self.seanet.hop_length * self.latent_stride


# -- transformer ------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MimiAttention(nn.Module):
    def __init__(self, cfg: MimiTransformerConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        h, kv, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(dim, h * e, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(dim, kv * e, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(dim, kv * e, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * e, dim, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        e = self.cfg.head_dim
        q = rearrange(self.q_proj(x), "b f (h e) -> b h f e", e=e)
        k = rearrange(self.k_proj(x), "b f (h e) -> b h f e", e=e)
        v = rearrange(self.v_proj(x), "b f (h e) -> b h f e", e=e)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        groups = self.cfg.num_heads // self.cfg.num_kv_heads  # grouped-query attention: share k/v heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F_.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=e**-0.5)  # (B, H, F, E)
        return self.o_proj(rearrange(out, "b h f e -> b f (h e)"))


class MimiMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F_.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel learnt scale of a residual branch (Touvron et al. 2021); starts near 0 in training."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class MimiTransformerLayer(nn.Module):
    def __init__(self, cfg: MimiTransformerConfig, dim: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.self_attn = MimiAttention(cfg, dim)
        self.self_attn_layer_scale = LayerScale(dim)
        self.post_attention_layernorm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = MimiMLP(dim, cfg.intermediate_size)
        self.mlp_layer_scale = LayerScale(dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class MimiTransformer(nn.Module):
    """Causal sliding-window transformer over frames; (B, D, F) in and out (the convs' layout)."""

    def __init__(self, cfg: MimiTransformerConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(MimiTransformerLayer(cfg, dim) for _ in range(cfg.num_layers))
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = rearrange(z, "b d f -> b f d")
        frames = x.shape[1]
        pos = torch.arange(frames, device=x.device, dtype=torch.float)
        freqs = pos[:, None] * self.inv_freq  # (F, E/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (F, E): rotate-half pairs i and i + E/2
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        q_idx, k_idx = pos[:, None], pos[None, :]
        mask = (k_idx <= q_idx) & (k_idx > q_idx - self.cfg.sliding_window)  # (F, F) True = attend
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return rearrange(x, "b f d -> b d f")


# -- quantizer --------------------------------------------------------------------------------------------------
class MimiRVQ(nn.Module):
    """Residual nearest-neighbour codebooks in a projected space. ``embed``: (Q, K, d); projections 1x1, no bias."""

    def __init__(self, num_codebooks: int, codebook_size: int, codebook_dim: int, dim: int):
        super().__init__()
        self.input_proj = nn.Conv1d(dim, codebook_dim, 1, bias=False)
        self.output_proj = nn.Conv1d(codebook_dim, dim, 1, bias=False)
        self.embed = nn.Parameter(torch.zeros(num_codebooks, codebook_size, codebook_dim), requires_grad=False)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, F) -> (B, Q, F)."""
        residual = rearrange(self.input_proj(z), "b d f -> b f d")
        codes = []
        for embed in self.embed:
            flat = residual.reshape(-1, residual.shape[-1])  # (B * F, d)
            # torch.cdist as in the reference (it switches to a matmul form for large inputs: same ties)
            idx = torch.cdist(flat[None].float(), embed[None].float(), p=2)[0].argmin(dim=-1)
            idx = idx.view(residual.shape[:-1])  # (B, F)
            residual = residual - F_.embedding(idx, embed)
            codes.append(idx)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, q <= Q, F) -> (B, D, F)."""
        out = sum(F_.embedding(codes[:, i], self.embed[i]) for i in range(codes.shape[1]))  # (B, F, d)
        return self.output_proj(rearrange(out, "b f d -> b d f"))


class MimiSplitRVQ(nn.Module):
    def __init__(self, cfg: MimiCodecConfig):
        super().__init__()
        dim, n_sem = cfg.seanet.hidden_size, cfg.num_semantic_codebooks
        self.num_semantic = n_sem
        self.semantic = MimiRVQ(n_sem, cfg.codebook_size, cfg.codebook_dim, dim)
        self.acoustic = (
            MimiRVQ(cfg.num_codebooks - n_sem, cfg.codebook_size, cfg.codebook_dim, dim)
            if cfg.num_codebooks > n_sem else None
        )

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        codes = self.semantic.encode(z)
        if self.acoustic is not None:  # the acoustic RVQ quantizes the latent itself, not the semantic residual
            codes = torch.cat([codes, self.acoustic.encode(z)], dim=1)
        return codes  # (B, Q, F)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        z = self.semantic.decode(codes[:, : self.num_semantic])
        if codes.shape[1] > self.num_semantic:
            z = z + self.acoustic.decode(codes[:, self.num_semantic :])
        return z


# -- the codec --------------------------------------------------------------------------------------------------
KIND = "anyloom.mimi"


class MimiCodec(AudioCodecModule):
    """Imported Mimi weights behind ``AudioTokenizer``. Encode takes any length (causal padding completes the
    last frame); decode returns F * hop samples. Fewer than ``num_codebooks`` levels decode too (a prefix,
    at least the semantic ones)."""

    KIND = KIND
    CONFIG = MimiCodecConfig

    def __init__(self, cfg: MimiCodecConfig):
        super().__init__()
        if cfg.seanet.channels != 1:
            raise ValueError("MimiCodec is mono (stereo input is downmixed by encode); seanet.channels must be 1")
        self.cfg = cfg
        dim, s = cfg.seanet.hidden_size, cfg.latent_stride
        self.encoder = SeanetEncoder(cfg.seanet)
        self.encoder_transformer = MimiTransformer(cfg.transformer, dim)
        self.downsample = SConv1d(replace(cfg.seanet, pad_mode="replicate"), dim, dim, 2 * s, stride=s, bias=False)
        self.quantizer = MimiSplitRVQ(cfg)
        self.upsample = SConvTranspose1d(cfg.seanet, dim, dim, 2 * s, stride=s, groups=cfg.upsample_groups,
                                         bias=False)
        self.decoder_transformer = MimiTransformer(cfg.transformer, dim)
        self.decoder = SeanetDecoder(cfg.seanet)

    def latents(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, 1, T) float at ``sample_rate`` -> z (B, D, ceil(T / hop)) before quantization."""
        return self.downsample(self.encoder_transformer(self.encoder(wave)))

    def synthesize(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D, F) -> wave (B, 1, F * hop)."""
        return self.decoder(self.decoder_transformer(self.upsample(z)))

    @torch.inference_mode()
    def encode(self, wave: torch.Tensor, sample_rate: int, lengths: torch.Tensor | None = None) -> AudioCodes:
        """wave (B, T) / (B, C, T), int16 or float -> codes (B, Q, ceil(T' / hop)) at the codec's rate."""
        prepared = prepare_wave(wave, sample_rate, self.sample_rate, min_samples=self.samples_per_frame)
        w = prepared.wave.to(self._device())[:, None]  # (B, 1, T)
        codes = self.quantizer.encode(self.latents(w))
        return AudioCodes(codes=codes.cpu(), lengths=self.frame_lengths(lengths, sample_rate, codes))

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, q, F) with num_semantic <= q <= Q -> wave (B, F * hop) at ``sample_rate``."""
        self.check_codes(codes, min_levels=self.cfg.num_semantic_codebooks)
        z = self.quantizer.decode(codes.to(self._device()))
        return self.synthesize(z)[:, 0].cpu()

    def _device(self) -> torch.device:
        return self.downsample.conv.weight.device


__all__ = ["MimiTransformerConfig", "MimiCodecConfig", "MimiCodec", "MimiTransformer", "MimiSplitRVQ", "KIND"]

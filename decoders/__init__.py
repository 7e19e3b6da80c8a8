"""Decoders: discrete codes back to pixels and waveforms.

- ``images``: VQ decoding (the tokenizer's own decoder) and the diffusion alternative, both as
  ``(tokenizer, codes) -> list[PIL.Image]``.
- ``audio``: codec decoding to waveforms, and WAV writing.
- ``diffusion``: a diffusers UNet that refines the VQ reconstruction (DDPM training, DDIM sampling).
- ``vocoder``: a neural vocoder for mel frames (ConvNeXt stack -> STFT magnitude and phase -> inverse STFT), the
  alternative to the mel tokenizer's Griffin-Lim.
"""

"""Generation: KV-cache decoding, modality-constrained sampling, classifier-free guidance, the research API.

``sampling`` (per-modality temperature / top-k / top-p), ``constraints`` (the stream grammar as a logits mask),
``cfg`` (classifier-free guidance), ``engine`` (prefill / decode_one_token / decode_n_tokens on a static KV
cache), ``pipeline`` (``load(run) -> Pipeline`` with typed outputs).
"""

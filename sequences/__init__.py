"""Sequences: the unified vocabulary, interleaved token streams, token shards, task mixtures and packing."""

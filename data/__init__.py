"""Data: the document type every dataset produces, user manifests (JSONL, webdataset shards) and OpenMoji.

The embedded world has its own package, ``anyloom.world``."""

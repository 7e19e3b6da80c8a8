"""Data: the embedded world (generator and judges), user manifests, and the document type they produce."""

"""Tokenizers: every modality to discrete codes and back (text BPE, image VQ, audio codecs), their importers of
pretrained weights, and the registry that maps an exported folder's ``kind`` to its class.

This folder installs as ``anyloom.tokenizers``. Run from the repository root, Python also finds it as a
top-level ``tokenizers`` (the current directory comes first on ``sys.path``), which is the name of Hugging Face's
package that transformers imports; the guard below hands such an import over to that package.
"""

if __name__ == "tokenizers":  # imported by Hugging Face's name from the repository root, not as anyloom.tokenizers
    import importlib.machinery as _machinery
    import importlib.util as _util
    import sys as _sys
    from pathlib import Path as _Path

    _here = _Path(__file__).resolve().parent.parent
    _path = [p for p in _sys.path if _Path(p or ".").resolve() != _here]
    _spec = _machinery.PathFinder.find_spec("tokenizers", _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'tokenizers' (Hugging Face's; this folder is anyloom.tokenizers)",
                                  name="tokenizers")
    _module = _util.module_from_spec(_spec)
    _sys.modules["tokenizers"] = _module
    _spec.loader.exec_module(_module)

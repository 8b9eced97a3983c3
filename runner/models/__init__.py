"""Models as TransformerLens ``HookedTransformer``s, offline first.

- :mod:`~runner.models.naming`: what a spec's model name refers to (no torch; ``runner plan`` uses it).
- :mod:`~runner.models.loaded`: :class:`LoadedModel`, devices, dtypes, hook checks.
- :mod:`~runner.models.loaders`: :func:`load_model`, dispatching on the kind of name to
  :mod:`~runner.models.gguf` (the embedded model and ``.gguf`` files, through
  :mod:`~runner.models.weight_cache`), :mod:`~runner.models.llama` (conversion) and
  :mod:`~runner.models.hub` (TransformerLens names and hub ids, failing fast offline).

The names below are importable from ``runner.models``; the ones that need torch are imported on
first use, so importing this package (e.g. for :func:`describe_model`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from runner.models.naming import EMBEDDED_MODEL, describe_model, embedded_gguf_path

if TYPE_CHECKING:
    from runner.models.gguf import read_gguf_architecture
    from runner.models.hub import hub_reachable
    from runner.models.llama import hooked_llama_from_hf, llama_config_dict
    from runner.models.loaded import LoadedModel, require_hooks, resolve_device, resolve_dtype
    from runner.models.loaders import load_model
    from runner.models.weight_cache import default_cache_dir

__all__ = [
    "EMBEDDED_MODEL",
    "LoadedModel",
    "default_cache_dir",
    "describe_model",
    "embedded_gguf_path",
    "hooked_llama_from_hf",
    "hub_reachable",
    "llama_config_dict",
    "load_model",
    "read_gguf_architecture",
    "require_hooks",
    "resolve_device",
    "resolve_dtype",
]

_LAZY = {
    "LoadedModel": "loaded",
    "require_hooks": "loaded",
    "resolve_device": "loaded",
    "resolve_dtype": "loaded",
    "load_model": "loaders",
    "hooked_llama_from_hf": "llama",
    "llama_config_dict": "llama",
    "hub_reachable": "hub",
    "read_gguf_architecture": "gguf",
    "default_cache_dir": "weight_cache",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"runner.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

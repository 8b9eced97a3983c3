"""The weight cache: converted TransformerLens weights on disk, so that later loads take seconds.

An entry is a directory (``weights.safetensors``, ``config.json`` with the TransformerLens config,
``tokenizer/``) written atomically; an unreadable entry raises :class:`CorruptCache` and is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from runner.models.llama import load_raw_weights, new_hooked_transformer

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

# Bumped whenever the layout or the conversion of cached weights changes, so old entries rebuild.
CACHE_FORMAT = 1


class CorruptCache(Exception):
    """A weight-cache entry that cannot be read back; it gets rebuilt."""


def default_cache_dir() -> Path:
    """Where converted weights are cached: ``$RUNNER_CACHE_DIR``, else ``~/.cache/runner``."""
    configured = os.environ.get("RUNNER_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "runner"


def write_cache(
    entry: Path,
    cfg_dict: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str,
) -> None:
    """Write a cache entry atomically: into a temporary directory, renamed into place when complete.

    An interrupted write leaves no entry (only a temporary directory, removed by the next write),
    so a half-written entry is never read.
    """
    from safetensors.torch import save_file

    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(entry)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        # Clones break the storage shared by tied embeddings (W_U is W_E transposed), which
        # safetensors refuses to save.
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / "weights.safetensors"))
        tokenizer.save_pretrained(tmp / "tokenizer")
        meta = {"format": CACHE_FORMAT, "source": source, "config": cfg_dict}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        try:
            tmp.rename(entry)
        except OSError:
            if not entry.exists():
                raise  # otherwise a concurrent load wrote the same entry first: keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temp_dirs(entry: Path, max_age_seconds: float = 3600.0) -> None:
    """Remove temporary directories that interrupted writes of ``entry`` left behind."""
    for stale in entry.parent.glob(f".{entry.name}.tmp-*"):
        if time.time() - stale.stat().st_mtime > max_age_seconds:
            shutil.rmtree(stale, ignore_errors=True)


def read_cache(entry: Path, device: str, dtype: torch.dtype) -> tuple[HookedTransformer, Any]:
    """Build the ``HookedTransformer`` from a cache entry; :class:`CorruptCache` if unreadable."""
    from transformers import AutoTokenizer

    # Anything wrong with the files (truncated, missing, invalid JSON) means: rebuild the entry.
    try:
        meta = json.loads((entry / "config.json").read_text())
        if meta.get("format") != CACHE_FORMAT:
            raise CorruptCache(f"format {meta.get('format')}, expected {CACHE_FORMAT}")
        state_dict = _read_weights(entry / "weights.safetensors")
        tokenizer = AutoTokenizer.from_pretrained(entry / "tokenizer", local_files_only=True)
    except CorruptCache:
        raise
    except Exception as exc:
        raise CorruptCache(f"{type(exc).__name__}: {exc}") from exc
    try:
        model = new_hooked_transformer(meta["config"], tokenizer, device, dtype)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:  # a config TransformerLens rejects
        raise CorruptCache(f"invalid config: {type(exc).__name__}: {exc}") from exc
    _check_state_dict(model, state_dict)
    load_raw_weights(model, state_dict, assign=True)  # fresh tensors: adopting them saves a copy
    return model, tokenizer


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file into memory the process owns.

    Not memory-mapped: a model whose weights map a file dies with SIGBUS if that file is
    truncated under it. ``pread`` is also faster than touching a fresh mapping page by page.
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(path), backend="pread")
    except TypeError:  # safetensors < 0.8 has no backend option
        return {name: tensor.clone() for name, tensor in load_file(str(path)).items()}


def _check_state_dict(model: HookedTransformer, state_dict: dict[str, torch.Tensor]) -> None:
    """TransformerLens fills missing weights with random ones silently, so check names and shapes."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    found = {name: tuple(t.shape) for name, t in state_dict.items()}
    if expected != found:
        wrong = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise CorruptCache(f"weights do not match the config, e.g. {wrong}")

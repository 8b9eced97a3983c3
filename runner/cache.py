"""The result cache: each case's stored result under a content key of everything that determines it.

A case's *inputs* are what its numbers depend on: the analysis and the version it declares, the
resolved params (less those declared not to change results, such as ``batch_size``), the model's
weights hash (not its name), its dtype and, for cases that run it, the device kind, the dataset's
source fingerprint and settings, SAE file hashes, the seed and the runner version. The sha256 of
their canonical JSON is the case's *base key*; an entry is stored under it. The earlier cases a
case read (``ctx.outputs``, ``sae: {from_step: ...}``) are recorded in its entry with their keys,
and the *cache key* hashes the base key with them: when an upstream case changes, the entry no
longer matches and the case reruns.

Layout of the cache folder (default ``~/.cache/runner/results``)::

    entries/<k[:2]>/<k>/entry.json   inputs, reads, notes, where it came from, files with sha256
    entries/<k[:2]>/<k>/files/...    result.json, result.npz, data/..., plots/...
    locks/<k>.lock                   one lock per entry (flock): shared to read, exclusive to write
    index/<h>.json                   the last key of each (spec name, case id), for "stale" reasons
    file-hashes.json                 sha256 of big files by path, size and mtime
    tmp/                             entries being written, renamed into place when complete

Nothing here imports torch: ``runner plan`` computes every key without loading a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from runner import __version__
from runner.errors import RunnerError

if TYPE_CHECKING:
    from runner.planner import Case

__all__ = [
    "CACHE_FORMAT",
    "CacheEntry",
    "FileHashes",
    "KeyMaker",
    "ResultCache",
    "base_key",
    "cache_key",
    "default_results_dir",
    "describe_changes",
]

CACHE_FORMAT = 1
"""Bumped when the entry layout changes; entries of another format are recomputed."""

NON_RESULT_PARAMS = frozenset({"batch_size"})
"""Params that never change a case's numbers (only its speed or memory), left out of keys.
A params field can also say so itself: ``Field(..., json_schema_extra={"cache_key": False})``."""


def default_results_dir() -> Path:
    """``$RUNNER_RESULTS_CACHE``, else ``$RUNNER_CACHE_DIR/results``, else ``~/.cache/runner/results``.

    ``RUNNER_CACHE_DIR`` is runner's whole cache (converted model weights live in its ``models/``);
    ``RUNNER_RESULTS_CACHE`` moves only the results (the tests use it).
    """
    results = os.environ.get("RUNNER_RESULTS_CACHE")
    if results:
        return Path(results).expanduser()
    root = os.environ.get("RUNNER_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "runner") / "results"


def canonical(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, so equal values hash equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def base_key(inputs: dict[str, Any]) -> str:
    """The sha256 of a case's inputs: the name of its cache entry."""
    return hashlib.sha256(canonical(inputs).encode()).hexdigest()


def cache_key(base: str, reads: dict[str, list[str]]) -> str:
    """The full key: ``base`` hashed with the keys of the earlier cases the case read."""
    if not reads:
        return base
    return hashlib.sha256(f"{base}:{canonical(reads)}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# File hashes, cached by path, size and mtime


class FileHashes:
    """sha256 of files, remembered by (path, size, mtime) in a JSON file so big files hash once."""

    def __init__(self, store: Path | None) -> None:
        self.store = store
        self._known: dict[str, list[Any]] | None = None
        self._dirty = False

    def _table(self) -> dict[str, list[Any]]:
        if self._known is None:
            self._known = {}
            if self.store is not None and self.store.is_file():
                try:
                    loaded = json.loads(self.store.read_text())
                    self._known = loaded if isinstance(loaded, dict) else {}
                except (OSError, ValueError):
                    self._known = {}  # a damaged table only costs rehashing
        return self._known

    def sha256(self, path: Path) -> str:
        """The file's sha256, read from the table when its size and mtime are unchanged."""
        path = path.resolve()
        stat = path.stat()
        table = self._table()
        known = table.get(str(path))
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return str(known[2])
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        table[str(path)] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
        self._dirty = True
        return digest.hexdigest()

    def directory(self, path: Path) -> dict[str, str]:
        """sha256 of every file under ``path`` (hidden ones left out), by relative path."""
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return {p.relative_to(path).as_posix(): self.sha256(p) for p in files}

    def save(self) -> None:
        """Write the table back (atomically; a lost race only costs a rehash later)."""
        if not self._dirty or self.store is None:
            return
        with contextlib.suppress(OSError):
            _write_bytes(self.store, json.dumps(self._table()).encode())
            self._dirty = False


# ---------------------------------------------------------------------------------------------
# Inputs of a case


@dataclass
class KeyMaker:
    """Computes each case's inputs and base key without loading anything (no torch)."""

    base_dir: Path
    """The spec's folder: relative dataset and SAE paths resolve against it."""
    hashes: FileHashes
    device_override: str | None = None
    _memo: dict[str, Any] = field(default_factory=dict)

    def inputs(self, case: Case) -> dict[str, Any]:
        """Everything that determines ``case``'s result, as JSON. Raises RunnerError for a missing model."""
        from runner.registry import ANALYSES

        analysis = ANALYSES.get(case.analysis)
        inputs: dict[str, Any] = {
            "analysis": case.analysis,
            "version": analysis.version,
            "params": key_params(case.params),
            "seed": case.seed,
            "runner": __version__,
        }
        if analysis.needs & {"model", "dataset"}:  # a dataset is tokenized with the model's tokenizer
            inputs["model"] = {
                **self._memoized(f"model:{case.model.name}", lambda: self.model_identity(case.model.name)),
                "dtype": case.model.dtype,
                "device": self.device_kind(case.model.device),
            }
        if "dataset" in analysis.needs:
            inputs["dataset"] = self.dataset_identity(case.dataset)
        saes = [self.sae_identity(s) for s in _sae_sources(case.params)]
        if saes:
            inputs["saes"] = saes
        return inputs

    def _memoized(self, key: str, compute: Any) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def model_identity(self, name: str) -> dict[str, Any]:
        """The model's weights hash (embedded or .gguf: the file; a directory: its files), not its name.

        Hub models are named with the revision in the local Hugging Face cache, when there is one.
        """
        from runner.models.naming import describe_model

        described = describe_model(name)
        kind, location = described["kind"], Path(described["location"])
        if kind in {"embedded", "gguf-file"}:
            return {"sha256": self.hashes.sha256(location), "file": location.name}
        if kind == "local-dir":
            files = self.hashes.directory(location)
            return {"sha256": hashlib.sha256(canonical(files).encode()).hexdigest(), "files": len(files)}
        return {"hub": str(location), "revision": hub_revision("models", str(location))}

    def device_kind(self, device: str) -> str:
        """``cpu`` or ``cuda``: numbers computed on a GPU differ in their last bits from a CPU's."""
        chosen = self.device_override or device
        if chosen != "auto":
            return chosen.split(":")[0]
        return self._memoized("device:auto", _auto_device)

    def dataset_identity(self, dataset: Any) -> dict[str, Any]:
        """The dataset's source fingerprint (the text's origin, hashed) and the settings that cut it."""
        settings = dataset.model_dump(mode="json")
        name = settings.pop("name")
        return {"source": self._memoized(f"text:{name}", lambda: self.text_source(name)), **settings}

    def text_source(self, name: str) -> dict[str, Any]:
        """What the text of dataset ``name`` is made from."""
        if name in {"python-docs", "python-stdlib"}:
            import pydoc_data.topics

            source = {"topics_sha256": self.hashes.sha256(Path(str(pydoc_data.topics.__file__)))}
            if name == "python-stdlib":  # the docstrings of this Python's standard library
                source["python"] = sys.version.split()[0]
            return {"embedded": name, **source}
        path = Path(name) if Path(name).is_absolute() else self.base_dir / name
        if path.is_file():
            return {"file": path.name, "sha256": self.hashes.sha256(path)}
        return {"hub": name, "revision": hub_revision("datasets", name)}

    def sae_identity(self, source: Any) -> dict[str, Any]:
        """The hashes of an SAE's files (shipped or local), or its release and id."""
        if source.release is not None:
            return {"release": source.release, "id": source.id}
        if source.from_step is not None:
            return {"from_step": source.from_step}  # its keys are among the case's reads
        if source.name is not None:
            from runner.saes import SHIPPED_DIR

            pattern, root = source.name, SHIPPED_DIR
        else:
            pattern, root = source.path, self.base_dir
        directories = sorted(root.glob(pattern.replace("{layer}", "*"))) if "{layer}" in pattern else []
        if "{layer}" not in pattern:
            directories = [Path(pattern) if Path(pattern).is_absolute() else root / pattern]
        files = {
            d.name: self.hashes.directory(d) for d in directories if d.is_dir()
        }  # a missing path fails when the case runs, with the loader's message
        return {"sae": source.describe(), "sha256": hashlib.sha256(canonical(files).encode()).hexdigest()}


def key_params(params: BaseModel) -> dict[str, Any]:
    """The params as JSON, without those that cannot change results (see :data:`NON_RESULT_PARAMS`)."""
    dumped = params.model_dump(mode="json")
    for name, info in type(params).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if name in NON_RESULT_PARAMS or extra.get("cache_key") is False:
            dumped.pop(name, None)
    return dict(dumped)


def _sae_sources(value: Any) -> list[Any]:
    """Every SAESource inside a params model (fields, lists, dicts)."""
    from runner.saes import SAESource

    if isinstance(value, SAESource):
        return [value]
    if isinstance(value, BaseModel):
        return [s for name in type(value).model_fields for s in _sae_sources(getattr(value, name))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _sae_sources(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _sae_sources(v)]
    return []


def _auto_device() -> str:
    """What ``device: auto`` resolves to, importing torch only where a GPU driver is present."""
    if "torch" not in sys.modules and not any(
        Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/proc/driver/nvidia")
    ):
        return "cpu"  # no NVIDIA or ROCm driver: torch.cuda.is_available() would be False
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def hub_revision(kind: str, repo: str) -> str | None:
    """The commit the local Hugging Face cache holds for ``repo`` (``refs/main``), or None."""
    home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub")))
    ref = hub / f"{kind}--{repo.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def describe_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    """``params.layers '0-5' -> '0-29', model.sha256 1a2b3c4d5e6f -> ...``: which inputs changed."""
    a, b = _flatten(old), _flatten(new)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k, _MISSING) != b.get(k, _MISSING)]
    parts = [f"{k} {_short(a.get(k, _MISSING))} -> {_short(b.get(k, _MISSING))}" for k in changed[:limit]]
    more = f" (+{len(changed) - limit} more)" if len(changed) > limit else ""
    return ", ".join(parts) + more if parts else "no input changed"


_MISSING = object()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    if value is _MISSING:
        return "(none)"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# Entries


class CorruptEntry(Exception):
    """A cache entry that cannot be read back; it is removed and the case recomputed."""


@dataclass
class CacheEntry:
    """One stored case: where its files are and what made it."""

    root: Path
    meta: dict[str, Any]

    @property
    def base(self) -> str:
        """The base key (the entry's folder name)."""
        return self.root.name

    @property
    def key(self) -> str:
        """The full cache key (base key and the keys of the cases it read)."""
        return str(self.meta["key"])

    @property
    def reads(self) -> dict[str, list[str]]:
        """Step id → keys of the earlier cases the case read, in order."""
        return dict(self.meta.get("reads", {}))

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """Relative path → ``{"bytes": n, "sha256": ...}``."""
        return dict(self.meta["files"])

    def path(self, name: str) -> Path:
        """The stored file ``name`` (``result.json``, ``data/x.csv``, ...)."""
        return self.root / "files" / name

    def describe(self) -> str:
        """``computed 2025-01-01 12:00 in 12.3s by runs/x/...``."""
        made = self.meta.get("created", "?")[:16].replace("T", " ")
        run = _shown(self.meta.get("run_dir")) or "an unknown run"
        return f"computed {made} in {self.meta.get('duration_s', 0):.1f}s by {run}"


@dataclass
class ResultCache:
    """The cache folder: lookups, atomic writes under a per-entry lock, the stale-reason index."""

    root: Path

    def entry_dir(self, base: str) -> Path:
        """Where the entry of base key ``base`` lives."""
        return self.root / "entries" / base[:2] / base

    def peek(self, base: str) -> CacheEntry | None:
        """The entry's metadata without checking its files (for ``runner plan``)."""
        try:
            meta = json.loads((self.entry_dir(base) / "entry.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            return None
        return CacheEntry(self.entry_dir(base), meta)

    def lookup(self, base: str) -> CacheEntry | None:
        """The entry of ``base`` with every file checked; :class:`CorruptEntry` when damaged."""
        directory = self.entry_dir(base)
        if not directory.exists():
            return None
        try:
            meta = json.loads((directory / "entry.json").read_text())
        except (OSError, ValueError) as exc:
            raise CorruptEntry(f"entry.json unreadable ({type(exc).__name__})") from None
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise CorruptEntry(f"format {meta.get('format') if isinstance(meta, dict) else '?'}")
        entry = CacheEntry(directory, meta)
        for name, info in entry.files.items():
            try:
                data = entry.path(name).read_bytes()
            except OSError:
                raise CorruptEntry(f"{name} is missing") from None
            if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise CorruptEntry(f"{name} does not match its recorded sha256")
        return entry

    def remove(self, base: str) -> None:
        """Delete an entry (a damaged one): rename it away first, so no reader sees half of it."""
        directory = self.entry_dir(base)
        if directory.exists():
            trash = self._tmp_dir(f"{base}-removed")
            with contextlib.suppress(OSError):
                os.replace(directory, trash)
                shutil.rmtree(trash, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, base: str, on_wait: Any = None, *, shared: bool = False) -> Iterator[None]:
        """Hold the entry's lock (``flock``; released by the OS if the process dies).

        Exclusive (the default) while writing or removing the entry, which takes milliseconds;
        ``shared`` while reading it, so readers never wait for each other, only for a write.
        Nobody holds it while a case computes: two runs at once do not serialise.
        """
        path = self.root / "locks" / f"{base}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        with open(path, "a+b") as handle:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(handle, mode)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def store(self, base: str, files: dict[str, Path], meta: dict[str, Any]) -> CacheEntry:
        """Write an entry atomically: files copied into a temporary folder renamed into place.

        Hold :meth:`lock` around it. A process killed while writing leaves only a temporary folder
        (removed by a later write), never a partial entry.
        """
        self._remove_orphans()
        tmp = self._tmp_dir(base)
        recorded: dict[str, dict[str, Any]] = {}
        for name, source in files.items():
            target = tmp / "files" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            data = source.read_bytes()
            target.write_bytes(data)
            recorded[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        meta = {"format": CACHE_FORMAT, **meta, "files": recorded}
        (tmp / "entry.json").write_text(json.dumps(meta, indent=1, default=str))
        _fsync_tree(tmp)
        directory = self.entry_dir(base)
        directory.parent.mkdir(parents=True, exist_ok=True)
        if directory.exists():  # recomputed (forced, upstream changed): replace the old entry
            old = self._tmp_dir(f"{base}-old")
            os.replace(directory, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, directory)
        return CacheEntry(directory, meta)

    def _tmp_dir(self, stem: str) -> Path:
        path = self.root / "tmp" / f"{stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _remove_orphans(self) -> None:
        """Remove temporary folders left by processes that died while writing."""
        for path in (self.root / "tmp").glob("*") if (self.root / "tmp").is_dir() else ():
            try:
                pid = int(path.name.rsplit("-", 2)[-2])
            except (ValueError, IndexError):
                continue
            if pid != os.getpid() and not _alive(pid):
                shutil.rmtree(path, ignore_errors=True)

    # The index: the last key each (spec, case id) had, so that `plan` can say what changed.

    def _index_path(self, spec_name: str, case_id: str) -> Path:
        digest = hashlib.sha256(f"{spec_name}\0{case_id}".encode()).hexdigest()[:32]
        return self.root / "index" / f"{digest}.json"

    def remember(self, spec_name: str, case_id: str, base: str, key: str, inputs: dict[str, Any]) -> None:
        """Record the key ``case_id`` of ``spec_name`` has now."""
        record = {"spec": spec_name, "case": case_id, "base": base, "key": key, "inputs": inputs}
        with contextlib.suppress(OSError):
            _write_bytes(self._index_path(spec_name, case_id), json.dumps(record).encode())

    def previous(self, spec_name: str, case_id: str) -> dict[str, Any] | None:
        """What :meth:`remember` recorded last for this case, if anything."""
        try:
            record = json.loads(self._index_path(spec_name, case_id).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def entries(self) -> list[CacheEntry]:
        """Every readable entry (metadata only), oldest first."""
        found = [self.peek(d.name) for d in sorted((self.root / "entries").glob("*/*")) if d.is_dir()]
        return sorted((e for e in found if e is not None), key=lambda e: str(e.meta.get("created", "")))

    def size(self, entry: CacheEntry) -> int:
        """Bytes of an entry's files."""
        return sum(int(f["bytes"]) for f in entry.files.values())

    def prune(self, older_than_s: float | None) -> tuple[int, int]:
        """Remove entries last used more than ``older_than_s`` seconds ago (all with None).

        Returns (entries removed, bytes freed). Entries locked by a running case are skipped.
        """
        removed = freed = 0
        now = time.time()
        for entry in self.entries():
            used = _timestamp(entry.meta.get("used") or entry.meta.get("created"))
            if older_than_s is not None and now - used < older_than_s:
                continue
            lock = self.root / "locks" / f"{entry.base}.lock"
            lock.parent.mkdir(parents=True, exist_ok=True)
            with open(lock, "a+b") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                freed += self.size(entry)
                self.remove(entry.base)
                removed += 1
        self._remove_orphans()
        return removed, freed

    def touch(self, entry: CacheEntry) -> None:
        """Record that ``entry`` was used now (``prune --older-than`` keeps recently used entries)."""
        entry.meta["used"] = datetime.now().astimezone().isoformat(timespec="seconds")
        with contextlib.suppress(OSError):
            _write_bytes(entry.root / "entry.json", json.dumps(entry.meta, indent=1, default=str).encode())


def _shown(path: str | None) -> str | None:
    """``path`` relative to the current folder when it is inside it."""
    if not path:
        return None
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _timestamp(text: Any) -> float:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    """Flush an entry's files to disk before it is renamed into place (a crash must not leave it empty)."""
    for path in [*root.rglob("*"), root]:
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``45m``, ``90s`` (or a number of days) → seconds; RunnerError otherwise."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "d")
    try:
        value = float(number)
    except ValueError:
        raise RunnerError(
            f"--older-than {text!r} is not an age. Write a number and a unit: 30d, 12h, 45m or 90s."
        ) from None
    return value * units[unit]

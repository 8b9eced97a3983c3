"""The run folder and its writers.

``runs/<spec name>/<timestamp>-<short hash>/`` holds the spec as given, ``manifest.json``,
``results/<case id>.json`` (+ ``.npz``: each case's typed result, see :mod:`runner.results`),
``data/<case id>/`` (CSV, JSONL, JSON, NPZ, NPY, TXT), ``plots/<case id>/`` (PNG) and the reports.
Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written file behind; the manifest is rewritten after every case.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import RunnerError
from runner.results import to_jsonable

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["RunFolder", "create_run_folder", "entry_name", "safe_name", "write_atomic"]


def safe_name(case_id: str) -> str:
    """A folder name for a case id: characters other than letters, digits and ``_.,=[]+-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.,=\[\]+-]", "_", case_id)


def write_atomic(path: Path, write: Callable[[io.BufferedWriter], object]) -> None:
    """Write through ``write(file)`` into a temporary sibling, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        write(handle)
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    text = json.dumps(to_jsonable(value), indent=2, allow_nan=False)
    write_atomic(path, lambda f: f.write(text.encode() + b"\n"))


def _frame(value: Any) -> pd.DataFrame:
    import pandas as pd

    return value if isinstance(value, pd.DataFrame) else pd.DataFrame(list(value))


def _write_csv(path: Path, value: Any) -> None:
    write_atomic(path, lambda f: _frame(value).to_csv(f, index=False))


def _write_jsonl(path: Path, value: Any) -> None:
    rows = _frame(value).to_dict(orient="records") if hasattr(value, "to_dict") else list(value)
    lines = "".join(json.dumps(to_jsonable(r), allow_nan=False) + "\n" for r in rows)
    write_atomic(path, lambda f: f.write(lines.encode()))


def _write_npz(path: Path, value: Any) -> None:
    import numpy as np

    arrays = {k: np.asarray(v) for k, v in value.items()}
    bad = [k for k, a in arrays.items() if a.dtype == object]
    if bad:
        raise RunnerError(
            f"{path.name}: arrays {bad} hold Python objects; NPZ files never hold pickles. "
            "Put metadata in a .json file instead."
        )
    write_atomic(path, lambda f: np.savez_compressed(f, **arrays))  # type: ignore[arg-type]


def _write_npy(path: Path, value: Any) -> None:
    import numpy as np

    array = np.asarray(value)
    if array.dtype == object:
        raise RunnerError(f"{path.name}: an object array cannot be saved without pickling")
    write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))


def _write_safetensors(path: Path, value: Any) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in value.items()}
    write_atomic(path, lambda f: f.write(save(tensors)))


def _write_text(path: Path, value: Any) -> None:
    write_atomic(path, lambda f: f.write(str(value).encode()))


WRITERS: dict[str, Callable[[Path, Any], None]] = {
    ".json": _write_json,
    ".csv": _write_csv,
    ".jsonl": _write_jsonl,
    ".npz": _write_npz,
    ".npy": _write_npy,
    ".safetensors": _write_safetensors,
    ".txt": _write_text,
    ".md": _write_text,
}


class RunFolder:
    """One run's output folder and the writers that fill it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write_result(self, case_id: str, json_bytes: bytes, npz_bytes: bytes | None) -> list[str]:
        """Write a case's typed result (``results/<case id>.json`` and, with arrays, ``.npz``)."""
        stem = self.root / "results" / safe_name(case_id)
        files = [(stem.with_name(f"{stem.name}.json"), json_bytes)]
        if npz_bytes is not None:
            files.append((stem.with_name(f"{stem.name}.npz"), npz_bytes))
        for path, content in files:
            write_atomic(path, lambda f, content=content: f.write(content))  # type: ignore[misc]
        return [path.relative_to(self.root).as_posix() for path, _ in files]

    def restore(self, case_id: str, files: dict[str, Path]) -> dict[str, list[str]]:
        """Copy a cached case's files (names from :func:`entry_name`) into this folder for ``case_id``.

        Returns the paths written, relative to the run folder, by kind (``results``, ``data``, ``plots``).
        """
        written: dict[str, list[str]] = {"results": [], "data": [], "plots": []}
        for name, source in files.items():
            kind, _, rest = name.partition("/")
            if kind in ("data", "plots"):
                path = self.root / kind / safe_name(case_id) / rest
            else:  # result.json, result.npz
                kind, path = "results", self.root / "results" / f"{safe_name(case_id)}{Path(name).suffix}"
            write_atomic(path, lambda f, source=source: f.write(source.read_bytes()))  # type: ignore[misc]
            written[kind].append(path.relative_to(self.root).as_posix())
        return written

    def write_data(self, case_id: str, data: dict[str, Any]) -> list[str]:
        """Write a case's data files; returns their paths relative to the run folder."""
        written = []
        for name, value in data.items():
            writer = WRITERS.get(Path(name).suffix)
            if writer is None:
                raise RunnerError(f"No writer for data file {name!r}; known extensions: {', '.join(WRITERS)}")
            path = self.root / "data" / safe_name(case_id) / name
            writer(path, value)
            written.append(path.relative_to(self.root).as_posix())
        return written

    def write_plots(self, case_id: str, plots: dict[str, Any], dpi: int = 110) -> list[str]:
        """Save matplotlib figures as PNG; returns their paths relative to the run folder."""
        written = []
        for name, figure in plots.items():
            path = (
                self.root / "plots" / safe_name(case_id) / (name if name.endswith(".png") else f"{name}.png")
            )
            # A figure with a layout engine already fits its canvas; "tight" would draw it twice.
            tight = {} if figure.get_layout_engine() is not None else {"bbox_inches": "tight"}
            write_atomic(path, partial(figure.savefig, format="png", dpi=dpi, **tight))
            written.append(path.relative_to(self.root).as_posix())
        return written

    def write_json(self, name: str, value: Any) -> Path:
        """Write a JSON file at the top of the run folder."""
        path = self.root / name
        _write_json(path, value)
        return path

    def write_text(self, name: str, text: str) -> Path:
        """Write a text file at the top of the run folder."""
        path = self.root / name
        _write_text(path, text)
        return path


def entry_name(case_id: str, path: str) -> str:
    """A run-folder path of ``case_id``'s files as a cache entry names it, without the case id.

    ``results/<case>.json`` → ``result.json``; ``data/<case>/x.csv`` → ``data/x.csv``; same for plots.
    """
    kind, _, rest = path.partition("/")
    if kind == "results":
        return f"result{Path(rest).suffix}"
    prefix = f"{safe_name(case_id)}/"
    if kind not in ("data", "plots") or not rest.startswith(prefix):
        raise ValueError(f"{path} is not a file of case {case_id}")
    return f"{kind}/{rest[len(prefix) :]}"


def spec_hash(text: str) -> str:
    """Short content hash of the spec text."""
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def create_run_folder(output_dir: Path, spec_name: str, spec_path: Path, spec_text: str) -> RunFolder:
    """Create ``<output_dir>/<spec name>/<timestamp>-<hash>/`` and copy the spec into it."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = output_dir / spec_name / f"{stamp}-{spec_hash(spec_text)}"
    suffix = 1
    while root.exists():
        suffix += 1
        root = output_dir / spec_name / f"{stamp}-{spec_hash(spec_text)}-{suffix}"
    try:
        root.mkdir(parents=True)
    except OSError as exc:
        raise RunnerError(
            f"Cannot create the run folder {root}: {exc.strerror}.\n"
            "Choose another place with --output-dir or `output.dir` in the spec."
        ) from None
    shutil.copyfile(spec_path, root / spec_path.name)
    return RunFolder(root)

"""Run folders read back: :func:`load_run` for notebooks, and the checks every reader shares.

``load_run(RUN_DIR)`` (or ``load_run(SPEC)`` for the newest run of a spec) gives the manifest and,
per case, its typed result and summary, its tables as pandas DataFrames and its arrays (NPZ, NPY,
safetensors), each file read when first asked for. Nothing is ever unpickled: NPZ and NPY files are
read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from runner.errors import RunnerError

__all__ = [
    "LoadedCase",
    "LoadedRun",
    "load_run",
    "newest_run_dir",
    "read_manifest",
    "rerender_reports",
    "run_dirs",
]

TABLE_SUFFIXES = (".csv", ".jsonl")
ARRAY_SUFFIXES = (".npz", ".npy", ".safetensors")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest of ``run_dir``; RunnerError if it is not a run folder or is from a newer runner."""
    from runner.manifest import MANIFEST_VERSION

    path = Path(run_dir) / "manifest.json"
    if not Path(run_dir).is_dir() or not path.is_file():
        raise RunnerError(
            f"{run_dir} is not a run folder: it has no manifest.json.\n"
            "A run folder is what `runner run` writes: runs/<spec name>/<timestamp>-<hash>/. "
            "Give one of those (or, to load_run, a spec file for its newest run)."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunnerError(f"{path}: not a readable manifest ({exc}).") from None
    if not isinstance(manifest, dict) or "spec" not in manifest or "cases" not in manifest:
        raise RunnerError(f"{path}: not a runner manifest (no `spec` or `cases`).")
    version = int(manifest.get("manifest_version", 1))
    if version > MANIFEST_VERSION:
        raise RunnerError(
            f"{path} was written by runner {manifest.get('runner_version', '?')} (manifest version "
            f"{version}); this runner reads manifest versions up to {MANIFEST_VERSION}.\n"
            "Upgrade runner to read this run folder."
        )
    return manifest


def run_dirs(output_dir: Path, spec_name: str) -> list[Path]:
    """The run folders of ``spec_name`` under ``output_dir``, oldest first.

    Ordered by when each started: the spec copy written when the folder was created (folder names
    have a one-second timestamp, and two runs of edited specs in one second sort by hash).
    """
    parent = Path(output_dir) / spec_name
    runs = [p for p in parent.glob("*") if (p / "manifest.json").is_file()] if parent.is_dir() else []
    return sorted(runs, key=_started_ns)


def _started_ns(run_dir: Path) -> tuple[str, int]:
    copies = [p.stat().st_mtime_ns for p in run_dir.glob("*.y*ml")]
    return run_dir.name[:15], min(copies, default=run_dir.stat().st_mtime_ns)


def newest_run_dir(output_dir: Path, spec_name: str) -> Path | None:
    """The newest run folder of ``spec_name`` under ``output_dir``, or None."""
    runs = run_dirs(output_dir, spec_name)
    return runs[-1] if runs else None


def spec_copy(run_dir: Path, manifest: dict[str, Any]) -> Path:
    """The run folder's own copy of its spec."""
    name = manifest["spec"].get("file") or Path(manifest["spec"]["path"]).name
    path = Path(run_dir) / name
    if not path.is_file():
        raise RunnerError(
            f"{run_dir} has lost its copy of the spec ({name}); runner copies it there when the run starts.\n"
            f"Restore it from the spec at {manifest['spec']['path']}, if that has not changed."
        )
    return path


def rerender_reports(run_dir: Path) -> list[Path]:
    """Write ``report.md`` and ``report.html`` of ``run_dir`` again from its manifest and files."""
    from runner.artifacts import RunFolder
    from runner.reports import render_reports

    manifest = read_manifest(run_dir)
    for record in manifest["cases"].values():
        for name in record.get("plot_files", []):
            _require(Path(run_dir) / name, run_dir)
    return render_reports(
        RunFolder(Path(run_dir)), manifest, spec_text=spec_copy(run_dir, manifest).read_text()
    )


def _require(path: Path, run_dir: Path) -> Path:
    if not path.is_file():
        raise RunnerError(
            f"{path} is missing from the run folder {run_dir}, but its manifest lists it.\n"
            "The folder was changed after the run; run the spec again (`runner rerun` on this folder)."
        )
    return path


class LazyFiles(Mapping[str, Any]):
    """File name → its content, each read on first access with ``read(path)``."""

    def __init__(self, paths: dict[str, Path], read: Callable[[Path], Any], run_dir: Path) -> None:
        self._paths = paths
        self._read = read
        self._run_dir = run_dir
        self._loaded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            if name not in self._paths:
                raise KeyError(f"{name!r}; this case has {', '.join(self._paths) or 'none'}")
            self._loaded[name] = self._read(_require(self._paths[name], self._run_dir))
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return f"<{len(self)} files: {', '.join(self._paths)}>"


def _read_table(path: Path) -> Any:
    import pandas as pd

    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_json(path, lines=True)


def _read_arrays(path: Path) -> Any:
    import numpy as np

    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(str(path))
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ValueError as exc:  # an object array: reading it would unpickle
        raise RunnerError(
            f"{path} holds pickled Python objects ({exc}); runner never unpickles files.\n"
            "runner writes no such file: this one was put in the run folder by something else."
        ) from None


@dataclass
class LoadedCase:
    """One case of a loaded run."""

    id: str
    step: str
    analysis: str
    status: str
    params: dict[str, Any]
    summary: dict[str, Any]
    record: dict[str, Any]
    """The case's entry in the manifest (checks, notes, cache key, files, error)."""
    run_dir: Path
    tables: LazyFiles = field(repr=False)
    """CSV and JSONL data files as DataFrames, by name relative to the case's data folder."""
    arrays: LazyFiles = field(repr=False)
    """NPZ (a dict of arrays), NPY and safetensors data files, by name."""

    @cached_property
    def result(self) -> Any:
        """The typed result (the analysis' result model), read from ``results/<case>.json`` / ``.npz``."""
        from runner.registry import ANALYSES, load_analyses
        from runner.results import result_from_files

        load_analyses()
        files = {
            Path(p).suffix: _require(self.run_dir / p, self.run_dir)
            for p in self.record.get("result_files", [])
        }
        if ".json" not in files:
            raise RunnerError(f"case {self.id} has no stored result (status {self.status})")
        model = ANALYSES.get(self.analysis).result_model
        npz = files[".npz"].read_bytes() if ".npz" in files else None
        return result_from_files(model, files[".json"].read_bytes(), npz)


@dataclass
class LoadedRun:
    """A run folder read back: ``run.manifest``, ``run.cases[case_id]``, ``run.path``."""

    path: Path
    manifest: dict[str, Any]
    cases: dict[str, LoadedCase]

    @property
    def status(self) -> str:
        """How the run ended (``passed``, ``failed``, ``interrupted``, ``aborted``, ``running``)."""
        return str(self.manifest["status"])

    def __repr__(self) -> str:
        return f"<LoadedRun {self.path} {self.status}: {len(self.cases)} cases>"


def load_run(path: str | Path) -> LoadedRun:
    """Read a run folder, or the newest run of a spec file (its ``output.dir``, from the current folder)."""
    path = Path(path)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        path = _newest_of_spec(path)
    manifest = read_manifest(path)
    planned = {p["id"]: p for p in manifest.get("plan", [])}
    cases = {}
    for case_id, record in manifest["cases"].items():
        plan = planned.get(case_id, {})
        data = {_data_name(case_id, p): path / p for p in record.get("data_files", [])}
        cases[case_id] = LoadedCase(
            id=case_id,
            step=plan.get("step", case_id.split("[")[0]),
            analysis=plan.get("analysis", ""),
            status=record.get("status", "not run"),
            params=plan.get("params", {}),
            summary=record.get("summary", {}),
            record=record,
            run_dir=path,
            tables=LazyFiles(
                {k: v for k, v in data.items() if v.suffix in TABLE_SUFFIXES}, _read_table, path
            ),
            arrays=LazyFiles(
                {k: v for k, v in data.items() if v.suffix in ARRAY_SUFFIXES}, _read_arrays, path
            ),
        )
    return LoadedRun(path, manifest, cases)


def _data_name(case_id: str, relative: str) -> str:
    """``data/<case>/x/y.csv`` → ``x/y.csv``."""
    parts = Path(relative).parts
    return "/".join(parts[2:]) if len(parts) > 2 else parts[-1]


def _newest_of_spec(spec: Path) -> Path:
    from runner.loader import load_spec

    loaded, _ = load_spec(spec)
    found = newest_run_dir(Path(loaded.output.dir), loaded.name)
    if found is None:
        raise RunnerError(
            f"{spec} has no run yet under {loaded.output.dir}/{loaded.name}/ (from {Path.cwd()}).\n"
            f"Run it with `runner run {spec}`, or give load_run a run folder."
        )
    return found

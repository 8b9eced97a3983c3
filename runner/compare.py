"""Comparing runs: ``runner rerun RUN_DIR`` (does it reproduce?) and ``runner diff RUN_A RUN_B``.

Every number a case stored is compared: its result (``results/<case>.json`` and ``.npz``) and its
data files (CSV and JSONL columns, JSON values, NPZ / NPY / safetensors arrays). A number matches
when ``|new - old| <= atol + rtol * |old|`` (NaN matches NaN). Wall-clock times (keys and columns
named like ``seconds``, ``time``, ``duration``, files named ``timing*``) differ on every run and
are left out; so are plots and text files, which hold no numbers to compare.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import RunnerError
from runner.load import read_manifest, spec_copy

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["CaseComparison", "Mismatch", "compare_cases", "diff_runs", "rerun"]

TIMING = re.compile(r"(second|time|timing|duration|elapsed|per_sec|_s$|^started$|^updated$)", re.IGNORECASE)
"""Keys, columns and file names that hold wall-clock measurements, not results."""
COMPARED_SUFFIXES = (".json", ".jsonl", ".csv", ".npz", ".npy", ".safetensors")


@dataclass
class Mismatch:
    """One number (or value, or array) that differs: where, old, new, and by how much."""

    file: str
    where: str
    old: Any
    new: Any
    difference: str


@dataclass
class CaseComparison:
    """The outcome of comparing one case of two runs."""

    case_id: str
    compared: int = 0
    """How many numbers were compared."""
    mismatches: list[Mismatch] = field(default_factory=list)
    problem: str | None = None
    """A case that cannot be compared: missing from a run, or not finished in one."""

    @property
    def reproduced(self) -> bool:
        """Every number within tolerance, and both runs finished the case."""
        return self.problem is None and not self.mismatches


@dataclass
class _Tolerance:
    rtol: float
    atol: float

    def close(self, old: float, new: float) -> bool:
        if math.isnan(old) or math.isnan(new):
            return math.isnan(old) and math.isnan(new)
        if math.isinf(old) or math.isinf(new):
            return old == new
        return abs(new - old) <= self.atol + self.rtol * abs(old)


def compare_cases(
    case_id: str,
    old_dir: Path,
    old: dict[str, Any],
    new_dir: Path,
    new: dict[str, Any],
    rtol: float,
    atol: float,
) -> CaseComparison:
    """Compare the files of one case recorded in two manifests (``old`` and ``new`` are its records)."""
    out = CaseComparison(case_id)
    for record, label in ((old, "the recorded run"), (new, "the new run")):
        if record.get("status") not in ("passed", "failed"):
            out.problem = f"{record.get('status', 'missing')} in {label}" + (
                f": {record['error'].splitlines()[0]}" if record.get("error") else ""
            )
            return out
    tol = _Tolerance(rtol, atol)
    old_files, new_files = _files(old), _files(new)
    for name in sorted(set(old_files) | set(new_files)):
        if name not in old_files or name not in new_files:
            missing = "new run" if name not in new_files else "recorded run"
            out.mismatches.append(Mismatch(name, "(file)", "", "", f"missing from the {missing}"))
            continue
        if TIMING.search(Path(name).stem) or not name.endswith(COMPARED_SUFFIXES):
            continue
        _compare_file(name, old_dir / old_files[name], new_dir / new_files[name], tol, out)
    return out


def _files(record: dict[str, Any]) -> dict[str, str]:
    """The case's files by a name that is the same in both runs (case id and folder left out)."""
    named = {f"result{Path(p).suffix}": p for p in record.get("result_files", [])}
    named.update({"/".join(Path(p).parts[2:]): p for p in record.get("data_files", [])})
    return named


def _compare_file(name: str, old: Path, new: Path, tol: _Tolerance, out: CaseComparison) -> None:
    for path in (old, new):
        if not path.is_file():
            raise RunnerError(
                f"{path} is missing, but its run's manifest lists it.\n"
                "The run folder was changed after the run; compare another run folder."
            )
    suffix = old.suffix
    if suffix in (".npz", ".npy", ".safetensors"):
        old_arrays, new_arrays = _arrays(old), _arrays(new)
        for key in sorted(set(old_arrays) | set(new_arrays)):
            _compare_array(name, key, old_arrays.get(key), new_arrays.get(key), tol, out)
    elif suffix == ".csv":
        _compare_table(name, _table(old), _table(new), tol, out)
    elif suffix == ".jsonl":
        _compare_tree(name, "", _jsonl(old), _jsonl(new), tol, out)
    else:
        _compare_tree(name, "", json.loads(old.read_text()), json.loads(new.read_text()), tol, out)


def _arrays(path: Path) -> dict[str, Any]:
    import numpy as np

    if path.suffix == ".npy":
        return {"": np.load(path, allow_pickle=False)}
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _table(path: Path) -> Any:
    import pandas as pd

    return pd.read_csv(path)


def _jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _compare_array(name: str, key: str, old: Any, new: Any, tol: _Tolerance, out: CaseComparison) -> None:
    import numpy as np

    where = key or "(array)"
    if old is None or new is None or old.shape != new.shape:
        shapes = [None if a is None else list(a.shape) for a in (old, new)]
        out.mismatches.append(Mismatch(name, where, shapes[0], shapes[1], "shape differs"))
        return
    out.compared += old.size
    if old.dtype.kind not in "fciub":
        if not np.array_equal(old, new):
            out.mismatches.append(Mismatch(name, where, "", "", "values differ"))
        return
    a, b = old.astype(np.float64), new.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    bad = ~(np.isclose(b, a, rtol=tol.rtol, atol=tol.atol, equal_nan=True) | both_nan)
    if bad.any():
        gap = np.where(bad, np.abs(np.nan_to_num(b - a, nan=np.inf)), -1.0)
        index = np.unravel_index(int(np.argmax(gap)), a.shape)
        shown = f"{where}[{', '.join(map(str, index))}]" if a.ndim else where
        out.mismatches.append(
            Mismatch(
                name,
                shown,
                float(a[index]),
                float(b[index]),
                f"{_gap(a[index], b[index])}; {int(bad.sum())} of {a.size} differ",
            )
        )


def _compare_table(name: str, old: Any, new: Any, tol: _Tolerance, out: CaseComparison) -> None:
    if list(old.columns) != list(new.columns) or len(old) != len(new):
        out.mismatches.append(
            Mismatch(
                name,
                "(shape)",
                f"{len(old)}x{len(old.columns)}",
                f"{len(new)}x{len(new.columns)}",
                "table shape or columns differ",
            )
        )
        return
    for column in old.columns:
        if TIMING.search(str(column)):
            continue
        a, b = old[column].tolist(), new[column].tolist()
        for row, (x, y) in enumerate(zip(a, b, strict=True)):
            if not _leaf_matches(x, y, tol, out):
                differ = sum(1 for p, q in zip(a, b, strict=True) if not _leaf_matches(p, q, tol, None))
                out.mismatches.append(
                    Mismatch(
                        name, f"{column}[{row}]", x, y, f"{_gap(x, y)}; {differ} of {len(a)} rows differ"
                    )
                )
                break


def _compare_tree(name: str, where: str, old: Any, new: Any, tol: _Tolerance, out: CaseComparison) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if TIMING.search(str(key)):
                continue
            path = f"{where}.{key}" if where else str(key)
            if key not in old or key not in new:
                out.mismatches.append(
                    Mismatch(name, path, old.get(key, "(none)"), new.get(key, "(none)"), "key missing")
                )
            else:
                _compare_tree(name, path, old[key], new[key], tol, out)
    elif isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            out.mismatches.append(
                Mismatch(name, where, f"{len(old)} items", f"{len(new)} items", "length differs")
            )
            return
        for i, (x, y) in enumerate(zip(old, new, strict=True)):
            _compare_tree(name, f"{where}[{i}]", x, y, tol, out)
    elif not _leaf_matches(old, new, tol, out):
        out.mismatches.append(Mismatch(name, where, old, new, _gap(old, new)))


def _number(value: Any) -> float | None:
    """A JSON number, or one of the strings non-finite floats are stored as."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if value in ("nan", "inf", "-inf", "NaN", "Infinity", "-Infinity"):
        return float(value.replace("Infinity", "inf"))
    return None


def _leaf_matches(old: Any, new: Any, tol: _Tolerance, out: CaseComparison | None) -> bool:
    a, b = _number(old), _number(new)
    if a is not None and b is not None:
        if out is not None:
            out.compared += 1
        return tol.close(a, b)
    if isinstance(old, float) and isinstance(new, float):  # pandas' NaN for an empty cell
        return math.isnan(old) and math.isnan(new)
    return bool(old == new)


def _gap(old: Any, new: Any) -> str:
    a, b = _number(old), _number(new)
    if a is None or b is None:
        return "differs"
    if not (math.isfinite(a) and math.isfinite(b)):
        return "non-finite"
    rel = abs(b - a) / abs(a) if a else math.inf
    return f"Δ {b - a:+.3g} (rel {rel:.2g})"


# ---------------------------------------------------------------------------------------------
# runner rerun


def rerun(args: argparse.Namespace, out: Console) -> int:
    """Run a run folder's spec copy again with the cache off, compare every number; exit 1 on a mismatch."""
    from runner.planner import load_plan
    from runner.registry import ANALYSES
    from runner.session import run_session

    run_dir: Path = args.run_dir
    manifest = read_manifest(run_dir)
    spec_path = spec_copy(run_dir, manifest)
    recorded_dir = Path(manifest["spec"].get("dir") or spec_path.parent)
    base_dir = recorded_dir if recorded_dir.is_dir() else spec_path.parent
    plan = _recorded_selection(load_plan(spec_path, args.keyword), manifest)
    created: list[Path] = []
    session_args = argparse.Namespace(
        output_dir=args.output_dir or run_dir.resolve().parent.parent,
        verbose=args.verbose,
        quiet=args.quiet,
        device=None,
        exitfirst=False,
        fulltrace=getattr(args, "fulltrace", False),
        no_cache=True,
        force=False,
        cache_dir=None,
    )
    started = time.perf_counter()
    run_session(plan, session_args, out, base_dir=base_dir, on_folder=created.append)
    new_dir = created[0]
    new = read_manifest(new_dir)
    comparisons = []
    for case in plan.cases:
        if case.id not in manifest["cases"]:
            continue  # run only so that a recorded case could read it
        old_record = manifest["cases"].get(case.id)
        if old_record is None:
            comparisons.append(CaseComparison(case.id, problem="not in the recorded run"))
            continue
        analysis = ANALYSES.get(case.analysis)
        rtol, atol = _tolerance(args, case.step.tolerance, analysis)
        comparisons.append(
            compare_cases(case.id, run_dir, old_record, new_dir, new["cases"].get(case.id, {}), rtol, atol)
        )
    _print_rerun(out, run_dir, new_dir, comparisons, time.perf_counter() - started)
    return 0 if comparisons and all(c.reproduced for c in comparisons) else 1


def _tolerance(args: Any, spec: Any, analysis: Any) -> tuple[float, float]:
    """``(rtol, atol)``: the command line's, else the step's ``tolerance:`` in the spec, else the
    analysis' declared defaults."""
    rtol = next(t for t in (args.rtol, spec and spec.rtol, analysis.rtol) if t is not None)
    atol = next(t for t in (args.atol, spec and spec.atol, analysis.atol) if t is not None)
    return float(rtol), float(atol)


def _recorded_selection(plan: Any, manifest: dict[str, Any]) -> Any:
    """The recorded run's cases, and the cases of earlier steps it did not run (a later step may read
    them: the recorded run took them from the cache)."""
    from runner.planner import Plan

    recorded = set(manifest["cases"])
    steps = [c.step.id for c in plan.cases]
    recorded_steps = {c.step.id for c in plan.cases if c.id in recorded}
    last = max((steps.index(s) for s in recorded_steps), default=-1)
    kept = tuple(
        c
        for c in plan.cases
        if c.id in recorded or (c.step.id not in recorded_steps and steps.index(c.step.id) < last)
    )
    dropped = tuple(c for c in plan.cases if c not in kept)
    return Plan(plan.spec, plan.source, kept, plan.deselected + dropped)


def _print_rerun(
    out: Console, old: Path, new: Path, comparisons: list[CaseComparison], seconds: float
) -> None:
    from rich.markup import escape

    out.rule(f"runner rerun: {escape(str(old))}")
    out.print(f"recomputed into {escape(str(new))}, compared with the recorded results")
    for c in comparisons:
        if c.reproduced:
            out.print(f"{escape(c.case_id)} [green]REPRODUCED[/green] [dim]({c.compared} numbers)[/dim]")
        elif c.problem:
            out.print(f"{escape(c.case_id)} [red]NOT COMPARED[/red] [dim]({escape(c.problem)})[/dim]")
        else:
            out.print(
                f"{escape(c.case_id)} [red]NOT REPRODUCED[/red] "
                f"[dim]({len(c.mismatches)} mismatches in {c.compared} numbers)[/dim]"
            )
    bad = [c for c in comparisons if c.mismatches]
    if bad:
        out.rule("MISMATCHES", characters="=")
        for c in bad:
            out.rule(f"[red]{escape(c.case_id)}[/red]", characters="_")
            out.print(_mismatch_table(c.mismatches))
    ok = sum(c.reproduced for c in comparisons)
    parts = [f"{ok} reproduced"] + (
        [f"{len(comparisons) - ok} not reproduced"] if ok < len(comparisons) else []
    )
    style = "green" if ok == len(comparisons) else "red"
    out.rule(f"[{style}]{', '.join(parts)} in {seconds:.1f}s[/{style}]", style=style)


def _mismatch_table(mismatches: list[Mismatch], limit: int = 30) -> Any:
    from rich.table import Table

    table = Table("file", "where", "old", "new", "difference", box=None)
    for m in mismatches[:limit]:
        table.add_row(m.file, m.where, _show(m.old), _show(m.new), m.difference)
    if len(mismatches) > limit:
        table.add_row(f"... {len(mismatches) - limit} more", "", "", "", "")
    return table


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.7g}"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# runner diff


def _flat(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _flat(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            yield from _flat(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


def setting_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(what, in A, in B) for the spec, versions, model hashes, git state and torch settings that differ."""
    sections = {
        "spec": lambda m: m["spec"].get("resolved", {}),
        "inputs": lambda m: m.get("provenance", {}),
        "environment": lambda m: {k: v for k, v in m.get("environment", {}).items() if k != "git"},
        "git": lambda m: m.get("environment", {}).get("git", {}),
    }
    found = []
    for section, pick in sections.items():
        flat_a, flat_b = dict(_flat(pick(a))), dict(_flat(pick(b)))
        for key in sorted(set(flat_a) | set(flat_b)):
            if flat_a.get(key) != flat_b.get(key):
                found.append((f"{section}.{key}", flat_a.get(key, "(none)"), flat_b.get(key, "(none)")))
    return found


def diff_runs(args: argparse.Namespace, out: Console) -> int:
    """Print what differs between two run folders and write the same as a self-contained HTML page."""
    from rich.markup import escape
    from rich.table import Table

    a, b = read_manifest(args.run_a), read_manifest(args.run_b)
    settings = setting_differences(a, b)
    ids = list(dict.fromkeys([*a["cases"], *b["cases"]]))
    cases = []
    for case_id in ids:
        if case_id not in a["cases"] or case_id not in b["cases"]:
            only = "A" if case_id in a["cases"] else "B"
            cases.append(CaseComparison(case_id, problem=f"only in run {only}"))
            continue
        cases.append(
            compare_cases(
                case_id,
                args.run_a,
                a["cases"][case_id],
                args.run_b,
                b["cases"][case_id],
                args.rtol,
                args.atol,
            )
        )
    out.rule(f"runner diff: A {escape(str(args.run_a))}  B {escape(str(args.run_b))}")
    table = Table("setting", "A", "B", box=None, title="spec and environment")
    for what, va, vb in settings:
        table.add_row(escape(what), escape(_show(va)), escape(_show(vb)))
    out.print(table if settings else "spec and environment: no difference")
    for c in cases:
        if c.problem:
            out.print(f"{escape(c.case_id)}: [yellow]{escape(c.problem)}[/yellow]")
        elif c.mismatches:
            out.rule(
                f"{escape(c.case_id)}: {len(c.mismatches)} differences in {c.compared} numbers",
                characters="_",
            )
            out.print(_mismatch_table(c.mismatches))
        else:
            out.print(f"{escape(c.case_id)}: [green]identical[/green] [dim]({c.compared} numbers)[/dim]")
    html = args.html or Path("diff.html")
    _write_diff_html(html, args.run_a, args.run_b, settings, cases)
    out.print(f"html: {escape(str(html))}")
    return 0 if not settings and all(c.reproduced for c in cases) else 1


def _write_diff_html(
    path: Path, run_a: Path, run_b: Path, settings: list[tuple[str, Any, Any]], cases: list[CaseComparison]
) -> None:
    from runner.artifacts import write_atomic
    from runner.reports import environment

    page = (
        environment()
        .get_template("diff.html.j2")
        .render(
            run_a=str(run_a),
            run_b=str(run_b),
            settings=[(w, _show(x), _show(y)) for w, x, y in settings],
            cases=cases,
            show=_show,
        )
    )
    write_atomic(path, lambda f: f.write(page.encode()))

"""Execution: a :class:`Plan` → one :class:`CaseResult` per case, written as each case finishes.

A case that raises is recorded with its error and the run goes on (unless ``-x``); a failed
expectation fails its case. Ctrl-C stops the run after writing everything finished so far. A model
or dataset that cannot be loaded aborts the run (exit 2): no case can use it.

With a :class:`Caching`, each case is first looked up in the result cache (:mod:`runner.cache`)
under its key, holding the entry's lock shared (exclusive only while an entry is written): a stored
case is copied into the run folder and its expectations evaluated again, without loading anything;
a computed one is stored as soon as it finishes, so a run killed at any moment resumes from the
last finished case.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from runner.artifacts import RunFolder, entry_name
from runner.cache import CorruptEntry, KeyMaker, ResultCache, base_key, cache_key
from runner.errors import BAD_INPUT, ResourceError, RunnerError
from runner.planner import Case, Plan
from runner.registry import ANALYSES, Analysis
from runner.results import result_bytes, result_from_files, to_jsonable
from runner.step import FinishedCase, StepContext, StepOutput

if TYPE_CHECKING:
    from runner.resources import Resources  # imports torch: only a case that computes needs it

__all__ = ["Caching", "CaseResult", "CheckResult", "Executor", "LocalExecutor", "RunResult", "run_plan"]

Status = Literal["passed", "failed", "error", "not run"]


@dataclass
class CheckResult:
    """The outcome of one expectation on one case."""

    name: str
    expression: str
    passed: bool
    explanation: str


@dataclass
class CaseResult:
    """What happened to one case: status, timing, files written, summary, checks, error."""

    case: Case
    status: Status = "not run"
    duration: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    data_files: list[str] = field(default_factory=list)
    plot_files: list[str] = field(default_factory=list)
    result_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    bad_input: bool = False
    """The error is the input's (a model, dataset, SAE or parameter the case cannot use), not the
    code's: the run ends with exit code 2, as a bad spec does, once every other case has run."""
    cache: dict[str, Any] = field(default_factory=dict)
    """``key``, ``state`` (``cached``, ``computed`` or ``not stored``) and, when cached, ``source``."""

    @property
    def cached(self) -> bool:
        """Whether the result came from the cache rather than being computed in this run."""
        return self.cache.get("state") == "cached"

    def describe(self) -> dict[str, Any]:
        """JSON-able record for the manifest."""
        return to_jsonable(
            {
                "status": self.status,
                "cache": self.cache,
                "duration_s": round(self.duration, 3),
                "summary": self.summary,
                "checks": [vars(c) for c in self.checks],
                "result_files": self.result_files,
                "data_files": self.data_files,
                "plot_files": self.plot_files,
                "notes": self.notes,
                "error": self.error,
                "bad_input": self.bad_input,
                "traceback": self.traceback,
            }
        )


@dataclass
class RunResult:
    """All case results of a run and how the run ended."""

    results: list[CaseResult]
    duration: float
    interrupted: bool = False
    aborted: str | None = None
    workers: list[dict[str, Any]] = field(default_factory=list)
    """The Ray executor's workers: process, host, CPU, torch settings and cases (empty for a local run)."""

    def count(self, status: Status) -> int:
        """Number of cases with ``status``."""
        return sum(1 for r in self.results if r.status == status)

    @property
    def exit_code(self) -> int:
        """pytest's codes: 0 all passed, 1 failures or errors, 2 interrupted, aborted or a case stopped by
        bad input, 5 nothing ran."""
        if self.interrupted or self.aborted or any(r.bad_input for r in self.results):
            return 2
        if not self.results:
            return 5
        return 1 if self.count("failed") or self.count("error") else 0

    @property
    def status(self) -> str:
        """One word for the manifest: passed, failed, interrupted or aborted."""
        if self.aborted:
            return "aborted"
        if self.interrupted:
            return "interrupted"
        return "passed" if self.exit_code == 0 else "failed"

    def summary_line(self, deselected: int = 0) -> str:
        """``3 passed, 1 failed, 2 deselected in 42.1s`` (pytest's wording and order)."""
        counts = {s: self.count(s) for s in ("failed", "passed", "error", "not run")}
        cached = sum(1 for r in self.results if r.cached)
        return summary_line(counts, cached, deselected, self.duration)


def summary_line(counts: dict[str, int], cached: int, deselected: int, duration: float) -> str:
    """``3 passed (2 cached), 1 failed, 2 deselected in 42.1s``; also rebuilt from a manifest."""
    parts = [f"{n} {s}s" if s == "error" and n > 1 else f"{n} {s}" for s, n in counts.items() if n]
    if cached:
        parts.append(f"{cached} from cache")
    if deselected:
        parts.append(f"{deselected} deselected")
    if not parts:
        parts = ["no cases ran"]
    return f"{', '.join(parts)} in {duration:.1f}s"


@dataclass
class Caching:
    """How a run uses the result cache: keys are always computed (the manifest records them)."""

    keys: KeyMaker
    store: ResultCache | None
    """None with ``--no-cache``: nothing is read from or written to the cache."""
    spec_name: str
    run_dir: str
    force: bool = False
    """Recompute every case (``--force``) and store the new results."""


class Reporter(Protocol):
    """What the executor tells the console (see :mod:`runner.console`)."""

    def case_started(self, case: Case) -> None: ...
    def message(self, text: str) -> None: ...
    def case_finished(self, result: CaseResult) -> None: ...
    def progress(self, items: Iterable[Any], total: int | None, description: str) -> Iterator[Any]: ...


class Executor(Protocol):
    """Runs a plan's cases into a run folder: :class:`LocalExecutor` here, or
    :class:`runner.ray_executor.RayExecutor` on Ray workers. Both fill the same folder, manifest and cache."""

    def run(
        self,
        plan: Plan,
        folder: RunFolder,
        resources: Resources,
        reporter: Reporter,
        *,
        exitfirst: bool = False,
        on_case_done: Any = None,
        caching: Caching | None = None,
    ) -> RunResult:
        """Run every case of ``plan``; ``on_case_done(run_result)`` after each."""
        ...


class LocalExecutor:
    """Every case in this process, one after the other in plan order (the default)."""

    def run(
        self,
        plan: Plan,
        folder: RunFolder,
        resources: Resources,
        reporter: Reporter,
        *,
        exitfirst: bool = False,
        on_case_done: Any = None,
        caching: Caching | None = None,
    ) -> RunResult:
        """See :func:`run_plan`."""
        return run_plan(
            plan, folder, resources, reporter, exitfirst=exitfirst, on_case_done=on_case_done, caching=caching
        )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_plan(
    plan: Plan,
    folder: RunFolder,
    resources: Resources,
    reporter: Reporter,
    *,
    exitfirst: bool = False,
    on_case_done: Any = None,
    caching: Caching | None = None,
) -> RunResult:
    """Run every case of ``plan`` in order; ``on_case_done(run_result)`` is called after each."""
    started = time.perf_counter()
    run = RunResult([CaseResult(case) for case in plan.cases], 0.0)
    upstream = _Upstream(plan.deselected, caching)
    run_cache: dict[Any, Any] = {}
    try:
        for result in run.results:
            try:
                if caching is None:
                    _run_case(result, folder, resources, reporter, upstream, run_cache)
                else:
                    _run_cached(result, folder, resources, reporter, upstream, run_cache, caching)
            except KeyboardInterrupt:
                if result.status not in ("passed", "failed"):  # else it finished, and was being stored
                    result.status, result.error = "not run", "interrupted by the user (Ctrl-C)"
                run.interrupted = True
            except ResourceError as exc:
                result.status, result.error = "error", str(exc)
                run.aborted = str(exc)
            run.duration = time.perf_counter() - started
            if on_case_done is not None:
                on_case_done(run)
            if run.interrupted or run.aborted or (exitfirst and result.status in {"failed", "error"}):
                break
    except KeyboardInterrupt:  # between cases (e.g. while the manifest is written)
        run.interrupted = True
    run.duration = time.perf_counter() - started
    return run


class _Upstream:
    """The finished cases of this run by step, with their cache keys, and what each case read."""

    def __init__(self, deselected: tuple[Case, ...] = (), caching: Caching | None = None) -> None:
        self.finished: dict[str, list[FinishedCase[Any]]] = {}
        self.keys: dict[str, list[str]] = {}
        self.reads: dict[str, list[str]] = {}
        self._deselected = deselected
        self._caching = caching

    def add(self, step_id: str, case: FinishedCase[Any], key: str | None) -> None:
        self.finished.setdefault(step_id, []).append(case)
        self.keys.setdefault(step_id, []).append(key or "")

    def set_key(self, case: Case, key: str) -> None:
        """Set the key of ``case`` once it finished (known only after it ran: it includes its reads)."""
        cases = self.finished.get(case.step.id, [])
        if cases and cases[-1].id == case.id:
            self.keys[case.step.id][-1] = key

    def provide(self, step_id: str) -> list[FinishedCase[Any]]:
        """What ``ctx.outputs(step_id)`` returns; remembers that the running case read it.

        A step whose cases were all deselected (``-k``, ``--lf``) is read from the cache when every
        one of them is stored there.
        """
        if step_id not in self.finished:
            self._from_cache(step_id)
        self.reads[step_id] = list(self.keys.get(step_id, []))
        return list(self.finished.get(step_id, []))

    def _from_cache(self, step_id: str) -> None:
        cases = [c for c in self._deselected if c.step.id == step_id]
        store = self._caching.store if self._caching else None
        if not cases or store is None or self._caching is None:
            return
        found = []
        for case in cases:
            try:
                entry = store.lookup(base_key(self._caching.keys.inputs(case)))
            except (CorruptEntry, RunnerError):
                return
            if entry is None:
                return
            npz = entry.path("result.npz").read_bytes() if "result.npz" in entry.files else None
            model = ANALYSES.get(case.analysis).result_model
            typed = result_from_files(model, entry.path("result.json").read_bytes(), npz)
            found.append((case, typed, entry.key))
        for case, typed, key in found:
            finished = FinishedCase(case.id, case.step.id, case.analysis, case.params, case.model.name, typed)
            self.add(step_id, finished, key)

    def current(self, reads: dict[str, list[str]]) -> dict[str, list[str]]:
        """The keys the steps of a recorded ``reads`` have in this run."""
        return {step_id: list(self.keys.get(step_id, [])) for step_id in reads}


def _run_cached(
    result: CaseResult,
    folder: RunFolder,
    resources: Resources,
    reporter: Reporter,
    upstream: _Upstream,
    run_cache: dict[Any, Any],
    caching: Caching,
) -> None:
    """Run one case through the cache: reuse its entry when its inputs and reads match, else compute."""
    case = result.case
    inputs = caching.keys.inputs(case)  # a model that cannot be found aborts the run, as loading would
    base = base_key(inputs)
    result.cache = {"key": base, "base": base, "state": "not stored", "inputs": inputs}
    if caching.store is None:
        _run_case(result, folder, resources, reporter, upstream, run_cache)
        result.cache["key"] = cache_key(base, dict(upstream.reads))
        upstream.set_key(case, result.cache["key"])
        return
    store = caching.store
    # The entry's lock is shared while reading it and exclusive only while writing it: two runs at
    # once never wait for each other's computing (each computes what is not stored yet).
    with store.lock(base, shared=True):
        entry = _usable_entry(store, base, caching.force, upstream, result)
        cache_notes = list(result.notes)  # notes about the cache itself are not stored with the result
        restored = entry is not None and _restore(result, entry, folder, upstream, reporter)
        if restored:
            store.touch(entry)
    if not restored:
        _run_case(result, folder, resources, reporter, upstream, run_cache)
        reads = dict(upstream.reads)
        result.cache["key"] = cache_key(base, reads)
        upstream.set_key(case, result.cache["key"])
        if result.status in ("passed", "failed"):
            waiting = f"waiting for another run storing {case.id}"
            with store.lock(base, on_wait=lambda: reporter.message(waiting)):
                _store(result, store, base, inputs, reads, folder, caching, cache_notes)
    store.remember(caching.spec_name, case.id, base, result.cache["key"], inputs)


def _usable_entry(store: ResultCache, base: str, force: bool, upstream: _Upstream, result: CaseResult) -> Any:
    """The entry to reuse, or None (absent, forced, damaged, or the cases it read changed)."""
    if force:
        return None
    try:
        entry = store.lookup(base)
    except CorruptEntry as exc:
        result.notes.append(f"the cache entry {base[:12]} was damaged ({exc}); recomputed")
        store.remove(base)
        return None
    if entry is not None and upstream.current(entry.reads) != entry.reads:
        result.notes.append("recomputed: an earlier step it reads changed since it was cached")
        return None
    return entry


def _restore(
    result: CaseResult, entry: Any, folder: RunFolder, upstream: _Upstream, reporter: Reporter
) -> bool:
    """Fill ``result`` from a cache entry (files copied, expectations evaluated); False if unusable."""
    case = result.case
    spec = ANALYSES.get(case.analysis)
    reporter.case_started(case)
    start = time.perf_counter()
    try:
        npz = entry.path("result.npz").read_bytes() if "result.npz" in entry.files else None
        typed = result_from_files(spec.result_model, entry.path("result.json").read_bytes(), npz)
    except Exception as exc:  # e.g. the result model changed without a version bump
        result.notes.append(
            f"the cache entry {entry.base[:12]} no longer reads ({type(exc).__name__}); recomputed"
        )
        return False
    written = folder.restore(case.id, {name: entry.path(name) for name in entry.files})
    result.result_files, result.data_files, result.plot_files = (
        written["results"],
        written["data"],
        written["plots"],
    )
    result.summary = typed.summary()
    result.notes = [*entry.meta.get("notes", []), *result.notes]
    result.cache.update(
        key=entry.key, state="cached", source=entry.describe(), run_dir=entry.meta.get("run_dir")
    )
    upstream.add(
        case.step.id,
        FinishedCase(case.id, case.step.id, case.analysis, case.params, case.model.name, typed),
        entry.key,
    )
    _check(result)
    result.duration = time.perf_counter() - start
    reporter.case_finished(result)
    return True


def _store(
    result: CaseResult,
    store: ResultCache,
    base: str,
    inputs: dict[str, Any],
    reads: dict[str, list[str]],
    folder: RunFolder,
    caching: Caching,
    cache_notes: list[str],
) -> None:
    """Store a computed case (its check outcome is not stored: expectations are evaluated on reuse)."""
    case = result.case
    paths = [*result.result_files, *result.data_files, *result.plot_files]
    files = {entry_name(case.id, p): folder.root / p for p in paths}
    meta = {
        "key": result.cache["key"],
        "inputs": inputs,
        "reads": reads,
        "case": case.id,
        "spec": caching.spec_name,
        "run_dir": caching.run_dir,
        "created": _now(),
        "duration_s": round(result.duration, 3),
        "notes": [note for note in result.notes if note not in cache_notes],
    }
    try:
        store.store(base, files, meta)
        result.cache["state"] = "computed"
    except OSError as exc:  # a full disk must not fail a case whose result is safe in the run folder
        result.notes.append(f"could not store the result in the cache ({exc})")


def _now() -> str:
    from datetime import datetime

    return datetime.now().astimezone().isoformat(timespec="seconds")


def _run_case(
    result: CaseResult,
    folder: RunFolder,
    resources: Resources,
    reporter: Reporter,
    upstream: _Upstream,
    run_cache: dict[Any, Any],
) -> None:
    case = result.case
    reporter.case_started(case)
    spec = ANALYSES.get(case.analysis)
    upstream.reads = {}
    ctx = _context(case, spec, resources, reporter, upstream, run_cache)
    # Load what the analysis needs before the case starts: a resource that cannot be loaded aborts
    # the run (no case could use it), and loading time is not counted as the case's time.
    for kind in sorted(spec.needs & {"model", "dataset"}):
        ctx.resource(kind)
    seed_everything(case.seed)
    start = time.perf_counter()
    try:
        output = spec.func(ctx, case.params)
        _check_output(spec, output)
        reloaded = _record(result, output, folder)
        upstream.add(
            case.step.id,
            FinishedCase(case.id, case.step.id, case.analysis, case.params, case.model.name, reloaded),
            None,  # the key is set once the case's reads are known
        )
        _check(result)
    except Exception as exc:
        _fail(result, exc)
    finally:
        result.duration = time.perf_counter() - start
        result.notes = [*ctx.notes, *result.notes]
    reporter.case_finished(result)


def _context(
    case: Case,
    spec: Analysis,
    resources: Resources,
    reporter: Reporter,
    upstream: _Upstream,
    run_cache: dict[Any, Any],
) -> StepContext:
    def resource(kind: str) -> Any:
        if kind not in spec.needs:
            raise RunnerError(
                f"Analysis {spec.name!r} uses the {kind!r} resource without declaring it: add "
                f"{kind!r} to `needs=` in its @analysis decorator (it declares {sorted(spec.needs)})."
            )
        if kind == "model":
            return resources.model(case.model)
        if kind == "saes":
            return resources.load_saes
        dataset = resources.dataset(case.dataset, case.model)
        if "note" in dataset.info and dataset.info["note"] not in ctx.notes:
            ctx.note(dataset.info["note"])
        return dataset

    ctx = StepContext(
        case_id=case.id,
        seed=case.seed,
        device=resources.device(case.model),
        resources=resource,
        progress=reporter.progress,
        finished=upstream.provide,
        run_cache=run_cache,
        spec_dir=resources.base_dir,
    )
    return ctx


def _check_output(spec: Analysis, output: Any) -> None:
    if not isinstance(output, StepOutput):
        raise RunnerError(f"analysis {spec.name!r} returned {type(output).__name__}, not StepOutput")
    if not isinstance(output.result, spec.result_model):
        raise RunnerError(
            f"analysis {spec.name!r} returned a {type(output.result).__name__} result; "
            f"it declares result={spec.result_model.__name__}"
        )


def _record(result: CaseResult, output: StepOutput, folder: RunFolder) -> Any:
    """Write the case's result, files and plots; return the result as reloaded from its files.

    Later steps get the reloaded result, so that they see exactly what a stored result gives.
    """
    json_bytes, npz_bytes = result_bytes(output.result)
    result.result_files = folder.write_result(result.case.id, json_bytes, npz_bytes)
    result.summary = output.result.summary()
    result.notes.extend(output.notes)
    result.data_files = folder.write_data(result.case.id, output.data)
    result.plot_files = folder.write_plots(result.case.id, output.plots)
    output.plots.clear()  # written; figures hold memory, and no later step reads them
    return result_from_files(type(output.result), json_bytes, npz_bytes)


def _check(result: CaseResult) -> None:
    for check in result.case.checks:
        outcome = check.expression.evaluate(result.summary)
        result.checks.append(
            CheckResult(check.name, check.expression.text, bool(outcome.passed), outcome.explanation)
        )
    result.status = "passed" if all(c.passed for c in result.checks) else "failed"


def _fail(result: CaseResult, exc: BaseException) -> None:
    result.status = "error"
    result.bad_input = isinstance(exc, BAD_INPUT)
    result.error = str(exc) if isinstance(exc, RunnerError) else f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, RunnerError):
        result.traceback = "".join(traceback.format_exception(exc))

"""Execution: a :class:`Plan` → one :class:`CaseResult` per case, written as each case finishes.

A case that raises is recorded with its error and the run goes on (unless ``-x``); a failed
expectation fails its case. Ctrl-C stops the run after writing everything finished so far. A model
or dataset that cannot be loaded aborts the run (exit 2): no case can use it.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from runner.artifacts import RunFolder
from runner.errors import ResourceError, RunnerError
from runner.planner import Case, Plan
from runner.registry import ANALYSES, Analysis
from runner.resources import Resources
from runner.results import result_bytes, result_from_files, to_jsonable
from runner.step import FinishedCase, StepContext, StepOutput

__all__ = ["CaseResult", "CheckResult", "RunResult", "run_plan"]

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

    def describe(self) -> dict[str, Any]:
        """JSON-able record for the manifest."""
        return to_jsonable(
            {
                "status": self.status,
                "duration_s": round(self.duration, 3),
                "summary": self.summary,
                "checks": [vars(c) for c in self.checks],
                "result_files": self.result_files,
                "data_files": self.data_files,
                "plot_files": self.plot_files,
                "notes": self.notes,
                "error": self.error,
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

    def count(self, status: Status) -> int:
        """Number of cases with ``status``."""
        return sum(1 for r in self.results if r.status == status)

    @property
    def exit_code(self) -> int:
        """pytest's codes: 0 all passed, 1 failures or errors, 2 interrupted or aborted, 5 nothing ran."""
        if self.interrupted or self.aborted:
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
        parts = [f"{n} {s}s" if s == "error" and n > 1 else f"{n} {s}" for s, n in counts.items() if n]
        if deselected:
            parts.append(f"{deselected} deselected")
        if not parts:
            parts = ["no cases ran"]
        return f"{', '.join(parts)} in {self.duration:.1f}s"


class Reporter(Protocol):
    """What the executor tells the console (see :mod:`runner.console`)."""

    def case_started(self, case: Case) -> None: ...
    def case_finished(self, result: CaseResult) -> None: ...
    def progress(self, items: Iterable[Any], total: int | None, description: str) -> Iterator[Any]: ...


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
) -> RunResult:
    """Run every case of ``plan`` in order; ``on_case_done(run_result)`` is called after each."""
    started = time.perf_counter()
    run = RunResult([CaseResult(case) for case in plan.cases], 0.0)
    finished: dict[str, list[FinishedCase[Any]]] = {}
    run_cache: dict[Any, Any] = {}
    try:
        for result in run.results:
            try:
                _run_case(result, folder, resources, reporter, finished, run_cache)
            except KeyboardInterrupt:
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


def _run_case(
    result: CaseResult,
    folder: RunFolder,
    resources: Resources,
    reporter: Reporter,
    finished: dict[str, list[FinishedCase[Any]]],
    run_cache: dict[Any, Any],
) -> None:
    case = result.case
    reporter.case_started(case)
    spec = ANALYSES.get(case.analysis)
    ctx = _context(case, spec, resources, reporter, finished, run_cache)
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
        finished.setdefault(case.step.id, []).append(
            FinishedCase(case.id, case.step.id, case.analysis, case.params, case.model.name, reloaded)
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
    finished: dict[str, list[FinishedCase[Any]]],
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
        finished=lambda step_id: list(finished.get(step_id, [])),
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
    result.error = str(exc) if isinstance(exc, RunnerError) else f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, RunnerError):
        result.traceback = "".join(traceback.format_exception(exc))

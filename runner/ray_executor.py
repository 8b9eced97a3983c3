"""Running a plan's cases on Ray workers (``runner run SPEC --executor ray [--address ADDR]``).

The driver (this process) keeps everything a local run owns: the plan order, the cache lookups and
stores, the run folder and the manifest. Cached cases are restored here and never sent. Workers are
Ray actors that only compute: each holds one :class:`~runner.resources.Resources`, so it loads a model,
dataset or SAE once and serves every case of that model sent to it (cases are grouped by model and by
the step's ``resources:``, and a group's workers are kept for later steps of the same group).

A case travels as the :class:`~runner.planner.Case` itself; the earlier results it may read travel as
their result files' bytes (the :mod:`runner.results` round trip), never as torch objects. Its files
come back as bytes and are written at the paths a local run writes. Steps run one after the other:
every case of a step has finished before a later step, which may read it, is sent.

A case that raises is an error, as in a local run. A worker process that dies mid-case is replaced
and the case sent to the new worker, up to :data:`MAX_RETRIES` times.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.artifacts import RunFolder
from runner.cache import base_key, cache_key
from runner.errors import ResourceError, RunnerError
from runner.executor import (
    Caching,
    CaseResult,
    Reporter,
    RunResult,
    _restore,
    _run_case,
    _store,
    _Upstream,
    _usable_entry,
)
from runner.planner import Case, Plan
from runner.registry import ANALYSES
from runner.results import result_bytes, result_from_files
from runner.spec import ResourcesSpec
from runner.step import FinishedCase

if TYPE_CHECKING:
    from runner.resources import Resources

__all__ = ["MAX_RETRIES", "RayExecutor"]

MAX_RETRIES = 2
"""How many times a case whose worker process died is sent again (a case that raises is not)."""

_COPIED = ("status", "duration", "summary", "checks", "data_files", "plot_files", "result_files")


class RayExecutor:
    """Runs cases on Ray actors; fills the same run folder, manifest and cache as a local run."""

    def __init__(
        self, address: str | None = None, *, base_dir: Path, device_override: str | None = None
    ) -> None:
        self.address = address
        self.settings = {"base_dir": str(base_dir), "device_override": device_override}

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
        """Run every case of ``plan`` step by step; ``on_case_done(run_result)`` after each."""
        ray = import_ray()
        started_here = _connect(ray, self.address)
        started = time.perf_counter()
        run = RunResult([CaseResult(case) for case in plan.cases], 0.0)
        state = _RunState(run, folder, reporter, caching, _Upstream(plan.deselected, caching), on_case_done)
        pool = _Pool(ray, _analysis_modules(plan), self.settings)
        try:
            for step in _steps(run.results):
                _run_step(step, state, pool, plan, exitfirst)
                if run.interrupted or run.aborted or (exitfirst and _any_failed(step)):
                    break
        except KeyboardInterrupt:
            run.interrupted = True
            for result in run.results:
                if result.status == "not run":
                    result.error = "interrupted by the user (Ctrl-C)"
        finally:
            pool.close()
            if started_here:
                ray.shutdown()
        run.duration = time.perf_counter() - started
        return run


def import_ray() -> Any:
    """The ``ray`` module, or a user error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RunnerError(
            "--executor ray needs Ray, which is not installed: pip install -e '.[ray]' "
            "(or pip install 'ray>=2.9')."
        ) from None
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Join Ray (an instance already started in this process, ``address``, or a new local one)."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # a local instance on this machine, reachable on loopback only
        ray.init(
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    return True


@dataclass
class _RunState:
    run: RunResult
    folder: RunFolder
    reporter: Reporter
    caching: Caching | None
    upstream: _Upstream
    on_case_done: Any
    started: float = field(default_factory=time.perf_counter)

    def done(self) -> None:
        self.run.duration = time.perf_counter() - self.started
        if self.on_case_done is not None:
            self.on_case_done(self.run)


def _steps(results: list[CaseResult]) -> list[list[CaseResult]]:
    """The results grouped by step, in plan order."""
    steps: dict[str, list[CaseResult]] = {}
    for result in results:
        steps.setdefault(result.case.step.id, []).append(result)
    return list(steps.values())


def _any_failed(step: list[CaseResult]) -> bool:
    return any(r.status in ("failed", "error") for r in step)


def _run_step(step: list[CaseResult], state: _RunState, pool: _Pool, plan: Plan, exitfirst: bool) -> None:
    """Restore the step's cached cases, compute the others on workers, then publish them in plan order."""
    pending: list[CaseResult] = []
    computed: dict[str, FinishedCase[Any]] = {}
    for result in step:
        try:
            cached = _restore_cached(result, state)
        except ResourceError as exc:  # a model that cannot be found aborts the run, as locally
            result.status, result.error = "error", str(exc)
            state.run.aborted = str(exc)
            state.done()
            return
        if cached:
            state.done()
        else:
            pending.append(result)
    if pending:
        received = pool.put(_upstream_blobs(state.upstream, plan))
        for result, outcome in pool.run(pending, received, state.reporter):
            finished = _finish(result, outcome, state)
            if finished is not None:
                computed[result.case.id] = finished
            state.done()
            if state.run.aborted or (exitfirst and result.status in ("failed", "error")):
                break
    _publish(step, computed, state.upstream)


def _restore_cached(result: CaseResult, state: _RunState) -> bool:
    """Compute the case's key; restore it from the cache when stored there (True)."""
    caching, case = state.caching, result.case
    if caching is None:
        return False
    inputs = caching.keys.inputs(case)
    base = base_key(inputs)
    result.cache = {"key": base, "base": base, "state": "not stored", "inputs": inputs}
    if caching.store is None:
        return False
    entry = _usable_entry(caching.store, base, caching.force, state.upstream, result)
    if entry is None or not _restore(result, entry, state.folder, state.upstream, state.reporter):
        return False
    caching.store.touch(entry)
    caching.store.remember(caching.spec_name, case.id, base, result.cache["key"], inputs)
    return True


def _finish(result: CaseResult, outcome: _Outcome, state: _RunState) -> FinishedCase[Any] | None:
    """Write a worker's case into the run folder and the cache; its result as later steps see it."""
    case = result.case
    cache_notes = [*result.notes, *outcome.retry_notes]
    if outcome.result is not None:
        for name in _COPIED:
            setattr(result, name, getattr(outcome.result, name))
        result.error, result.traceback = outcome.result.error, outcome.result.traceback
        result.bad_input = outcome.result.bad_input
        result.notes = [*outcome.result.notes, *cache_notes]
    else:
        result.status, result.error, result.notes = "error", outcome.error, cache_notes
    if outcome.aborted:
        state.run.aborted = outcome.error
    for path, content in outcome.files.items():
        target = state.folder.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    caching = state.caching
    if caching is not None:
        base, inputs = result.cache["base"], result.cache["inputs"]
        result.cache["key"] = cache_key(base, outcome.reads)
        if caching.store is not None:
            store = caching.store
            if result.status in ("passed", "failed"):
                with store.lock(base):
                    _store(result, store, base, inputs, outcome.reads, state.folder, caching, cache_notes)
            store.remember(caching.spec_name, case.id, base, result.cache["key"], inputs)
    state.reporter.case_finished(result)
    if result.status not in ("passed", "failed"):
        return None
    return FinishedCase(
        case.id, case.step.id, case.analysis, case.params, case.model.name, _reload(result, outcome.files)
    )


def _reload(result: CaseResult, files: dict[str, bytes]) -> Any:
    json_path = next(p for p in result.result_files if p.endswith(".json"))
    npz_path = next((p for p in result.result_files if p.endswith(".npz")), None)
    model = ANALYSES.get(result.case.analysis).result_model
    return result_from_files(model, files[json_path], files[npz_path] if npz_path else None)


def _publish(step: list[CaseResult], computed: dict[str, FinishedCase[Any]], upstream: _Upstream) -> None:
    """Make the step's finished cases readable by later steps in plan order, as a local run does."""
    step_id = step[0].case.step.id
    earlier = upstream.finished.pop(step_id, [])
    keys = dict(zip([c.id for c in earlier], upstream.keys.pop(step_id, []), strict=True))
    restored = {c.id: c for c in earlier}
    for result in step:
        case_id = result.case.id
        finished = computed.get(case_id) or restored.get(case_id)
        if finished is not None:
            upstream.add(step_id, finished, keys.get(case_id) or result.cache.get("key"))


_Blob = tuple[str, str, Any, str, bytes, bytes | None, str]


def _upstream_blobs(upstream: _Upstream, plan: Plan) -> dict[str, list[_Blob]]:
    """Every finished earlier result as its result files' bytes, by step (what a worker may read)."""
    for step_id in {c.step.id for c in plan.deselected} - set(upstream.finished):
        upstream._from_cache(step_id)  # a deselected step a case reads comes from the cache
    blobs: dict[str, list[_Blob]] = {}
    for step_id, cases in upstream.finished.items():
        for case, key in zip(cases, upstream.keys.get(step_id, []), strict=True):
            json_bytes, npz_bytes = result_bytes(case.result)
            blobs.setdefault(step_id, []).append(
                (case.id, case.analysis, case.params, case.model_name, json_bytes, npz_bytes, key)
            )
    return blobs


def _analysis_modules(plan: Plan) -> dict[str, str | None]:
    """The modules defining the plan's analyses, with their files (for analyses outside ``analyses/``)."""
    modules: dict[str, str | None] = {}
    for case in (*plan.cases, *plan.deselected):
        name = ANALYSES.get(case.analysis).func.__module__
        module = sys.modules.get(name)
        modules[name] = getattr(module, "__file__", None)
    return modules


# --- workers -----------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    """What a worker sends back for one case."""

    result: CaseResult | None
    files: dict[str, bytes] = field(default_factory=dict)
    reads: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    aborted: bool = False
    retry_notes: list[str] = field(default_factory=list)


class _Received(_Upstream):
    """Earlier results as a worker gets them: files' bytes, read into typed results when a case asks."""

    def __init__(self, blobs: dict[str, list[_Blob]]) -> None:
        super().__init__()
        self._blobs = blobs

    def provide(self, step_id: str) -> list[FinishedCase[Any]]:
        if step_id not in self.finished:
            for case_id, analysis, params, model, json_bytes, npz_bytes, key in self._blobs.get(step_id, []):
                typed = result_from_files(ANALYSES.get(analysis).result_model, json_bytes, npz_bytes)
                self.add(step_id, FinishedCase(case_id, step_id, analysis, params, model, typed), key)
        return super().provide(step_id)


class _QuietReporter:
    """A worker tells the driver nothing while a case runs; the driver reports it when it returns."""

    def case_started(self, case: Case) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def case_finished(self, result: CaseResult) -> None:
        pass

    def progress(self, items: Any, total: int | None, description: str) -> Iterator[Any]:
        return iter(items)


class CaseWorker:
    """A Ray actor: loads what its cases use once and runs them one at a time."""

    def __init__(self, modules: dict[str, str | None], settings: dict[str, Any]) -> None:
        from runner.registry import load_analyses

        load_analyses()
        for name, path in modules.items():
            _import_module(name, path)
        from runner.resources import Resources

        self.resources = Resources(
            base_dir=Path(settings["base_dir"]), device_override=settings["device_override"]
        )
        self.run_cache: dict[Any, Any] = {}

    def pid(self) -> int:
        """This worker's process id."""
        return os.getpid()

    def run(self, case: Case, blobs: dict[str, list[_Blob]]) -> _Outcome:
        """Run one case into a scratch folder; return its result and files."""
        scratch = Path(tempfile.mkdtemp(prefix="runner-case-"))
        try:
            result = CaseResult(case)
            upstream = _Received(blobs)
            try:
                folder, quiet = RunFolder(scratch), _QuietReporter()
                _run_case(result, folder, self.resources, quiet, upstream, self.run_cache)
            except ResourceError as exc:  # a model or dataset that cannot load: no case of the run can run
                return _Outcome(None, error=str(exc), aborted=True)
            files = {
                path: (scratch / path).read_bytes()
                for path in (*result.result_files, *result.data_files, *result.plot_files)
            }
            return _Outcome(result, files, dict(upstream.reads))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _import_module(name: str, path: str | None) -> None:
    """Import an analysis' module by name, or from its file (e.g. a test's ``conftest``)."""
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except ImportError:
        if path is None:
            raise
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RunnerError(f"cannot import the analysis module {name!r} from {path} on a Ray worker")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


class _Pool:
    """Ray actors by group (model and resources); a group's actors are kept while it has work."""

    def __init__(self, ray: Any, modules: dict[str, str | None], settings: dict[str, Any]) -> None:
        self.ray = ray
        self.actor_class = ray.remote(max_restarts=0)(CaseWorker)
        self.modules, self.settings = modules, settings
        self.groups: dict[str, list[Any]] = {}
        self.cluster = ray.cluster_resources()

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def run(
        self, pending: list[CaseResult], received: Any, reporter: Reporter
    ) -> Iterator[tuple[CaseResult, _Outcome]]:
        """Run ``pending`` on workers; yields each case with its outcome as it finishes."""
        groups: dict[str, list[CaseResult]] = {}
        options: dict[str, dict[str, Any]] = {}
        for result in pending:
            opts = worker_options(result.case.step.resources, result.case.model.device, self.cluster)
            group = f"{result.case.model.model_dump_json()}|{sorted(opts.items())}"
            groups.setdefault(group, []).append(result)
            options[group] = opts
        for group, results in groups.items():
            yield from self._run_group(group, options[group], results, received, reporter)

    def _run_group(
        self, group: str, opts: dict[str, Any], results: list[CaseResult], received: Any, reporter: Reporter
    ) -> Iterator[tuple[CaseResult, _Outcome]]:
        for other in [g for g in self.groups if g != group]:  # free the cluster for this group's workers
            self._kill(self.groups.pop(other))
        actors = self.groups.setdefault(group, [])
        while len(actors) < min(len(results), _capacity(opts, self.cluster)):
            actors.append(self._start(opts))
        queue, idle = deque(results), list(actors)
        inflight: dict[Any, tuple[Any, CaseResult]] = {}
        tries: dict[str, int] = {}
        retry_notes: dict[str, list[str]] = {}
        while queue or inflight:
            while queue and idle:
                actor, result = idle.pop(), queue.popleft()
                reporter.case_started(result.case)
                inflight[actor.run.remote(result.case, received)] = (actor, result)
            [ref], _ = self.ray.wait(list(inflight), num_returns=1)
            actor, result = inflight.pop(ref)
            try:
                outcome = self.ray.get(ref)
                idle.append(actor)
            except self.ray.exceptions.RayActorError as exc:
                replacement = self._start(opts)
                actors[actors.index(actor)] = replacement
                idle.append(replacement)
                retried = self._died(result, exc, tries, retry_notes)
                if retried is None:
                    queue.appendleft(result)
                    continue
                outcome = retried
            outcome.retry_notes = retry_notes.get(result.case.id, [])
            yield result, outcome

    @staticmethod
    def _died(
        result: CaseResult, exc: Exception, tries: dict[str, int], notes: dict[str, list[str]]
    ) -> _Outcome | None:
        """None: send the case again (its worker died); else, past the limit, its error outcome."""
        case_id = result.case.id
        tries[case_id] = tries.get(case_id, 0) + 1
        if tries[case_id] <= MAX_RETRIES:
            notes.setdefault(case_id, []).append(
                f"its Ray worker died ({type(exc).__name__}); sent again to a new worker"
            )
            return None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _Outcome(None, error=f"its Ray worker died {tries[case_id]} times, the last time: {reason}")

    def _start(self, opts: dict[str, Any]) -> Any:
        return self.actor_class.options(**opts).remote(self.modules, self.settings)

    def _kill(self, actors: list[Any]) -> None:
        for actor in actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)

    def close(self) -> None:
        """Stop every worker (outstanding work is cancelled)."""
        for actors in self.groups.values():
            self._kill(actors)
        self.groups.clear()


def worker_options(spec: ResourcesSpec | None, device: str, cluster: dict[str, float]) -> dict[str, Any]:
    """Ray actor options of a step's ``resources:``, with the defaults filled in.

    Defaults: one CPU; one GPU when the cluster has GPUs and the model's device is not ``cpu``.
    """
    spec = spec or ResourcesSpec()
    gpu_default = 1.0 if cluster.get("GPU", 0) > 0 and device != "cpu" else 0.0
    options: dict[str, Any] = {
        "num_cpus": 1.0 if spec.num_cpus is None else spec.num_cpus,
        "num_gpus": gpu_default if spec.num_gpus is None else spec.num_gpus,
    }
    if spec.memory is not None:
        options["memory"] = int(spec.memory)
    return options


def _capacity(opts: dict[str, Any], cluster: dict[str, float]) -> int:
    """How many workers with ``opts`` the cluster holds at once (at least one)."""
    fits = [
        int(cluster.get(resource, 0) // opts[key] + 1e-9)
        for key, resource in (("num_cpus", "CPU"), ("num_gpus", "GPU"), ("memory", "memory"))
        if opts.get(key)
    ]
    return max(1, min(fits, default=1))

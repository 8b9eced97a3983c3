"""Running a plan's cases on Ray workers (``runner run SPEC --executor ray [--address ADDR]``).

The driver (this process) keeps everything a local run owns: the plan order, the cache lookups and
stores, the run folder and the manifest. Cached cases are restored here and never sent. Workers are
Ray actors that only compute: each holds one :class:`~runner.resources.Resources`, so it loads a model,
dataset or SAE once and serves every case of its group (cases are grouped by model and by the step's
``resources:``). Groups run side by side as far as the cluster's CPUs, GPUs and memory allow; an idle
worker is kept for later cases of its group until another group needs the room.

A case is sent as soon as the earlier cases it reads have finished, not after their whole step: it
reads a step (``ctx.outputs``, ``from_step``) as the cases of that step before it in plan order, as in
a local run, so it waits for exactly those. Which steps a case reads is known from its params (a
string naming a step, as ``from_step`` does) or from its cache entry; a case that reads a step found
neither way stops on the worker at ``ctx.outputs`` and is sent again once that step is ready.

A case travels as the :class:`~runner.planner.Case` itself; the earlier results it reads travel as
their result files' bytes (the :mod:`runner.results` round trip), never as torch objects. Its files
come back as bytes and are written at the paths a local run writes.

A case that raises is an error, as in a local run. A worker process that dies mid-case is replaced
and the case sent to the new worker, up to :data:`MAX_RETRIES` times. Ctrl-C stops every worker
(outstanding cases are not run) and keeps what finished.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import socket
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

__all__ = ["MAX_RETRIES", "RayExecutor", "worker_options"]

MAX_RETRIES = 2
"""How many times a case whose worker process died is sent again (a case that raises is not)."""

WAIT_S = 0.5
"""How long the driver waits for a worker before looking at Ctrl-C and the console again."""

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
        """Run every case of ``plan`` as soon as what it reads is ready; ``on_case_done(run)`` after each."""
        ray = import_ray()
        started_here = _connect(ray, self.address)
        run = RunResult([CaseResult(case) for case in plan.cases], 0.0)
        pool = _Pool(ray, _analysis_modules(plan), self.settings, reporter, fixed=started_here)
        schedule = _Schedule(run, plan, folder, reporter, caching, on_case_done, pool)
        try:
            schedule.run(exitfirst)
        except KeyboardInterrupt:
            run.interrupted = True
            schedule.keep_returned()
            for result in run.results:
                if result.status == "not run":
                    result.error = "interrupted by the user (Ctrl-C)"
        finally:
            run.workers = pool.close()
            if started_here:
                ray.shutdown()
        run.duration = time.perf_counter() - schedule.started
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


# --- the driver's schedule ---------------------------------------------------------------------------


_Blob = tuple[str, str, Any, str, bytes, bytes | None, str]


class _Schedule:
    """Which cases may go now: restores cached ones, sends the others, takes back what workers return."""

    def __init__(
        self,
        run: RunResult,
        plan: Plan,
        folder: RunFolder,
        reporter: Reporter,
        caching: Caching | None,
        on_case_done: Any,
        pool: _Pool,
    ) -> None:
        self.run_result, self.folder, self.reporter, self.caching = run, folder, reporter, caching
        self.on_case_done, self.pool = on_case_done, pool
        self.started = time.perf_counter()
        self.order = {r.case.id: i for i, r in enumerate(run.results)}
        self.steps: dict[str, list[CaseResult]] = {}
        for result in run.results:
            self.steps.setdefault(result.case.step.id, []).append(result)
        known = set(self.steps) | {c.step.id for c in plan.deselected}
        self.reads = {r.case.id: _named_steps(r.case.params, known - {r.case.step.id}) for r in run.results}
        self.waiting: list[CaseResult] = list(run.results)
        self.done: set[str] = set()
        self.finished: dict[str, tuple[FinishedCase[Any], str]] = {}
        self.deselected = _Upstream(plan.deselected, caching)  # steps -k left out, read from the cache
        self._bytes: dict[str, tuple[bytes, bytes | None]] = {}
        self._sent: dict[Any, Any] = {}

    def run(self, exitfirst: bool) -> None:
        """Until every case is done (or the run stops): send what is ready, take back what returns."""
        while True:
            stopping = self.run_result.aborted or (exitfirst and self._any_failed())
            if stopping:
                self.pool.drop_queued()  # what runs finishes and is kept; nothing more starts
            else:
                self._send_ready()
            if not self.pool.busy:
                if stopping or not self.waiting:
                    return
                raise RuntimeError(f"no case can start: {[r.case.id for r in self.waiting]}")  # a bug
            for result, outcome in self.pool.wait(WAIT_S):
                if outcome.not_ready is not None:  # it reads a step that is not ready: send it later
                    self.reads[result.case.id].add(outcome.not_ready)
                    self.waiting.insert(self._position(result), result)
                else:
                    self._finish(result, outcome)

    def keep_returned(self) -> None:
        """After Ctrl-C: record the cases whose results already came back but were not yet taken
        (a worker finished them just before), so that no finished case is lost; start nothing.
        Cases the interrupt itself ended (errors) stay "not run"."""
        for result, outcome in self.pool.returned():
            if outcome.result is not None and outcome.result.status in ("passed", "failed"):
                self._finish(result, outcome)

    def _any_failed(self) -> bool:
        return any(r.status in ("failed", "error") for r in self.run_result.results)

    def _position(self, result: CaseResult) -> int:
        index = self.order[result.case.id]
        return next(
            (i for i, r in enumerate(self.waiting) if self.order[r.case.id] > index), len(self.waiting)
        )

    def _ready(self, result: CaseResult) -> bool:
        """Whether every case before it of every step it reads is done."""
        index = self.order[result.case.id]
        return all(
            other.case.id in self.done
            for step_id in self.reads[result.case.id]
            for other in self.steps.get(step_id, [])
            if self.order[other.case.id] < index
        )

    def _send_ready(self) -> None:
        """Restore or send every waiting case that is ready (restoring one may make others ready)."""
        progress = True
        while progress and not self.run_result.aborted:
            progress = False
            for result in list(self.waiting):
                if not self._ready(result):
                    continue
                state = self._try_cache(result)
                if state == "later":
                    continue
                self.waiting.remove(result)
                progress = progress or state == "restored"
                if state == "send":
                    self.pool.submit(result, self._blobs(result))
                if self.run_result.aborted:
                    return

    def _try_cache(self, result: CaseResult) -> str:
        """``restored`` from the cache, ``send`` to a worker, or ``later`` (its entry reads unready steps)."""
        caching, case = self.caching, result.case
        if caching is None:
            return "send"
        try:
            inputs = caching.keys.inputs(case)
        except ResourceError as exc:  # a model that cannot be found aborts the run, as locally
            result.status, result.error = "error", str(exc)
            self.run_result.aborted = str(exc)
            self._done(result)
            return "restored"
        base = base_key(inputs)
        result.cache = {"key": base, "base": base, "state": "not stored", "inputs": inputs}
        store = caching.store
        if store is None:
            return "send"
        peeked = None if caching.force else store.peek(base)
        if peeked is not None and not set(peeked.reads) <= self.reads[case.id]:
            self.reads[case.id] |= set(peeked.reads)  # its entry says what it reads
            if not self._ready(result):
                return "later"
        view = self._view(result)
        with store.lock(base, shared=True):
            entry = _usable_entry(store, base, caching.force, view, result)
            restored = entry is not None and _restore(result, entry, self.folder, view, self.reporter)
            if restored:
                store.touch(entry)
        if not restored:
            return "send"
        store.remember(caching.spec_name, case.id, base, result.cache["key"], inputs)
        self.finished[case.id] = (view.finished[case.step.id][-1], result.cache["key"])
        self._done(result)
        return "restored"

    def _view(self, result: CaseResult) -> _Upstream:
        """What ``result`` may read, as a local run gives it: each step it reads, up to the case."""
        view = _Upstream()
        index = self.order[result.case.id]
        for step_id in sorted(self.reads[result.case.id]):
            view.finished.setdefault(step_id, [])  # sent even when empty: ctx.outputs then says so
            if step_id not in self.steps:
                cases = self.deselected.provide(step_id)
                for case, key in zip(cases, self.deselected.keys.get(step_id, []), strict=True):
                    view.add(step_id, case, key)
                continue
            for other in self.steps[step_id]:
                if self.order[other.case.id] < index and other.case.id in self.finished:
                    view.add(step_id, *self.finished[other.case.id])
        return view

    def _blobs(self, result: CaseResult) -> Any:
        """The results the case reads as their files' bytes, by step, in Ray's object store (put once)."""
        view = self._view(result)
        signature = tuple((s, tuple(c.id for c in cases)) for s, cases in sorted(view.finished.items()))
        if signature not in self._sent:
            blobs: dict[str, list[_Blob]] = {}
            for step_id, cases in view.finished.items():
                blobs[step_id] = [
                    (c.id, c.analysis, c.params, c.model_name, *self._result_bytes(c), key)
                    for c, key in zip(cases, view.keys.get(step_id, []), strict=True)
                ]
            self._sent[signature] = self.pool.put(blobs)
        return self._sent[signature]

    def _result_bytes(self, case: FinishedCase[Any]) -> tuple[bytes, bytes | None]:
        if case.id not in self._bytes:
            self._bytes[case.id] = result_bytes(case.result)
        return self._bytes[case.id]

    def _done(self, result: CaseResult) -> None:
        self.done.add(result.case.id)
        self.run_result.duration = time.perf_counter() - self.started
        if self.on_case_done is not None:
            self.on_case_done(self.run_result)

    def _finish(self, result: CaseResult, outcome: _Outcome) -> None:
        """Write a worker's case into the run folder and the cache; keep its result for later cases."""
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
            self.run_result.aborted = outcome.error
        for path, content in outcome.files.items():
            target = self.folder.root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        key = self._store(result, outcome, cache_notes)
        self.reporter.case_finished(result)
        if result.status in ("passed", "failed"):
            typed = _reload(result, outcome.files)
            finished = FinishedCase(case.id, case.step.id, case.analysis, case.params, case.model.name, typed)
            self.finished[case.id] = (finished, key)
        self._done(result)

    def _store(self, result: CaseResult, outcome: _Outcome, cache_notes: list[str]) -> str:
        """Store a computed case in the cache (under the entry's lock, held only while writing); its key."""
        caching = self.caching
        if caching is None:
            return ""
        base, inputs = result.cache["base"], result.cache["inputs"]
        result.cache["key"] = cache_key(base, outcome.reads)
        if caching.store is not None:
            store = caching.store
            if result.status in ("passed", "failed"):
                with store.lock(base):
                    _store(result, store, base, inputs, outcome.reads, self.folder, caching, cache_notes)
            store.remember(caching.spec_name, result.case.id, base, result.cache["key"], inputs)
        return str(result.cache["key"])


def _named_steps(params: Any, step_ids: set[str]) -> set[str]:
    """The step ids that appear as string values in ``params`` (``from_step: train``, ``source: toy``)."""
    found: set[str] = set()
    stack = [params.model_dump(mode="json") if hasattr(params, "model_dump") else params]
    while stack:
        value = stack.pop()
        if isinstance(value, str) and value in step_ids:
            found.add(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return found


def _reload(result: CaseResult, files: dict[str, bytes]) -> Any:
    json_path = next(p for p in result.result_files if p.endswith(".json"))
    npz_path = next((p for p in result.result_files if p.endswith(".npz")), None)
    model = ANALYSES.get(result.case.analysis).result_model
    return result_from_files(model, files[json_path], files[npz_path] if npz_path else None)


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
    not_ready: str | None = None
    """A step the case reads that was not sent with it: the case stopped and is sent again later."""


class _NotReady(BaseException):
    """Raised inside a case that reads a step it was not sent (a BaseException: analyses catch Exception)."""

    def __init__(self, step_id: str) -> None:
        super().__init__(step_id)
        self.step_id = step_id


class _Received(_Upstream):
    """Earlier results as a worker gets them: files' bytes, read into typed results when a case asks."""

    def __init__(self, blobs: dict[str, list[_Blob]]) -> None:
        super().__init__()
        self._blobs = blobs

    def provide(self, step_id: str) -> list[FinishedCase[Any]]:
        if step_id not in self._blobs:
            raise _NotReady(step_id)
        if step_id not in self.finished:
            self.finished[step_id] = []
            for case_id, analysis, params, model, json_bytes, npz_bytes, key in self._blobs[step_id]:
                typed = result_from_files(ANALYSES.get(analysis).result_model, json_bytes, npz_bytes)
                self.add(step_id, FinishedCase(case_id, step_id, analysis, params, model, typed), key)
        self.reads[step_id] = list(self.keys.get(step_id, []))
        return list(self.finished[step_id])


Progress = tuple[str, int, int | None]
"""A running case's inner loop as the driver's console shows it: description, items done, total."""


class _WorkerReporter:
    """What a worker's case reports: its inner loop's progress, kept for the driver to ask for
    (:meth:`CaseWorker.progress`); the driver reports everything else when the case returns."""

    def __init__(self) -> None:
        self.now: Progress | None = None

    def case_started(self, case: Case) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def case_finished(self, result: CaseResult) -> None:
        pass

    def progress(self, items: Any, total: int | None, description: str) -> Iterator[Any]:
        done = 0
        self.now = (description, done, total)
        for item in items:
            yield item
            done += 1
            self.now = (description, done, total)


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
        self.reporter = _WorkerReporter()

    def progress(self) -> Progress | None:
        """The running case's inner loop (batches...): asked by the driver while :meth:`run` runs,
        which is why the actor takes two calls at once (``max_concurrency=2``)."""
        return self.reporter.now

    def describe(self, model: Any) -> dict[str, Any]:
        """This worker's process, machine and torch settings, as the manifest records the driver's."""
        import torch

        from runner.manifest import cpu_model, torch_state

        return {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "cpu": cpu_model(),
            "device": self.resources.device(model),
            "torch_version": torch.__version__,
            "torch": torch_state(),
        }

    def run(self, case: Case, blobs: dict[str, list[_Blob]]) -> _Outcome:
        """Run one case into a scratch folder; return its result and files."""
        scratch = Path(tempfile.mkdtemp(prefix="runner-case-"))
        self.reporter.now = None
        try:
            result = CaseResult(case)
            upstream = _Received(blobs)
            try:
                folder = RunFolder(scratch)
                _run_case(result, folder, self.resources, self.reporter, upstream, self.run_cache)
            except ResourceError as exc:  # a model or dataset that cannot load: no case of the run can run
                return _Outcome(None, error=str(exc), aborted=True)
            except _NotReady as exc:
                return _Outcome(None, not_ready=exc.step_id)
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


# --- the pool of workers -----------------------------------------------------------------------------


@dataclass
class _Group:
    """Cases that share a model and a step's resources, and so can share a worker."""

    key: str
    options: dict[str, Any]
    model: Any
    rank: int
    queue: deque[tuple[CaseResult, Any]] = field(default_factory=deque)


@dataclass
class _Worker:
    """One actor, the group it serves and the case it runs."""

    number: int
    actor: Any
    group: _Group
    info: Any
    running: CaseResult | None = None
    cases: list[str] = field(default_factory=list)
    stopped: str | None = None


class _Pool:
    """Ray actors by group; starts, reuses, replaces and stops them within the cluster's resources."""

    def __init__(
        self,
        ray: Any,
        modules: dict[str, str | None],
        settings: dict[str, Any],
        reporter: Reporter,
        fixed: bool = False,
    ) -> None:
        self.ray = ray
        self.fixed = fixed
        """The cluster cannot grow (a local instance runner started): a case it cannot hold is an error."""
        self.refused: list[tuple[CaseResult, _Outcome]] = []
        # Two calls at once: the driver asks a worker for its case's progress while the case runs.
        self.actor_class = ray.remote(max_restarts=0, max_concurrency=2)(CaseWorker)
        self.modules, self.settings, self.reporter = modules, settings, reporter
        self.cluster = ray.cluster_resources()
        self.groups: dict[str, _Group] = {}
        self.workers: list[_Worker] = []
        self.retired: list[_Worker] = []
        self.inflight: dict[Any, tuple[_Worker, CaseResult, Any]] = {}
        self.polls: dict[Any, tuple[_Worker, CaseResult]] = {}
        """Outstanding progress questions to running workers, by Ray reference."""
        self.tries: dict[str, int] = {}
        self.retry_notes: dict[str, list[str]] = {}
        self._numbers = 0

    @property
    def busy(self) -> bool:
        """Whether a case is running or queued."""
        return bool(self.inflight or self.refused) or any(g.queue for g in self.groups.values())

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def drop_queued(self) -> None:
        """Forget the cases not yet sent to a worker (they stay not run)."""
        for group in self.groups.values():
            group.queue.clear()

    def submit(self, result: CaseResult, blobs: Any) -> None:
        """Queue a case for its group's workers."""
        options = worker_options(result.case.step.resources, result.case.model.device, self.cluster)
        if self.fixed and not _fits((), options, self.cluster):  # Ray would wait for it forever
            wanted = ", ".join(f"{k} {v:g}" for k, v in options.items() if v)
            error = (
                f"its step reserves {wanted} per case, more than the local Ray instance has "
                f"({', '.join(f'{k} {self.cluster.get(k, 0):g}' for k in ('CPU', 'GPU'))}). Lower the "
                "step's `resources:`, or join a bigger cluster with --address."
            )
            self.refused.append((result, _Outcome(None, error=error)))
            return
        key = f"{result.case.model.model_dump_json()}|{sorted(options.items())}"
        if key not in self.groups:
            self.groups[key] = _Group(key, options, result.case.model, len(self.groups))
        self.groups[key].queue.append((result, blobs))

    def wait(self, timeout: float) -> list[tuple[CaseResult, _Outcome]]:
        """Start what can start, then the cases that returned within ``timeout`` seconds."""
        refused, self.refused = self.refused, []
        self._pump()
        if not self.inflight:
            return refused
        self._ask_progress()
        refs = list(self.inflight)
        ready, rest = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            ready = [*ready, *more]
        self._show_progress()
        returned = refused
        for ref in ready:
            outcome = self._collect(ref)
            if outcome is not None:
                returned.append(outcome)
        self._pump()
        return returned

    def returned(self) -> list[tuple[CaseResult, _Outcome]]:
        """The running cases whose results are back already, taken without waiting or starting any."""
        if not self.inflight:
            return []
        ready, _ = self.ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        taken = (self._collect(ref) for ref in ready)
        return [outcome for outcome in taken if outcome is not None]

    def _ask_progress(self) -> None:
        """Ask each running worker (that has not been asked already) how far its case is."""
        if getattr(self.reporter, "worker_status", None) is None:
            return
        asked = {worker.number for worker, _ in self.polls.values()}
        for worker in self.workers:
            if worker.running is not None and worker.number not in asked:
                self.polls[worker.actor.progress.remote()] = (worker, worker.running)

    def _show_progress(self) -> None:
        """Put the answers that came back on the workers' console lines."""
        if not self.polls:
            return
        answered, _ = self.ray.wait(list(self.polls), num_returns=len(self.polls), timeout=0)
        for ref in answered:
            worker, result = self.polls.pop(ref)
            try:
                now = self.ray.get(ref)
            except Exception:  # a worker that died: its case's own reference says so
                continue
            if now is not None and worker.running is result and not worker.stopped:
                self._show(worker, result.case.id, now)

    def _collect(self, ref: Any) -> tuple[CaseResult, _Outcome] | None:
        worker, result, blobs = self.inflight.pop(ref)
        worker.running = None
        try:
            outcome: _Outcome = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            self._retire(worker, f"died in {result.case.id}")
            if getattr(exc, "actor_init_failed", False):  # it raised while starting: no retry helps
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                return result, _Outcome(None, error=f"its Ray worker could not start: {lines[-1]}")
            retried = self._died(result, exc)
            if retried is None:
                worker.group.queue.appendleft((result, blobs))
                return None
            outcome = retried
        except self.ray.exceptions.RayTaskError as exc:  # raised outside the case's own try (a bug)
            cause = getattr(exc, "cause", None) or exc
            error = str(cause) if isinstance(cause, RunnerError) else f"{type(cause).__name__}: {cause}"
            outcome = _Outcome(None, error=error)
            self._show(worker, None)
        else:
            self._show(worker, None)
        outcome.retry_notes = self.retry_notes.get(result.case.id, [])
        return result, outcome

    def _pump(self) -> None:
        """Give idle workers their group's next case; start workers for groups that wait, fewest first."""
        for worker in self.workers:
            if worker.running is None and worker.group.queue:
                self._send(worker)
        while True:
            waiting = [g for g in self.groups.values() if g.queue]
            if not waiting:
                return
            group = min(waiting, key=lambda g: (sum(w.group is g for w in self.workers), g.rank))
            if not self.workers or _fits(self.workers, group.options, self.cluster):
                self._send(self._start(group))
                continue
            idle = [w for w in self.workers if w.running is None and not w.group.queue]
            if not idle:
                return
            self._retire(idle[0], "stopped to make room for another group")

    def _start(self, group: _Group) -> _Worker:
        self._numbers += 1
        actor = self.actor_class.options(**group.options).remote(self.modules, self.settings)
        worker = _Worker(self._numbers, actor, group, actor.describe.remote(group.model))
        self.workers.append(worker)
        return worker

    def _send(self, worker: _Worker) -> None:
        result, blobs = worker.group.queue.popleft()
        worker.running = result
        worker.cases.append(result.case.id)
        if getattr(self.reporter, "worker_status", None) is None:  # else the worker's line names it
            self.reporter.case_started(result.case)
        self._show(worker, result.case.id)
        self.inflight[worker.actor.run.remote(result.case, blobs)] = (worker, result, blobs)

    def _show(self, worker: _Worker, case_id: str | None, progress: Progress | None = None) -> None:
        """Tell the console what the worker runs now (None: idle, or stopped) and how far it is."""
        show = getattr(self.reporter, "worker_status", None)
        if show is not None:
            name = f"worker {worker.number} ({worker.group.model.name})"
            if progress is None:
                show(name, None if worker.stopped else case_id or "idle")
            else:
                show(name, case_id, progress)

    def _retire(self, worker: _Worker, why: str) -> None:
        worker.stopped = why
        self._show(worker, None)
        self.workers.remove(worker)
        self.retired.append(worker)
        with contextlib.suppress(Exception):
            self.ray.kill(worker.actor)

    def _died(self, result: CaseResult, exc: Exception) -> _Outcome | None:
        """None: send the case again (its worker died); else, past the limit, its error outcome."""
        case_id = result.case.id
        self.tries[case_id] = self.tries.get(case_id, 0) + 1
        if self.tries[case_id] <= MAX_RETRIES:
            self.retry_notes.setdefault(case_id, []).append(
                f"its Ray worker died ({type(exc).__name__}); sent again to a new worker"
            )
            return None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _Outcome(
            None, error=f"its Ray worker died {self.tries[case_id]} times, the last time: {reason}"
        )

    def close(self) -> list[dict[str, Any]]:
        """Stop every worker (outstanding cases are cancelled); what each worker was, for the manifest."""
        for worker in list(self.workers):
            worker.stopped = "the run ended"
        everyone = sorted([*self.retired, *self.workers], key=lambda w: w.number)
        described = self._described(everyone)
        for worker in list(self.workers):
            self._retire(worker, "the run ended")
        return described

    def _described(self, workers: list[_Worker]) -> list[dict[str, Any]]:
        infos = [w.info for w in workers]
        ready: set[Any] = set()
        with contextlib.suppress(Exception):
            ready = set(self.ray.wait(infos, num_returns=len(infos), timeout=0)[0]) if infos else set()
        described = []
        for worker in workers:
            info: dict[str, Any] = {}
            if worker.info in ready:
                with contextlib.suppress(Exception):
                    info = self.ray.get(worker.info)
            described.append(
                {
                    "worker": worker.number,
                    "model": worker.group.model.name,
                    "resources": worker.group.options,
                    "cases": worker.cases,
                    **info,
                }
            )
        return described


def _fits(workers: Any, options: dict[str, Any], cluster: dict[str, float]) -> bool:
    """Whether one more worker with ``options`` fits in ``cluster`` beside ``workers``."""
    for key, resource in (("num_cpus", "CPU"), ("num_gpus", "GPU"), ("memory", "memory")):
        want = options.get(key) or 0
        used = sum(w.group.options.get(key) or 0 for w in workers)
        if want and used + want > cluster.get(resource, 0) + 1e-9:
            return False
    return True


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

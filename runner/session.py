"""One ``runner run``: run folder, cache, resources, console, execution, manifest and reports together."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from runner.artifacts import RunFolder, create_run_folder
from runner.cache import FileHashes, KeyMaker, ResultCache, default_results_dir
from runner.console import ConsoleReporter
from runner.executor import Caching, Executor, LocalExecutor, RunResult
from runner.manifest import build_manifest, environment
from runner.planner import Plan
from runner.reports import render_reports

__all__ = ["caching_for", "run_session"]


def caching_for(plan: Plan, args: argparse.Namespace, run_dir: str, base_dir: Path) -> Caching:
    """The run's use of the result cache from ``--cache-dir``, ``--no-cache`` and ``--force``."""
    root = getattr(args, "cache_dir", None) or default_results_dir()
    no_cache = getattr(args, "no_cache", False)
    return Caching(
        keys=KeyMaker(base_dir, FileHashes(root / "file-hashes.json"), getattr(args, "device", None)),
        store=None if no_cache else ResultCache(root),
        spec_name=plan.spec.name,
        run_dir=run_dir,
        force=getattr(args, "force", False),
    )


def run_session(
    plan: Plan,
    args: argparse.Namespace,
    out: Console,
    *,
    base_dir: Path | None = None,
    on_folder: Callable[[Path], None] | None = None,
) -> int:
    """Run ``plan`` into a new run folder; returns pytest's exit code.

    ``base_dir`` (default: the spec's folder) is where relative paths of the spec resolve; ``runner
    rerun`` passes the original spec's folder while running the run folder's copy, and learns the
    new folder through ``on_folder``.
    """
    spec_path = Path(plan.source)
    spec_text = spec_path.read_text(encoding="utf-8")
    output_dir = args.output_dir or Path(plan.spec.output.dir)
    folder = create_run_folder(output_dir, plan.spec.name, spec_path, spec_text)
    if on_folder is not None:
        on_folder(folder.root)
    base_dir = base_dir or spec_path.parent
    with open(folder.root / "run.log", "w", encoding="utf-8") as log_file, _logging_to(log_file):
        log = Console(file=log_file, highlight=False, soft_wrap=True, no_color=True, width=120)
        reporter = ConsoleReporter(out, verbosity=args.verbose - args.quiet, log=log)
        return _run(plan, args, folder, reporter, spec_text, base_dir)


def _run(
    plan: Plan,
    args: argparse.Namespace,
    folder: RunFolder,
    reporter: ConsoleReporter,
    spec_text: str,
    base_dir: Path,
) -> int:
    resources: Any = _LazyResources(base_dir=base_dir, device_override=args.device, status=reporter.status)
    caching = caching_for(plan, args, str(folder.root.resolve()), base_dir)
    started = datetime.now().astimezone()
    env = environment(base_dir)

    def write_manifest(run: RunResult | None, finished: bool) -> dict[str, Any]:
        manifest = build_manifest(
            plan,
            run,
            spec_text=spec_text,
            started=started,
            command=["runner", *sys.argv[1:]],
            env=env,
            resources=resources.loaded,
            finished=finished,
            cache={
                "dir": str(caching.store.root) if caching.store else None,
                "enabled": caching.store is not None,
                "force": caching.force,
            },
            spec_dir=base_dir,
        )
        folder.write_json("manifest.json", manifest)
        return manifest

    write_manifest(None, finished=False)
    reporter.header(plan, str(folder.root))
    with reporter.running(len(plan.cases)), _sigterm_as_interrupt():
        run = _executor(args, base_dir).run(
            plan,
            folder,
            resources,
            reporter,
            exitfirst=args.exitfirst,
            on_case_done=lambda partial: write_manifest(partial, finished=False),
            caching=caching,
        )
    caching.keys.hashes.save()
    manifest = write_manifest(run, finished=True)
    reports = _write_reports(folder, manifest, spec_text, reporter)
    reporter.finish(run, plan, str(folder.root), [str(p) for p in reports], fulltrace=args.fulltrace)
    return run.exit_code


def _executor(args: argparse.Namespace, base_dir: Path) -> Executor:
    """``--executor local`` (the default: this process) or ``ray`` (workers of a Ray cluster)."""
    if getattr(args, "executor", "local") != "ray":
        return LocalExecutor()
    from runner.ray_executor import RayExecutor

    return RayExecutor(getattr(args, "address", None), base_dir=base_dir, device_override=args.device)


class _LazyResources:
    """:class:`runner.resources.Resources`, created (importing torch) when a case first computes.

    A run whose cases all come from the cache then never imports torch: it finishes in a second or two.
    """

    def __init__(self, **settings: Any) -> None:
        self._settings = settings
        self._real: Any = None
        self.base_dir: Path = settings["base_dir"]

    @property
    def loaded(self) -> dict[str, dict[str, Any]]:
        """What was loaded, for the manifest (nothing until a case computes)."""
        return self._real.loaded if self._real is not None else {"models": {}, "datasets": {}, "saes": {}}

    def __getattr__(self, name: str) -> Any:
        if self._real is None:
            from runner.models.imports import import_heavy

            resources, _ = import_heavy("runner.resources")  # torch: with the collector paused
            self._real = resources.Resources(**self._settings)
        return getattr(self._real, name)


def _write_reports(
    folder: RunFolder, manifest: dict[str, Any], spec_text: str, reporter: ConsoleReporter
) -> list[Path]:
    """The reports written; none when rendering failed (the error is printed, the data kept)."""
    try:
        return render_reports(folder, manifest, spec_text=spec_text)
    except Exception as exc:  # the data is on disk; a template bug must not hide the run's outcome
        reporter.print(f"[red]Could not render the report:[/red] {type(exc).__name__}: {exc}")
        return []


@contextmanager
def _logging_to(stream: IO[str]) -> Iterator[None]:
    """Send warnings and log records (e.g. a rebuilt weight cache) to ``run.log`` too."""
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous = warnings.showwarning

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        stream.write(f"WARNING {category.__name__}: {message} ({filename}:{lineno})\n")
        previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous
        root.removeHandler(handler)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C so a killed run also leaves a valid run folder."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

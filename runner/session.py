"""One ``runner run``: run folder, resources, console, execution, manifest and reports wired together."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from runner.artifacts import RunFolder, create_run_folder
from runner.console import ConsoleReporter
from runner.executor import RunResult, run_plan
from runner.manifest import build_manifest, environment
from runner.planner import Plan
from runner.reports import render_reports
from runner.resources import Resources

__all__ = ["run_session"]


def run_session(plan: Plan, args: argparse.Namespace, out: Console) -> int:
    """Run ``plan`` into a new run folder; returns pytest's exit code."""
    spec_path = Path(plan.source)
    spec_text = spec_path.read_text(encoding="utf-8")
    output_dir = args.output_dir or Path(plan.spec.output.dir)
    folder = create_run_folder(output_dir, plan.spec.name, spec_path, spec_text)
    reporter = ConsoleReporter(out, verbosity=args.verbose - args.quiet)
    resources = Resources(base_dir=spec_path.parent, device_override=args.device, status=reporter.status)
    started = datetime.now().astimezone()
    env = environment(spec_path.parent)
    device = resources.device(plan.spec.model)

    def write_manifest(run: RunResult | None, finished: bool) -> dict[str, Any]:
        manifest = build_manifest(
            plan,
            run,
            spec_text=spec_text,
            started=started,
            command=["runner", *sys.argv[1:]],
            env=env,
            resources=resources.loaded,
            device=device,
            finished=finished,
        )
        folder.write_json("manifest.json", manifest)
        return manifest

    write_manifest(None, finished=False)
    reporter.header(plan, str(folder.root))
    with reporter.running(len(plan.cases)), _sigterm_as_interrupt():
        run = run_plan(
            plan,
            folder,
            resources,
            reporter,
            exitfirst=args.exitfirst,
            on_case_done=lambda partial: write_manifest(partial, finished=False),
        )
    manifest = write_manifest(run, finished=True)
    reports = _write_reports(folder, plan, run, manifest, spec_text, reporter)
    reporter.finish(run, plan, str(folder.root), [str(p) for p in reports], fulltrace=args.fulltrace)
    return run.exit_code


def _write_reports(
    folder: RunFolder,
    plan: Plan,
    run: RunResult,
    manifest: dict[str, Any],
    spec_text: str,
    reporter: ConsoleReporter,
) -> list[Path]:
    """The reports written; none when rendering failed (the error is printed, the data kept)."""
    try:
        return render_reports(folder, plan, run, manifest, spec_text=spec_text, html=plan.spec.output.html)
    except Exception as exc:  # the data is on disk; a template bug must not hide the run's outcome
        reporter.console.print(f"[red]Could not render the report:[/red] {type(exc).__name__}: {exc}")
        return []


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

"""Console output in pytest's shape: a header, one line per case, failures, then the summary line.

Progress bars (cases, and batches within a case) are drawn with rich on a terminal and left out
when the output is a file or a CI log. Everything printed also goes to the ``log`` console when
given (the run folder's ``run.log``), without colours or progress bars.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from runner.executor import CaseResult, RunResult
from runner.planner import Case, Plan, cases_text

__all__ = ["ConsoleReporter"]

STYLES = {"passed": "green", "failed": "red", "error": "red", "not run": "yellow"}
LABELS = {"passed": "PASSED", "failed": "FAILED", "error": "ERROR", "not run": "NOT RUN"}


class ConsoleReporter:
    """Prints the run like pytest; ``verbosity`` -1 (``-q``), 0, or 1 (``-v``)."""

    def __init__(
        self, console: Console | None = None, verbosity: int = 0, log: Console | None = None
    ) -> None:
        self.console = console or Console(highlight=False)
        self.verbosity = verbosity
        self.log = log
        self._progress: Progress | None = None
        self._cases_task: Any = None
        self._workers: dict[str, Any] = {}
        self._worker_doing: dict[str, str] = {}

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """Print to the console and to the log."""
        self.console.print(*objects, **kwargs)
        if self.log is not None:
            self.log.print(*objects, **kwargs)

    def rule(self, title: str = "", **kwargs: Any) -> None:
        """A horizontal rule on the console and in the log."""
        self.console.rule(title, **kwargs)
        if self.log is not None:
            self.log.rule(title, **kwargs)

    def message(self, text: str) -> None:
        """A line about the run itself (waiting for a lock, what the cache did)."""
        if self.verbosity >= 0:
            self.print(f"[dim]{escape(text)}[/dim]")

    @property
    def live(self) -> bool:
        """Whether progress bars are drawn."""
        return self.console.is_terminal and self.verbosity >= 0

    def header(self, plan: Plan, run_dir: str) -> None:
        """The session header: spec, model, data, number of cases, run folder."""
        if self.verbosity < 0:
            return
        spec = plan.spec
        self.rule(f"runner: {escape(spec.name)}")
        self.print(
            f"spec: {escape(plan.source)}   model: {escape(spec.model.name)}   "
            f"dataset: {escape(spec.dataset.name)}   seed: {spec.seed}"
        )
        deselected = f" / {len(plan.deselected)} deselected" if plan.deselected else ""
        self.print(f"collected {cases_text(len(plan.cases) + len(plan.deselected))}{deselected}")
        self.print(f"run folder: {escape(run_dir)}\n")

    @contextmanager
    def running(self, total: int) -> Iterator[None]:
        """Show the cases bar for the duration of the run."""
        if not self.live:
            yield
            return
        columns = [TextColumn("{task.description}"), BarColumn(), _Count(), TimeElapsedColumn()]
        with Progress(*columns, console=self.console, transient=True) as progress:
            self._progress = progress
            self._cases_task = progress.add_task("cases", total=total)
            try:
                yield
            finally:
                self._progress = None
                self._workers.clear()
                self._worker_doing.clear()

    def status(self, message: str) -> AbstractContextManager[Any]:
        """A spinner (or a plain line) while a resource loads."""
        if self.verbosity < 0:
            return nullcontext()
        if self.log is not None:
            self.log.print(f"{message}…")
        if self._progress is not None:
            self._progress.console.print(f"[dim]{escape(message)}…[/dim]")
            return nullcontext()
        return self.console.status(escape(message)) if self.live else _printing(self.console, message)

    def case_started(self, case: Case) -> None:
        """Name the running case on the cases bar."""
        if self._progress is not None:
            self._progress.update(self._cases_task, description=escape(case.id))

    def worker_status(
        self, worker: str, doing: str | None, progress: tuple[str, int, int | None] | None = None
    ) -> None:
        """One line per Ray worker under the cases bar: what it runs (``idle``), for how long, and
        with ``progress`` (description, done, total) how far its case's inner loop is (``batches
        3/8``). A new ``doing`` restarts the line's clock.

        ``doing`` None removes the worker's line (it stopped). Nothing is printed without a terminal.
        """
        if self._progress is None:
            return
        task = self._workers.get(worker)
        if doing is None:
            if task is not None:
                self._progress.remove_task(self._workers.pop(worker))
                self._worker_doing.pop(worker, None)
            return
        description = f"  {escape(worker)}: {escape(doing)}"
        if task is None:
            task = self._workers[worker] = self._progress.add_task(description, total=None)
        elif progress is None or self._worker_doing.get(worker) != doing:
            self._progress.reset(task, description=description, total=None)
        self._worker_doing[worker] = doing
        if progress is not None:  # as text: a bar's total could not go back to none for the next case
            what, done, total = progress
            count = f"{done}/{total}" if total is not None else str(done)
            self._progress.update(task, description=f"{description} · {escape(what)} {count}")

    def progress(self, items: Iterable[Any], total: int | None, description: str) -> Iterator[Any]:
        """Advance an inner bar (e.g. batches) while iterating."""
        if self._progress is None:
            yield from items
            return
        task = self._progress.add_task(f"  {escape(description)}", total=total)
        try:
            for item in items:
                yield item
                self._progress.advance(task)
        finally:
            self._progress.remove_task(task)

    def case_finished(self, result: CaseResult) -> None:
        """One line per case (``-q`` prints only failures), then notes."""
        if self._progress is not None:
            self._progress.advance(self._cases_task)
        if self.verbosity < 0 and result.status == "passed":
            return
        style = STYLES[result.status]
        timing = f"cached, {result.cache.get('source', '')}" if result.cached else f"{result.duration:.1f}s"
        label = f"[{style}]{LABELS[result.status]}[/{style}]"
        self.print(f"{escape(result.case.id)} {label} [dim]({escape(timing)})[/dim]")
        for note in result.notes if self.verbosity >= 0 else ():
            self.print(f"  [yellow]note:[/yellow] {escape(note)}")
        if self.verbosity > 0:
            for check in result.checks:
                mark = "[green]✓[/green]" if check.passed else "[red]✗[/red]"
                self.print(f"  {mark} {escape(check.name)}")

    def finish(
        self, run: RunResult, plan: Plan, run_dir: str, reports: list[str], fulltrace: bool = False
    ) -> None:
        """Failures and errors in detail, the reports written (or the run folder), and the summary line."""
        self._details(run, fulltrace)
        if run.interrupted:
            self.print("[yellow]Interrupted: finished cases are saved; the run folder is valid.[/yellow]")
        if run.aborted:
            self.print(f"[red]Run aborted:[/red] {escape(run.aborted)}")
        if self.verbosity >= 0:
            for report in reports:
                self.print(f"report: {escape(report)}")
            if not reports:
                self.print(f"no report; data and manifest.json are in {escape(run_dir)}")
        bad = run.count("failed") or run.count("error") or run.interrupted or run.aborted
        style = "red" if bad else "green" if run.results else "yellow"
        self.rule(f"[{style}]{escape(run.summary_line(len(plan.deselected)))}[/{style}]", style=style)

    def _details(self, run: RunResult, fulltrace: bool) -> None:
        failed = [
            r
            for r in run.results
            if r.status in {"failed", "error"} and not (run.aborted and r.error == run.aborted)
        ]
        if not failed:
            return
        self.rule("FAILURES", characters="=")
        for result in failed:
            self.rule(f"[red]{escape(result.case.id)}[/red]", characters="_")
            for check in result.checks:
                if not check.passed:
                    self.print(f"[red]expectation failed:[/red] {escape(check.name)}")
                    self.print(escape(check.explanation))
            if result.error:
                text = result.traceback if (fulltrace and result.traceback) else result.error
                self.print(escape(text))
                if result.traceback and not fulltrace:
                    self.print("[dim](full traceback in manifest.json; or rerun with --fulltrace)[/dim]")


@contextmanager
def _printing(console: Console, message: str) -> Iterator[None]:
    console.print(f"{message}…")
    yield


class _Count(MofNCompleteColumn):
    """``3/10`` for a bar with a total; nothing for a worker's line, which has none."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.total is not None else Text("")

"""The console's live display: the cases bar and one line per Ray worker."""

from __future__ import annotations

import io

from rich.console import Console

from runner.console import ConsoleReporter


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=100, highlight=False)


def shown(reporter: ConsoleReporter) -> list[str]:
    """The live display's lines as a terminal shows them now."""
    assert reporter._progress is not None
    screen = Console(file=io.StringIO(), width=100, record=True)
    screen.print(reporter._progress.get_renderable())
    return [line.rstrip() for line in screen.export_text().splitlines() if line.strip()]


def test_each_worker_gets_a_line_with_the_case_it_runs_and_loses_it_when_it_stops():
    reporter = ConsoleReporter(terminal())
    with reporter.running(3):
        reporter.worker_status("worker 1 (smollm2-135m)", "importance[aggregate_by=values]")
        reporter.worker_status("worker 2 (smollm2-135m)", "idle")
        lines = shown(reporter)
        assert lines[0].startswith("cases") and "0/3" in lines[0]
        assert lines[1].startswith("  worker 1 (smollm2-135m): importance[aggregate_by=values]")
        assert lines[2].startswith("  worker 2 (smollm2-135m): idle")
        assert not any("0/?" in line or "/1 " in line for line in lines[1:])  # no count on a worker line
        reporter.worker_status("worker 2 (smollm2-135m)", "importance[aggregate_by=gradients]")
        reporter.worker_status("worker 1 (smollm2-135m)", None)
        lines = shown(reporter)
        assert len(lines) == 2 and lines[1].startswith(
            "  worker 2 (smollm2-135m): importance[aggregate_by=grad"
        )


def test_worker_lines_are_left_out_without_a_terminal():
    console = Console(file=io.StringIO(), width=100)
    reporter = ConsoleReporter(console)
    with reporter.running(1):
        reporter.worker_status("worker 1 (m)", "case")
    assert console.file.getvalue() == ""


def test_a_worker_line_shows_how_far_its_case_is_and_restarts_for_the_next_case():
    reporter = ConsoleReporter(terminal())
    with reporter.running(2):
        reporter.worker_status("worker 1 (m)", "importance[aggregate_by=values]")
        reporter.worker_status("worker 1 (m)", "importance[aggregate_by=values]", ("batches", 3, 8))
        assert shown(reporter)[1].startswith("  worker 1 (m): importance[aggregate_by=values] · batches 3/8")
        reporter.worker_status("worker 1 (m)", "importance[aggregate_by=values]", ("batches", 5, 8))
        assert shown(reporter)[1].startswith("  worker 1 (m): importance[aggregate_by=values] · batches 5/8")
        reporter.worker_status("worker 1 (m)", "importance[aggregate_by=gradients]")
        line = shown(reporter)[1]
        assert line.startswith("  worker 1 (m): importance[aggregate_by=gradients]")
        assert "batches" not in line and "/8" not in line

"""``report.md`` and ``report.html`` rendered from the Jinja templates of the ``templates`` package.

The report templates include one partial per analysis (``templates/analyses/<name>.md.j2`` and
``.html.j2``; ``_default`` otherwise). Numbers are formatted in templates with the ``fmt`` filter.
The HTML embeds its plots as data URIs so the single file opens from disk anywhere. The templates
ship as package data, so an installed runner renders reports from any folder.
"""

from __future__ import annotations

import base64
import importlib.resources
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2

from runner.artifacts import RunFolder
from runner.executor import CaseResult, RunResult
from runner.planner import Plan

__all__ = ["environment", "fmt", "render_reports", "templates_dir"]


def templates_dir() -> Path:
    """The folder of the installed ``templates`` package (the repository's ``templates/``)."""
    return Path(str(importlib.resources.files("templates")))


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers to ``digits`` significant digits (ints unchanged); None → ``–``; others as ``str``."""
    if value is None:
        return "–"
    if isinstance(value, bool | int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 10 ** (digits + 2) or abs(value) < 1e-3):
            return f"{value:.{max(digits - 1, 0)}e}"
        return f"{value:.{digits}g}"
    return str(value)


@dataclass
class PlotView:
    """A plot as templates see it: name, path relative to the run folder, and a data URI."""

    name: str
    path: str
    root: Path

    @cached_property
    def data_uri(self) -> str:
        """The PNG as ``data:image/png;base64,...`` (read on first use)."""
        return "data:image/png;base64," + base64.b64encode((self.root / self.path).read_bytes()).decode()


@dataclass
class CaseView:
    """A case as templates see it."""

    id: str
    step_id: str
    analysis: str
    description: str
    status: str
    duration: float
    params: dict[str, Any]
    sweep_values: dict[str, Any]
    summary: dict[str, Any]
    notes: list[str]
    checks: list[Any]
    error: str | None
    traceback: str | None
    plots: list[PlotView]
    data_files: list[str]

    @classmethod
    def of(cls, result: CaseResult, root: Path) -> CaseView:
        """Build from a :class:`CaseResult`."""
        case = result.case
        plots = [PlotView(Path(p).stem, p, root) for p in result.plot_files]
        return cls(
            case.id,
            case.step.id,
            case.analysis,
            case.step.description,
            result.status,
            result.duration,
            case.params.model_dump(mode="json"),
            case.sweep_values,
            result.summary,
            result.notes,
            result.checks,
            result.error,
            result.traceback,
            plots,
            result.data_files,
        )

    def plot(self, name: str) -> PlotView | None:
        """The plot whose file stem is ``name``, if any."""
        return next((p for p in self.plots if p.name == name), None)


def environment(templates: Path | None = None) -> jinja2.Environment:
    """The Jinja environment used for reports (strict about undefined variables)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates or templates_dir()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=lambda name: bool(name and name.endswith(".html.j2")),
    )
    env.filters["fmt"] = fmt
    return env


def render_reports(
    folder: RunFolder,
    plan: Plan,
    run: RunResult,
    manifest: dict[str, Any],
    *,
    spec_text: str,
    html: bool = True,
) -> list[Path]:
    """Write ``report.md`` (and ``report.html``); returns the paths written."""
    env = environment()
    context = {
        "plan": plan,
        "spec": plan.spec,
        "manifest": manifest,
        "spec_text": spec_text,
        "cases": [CaseView.of(r, folder.root) for r in run.results],
        "summary_line": run.summary_line(len(plan.deselected)),
        "run": run,
    }
    paths = [folder.write_text("report.md", env.get_template("report.md.j2").render(context, html=False))]
    if html:
        paths.append(
            folder.write_text("report.html", env.get_template("report.html.j2").render(context, html=True))
        )
    return paths

"""``report.md`` and ``report.html`` rendered from the Jinja templates of the ``templates`` package.

The report templates include one partial per analysis (``templates/analyses/<name>.md.j2`` and
``.html.j2``; ``_default`` otherwise). Numbers are formatted in templates with the ``fmt`` filter.
The HTML embeds its plots as data URIs so the single file opens from disk anywhere. The templates
ship as package data, so an installed runner renders reports from any folder.

Reports are rendered from ``manifest.json`` and the files of the run folder alone, so ``runner
report RUN_DIR`` re-renders them without recomputing anything.
"""

from __future__ import annotations

import base64
import importlib.resources
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2

from runner.artifacts import RunFolder
from runner.executor import summary_line
from runner.spec import ExperimentSpec

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


def token(text: Any) -> str:
    """A token in double quotes, its spaces visible at the edges and its characters as they are:
    ``" ≥"``, ``"\\n"``. Unlike Jinja's ``tojson``, which writes ``<``, ``>``, ``&`` and ``'`` as
    ``\\u003c``-style escapes for scripts, this is for reading; HTML autoescaping still applies."""
    return json.dumps(str(text), ensure_ascii=False)


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
    cache: dict[str, Any] = field(default_factory=dict)
    """The case's cache record: ``key``, ``state`` (``cached`` or ``computed``), ``source``."""

    @classmethod
    def from_manifest(
        cls, planned: dict[str, Any], record: dict[str, Any], description: str, root: Path
    ) -> CaseView:
        """Build from a case of the manifest's ``plan`` and its record under ``cases``."""
        plots = [PlotView(Path(p).stem, p, root) for p in record.get("plot_files", [])]
        return cls(
            planned["id"],
            planned["step"],
            planned["analysis"],
            description,
            record.get("status", "not run"),
            float(record.get("duration_s", 0.0)),
            planned.get("params", {}),
            planned.get("sweep_values", {}),
            record.get("summary", {}),
            record.get("notes", []),
            [SimpleNamespace(**c) for c in record.get("checks", [])],
            record.get("error"),
            record.get("traceback"),
            plots,
            record.get("data_files", []),
            record.get("cache", {}),
        )

    @property
    def cached(self) -> bool:
        """Whether the case's result came from the cache."""
        return self.cache.get("state") == "cached"

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
    env.filters["token"] = token
    return env


def report_context(folder: RunFolder, manifest: dict[str, Any], spec_text: str) -> dict[str, Any]:
    """What the report templates see, built from the manifest (and the run folder's files) alone."""
    spec = ExperimentSpec.model_validate(manifest["spec"]["resolved"])
    descriptions = {step.id: step.description for step in spec.steps}
    records = manifest.get("cases", {})
    cases = [
        CaseView.from_manifest(p, records.get(p["id"], {}), descriptions.get(p["step"], ""), folder.root)
        for p in manifest.get("plan", [])
    ]
    counts = {s: int(manifest.get("totals", {}).get(s, 0)) for s in ("failed", "passed", "error", "not run")}
    cached = sum(1 for c in cases if c.cached)
    deselected = manifest.get("deselected", [])
    return {
        "plan": SimpleNamespace(source=manifest["spec"]["path"], deselected=deselected),
        "spec": spec,
        "manifest": manifest,
        "spec_text": spec_text,
        "cases": cases,
        "summary_line": summary_line(counts, cached, len(deselected), float(manifest.get("duration_s", 0.0))),
    }


def render_reports(folder: RunFolder, manifest: dict[str, Any], *, spec_text: str) -> list[Path]:
    """Write ``report.md`` (and ``report.html`` unless the spec's ``output.html`` is false)."""
    env = environment()
    context = report_context(folder, manifest, spec_text)
    paths = [folder.write_text("report.md", env.get_template("report.md.j2").render(context, html=False))]
    if context["spec"].output.html:
        paths.append(
            folder.write_text("report.html", env.get_template("report.html.j2").render(context, html=True))
        )
    return paths

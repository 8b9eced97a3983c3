"""Fixtures for CLI tests: a toy analysis that needs no model, and spec-file helpers."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict

from runner.errors import ResourceError
from runner.registry import ANALYSES, analysis
from runner.results import Array, StepResult
from runner.step import StepOutput


class ToyParams(BaseModel):
    """Parameters of the toy analysis used by the CLI tests."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    value: float = 1.0
    """A number echoed into the summary."""
    n: int = 3
    """Length of the array written."""
    fail: bool = False
    """Raise inside the analysis."""
    missing: str | None = None
    """A file the case needs that does not exist: the case raises ResourceError (bad input)."""
    interrupt: bool = False
    """Raise KeyboardInterrupt, as Ctrl-C would."""
    sleep: float = 0.0
    """Seconds to wait."""


class ToyResult(StepResult):
    """What the toy analysis returns."""

    value: float
    squares: list[float]
    layers: dict[int, dict[str, float]]
    array: Array
    """The squares again, as an array (stored in the result's NPZ)."""


def toy(ctx, params):
    """Echo a value, write a CSV, an NPZ and a plot (test-only analysis)."""
    if params.interrupt:
        raise KeyboardInterrupt
    if params.fail:
        raise ValueError(f"toy failure for value {params.value}")
    if params.missing is not None:
        raise ResourceError(f"toy case {ctx.case_id}: `missing` {params.missing} does not exist.")
    time.sleep(params.sleep)
    squares = [params.value * i * i for i in range(params.n)]
    figure = Figure()
    figure.add_subplot().plot(squares)
    ctx.note(f"toy ran with n={params.n}")
    return StepOutput(
        result=ToyResult(
            value=params.value,
            squares=squares,
            layers={0: {"max": max(squares)}},
            array=np.asarray(squares),
        ),
        data={
            "rows.csv": [{"i": i, "square": s} for i, s in enumerate(squares)],
            "rows.jsonl": [{"i": i} for i in range(params.n)],
            "arrays.npz": {"squares": squares},
        },
        plots={"squares.png": figure},
    )


class ToyTotalParams(BaseModel):
    """Parameters of the toy analysis that reads an earlier step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    """The step whose `value`s are summed."""


class ToyTotalResult(StepResult):
    """What the toy total returns."""

    total: float
    cases: list[str]
    array_sum: float
    """The sum of the upstream results' arrays, as reloaded from their NPZ files."""


def toy_total(ctx, params):
    """Sum the `value` of every finished case of an earlier step (test-only analysis)."""
    cases = ctx.outputs(params.source, ToyResult)
    return StepOutput(
        result=ToyTotalResult(
            total=sum(c.result.value for c in cases),
            cases=[c.id for c in cases],
            array_sum=float(sum(c.result.array.sum() for c in cases)),
        )
    )


if "toy" not in ANALYSES:
    analysis("toy", params=ToyParams, result=ToyResult, needs=())(toy)
    analysis("toy_total", params=ToyTotalParams, result=ToyTotalResult, needs=())(toy_total)


@pytest.fixture
def write_spec(tmp_path: Path):
    """Write a spec file from an indented YAML string; returns its path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return write


@pytest.fixture
def run_cli(tmp_path: Path, monkeypatch, capsys):
    """Run the CLI in-process from ``tmp_path``; returns (exit code, stdout, stderr)."""
    from runner.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run

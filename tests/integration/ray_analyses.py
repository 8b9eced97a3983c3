"""Test-only analyses for the Ray executor's tests, importable by a subprocess and by Ray workers.

Each appends ``start <case>`` / ``end <case>`` lines to a log file and can wait for a line another
case writes, so a test sees the order in which cases ran without relying on timing: a case that
waits for a line no other case writes in time errors after :data:`PATIENCE_S` seconds.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from runner.registry import ANALYSES, analysis
from runner.results import StepResult
from runner.step import StepOutput

PATIENCE_S = 30.0
"""How long a case waits for a line before it errors (the scheduling under test is then wrong)."""


class StampParams(BaseModel):
    """Parameters of ``stamp``: log its start and end, read steps, wait for other cases."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    log: str
    """The shared log file."""
    source: str | None = None
    """A step to read (the scheduler sees its name in the params)."""
    hidden_source: str | None = None
    """A step to read, upper-cased: the scheduler cannot tell it names a step."""
    wait_for: str | None = None
    """A line to wait for in the log before ending."""
    starts: int = 0
    """Wait until the log holds this many ``start`` lines (cases running at once)."""
    sleep: float = 0.0
    """Seconds to sleep before ending."""
    items: int = 0
    """Loop over this many items through ``ctx.progress``; after the first, wait for the line
    ``seen <case> items 1/<items>`` (written by whoever watched the progress)."""


class StampResult(StepResult):
    """What ``stamp`` read, and where it ran."""

    read: list[str]
    pid: int
    d_model: int = 0


def log_line(path: str, text: str) -> None:
    """Append one line (a single write: lines of concurrent cases do not interleave)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"{text}\n")


def wait_until(path: str, test, what: str) -> None:
    """Poll the log until ``test(lines)`` holds; TimeoutError after PATIENCE_S."""
    deadline = time.monotonic() + PATIENCE_S
    while not test(Path(path).read_text().splitlines()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {PATIENCE_S}s for {what}")
        time.sleep(0.05)


def _stamp(ctx, params: StampParams, d_model: int = 0) -> StepOutput:
    log_line(params.log, f"start {ctx.case_id}")
    read = []
    for step in (params.source, params.hidden_source.lower() if params.hidden_source else None):
        if step is not None:
            read += [c.id for c in ctx.outputs(step)]
    if params.wait_for is not None:
        wait_until(params.log, lambda lines: params.wait_for in lines, repr(params.wait_for))
    if params.starts:
        count = params.starts
        wait_until(params.log, lambda lines: sum(x.startswith("start") for x in lines) >= count, "starts")
    seen = f"seen {ctx.case_id} items 1/{params.items}"
    for index in ctx.progress(range(params.items), params.items, "items"):
        if index == 1:
            wait_until(params.log, lambda lines: seen in lines, repr(seen))
    time.sleep(params.sleep)
    log_line(params.log, f"end {ctx.case_id}")
    return StepOutput(result=StampResult(read=read, pid=os.getpid(), d_model=d_model))


def stamp(ctx, params: StampParams) -> StepOutput:
    """Log start and end; optionally read steps and wait for lines of other cases."""
    return _stamp(ctx, params)


def model_stamp(ctx, params: StampParams) -> StepOutput:
    """``stamp`` on a worker that loads the case's model (its d_model goes into the result)."""
    return _stamp(ctx, params, d_model=int(ctx.model.model.cfg.d_model))


class DieOnceParams(BaseModel):
    """Parameters of an analysis whose worker process dies the first time it runs a case."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    marker: str
    """A file: absent, the case creates it and kills its own process; present, the case returns."""
    value: float = 1.0
    always: bool = False
    """Kill the process on every attempt."""


class DieOnceResult(StepResult):
    value: float
    pid: int


def die_once(ctx, params):
    """SIGKILL this process on the first attempt (as an OOM killer or a lost node would)."""
    marker = Path(params.marker)
    if params.always or not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return StepOutput(result=DieOnceResult(value=params.value * 2, pid=os.getpid()))


if "die_once" not in ANALYSES:
    analysis("die_once", params=DieOnceParams, result=DieOnceResult, needs=())(die_once)


if "stamp" not in ANALYSES:
    analysis("stamp", params=StampParams, result=StampResult, needs=())(stamp)
    analysis("model_stamp", params=StampParams, result=StampResult, needs=("model",))(model_stamp)

"""Two runs of one spec at once share the result cache without waiting for each other's cases."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from runner.cli import main
from runner.load import run_dirs
from runner.registry import ANALYSES, analysis
from runner.results import StepResult
from runner.step import StepOutput

MEETING = threading.Barrier(2, timeout=30)
"""Both runs' cases must be inside the analysis at once to pass it."""


class MeetParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    value: float = 1.0


class MeetResult(StepResult):
    value: float


def meet(ctx, params):
    """Wait inside the case until the other run's case is inside it too (BrokenBarrierError if never)."""
    MEETING.wait()
    return StepOutput(result=MeetResult(value=params.value * 2))


if "meet" not in ANALYSES:
    analysis("meet", params=MeetParams, result=MeetResult, needs=())(meet)


def test_two_runs_of_one_spec_compute_at_once_and_store_one_entry(write_spec, tmp_path):
    spec = write_spec("name: meeting\nsteps:\n  - id: meet\n    analysis: meet\n    params: {value: 3.0}\n")
    codes: dict[str, int] = {}

    def run(name: str) -> None:
        codes[name] = main(["run", str(spec), "-q", "--output-dir", str(tmp_path / name)])

    threads = [threading.Thread(target=run, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Had the first run held the entry's lock while computing, the second could not have entered
    # its case, and the barrier would have broken after 30 s (both cases errors, exit 1).
    assert codes == {"first": 0, "second": 0}
    for name in ("first", "second"):
        record = json.loads((run_dirs(tmp_path / name, "meeting")[-1] / "manifest.json").read_text())
        assert record["cases"]["meet"]["cache"]["state"] == "computed"
        assert record["cases"]["meet"]["summary"]["value"] == 6.0
    entries = list((Path(os.environ["RUNNER_RESULTS_CACHE"]) / "entries").glob("*/*"))
    assert len(entries) == 1  # the second store replaced the first: one entry, complete
    assert not list((Path(os.environ["RUNNER_RESULTS_CACHE"]) / "tmp").iterdir())
    MEETING.reset()
    assert main(["run", str(spec), "-q", "--output-dir", str(tmp_path / "third")]) == 0  # from the cache
    third = json.loads((run_dirs(tmp_path / "third", "meeting")[-1] / "manifest.json").read_text())
    assert third["cases"]["meet"]["cache"]["state"] == "cached"

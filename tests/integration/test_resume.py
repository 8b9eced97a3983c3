"""Resume after SIGKILL: a real `runner run` process killed at a chosen moment, then `runner run` again.

The killed process is a subprocess whose script pauses at the moment under test (writing a marker
file first) so that the kill lands exactly there: inside a case, inside the writing of a cache
entry (its files written to the temporary folder, not yet renamed into place), or between cases.
The resumed run must lose no finished case and give the results an uninterrupted run gives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from runner.load import run_dirs

TOY = """
name: resume
steps:
  - id: toy
    analysis: toy
    params: {n: 5}
    sweep:
      product:
        value: [1.0, 2.0, 3.0]
  - id: total
    analysis: toy_total
    params: {source: toy}
"""

PAUSES = {
    # the third case's analysis is running
    "in a case": """
from runner.registry import ANALYSES
toy = ANALYSES.get("toy")
original = toy.func
def func(ctx, params):
    if params.value == 3.0:
        pause()
    return original(ctx, params)
object.__setattr__(toy, "func", func)
""",
    # the second case's entry is complete in cache/tmp/ but not renamed into place
    "writing an entry": """
import runner.cache
original = runner.cache._fsync_tree
calls = []
def fsync_tree(root):
    calls.append(root)
    if len(calls) == 2:
        pause()
    return original(root)
runner.cache._fsync_tree = fsync_tree
""",
    # the second case is stored and the third not started
    "between cases": """
import runner.executor
original = runner.executor._run_cached
calls = []
def run_cached(result, *args, **kwargs):
    calls.append(result)
    if len(calls) == 3:
        pause()
    return original(result, *args, **kwargs)
runner.executor._run_cached = run_cached
""",
}

SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {conftest_dir!r})
import conftest  # registers the toy analyses
from runner.cli import main

def pause():
    Path({marker!r}).write_text("paused")
    time.sleep(300)

{pause}
sys.exit(main(["run", {spec!r}, "-q"]))
"""


def run_until_killed(spec: Path, cwd: Path, moment: str, pause: str | None = None) -> None:
    """Start ``runner run spec`` in a subprocess, SIGKILL it once it reaches ``moment``."""
    marker = cwd / f"paused-{moment.replace(' ', '-')}"
    script = SCRIPT.format(
        conftest_dir=str(Path(__file__).parent),
        marker=str(marker),
        spec=str(spec),
        pause=pause or PAUSES[moment],
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=cwd, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the run never reached the moment {moment!r}: {process.communicate()[0]}"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def stored_results(folder: Path) -> dict[str, bytes]:
    """Every result and data file of a run folder (what must equal an uninterrupted run's)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return {
        name: (folder / name).read_bytes()
        for record in manifest["cases"].values()
        for name in record["result_files"] + record["data_files"]
    }


@pytest.mark.parametrize(
    ("moment", "from_cache"),
    [
        ("in a case", ["toy[value=1.0]", "toy[value=2.0]"]),
        ("writing an entry", ["toy[value=1.0]"]),
        ("between cases", ["toy[value=1.0]", "toy[value=2.0]"]),
    ],
)
def test_a_run_killed_with_sigkill_resumes_without_losing_finished_cases(
    moment, from_cache, write_spec, run_cli, tmp_path
):
    spec = write_spec(TOY)
    run_until_killed(spec, tmp_path, moment)
    (killed,) = run_dirs(tmp_path / "runs", "resume")
    assert json.loads((killed / "manifest.json").read_text())["status"] == "running"  # complete JSON
    leftovers = list((Path(os.environ["RUNNER_RESULTS_CACHE"]) / "tmp").glob("*"))
    assert len(leftovers) == (1 if moment == "writing an entry" else 0)  # the kill landed mid-write

    code, out, _ = run_cli("run", spec)
    assert code == 0, out
    resumed = json.loads((run_dirs(tmp_path / "runs", "resume")[-1] / "manifest.json").read_text())
    cached = [case_id for case_id, r in resumed["cases"].items() if r["cache"]["state"] == "cached"]
    assert cached == from_cache
    assert not list((Path(os.environ["RUNNER_RESULTS_CACHE"]) / "tmp").iterdir())  # the dead write is gone

    run_cli("run", spec, "--no-cache")
    resumed_dir, uninterrupted_dir = run_dirs(tmp_path / "runs", "resume")[-2:]
    # The same computation on the same machine: the stored bytes are identical.
    assert stored_results(resumed_dir) == stored_results(uninterrupted_dir)


TINY = """
name: tiny-resume
model: {{name: {model}, device: cpu}}
dataset: {{name: data.txt, max_passages: 4, max_len: 16}}
steps:
  - id: importance
    analysis: activation_importance
    params: {{layers: "0-1", batch_size: 2, layer_histograms: false}}
    sweep:
      product:
        aggregate_by: [values, gradients]
"""


def test_a_real_model_run_killed_between_cases_resumes_to_the_uninterrupted_results(
    tiny_llama_dir, write_spec, run_cli, tmp_path
):
    (tmp_path / "data.txt").write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 100))
    spec = write_spec(TINY.format(model=tiny_llama_dir))
    pause = textwrap.dedent(PAUSES["between cases"]).replace("len(calls) == 3", "len(calls) == 2")
    run_until_killed(spec, tmp_path, "between cases", pause)

    code, out, _ = run_cli("run", spec)
    assert code == 0, out
    assert "importance[aggregate_by=values] PASSED (cached, computed" in out
    assert "importance[aggregate_by=gradients] PASSED (cached" not in out
    run_cli("run", spec, "--no-cache")
    resumed, uninterrupted = run_dirs(tmp_path / "runs", "tiny-resume")[-2:]
    manifest = json.loads((resumed / "manifest.json").read_text())
    model = manifest["provenance"]["models"][str(tiny_llama_dir)]
    assert len(model["sha256"]) == 64 and model["device"] == "cpu" and model["dtype"] == "float32"
    for case_id, record in manifest["cases"].items():
        for name in record["result_files"]:
            if name.endswith(".npz"):
                old, new = np.load(resumed / name), np.load(uninterrupted / name)
                # Same computation, same process layout and thread count: exactly equal.
                assert all(np.array_equal(old[k], new[k]) for k in old.files), case_id
            else:
                assert (resumed / name).read_bytes() == (uninterrupted / name).read_bytes(), name

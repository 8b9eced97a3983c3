"""`runner run --executor ray` on a local Ray instance started by the tests (2 CPUs, loopback only).

Toy analyses (no model) keep these fast; the workers are real Ray actor processes.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from runner.registry import ANALYSES, analysis
from runner.results import StepResult
from runner.step import StepOutput

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

CHAIN = """
name: chain
seed: 7
steps:
  - id: toy
    analysis: toy
    params: {n: 4}
    resources: {num_cpus: 1}  # the default: both steps share their workers
    sweep:
      product:
        value: [1.0, 2.0, 3.0]
  - id: total
    analysis: toy_total
    params: {source: toy}
expectations:
  - step: toy
    name: biggest square above ten
    that: "max(squares) > 10"
"""


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


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module: 2 CPUs, loopback, no dashboard."""
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def newest_run(tmp_path: Path, name: str = "chain") -> Path:
    from runner.load import run_dirs

    return run_dirs(tmp_path / "runs", name)[-1]


def case_records(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())["cases"]


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every result, data and plot file of a run folder, by path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for kind in ("results", "data", "plots")
        for p in sorted((folder / kind).rglob("*"))
        if p.is_file()
    }


def test_ray_run_gives_the_same_results_and_files_as_a_local_run(local_ray, write_spec, run_cli, tmp_path):
    spec = write_spec(CHAIN)
    local_code, _, _ = run_cli("run", spec, "--no-cache")
    local = newest_run(tmp_path)
    ray_code, out, err = run_cli("run", spec, "--no-cache", "--executor", "ray")
    remote = newest_run(tmp_path)
    assert remote != local
    assert ray_code == local_code == 1, out + err  # toy[value=1.0] fails its expectation in both
    local_cases, ray_cases = case_records(local), case_records(remote)
    assert list(ray_cases) == list(local_cases)
    for case_id, record in local_cases.items():
        for key in ("status", "summary", "checks", "result_files", "data_files", "plot_files", "notes"):
            assert ray_cases[case_id][key] == record[key], (case_id, key)
    # The same computation in both (the toy's numbers are exact), so files are byte-equal,
    # the total's included: it read the Ray workers' results back in plan order.
    assert folder_files(remote) == folder_files(local)
    total = json.loads((remote / "results" / "total.json").read_text())
    assert total["total"] == 6.0 and total["cases"] == [c for c in local_cases if c.startswith("toy[")]


def test_cached_cases_are_not_sent_to_workers(local_ray, write_spec, run_cli, tmp_path):
    spec = write_spec(CHAIN.replace("value: [1.0, 2.0, 3.0]", "value: [2.0, 3.0]"))
    assert run_cli("run", spec)[0] == 0
    first = newest_run(tmp_path)
    # One more sweep value: only the new toy case and the total that reads it are computed.
    spec.write_text(spec.read_text().replace("value: [2.0, 3.0]", "value: [2.0, 3.0, 4.0]"))
    code, out, err = run_cli("run", spec, "--executor", "ray")
    assert code == 0, out + err
    records = case_records(newest_run(tmp_path))
    states = {case_id: r["cache"]["state"] for case_id, r in records.items()}
    assert states == {
        "toy[value=2.0]": "cached",
        "toy[value=3.0]": "cached",
        "toy[value=4.0]": "computed",
        "total": "computed",
    }
    assert records["toy[value=2.0]"]["cache"]["run_dir"] == str(first.resolve())
    assert json.loads((newest_run(tmp_path) / "results" / "total.json").read_text())["total"] == 9.0
    # A third run under Ray computes nothing: every case is restored on the driver.
    code, out, _ = run_cli("run", spec, "--executor", "ray")
    assert code == 0
    assert {r["cache"]["state"] for r in case_records(newest_run(tmp_path)).values()} == {"cached"}


def test_a_killed_worker_is_replaced_and_a_raising_case_is_an_error_not_retried(
    local_ray, write_spec, run_cli, tmp_path
):
    spec = write_spec(
        f"""
        name: dies
        steps:
          - id: die
            analysis: die_once
            params: {{marker: {tmp_path / "died"}}}
            sweep:
              product:
                value: [1.0, 2.0]
          - id: toy
            analysis: toy
            params: {{fail: true}}
          - id: always
            analysis: die_once
            params: {{marker: {tmp_path / "always"}, always: true}}
        """
    )
    code, out, err = run_cli("run", spec, "--executor", "ray")
    assert code == 1, out + err  # the raising case
    killed = int((tmp_path / "died").read_text())
    records = case_records(newest_run(tmp_path, "dies"))
    died = {case_id: r for case_id, r in records.items() if case_id.startswith("die[")}
    assert {case_id: r["status"] for case_id, r in died.items()} == {
        "die[value=1.0]": "passed",
        "die[value=2.0]": "passed",
    }
    assert {case_id: r["summary"]["value"] for case_id, r in died.items()} == {
        "die[value=1.0]": 2.0,
        "die[value=2.0]": 4.0,
    }
    assert all(r["summary"]["pid"] != killed for r in died.values())
    retried = [r for r in died.values() if any("Ray worker died" in n for n in r["notes"])]
    assert len(retried) == 1
    failed = records["toy"]
    assert failed["status"] == "error"
    assert failed["error"] == "ValueError: toy failure for value 1.0"
    assert not any("Ray worker died" in n for n in failed["notes"])
    # A case that kills every worker it runs on is tried 1 + MAX_RETRIES times, then an error.
    from runner.ray_executor import MAX_RETRIES

    always = records["always"]
    assert always["status"] == "error"
    assert always["error"].startswith(f"its Ray worker died {MAX_RETRIES + 1} times")
    assert sum("Ray worker died" in n for n in always["notes"]) == MAX_RETRIES


def test_a_bad_resources_block_is_a_located_spec_error(write_spec, run_cli):
    spec = write_spec(
        """
        name: bad
        steps:
          - id: toy
            analysis: toy
            resources:
              num_gpus: -1
              memory: lots
        """
    )
    code, out, err = run_cli("validate", spec)
    assert code == 2
    assert f"{spec}:6:17: steps[0].resources.num_gpus:" in out
    assert f"{spec}:7:15: steps[0].resources.memory:" in out


def test_address_without_the_ray_executor_is_a_usage_error(write_spec, run_cli, tmp_path):
    spec = write_spec("name: plain\nsteps:\n  - id: toy\n    analysis: toy\n")
    code, out, err = run_cli("run", spec, "--address", "auto")
    assert code == 2
    assert "--address names a Ray cluster: use it with --executor ray." in err
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made

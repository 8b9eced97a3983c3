"""`runner run --executor ray` on a local Ray instance started by the tests (2 CPUs, loopback only).

Toy analyses (no model) keep these fast; the workers are real Ray actor processes. The analyses in
``ray_analyses.py`` log when each case starts and ends and wait for each other's lines, so the tests
check the order in which cases ran without relying on timing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import ray_analyses  # noqa: E402  (registers stamp, model_stamp and die_once)

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


def test_the_manifest_records_each_workers_process_host_and_torch_settings(
    local_ray, write_spec, run_cli, tmp_path
):
    import torch

    from runner.manifest import cpu_model

    spec = write_spec(CHAIN)
    assert run_cli("run", spec, "--no-cache", "--executor", "ray")[0] == 1
    workers = json.loads((newest_run(tmp_path) / "manifest.json").read_text())["environment"]["workers"]
    assert sorted(c for w in workers for c in w["cases"]) == sorted(case_records(newest_run(tmp_path)))
    for worker in workers:
        assert worker["pid"] != os.getpid() and worker["hostname"] == socket.gethostname()
        assert worker["cpu"] == cpu_model() and worker["device"] == "cpu"
        assert worker["torch_version"] == torch.__version__
        assert worker["torch"]["threads"] == 1  # Ray gives an actor num_cpus threads: one by default
        assert worker["resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert run_cli("run", spec, "--no-cache")[0] == 1
    local = json.loads((newest_run(tmp_path) / "manifest.json").read_text())["environment"]
    assert "workers" not in local  # a local run has none


DEPENDENT = """
name: deps
steps:
  - id: slow  # ends only once total ended: total must not wait for it
    analysis: stamp
    params: {{log: {log}, wait_for: end total}}
    resources: {{num_cpus: 0.5}}
  - id: fast  # ends only once hidden started: hidden is sent before fast finished
    analysis: stamp
    params: {{log: {log}, wait_for: start hidden}}
    resources: {{num_cpus: 0.5}}
  - id: hidden  # reads fast under a name the scheduler cannot see
    analysis: stamp
    params: {{log: {log}, hidden_source: FAST}}
    resources: {{num_cpus: 0.5}}
  - id: total  # reads fast: sent as soon as fast finished
    analysis: stamp
    params: {{log: {log}, source: fast}}
    resources: {{num_cpus: 0.5}}
"""


def test_a_case_is_sent_once_what_it_reads_finished_not_after_every_earlier_case(
    local_ray, write_spec, run_cli, tmp_path, monkeypatch
):
    from runner.console import ConsoleReporter

    shown: list[tuple[str, str | None]] = []
    monkeypatch.setattr(
        ConsoleReporter, "worker_status", lambda self, w, doing, progress=None: shown.append((w, doing))
    )
    log = tmp_path / "events.log"
    log.write_text("")
    code, out, err = run_cli("run", write_spec(DEPENDENT.format(log=log)), "--executor", "ray")
    assert code == 0, out + err
    events = log.read_text().splitlines()
    assert events.index("end total") < events.index("end slow")
    # hidden started while fast ran, found it unfinished, and was sent again once it had finished
    assert events.count("start hidden") == 2
    assert events.index("start hidden") < events.index("end fast") < events.index("end hidden")
    records = case_records(newest_run(tmp_path, "deps"))
    assert {case_id: r["status"] for case_id, r in records.items()} == dict.fromkeys(
        ["slow", "fast", "hidden", "total"], "passed"
    )
    assert records["hidden"]["summary"]["read"] == records["total"]["summary"]["read"] == ["fast"]
    assert records["hidden"]["notes"] == []  # the resend is the scheduler's business, not the case's
    # The console was told which worker ran what, and every worker's line was removed at the end.
    running = {doing for _, doing in shown if doing not in (None, "idle")}
    assert running == {"slow", "fast", "hidden", "total"}
    workers = {w for w, _ in shown}
    assert len(workers) >= 3 and all(w.startswith("worker ") for w in workers)
    assert all([d for w2, d in shown if w2 == w][-1] is None for w in workers)


PROGRESS = """
name: progress
steps:
  - id: loop
    analysis: stamp
    params: {{log: {log}, items: 3}}
"""


def test_the_console_shows_how_far_a_workers_case_is(local_ray, write_spec, run_cli, tmp_path, monkeypatch):
    from runner.console import ConsoleReporter

    log = tmp_path / "events.log"
    log.write_text("")
    shown: list[tuple[str, str | None, object]] = []

    def worker_status(self, worker, doing, progress=None):
        shown.append((worker, doing, progress))
        if progress is not None:  # the case waits for this line after its first item
            ray_analyses.log_line(str(log), f"seen {doing} {progress[0]} {progress[1]}/{progress[2]}")

    monkeypatch.setattr(ConsoleReporter, "worker_status", worker_status)
    code, out, err = run_cli("run", write_spec(PROGRESS.format(log=log)), "--executor", "ray")
    assert code == 0, out + err
    # The driver asked the worker while the case ran and showed what it answered: one item done of
    # three (the case could not go on before), then the worker's line was removed.
    answers = {(w.split(" (")[0], doing, progress) for w, doing, progress in shown if progress}
    assert ("worker 1", "loop", ("items", 1, 3)) in answers  # asked again while it waited: same answer
    assert answers <= {("worker 1", "loop", ("items", done, 3)) for done in (1, 2, 3)}
    assert "seen loop items 1/3" in log.read_text().splitlines()
    assert shown[-1][1] is None


KEPT = """
name: kept
steps:
  - id: only
    analysis: stamp
    params: {{log: {log}}}
"""


def test_ctrl_c_keeps_a_case_whose_result_had_come_back(
    local_ray, write_spec, run_cli, tmp_path, monkeypatch
):
    from runner import ray_executor

    def interrupted_once_returned(self, timeout):
        self._pump()
        ray.wait(list(self.inflight), num_returns=len(self.inflight))  # the case has returned...
        raise KeyboardInterrupt  # ...and Ctrl-C comes before the driver took its result

    monkeypatch.setattr(ray_executor._Pool, "wait", interrupted_once_returned)
    log = tmp_path / "events.log"
    log.write_text("")
    code, out, err = run_cli("run", write_spec(KEPT.format(log=log)), "--executor", "ray")
    assert code == 2, out + err  # interrupted
    record = case_records(newest_run(tmp_path, "kept"))["only"]
    assert record["status"] == "passed" and record["cache"]["state"] == "computed"
    assert record["summary"]["pid"] != os.getpid()  # computed on a worker, not again here
    assert log.read_text().splitlines() == ["start only", "end only"]
    assert run_cli("plan", tmp_path / "spec.yaml")[1].count("cached") >= 1  # and stored in the cache


SCRIPT = """
import sys
sys.path.insert(0, {here!r})
import ray_analyses  # registers stamp and model_stamp
from runner.cli import main
sys.exit(main(["run", {spec!r}, "--executor", "ray"]))
"""

PAIR = """
name: pair
model: {{name: {a}, device: cpu}}
sweep:
  product:
    model.name: [{a}, {b}]
steps:
  - id: meet  # each model's case ends only once both have started: they run side by side
    analysis: model_stamp
    params: {{log: {log}, starts: 2}}
  - id: wait
    analysis: stamp
    params: {{log: {log}, sleep: 300}}
"""


@pytest.fixture(scope="module")
def interrupted_pair(tiny_llama_dir, tmp_path_factory):
    """A subprocess runs two tiny models' cases on Ray, then a long case; Ctrl-C (SIGINT) while it runs."""
    root = tmp_path_factory.mktemp("pair")
    for name in ("model-a", "model-b"):  # two models to runner (two names), the same tiny weights
        (root / name).symlink_to(tiny_llama_dir, target_is_directory=True)
    log = root / "events.log"
    log.write_text("")
    spec = root / "pair.yaml"
    spec.write_text(PAIR.format(a=root / "model-a", b=root / "model-b", log=log))
    script = SCRIPT.format(here=str(Path(__file__).parent), spec=str(spec))
    env = {**os.environ, "RUNNER_RESULTS_CACHE": str(root / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=root,
        env=env,
        text=True,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # Ctrl-C once the long case runs and the driver has recorded both finished cases (a case that
    # logged its end may still be on its way back to the driver: then it is rightly "not run").
    deadline = time.monotonic() + 180
    while not _meets_recorded(root, log) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _meets_recorded(root, log), process.communicate(timeout=60)[0]
    interrupted = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
    output = process.communicate(timeout=120)[0]
    (folder,) = (root / "runs" / "pair").iterdir()
    return {
        "code": process.returncode,
        "output": output,
        "seconds": time.monotonic() - interrupted,
        "folder": folder,
        "manifest": json.loads((folder / "manifest.json").read_text()),
        "models": (str(root / "model-a"), str(root / "model-b")),
        "cache": root / "cache",
    }


def _meets_recorded(root: Path, log: Path) -> bool:
    """Whether the long case started and the run's manifest records both ``meet`` cases as passed."""
    if "start wait" not in log.read_text():
        return False
    try:
        (manifest,) = (root / "runs" / "pair").glob("*/manifest.json")
        cases = json.loads(manifest.read_text())["cases"]
    except (ValueError, OSError):  # no folder yet, or a manifest being replaced
        return False
    meets = [r for case_id, r in cases.items() if case_id.startswith("meet[")]
    return len(meets) == 2 and all(r["status"] == "passed" for r in meets)


def test_ctrl_c_stops_the_workers_and_keeps_the_finished_cases(interrupted_pair):
    run = interrupted_pair
    assert run["code"] == 2, run["output"]  # pytest's "interrupted"
    assert run["seconds"] < 60  # the 300 s case was cancelled, not awaited
    manifest = run["manifest"]
    assert manifest["status"] == "interrupted"
    cases = manifest["cases"]
    assert cases["wait"]["status"] == "not run"
    assert cases["wait"]["error"] == "interrupted by the user (Ctrl-C)"
    meets = {case_id: r for case_id, r in cases.items() if case_id.startswith("meet[")}
    assert len(meets) == 2
    for record in meets.values():
        assert record["status"] == "passed" and record["cache"]["state"] == "computed"
        assert record["result_files"] and all((run["folder"] / n).is_file() for n in record["result_files"])
        entry = run["cache"] / "entries" / record["cache"]["key"][:2] / record["cache"]["key"]
        assert (entry / "entry.json").is_file()
    assert "Interrupted: finished cases are saved" in run["output"]


def test_two_models_run_side_by_side_on_their_own_workers(interrupted_pair):
    manifest = interrupted_pair["manifest"]
    meets = [r for case_id, r in manifest["cases"].items() if case_id.startswith("meet[")]
    # Each case waited until both had started, so both passing means they ran at the same time.
    assert [r["status"] for r in meets] == ["passed", "passed"]
    assert len({r["summary"]["pid"] for r in meets}) == 2
    assert all(r["summary"]["d_model"] > 0 for r in meets)
    workers = manifest["environment"]["workers"]
    by_model = {w["model"]: w for w in workers if any(c.startswith("meet[") for c in w["cases"])}
    assert sorted(by_model) == sorted(interrupted_pair["models"])
    assert {w["pid"] for w in by_model.values()} == {r["summary"]["pid"] for r in meets}


def test_a_case_reading_a_step_the_plan_lacks_errors_as_in_a_local_run(
    local_ray, write_spec, run_cli, tmp_path
):
    log = tmp_path / "events.log"
    log.write_text("")
    spec = write_spec(
        f"""
        name: missing
        steps:
          - id: hidden  # reads step "nosuch" under a name the scheduler cannot see
            analysis: stamp
            params: {{log: {log}, hidden_source: NOSUCH}}
        """
    )
    code, out, err = run_cli("run", spec, "--executor", "ray")
    assert code == 1, out + err
    (record,) = case_records(newest_run(tmp_path, "missing")).values()
    assert record["status"] == "error"
    assert record["error"].startswith("Step 'nosuch' has no finished case in this run, but case hidden needs")
    assert log.read_text().splitlines().count("start hidden") == 2  # sent once more, with the (empty) step


BROKEN = """
import os

if os.getpid() != {pid}:
    raise RuntimeError("this module imports only in the driver")

from ray_analyses import StampParams, StampResult, stamp
from runner.registry import ANALYSES, analysis


def broken(ctx, params):
    '''stamp, from a module that imports only in the driver.'''
    return stamp(ctx, params)


if "broken_on_workers" not in ANALYSES:
    analysis("broken_on_workers", params=StampParams, result=StampResult, needs=())(broken)
"""


def test_a_worker_that_cannot_start_errors_its_case_with_the_cause_without_retrying(
    local_ray, write_spec, run_cli, tmp_path, monkeypatch
):
    import importlib

    (tmp_path / "broken_module.py").write_text(BROKEN.format(pid=os.getpid()))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("broken_module")  # registers the analysis here; a worker's import raises
    log = tmp_path / "log"
    spec = write_spec(
        f"name: broken\nsteps:\n  - id: b\n    analysis: broken_on_workers\n    params: {{log: {log}}}\n"
    )
    code, out, err = run_cli("run", spec, "--executor", "ray")
    assert code == 1, out + err
    (record,) = case_records(newest_run(tmp_path, "broken")).values()
    assert record["status"] == "error"
    assert (
        record["error"]
        == "its Ray worker could not start: RuntimeError: this module imports only in the driver"
    )
    assert record["notes"] == []  # not retried


def test_an_analysis_the_workers_do_not_know_errors_its_case_instead_of_the_run(
    local_ray, write_spec, run_cli, tmp_path
):
    from runner.registry import ANALYSES, analysis

    if "driver_only" not in ANALYSES:  # registered here only: ray_analyses, which workers import, lacks it
        analysis("driver_only", params=ray_analyses.StampParams, result=ray_analyses.StampResult, needs=())(
            ray_analyses.stamp
        )
    log = tmp_path / "log"
    spec = write_spec(
        f"name: unknown\nsteps:\n  - id: d\n    analysis: driver_only\n    params: {{log: {log}}}\n"
    )
    code, out, err = run_cli("run", spec, "--executor", "ray")
    assert code == 1, out + err
    (record,) = case_records(newest_run(tmp_path, "unknown")).values()
    assert record["status"] == "error"
    assert record["error"].startswith("Unknown analysis 'driver_only'.")
    assert "Traceback" not in out + err

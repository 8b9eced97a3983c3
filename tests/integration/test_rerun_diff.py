"""`runner rerun`, `runner diff`, `runner report` and `runner.load_run` on toy run folders (in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import runner
from runner.errors import RunnerError
from runner.load import run_dirs

SPEC = """
name: rec
seed: 3
steps:
  - id: toy
    analysis: toy
    params: {n: 4}
    sweep:
      product:
        value: [1.5, 2.0]
  - id: total
    analysis: toy_total
    params: {source: toy}
"""


@pytest.fixture
def recorded(write_spec, run_cli, tmp_path) -> Path:
    code, out, _ = run_cli("run", write_spec(SPEC))
    assert code == 0, out
    return run_dirs(tmp_path / "runs", "rec")[-1]


def test_rerun_recomputes_without_the_cache_and_reports_every_number_reproduced(recorded, run_cli, tmp_path):
    code, out, _ = run_cli("rerun", recorded)
    assert code == 0, out
    assert "toy[value=1.5] REPRODUCED" in out and "total REPRODUCED" in out
    assert "3 reproduced in" in out.splitlines()[-1]
    new = run_dirs(tmp_path / "runs", "rec")[-1]
    assert new != recorded
    states = {r["cache"]["state"] for r in json.loads((new / "manifest.json").read_text())["cases"].values()}
    assert states == {"not stored"}  # computed again, the cache neither read nor written


def test_rerun_names_each_number_that_did_not_reproduce(recorded, run_cli):
    stored = recorded / "results" / "toy[value=2.0].json"
    result = json.loads(stored.read_text())
    result["squares"][3] = 18.5  # recorded 18.0
    stored.write_text(json.dumps(result))
    rows = recorded / "data" / "toy[value=2.0]" / "rows.csv"
    rows.write_text(rows.read_text().replace("8.0", "8.001"))
    code, out, _ = run_cli("rerun", recorded)
    assert code == 1
    assert "toy[value=2.0] NOT REPRODUCED" in out and "toy[value=1.5] REPRODUCED" in out
    (row,) = [line.split() for line in out.splitlines() if "squares[3]" in line]
    assert row == ["result.json", "squares[3]", "18.5", "18", "Δ", "-0.5", "(rel", "0.027)"]
    assert "rows.csv" in out and "square[2]" in out and "8.001" in out
    assert "1 not reproduced" in out.splitlines()[-1]
    code, out, _ = run_cli("rerun", recorded, "--rtol", "0.05")
    assert code == 0, out  # 0.5 in 18.5 and 0.001 in 8 are within 5%


def test_a_step_tolerance_in_the_spec_applies_and_the_command_line_overrides_it(recorded, run_cli):
    stored = recorded / "results" / "toy[value=2.0].json"
    result = json.loads(stored.read_text())
    result["squares"][3] = 18.5  # recorded 18.0
    stored.write_text(json.dumps(result))
    spec = recorded / "spec.yaml"
    spec.write_text(
        spec.read_text().replace("    params: {n: 4}\n", "    params: {n: 4}\n    tolerance: {rtol: 0.05}\n")
    )
    assert "tolerance: {rtol: 0.05}" in spec.read_text()
    code, out, _ = run_cli("rerun", recorded)
    assert code == 0, out  # 0.5 in 18.5 is within the step's 5%
    code, out, _ = run_cli("rerun", recorded, "--rtol", "0.001")
    assert code == 1 and "toy[value=2.0] NOT REPRODUCED" in out


def test_diff_lists_spec_changes_and_numeric_differences_and_writes_html(
    recorded, write_spec, run_cli, tmp_path
):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("n: 4", "n: 5"))
    run_cli("run", spec)
    other = run_dirs(tmp_path / "runs", "rec")[-1]
    code, out, _ = run_cli("diff", recorded, other, "--html", tmp_path / "d.html")
    assert code == 1
    assert "spec.steps[0].params.n" in out and "4" in out and "5" in out
    assert "total: 1 differences" in out and "array_sum" in out
    html = (tmp_path / "d.html").read_text()
    assert "spec.steps[0].params.n" in html and "<script" not in html and "array_sum" in html
    code, out, _ = run_cli("diff", recorded, recorded, "--html", tmp_path / "same.html")
    assert code == 0 and "no difference" in out and "toy[value=2.0]: identical" in out


def test_report_is_rerendered_from_the_stored_data(recorded, run_cli):
    before = {name: (recorded / name).read_text() for name in ("report.md", "report.html")}
    for name in before:
        (recorded / name).unlink()
    code, out, _ = run_cli("report", recorded)
    assert code == 0 and "report.html" in out
    assert {name: (recorded / name).read_text() for name in before} == before


def test_load_run_gives_results_summaries_tables_and_arrays(recorded, tmp_path, monkeypatch):
    loaded = runner.load_run(recorded)
    assert loaded.status == "passed" and set(loaded.cases) == {"toy[value=1.5]", "toy[value=2.0]", "total"}
    case = loaded.cases["toy[value=2.0]"]
    assert case.result.squares == [0.0, 2.0, 8.0, 18.0] and case.result.array.tolist() == case.result.squares
    assert case.summary["value"] == 2.0 and case.params["n"] == 4
    pd.testing.assert_frame_equal(
        case.tables["rows.csv"], pd.DataFrame({"i": range(4), "square": case.result.squares})
    )
    assert case.arrays["arrays.npz"]["squares"].tolist() == case.result.squares
    assert "rows.csv" not in case.arrays and "arrays.npz" not in case.tables
    monkeypatch.chdir(tmp_path)
    assert runner.load_run(tmp_path / "spec.yaml").path.resolve() == recorded  # the spec's newest run


def test_load_run_refuses_pickled_arrays(recorded):
    np.save(
        recorded / "data" / "toy[value=2.0]" / "rows.npy",
        np.array([{"a": 1}], dtype=object),
        allow_pickle=True,
    )
    manifest = json.loads((recorded / "manifest.json").read_text())
    manifest["cases"]["toy[value=2.0]"]["data_files"].append("data/toy[value=2.0]/rows.npy")
    (recorded / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunnerError, match="runner never unpickles"):
        runner.load_run(recorded).cases["toy[value=2.0]"].arrays["rows.npy"]


@pytest.mark.parametrize("command", ["report", "rerun"])
def test_a_folder_that_is_not_a_run_folder_is_exit_2(command, run_cli, tmp_path):
    code, _, err = run_cli(command, tmp_path)
    assert code == 2
    assert f"{tmp_path} is not a run folder: it has no manifest.json" in " ".join(err.split())


def test_a_manifest_from_a_newer_runner_is_refused(recorded, run_cli):
    manifest = json.loads((recorded / "manifest.json").read_text())
    (recorded / "manifest.json").write_text(json.dumps({**manifest, "manifest_version": 99}))
    code, _, err = run_cli("diff", recorded, recorded)
    assert code == 2
    assert "manifest version 99" in err and "Upgrade runner" in err


def test_a_missing_data_file_is_exit_2_naming_it(recorded, run_cli):
    (recorded / "data" / "toy[value=2.0]" / "rows.csv").unlink()
    code, _, err = run_cli("diff", recorded, recorded)
    assert code == 2 and "rows.csv is missing" in " ".join(err.split())
    (recorded / "plots" / "toy[value=2.0]" / "squares.png").unlink()
    code, _, err = run_cli("report", recorded)
    assert code == 2 and "squares.png is missing from the run folder" in " ".join(err.split())

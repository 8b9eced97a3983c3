"""`runner run` end to end on spec files with a toy analysis: run folder, exit codes, summary lines."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TOY_SPEC = """
name: toy-run
seed: 7
steps:
  - id: toy
    analysis: toy
    params: {n: 4}
    sweep:
      product:
        value: [1.0, 2.0]
expectations:
  - step: toy
    name: biggest square above ten
    that: "max(squares) > 10"
"""


def only_run_folder(tmp_path: Path, name: str) -> Path:
    folders = list((tmp_path / "runs" / name).iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def test_run_writes_a_complete_run_folder(write_spec, run_cli, tmp_path):
    code, out, _ = run_cli("run", write_spec(TOY_SPEC))
    assert code == 1  # value=1.0 gives max square 9: that case fails its expectation
    folder = only_run_folder(tmp_path, "toy-run")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert manifest["totals"] == {"passed": 1, "failed": 1, "error": 0, "not run": 0}
    assert manifest["seeds"] == [7]
    assert set(manifest["cases"]) == {"toy[value=1.0]", "toy[value=2.0]"}
    assert (folder / "spec.yaml").read_text().startswith("name: toy-run")
    rows = (folder / "data" / "toy[value=2.0]" / "rows.csv").read_text().splitlines()
    assert rows == ["i,square", "0,0.0", "1,2.0", "2,8.0", "3,18.0"]
    arrays = np.load(folder / "data" / "toy[value=2.0]" / "arrays.npz")  # no allow_pickle needed
    assert arrays["squares"].tolist() == [0.0, 2.0, 8.0, 18.0]
    assert (folder / "plots" / "toy[value=2.0]" / "squares.png").read_bytes()[:4] == b"\x89PNG"
    assert "toy[value=2.0]" in (folder / "report.md").read_text()
    assert "data:image/png;base64," in (folder / "report.html").read_text()
    assert f"report: {folder.relative_to(tmp_path) / 'report.html'}" in out


def test_each_case_result_is_stored_as_json_and_npz_and_is_its_summary(write_spec, run_cli, tmp_path):
    run_cli("run", write_spec(TOY_SPEC))
    folder = only_run_folder(tmp_path, "toy-run")
    manifest = json.loads((folder / "manifest.json").read_text())
    case = manifest["cases"]["toy[value=2.0]"]
    assert case["result_files"] == ["results/toy[value=2.0].json", "results/toy[value=2.0].npz"]
    stored = json.loads((folder / "results" / "toy[value=2.0].json").read_text())
    assert stored["squares"] == [0.0, 2.0, 8.0, 18.0] and stored["layers"] == {"0": {"max": 18.0}}
    assert stored["array"] == {"$array": "a0", "shape": [4], "dtype": "float64"}
    with np.load(folder / "results" / "toy[value=2.0].npz") as arrays:
        assert arrays["a0"].tolist() == [0.0, 2.0, 8.0, 18.0]
    # The summary (what expectations read, and the manifest shows) is the result without its arrays.
    assert case["summary"] == {**stored, "array": {"shape": [4], "dtype": "float64"}}


def test_summary_line_reads_like_pytest(write_spec, run_cli):
    code, out, _ = run_cli("run", write_spec(TOY_SPEC))
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert "1 failed, 1 passed in" in last
    assert "toy[value=1.0] FAILED" in out and "toy[value=2.0] PASSED" in out


def test_failed_expectation_shows_actual_values(write_spec, run_cli):
    _, out, _ = run_cli("run", write_spec(TOY_SPEC))
    assert "expectation failed: biggest square above ten" in out
    assert "9.0" in out  # the actual maximum, introspected


def test_all_passed_exits_zero(write_spec, run_cli):
    code, out, _ = run_cli("run", write_spec(TOY_SPEC), "-k", "value=2.0")
    assert code == 0
    assert "1 passed, 1 deselected in" in out


def test_nothing_selected_exits_five(write_spec, run_cli, tmp_path):
    code, out, _ = run_cli("run", write_spec(TOY_SPEC), "-k", "nomatch")
    assert code == 5
    assert not (tmp_path / "runs").exists()


def test_erroring_case_is_recorded_and_others_still_run(write_spec, run_cli, tmp_path):
    spec = write_spec(TOY_SPEC.replace("value: [1.0, 2.0]", "fail: [true, false]\n        value: [5.0]"))
    code, out, _ = run_cli("run", spec)
    assert code == 1
    folder = only_run_folder(tmp_path, "toy-run")
    cases = json.loads((folder / "manifest.json").read_text())["cases"]
    failing = cases["toy[fail=True-value=5.0]"]
    assert failing["status"] == "error"
    assert "ValueError: toy failure for value 5.0" in failing["error"]
    assert "Traceback" in failing["traceback"]
    assert cases["toy[fail=False-value=5.0]"]["status"] == "passed"
    assert "1 passed, 1 error in" in out


def test_a_case_stopped_by_bad_input_exits_two_and_keeps_the_others(write_spec, run_cli, tmp_path):
    spec = write_spec(
        TOY_SPEC.replace("value: [1.0, 2.0]", "missing: [null, nowhere.txt]\n        value: [5.0]")
    )
    code, out, err = run_cli("run", spec)
    assert code == 2  # as for a bad spec; the other case still ran and is in the folder
    folder = only_run_folder(tmp_path, "toy-run")
    cases = json.loads((folder / "manifest.json").read_text())["cases"]
    bad = cases["toy[missing=nowhere.txt-value=5.0]"]
    assert bad["status"] == "error" and bad["bad_input"] is True and bad["traceback"] is None
    assert "`missing` nowhere.txt does not exist" in out
    assert "Traceback" not in out + err
    assert cases["toy[missing=None-value=5.0]"]["status"] == "passed"
    assert (folder / "data" / "toy[missing=None-value=5.0]" / "rows.csv").exists()


def test_exitfirst_stops_after_first_failure(write_spec, run_cli, tmp_path):
    code, out, _ = run_cli("run", write_spec(TOY_SPEC), "-x")
    assert code == 1
    cases = json.loads((only_run_folder(tmp_path, "toy-run") / "manifest.json").read_text())["cases"]
    assert cases["toy[value=2.0]"]["status"] == "not run"


def test_interrupt_keeps_finished_cases_and_a_valid_folder(write_spec, run_cli, tmp_path):
    spec = write_spec(
        TOY_SPEC.replace("value: [1.0, 2.0]", "interrupt: [false, true, false]\n        value: [5.0]")
    )
    code, out, _ = run_cli("run", spec)
    assert code == 2
    folder = only_run_folder(tmp_path, "toy-run")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert [c["status"] for c in manifest["cases"].values()] == ["passed", "not run", "not run"]
    assert (folder / "data" / "toy[interrupt=False-value=5.0_0]" / "rows.csv").exists()
    assert (folder / "report.md").exists()
    assert "Interrupted" in out


def test_collect_only_shows_plan_and_writes_nothing(write_spec, run_cli, tmp_path):
    code, out, _ = run_cli("run", write_spec(TOY_SPEC), "--collect-only")
    assert code == 0
    assert "<Case toy[value=1.0]>" in out and "<Case toy[value=2.0]>" in out
    assert "expect: max(squares) > 10" in out
    assert "2 cases collected" in out
    assert not (tmp_path / "runs").exists()


def test_zip_and_product_sweeps_expand_into_cases(write_spec, run_cli):
    spec = write_spec("""
        name: sweeps
        steps:
          - id: toy
            analysis: toy
            sweep:
              product: {n: [1, 2]}
              zip: {value: [1.0, 2.0, 3.0], sleep: [0, 0, 0]}
    """)
    code, out, _ = run_cli("plan", spec)
    assert code == 0
    assert "6 cases collected" in out
    assert "<Case toy[n=1-value=1.0-sleep=0]>" in out
    assert "<Case toy[n=2-value=3.0-sleep=0]>" in out


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("value=1.0", "1 case collected"),
        ("not value=1.0", "1 case collected"),
        ("toy and (value=1.0 or value=2.0)", "2 cases collected"),
        ("TOY", "2 cases collected"),
    ],
)
def test_keyword_selection_follows_pytest(write_spec, run_cli, expr, expected):
    code, out, _ = run_cli("plan", write_spec(TOY_SPEC), "-k", expr)
    assert expected in out


def test_spec_level_sweep_over_seed_names_cases(write_spec, run_cli, tmp_path):
    spec = write_spec("""
        name: seeds
        sweep:
          product: {seed: [1, 2]}
        steps:
          - id: toy
            analysis: toy
    """)
    code, out, _ = run_cli("run", spec, "-q")
    assert code == 0
    manifest = json.loads((only_run_folder(tmp_path, "seeds") / "manifest.json").read_text())
    assert list(manifest["cases"]) == ["toy[seed=1]", "toy[seed=2]"]
    assert manifest["seeds"] == [1, 2]


def test_step_sweep_may_vary_resources_per_case(write_spec, run_cli):
    spec = write_spec("""
        name: resources
        steps:
          - id: toy
            analysis: toy
            sweep:
              product: {seed: [3, 4], dataset.max_len: [16, 32]}
    """)
    code, out, _ = run_cli("plan", spec)
    assert code == 0
    assert "<Case toy[seed=3-dataset.max_len=16]>" in out
    assert "4 cases collected" in out


def test_later_step_reads_earlier_step_outputs(write_spec, run_cli, tmp_path):
    spec = write_spec("""
        name: chained
        steps:
          - id: first
            analysis: toy
            sweep:
              product: {value: [1.0, 3.0]}
          - id: total
            analysis: toy_total
            params: {source: first}
        expectations:
          - step: total
            that: "total == 4.0 and cases == ['first[value=1.0]', 'first[value=3.0]']"
          - step: total
            name: arrays come back from the earlier cases' NPZ files
            that: "array_sum == (0 + 1 + 4) * 1.0 + (0 + 1 + 4) * 3.0"
    """)
    code, out, _ = run_cli("run", spec, "-q")
    assert code == 0, out


def test_a_step_read_as_the_wrong_result_type_is_a_case_error_naming_both(write_spec, run_cli):
    spec = write_spec("""
        name: chained
        steps:
          - id: squares
            analysis: toy
          - id: first
            analysis: toy_total
            params: {source: squares}
          - id: total
            analysis: toy_total
            params: {source: first}
    """)
    code, out, _ = run_cli("run", spec, "-q")
    assert code == 1
    assert (
        "Case total reads step 'first' as ToyResult, but that step runs analysis 'toy_total', whose result "
        "is ToyTotalResult." in out
    )


def test_missing_upstream_step_is_a_case_error(write_spec, run_cli):
    spec = write_spec("""
        name: chained
        steps:
          - id: total
            analysis: toy_total
            params: {source: first}
    """)
    code, out, _ = run_cli("run", spec, "-q")
    assert code == 1
    assert "Step 'first' has no finished case in this run" in out


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_real_signal_mid_run_leaves_a_valid_partial_folder(write_spec, tmp_path, signal_number):
    spec = write_spec("""
        name: slow
        steps:
          - id: toy
            analysis: toy
            sweep:
              product: {sleep: [0.0, 30.0, 30.0]}
    """)
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import conftest; "
        f"from runner.cli import main; sys.exit(main(['run', {str(spec)!r}, '-q']))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(
        tmp_path.glob("runs/slow/*/data/toy[[]sleep=0.0[]]/rows.csv")
    ):
        time.sleep(0.1)
    time.sleep(0.5)  # into the second case's sleep
    process.send_signal(signal_number)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 2, out
    manifest = json.loads(next(tmp_path.glob("runs/slow/*/manifest.json")).read_text())
    assert manifest["status"] == "interrupted"
    assert [c["status"] for c in manifest["cases"].values()] == ["passed", "not run", "not run"]
    assert next(tmp_path.glob("runs/slow/*/report.html")).exists()

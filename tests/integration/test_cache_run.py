"""`runner run` and `runner plan` with the result cache, end to end on toy specs (in-process)."""

from __future__ import annotations

import json
import re
from pathlib import Path

CHAIN = """
name: chain
seed: 7
steps:
  - id: toy
    analysis: toy
    params: {n: 4}
    sweep:
      product:
        value: [1.0, 2.0]
  - id: total
    analysis: toy_total
    params: {source: toy}
expectations:
  - step: toy
    name: biggest square above ten
    that: "max(squares) > 10"
"""


def run_folders(tmp_path: Path, name: str = "chain") -> list[Path]:
    from runner.load import run_dirs

    return run_dirs(tmp_path / "runs", name)


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def case_lines(out: str) -> dict[str, str]:
    """Case id → the rest of its console line."""
    found = {}
    for line in out.splitlines():
        match = re.match(r"^(\S+) (PASSED|FAILED|ERROR|NOT RUN) (.*)$", line)
        if match:
            found[match.group(1)] = f"{match.group(2)} {match.group(3)}"
    return found


def test_a_second_run_takes_every_case_from_the_cache_and_writes_the_same_files(
    write_spec, run_cli, tmp_path
):
    spec = write_spec(CHAIN)
    first_code, _, _ = run_cli("run", spec)
    code, out, _ = run_cli("run", spec)
    assert code == first_code == 1  # toy[value=1.0] fails its expectation, also when cached
    first, second = run_folders(tmp_path)
    lines = case_lines(out)
    assert all(
        "(cached, computed" in line and f"by runs/chain/{first.name}" in line for line in lines.values()
    )
    assert lines["toy[value=1.0]"].startswith("FAILED")
    assert "1 failed, 2 passed, 3 from cache in" in out.splitlines()[-1]
    old, new = manifest_of(first), manifest_of(second)
    for case_id, record in new["cases"].items():
        assert record["cache"]["state"] == "cached"
        assert record["cache"]["key"] == old["cases"][case_id]["cache"]["key"]
        assert record["summary"] == old["cases"][case_id]["summary"]
        assert record["checks"] == old["cases"][case_id]["checks"]
        for name in record["result_files"] + record["data_files"] + record["plot_files"]:
            assert (second / name).read_bytes() == (first / name).read_bytes(), name
    assert "| `total` | passed |" in (second / "report.md").read_text()
    assert "Result from the cache" in (second / "report.html").read_text()


def test_a_changed_param_reruns_its_step_and_the_steps_reading_it(write_spec, run_cli, tmp_path):
    spec = write_spec(CHAIN)
    run_cli("run", spec)
    spec.write_text(CHAIN.replace("value: [1.0, 2.0]", "value: [1.0, 3.0]"))
    code, out, _ = run_cli("plan", spec)
    assert code == 0
    assert "<Case toy[value=1.0]> cached (computed" in out
    assert "<Case toy[value=3.0]> new" in out
    assert "<Case total> stale: earlier step toy runs again" in out
    assert "3 cases collected (1 cached, 1 new, 1 stale)" in out
    _, out, _ = run_cli("run", spec)
    lines = case_lines(out)
    assert "cached" in lines["toy[value=1.0]"] and "cached" not in lines["toy[value=3.0]"]
    assert "cached" not in lines["total"]
    assert manifest_of(run_folders(tmp_path)[-1])["cases"]["total"]["summary"]["total"] == 4.0


def test_plan_names_the_input_that_changed_with_old_and_new_values(write_spec, run_cli):
    spec = write_spec(CHAIN)
    run_cli("run", spec)
    spec.write_text(CHAIN.replace("n: 4", "n: 6"))
    _, out, _ = run_cli("plan", spec)
    assert "<Case toy[value=1.0]> stale: params.n 4 -> 6" in out


def test_seed_is_part_of_the_key(write_spec, run_cli):
    spec = write_spec(CHAIN)
    run_cli("run", spec)
    spec.write_text(CHAIN.replace("seed: 7", "seed: 8"))
    _, out, _ = run_cli("plan", spec)
    assert "<Case toy[value=2.0]> stale: seed 7 -> 8" in out


def test_no_cache_neither_reads_nor_writes_the_cache(write_spec, run_cli, tmp_path):
    spec = write_spec(CHAIN)
    cache = tmp_path / "cache"
    run_cli("run", spec, "--cache-dir", cache, "--no-cache")
    assert not cache.exists()
    run_cli("run", spec, "--cache-dir", cache)
    _, out, _ = run_cli("run", spec, "--cache-dir", cache, "--no-cache")
    assert not any("cached" in line for line in case_lines(out).values())
    record = manifest_of(run_folders(tmp_path)[-1])["cases"]["toy[value=2.0]"]
    assert record["cache"]["state"] == "not stored" and len(record["cache"]["key"]) == 64


def test_cache_dir_option_and_environment_choose_the_folder(write_spec, run_cli, tmp_path, monkeypatch):
    spec = write_spec(CHAIN)
    run_cli("run", spec, "--cache-dir", tmp_path / "mine")
    assert len(list((tmp_path / "mine" / "entries").glob("*/*"))) == 3
    _, out, _ = run_cli("plan", spec, "--cache-dir", tmp_path / "mine")
    assert "3 cases collected (3 cached)" in out
    monkeypatch.delenv("RUNNER_RESULTS_CACHE")
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path / "root"))
    run_cli("run", spec)
    assert len(list((tmp_path / "root" / "results" / "entries").glob("*/*"))) == 3


def test_force_recomputes_and_replaces_the_entries(write_spec, run_cli, tmp_path):
    spec = write_spec(CHAIN)
    run_cli("run", spec)
    _, out, _ = run_cli("run", spec, "--force", "-k", "value=2")
    assert list(case_lines(out)) == ["toy[value=2.0]"] and "cached" not in out
    _, out, _ = run_cli("run", spec)
    assert f"by runs/chain/{run_folders(tmp_path)[1].name}" in case_lines(out)["toy[value=2.0]"]


def test_last_failed_runs_only_the_cases_that_failed_last_time(write_spec, run_cli):
    spec = write_spec(CHAIN)
    run_cli("run", spec)
    code, out, _ = run_cli("run", spec, "--lf")
    assert "run-last-failure: rerunning 1 case(s) that failed in" in out
    assert list(case_lines(out)) == ["toy[value=1.0]"]
    assert code == 1


def test_a_deselected_step_that_a_case_reads_comes_from_the_cache(write_spec, run_cli):
    spec = write_spec(CHAIN)
    run_cli("run", spec)
    code, out, _ = run_cli("run", spec, "-k", "total", "--force")
    assert code == 0, out
    assert case_lines(out)["total"].startswith("PASSED")


def test_a_damaged_entry_is_recomputed_with_a_note(write_spec, run_cli, tmp_path):
    spec = write_spec(CHAIN)
    run_cli("run", spec)
    record = manifest_of(run_folders(tmp_path)[0])["cases"]["toy[value=2.0]"]
    cache = Path(__import__("os").environ["RUNNER_RESULTS_CACHE"])
    entry = cache / "entries" / record["cache"]["base"][:2] / record["cache"]["base"]
    (entry / "files" / "data" / "rows.csv").write_text("tampered\n")
    _, out, _ = run_cli("run", spec)
    assert "cached" not in case_lines(out)["toy[value=2.0]"]
    assert (
        f"note: the cache entry {record['cache']['base'][:12]} was damaged (data/rows.csv does not match"
        in out
    )
    _, out, _ = run_cli("run", spec)
    assert "cached" in case_lines(out)["toy[value=2.0]"]
    assert "was damaged" not in out  # the note belonged to that run, not to the stored result


def test_errors_are_not_cached(write_spec, run_cli):
    spec = write_spec("""
        name: broken
        steps:
          - id: toy
            analysis: toy
            params: {fail: true}
    """)
    run_cli("run", spec)
    _, out, _ = run_cli("plan", spec)
    assert "<Case toy> new" in out


def test_manifest_records_provenance(write_spec, run_cli, tmp_path):
    spec = write_spec(CHAIN)
    run_cli("run", spec, "-k", "toy")
    manifest = manifest_of(run_folders(tmp_path)[0])
    assert manifest["manifest_version"] == 2
    assert manifest["command"][0] == "runner" and "argv" in manifest
    assert manifest["cwd"] == str(tmp_path)
    assert manifest["spec"]["sha256"] == __import__("hashlib").sha256(spec.read_bytes()).hexdigest()
    assert set(manifest["environment"]["git"]) >= {"commit", "dirty", "diff_sha256"}
    assert manifest["cache"]["enabled"] is True
    inputs = manifest["cases"]["toy[value=1.0]"]["cache"]["inputs"]
    assert inputs["analysis"] == "toy" and inputs["seed"] == 7 and inputs["params"]["value"] == 1.0
    assert "model" not in inputs  # the toy needs no model: its key must not depend on one


def test_run_log_keeps_what_the_console_printed(write_spec, run_cli, tmp_path):
    _, out, _ = run_cli("run", write_spec(CHAIN))
    log = (run_folders(tmp_path)[0] / "run.log").read_text()
    for line in (
        "toy[value=1.0] FAILED",
        "note: toy ran with n=4",
        "assert 9.0 > 10",
        "1 failed, 2 passed in",
    ):
        assert line in out and line in log


def test_cache_ls_lists_entries_and_prune_removes_them(write_spec, run_cli, tmp_path):
    spec = write_spec(CHAIN)
    run_cli("run", spec)
    code, out, _ = run_cli("cache", "ls")
    assert code == 0 and "3 entries" in out and "toy[value=1.0]" in out
    _, out, _ = run_cli("cache", "prune", "--older-than", "1d")
    assert "removed 0 entries" in out
    _, out, _ = run_cli("cache", "prune")
    assert "removed 3 entries" in out
    _, out, _ = run_cli("plan", spec)
    assert "<Case toy[value=1.0]> new (its cache entry was removed)" in out
    assert "3 cases collected (3 new)" in out

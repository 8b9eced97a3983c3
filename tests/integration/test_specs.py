"""The committed specs: all validate; the quickstart runs for real; hub specs fail fast offline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from runner.models import hub

SPECS = Path(__file__).resolve().parents[2] / "specs"


def test_committed_specs_validate(run_cli):
    code, out, _ = run_cli("validate", SPECS)
    assert code == 0, out


def test_seed_default_spec_fails_fast_offline(run_cli, monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(hub, "in_hf_cache", lambda repo_id: False)
    start = time.perf_counter()
    code, out, err = run_cli("run", SPECS / "layer_gradient_qwen.yaml", "--output-dir", tmp_path / "runs")
    assert code == 2
    assert time.perf_counter() - start < 30
    assert "Qwen/Qwen2.5-0.5B" in out and "smollm2-135m" in out
    assert "Traceback" not in out + err
    manifest = json.loads(next((tmp_path / "runs").rglob("manifest.json")).read_text())
    assert manifest["status"] == "aborted"


@pytest.mark.slow
def test_quickstart_runs_offline_and_writes_what_a_user_opens(run_cli, tmp_path):
    code, out, _ = run_cli("run", SPECS / "quickstart.yaml", "--output-dir", tmp_path / "runs")
    assert code == 0, out
    assert "2 passed in" in out.strip().splitlines()[-1]
    folder = next((tmp_path / "runs" / "quickstart").iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "passed"
    assert manifest["resources"]["models"]["smollm2-135m"]["n_layers"] == 30
    for case in ("importance[aggregate_by=values]", "importance[aggregate_by=gradients]"):
        data = folder / "data" / case
        consolidated = np.load(data / "consolidated_results.npz")  # no pickles
        layer = consolidated["layer_29_mean_abs"]
        assert layer.shape == (1536,)
        assert np.isclose(np.abs(layer).sum(), 1536)  # sum_abs normalization
        # One array written to two files: equal bit for bit.
        assert np.array_equal(np.load(data / "layer_29_mean_abs_gradients.npy"), layer)
        assert (folder / "plots" / case / "importance_by_layer.png").exists()
    report = (folder / "report.html").read_text()
    assert "importance[aggregate_by=gradients]" in report and "data:image/png;base64," in report

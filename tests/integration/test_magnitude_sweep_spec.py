"""`runner run` on a small toy pipeline (train -> decompose -> sweep, ablations), and a missing checkpoint.

The committed ``specs/toy_magnitude_sweep.yaml`` takes minutes; this spec keeps its three steps and
shrinks the model and step counts so that it runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SPEC = """
name: toy-sweep
seed: 0
steps:
  - id: train
    analysis: train_toy_model
    params: {n_features: 5, d_embed: 20, d_mlp: 3, feature_probability: 0.2, steps: 150, batch_size: 256}
  - id: decompose
    analysis: decompose_spd
    params:
      source: {from_step: train}
      C: 6
      steps: 150
      batch_size: 256
      pnorm: 1.0
      importance_minimality_coeff: 3.0e-3
      faithfulness_warmup_steps: 50
      eval_batches: 1
  - id: sweep
    analysis: magnitude_sweep
    params: {source: {from_step: decompose}, feature_idx: 2, n_steps: 11, ablation: true, dpi: 40}
  - id: reload
    analysis: magnitude_sweep
    params: {source: {path: PATH}, feature_idx: 2, n_steps: 11, dpi: 40}
"""


def only_run_folder(tmp_path: Path, name: str) -> Path:
    folders = list((tmp_path / "runs" / name).iterdir())
    assert len(folders) == 1, folders
    return folders[0]


@pytest.mark.slow
def test_toy_pipeline_trains_decomposes_and_sweeps(write_spec, run_cli, tmp_path):
    # The last step reads the decomposition from a folder of an earlier run of the first three steps.
    first = SPEC.split("  - id: reload")[0]
    assert run_cli("run", write_spec(first, "first.yaml"))[0] == 0
    earlier = only_run_folder(tmp_path, "toy-sweep")
    spec = SPEC.replace("toy-sweep", "toy-sweep-2").replace("PATH", str(earlier / "data" / "decompose"))
    code, out, _ = run_cli("run", write_spec(spec))
    assert code == 0, out
    folder = only_run_folder(tmp_path, "toy-sweep-2")
    manifest = json.loads((folder / "manifest.json").read_text())
    sweep = manifest["cases"]["sweep"]["summary"]
    reload = manifest["cases"]["reload"]["summary"]
    assert sweep["has_components"] and sweep["feature_idx"] == 2
    arrays = np.load(folder / "data" / "sweep" / "magnitude_sweep.npz")
    assert arrays["magnitudes"].tolist() == pytest.approx(np.linspace(-2, 2, 11).tolist(), abs=1e-6)
    assert arrays["ci/layers.0.mlp_in"].shape == (11, 6)
    plots = folder / "plots" / "sweep"
    assert (plots / "unified_grid_feature_2_layers_0_mlp_in.png").read_bytes()[:4] == b"\x89PNG"
    assert (plots / "unified_grid_feature_2_layers_0_mlp_out.png").exists()
    ablation_grids = list(plots.glob("ablation_*/unified_grid_feature_2_layers_0_mlp_in.png"))
    assert len(ablation_grids) == len(sweep["ablations"])
    assert (folder / "data" / "decompose" / "spd_model.safetensors").exists()
    assert "### SPD: C = 6 components per weight" in (folder / "report.md").read_text()
    # The earlier run's decomposition, read from its folder, is the same one this run made (same seed).
    assert reload["source"] == str(earlier / "data" / "decompose")
    assert reload["active_components"] == sweep["active_components"]


def test_missing_checkpoint_is_reported_without_a_traceback(write_spec, run_cli, tmp_path):
    spec = write_spec(
        """
        name: missing
        steps:
          - id: sweep
            analysis: magnitude_sweep
            params: {source: {path: runs/none}}
        """
    )
    code, out, err = run_cli("run", spec)
    # The case errors with the located message and no traceback; a bad input exits 2.
    assert code == 2
    assert f"magnitude_sweep case sweep: `source.path` {tmp_path / 'runs/none'} does not exist" in out + err
    assert "Traceback" not in out + err

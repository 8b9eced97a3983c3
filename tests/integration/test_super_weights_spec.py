"""`runner run` end to end on super-weight specs: a tiny Llama checkpoint with a planted super weight,
the window checks, the committed specs, and (slow) the embedded SmolLM2-135M.

The planted weight is written in Hugging Face coordinates, ``mlp.down_proj.weight[row, col]``, into a
checkpoint directory that the CLI loads and converts to TransformerLens; finding it at ``(layer, row,
col)`` checks the whole convention end to end.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from analyses.super_weights import PROBE_TEXT

SPECS = Path(__file__).resolve().parents[2] / "specs"
ROW, COL = 11, 37  # down_proj.weight[11, 37] of layer 0 (d_model 32, d_mlp 64)


@pytest.fixture(scope="module")
def planted_dir(tiny_llama: Any, tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with neuron COL of layer 0 firing strongly on the probe and writing into channel ROW.

    The neuron's gate and up projections are aligned with the layer-0 MLP input at the probe's first
    position (so ``silu(g) * u`` is large there), and the rest of its down-projection column is shrunk.
    """
    model = copy.deepcopy(tiny_llama)
    mlp = model.model.layers[0].mlp
    captured: dict[str, torch.Tensor] = {}
    handle = mlp.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(torch.tensor([tiny_tokenizer(PROBE_TEXT)["input_ids"]]))
    handle.remove()
    direction = captured["x"][0, 0] / captured["x"][0, 0].norm()  # (d_model,)
    with torch.no_grad():
        mlp.gate_proj.weight[COL] = 5.0 * direction
        mlp.up_proj.weight[COL] = 5.0 * direction
        mlp.down_proj.weight[:, COL] *= 0.01
        mlp.down_proj.weight[ROW, COL] = 10.0
    directory = tmp_path_factory.mktemp("planted_llama")
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


# `ppl.restored == ppl.baseline` holds exactly: the same model with its weights written back bit for bit,
# run on the same batches, is the same computation.
SPEC = """
name: planted
seed: 0
model:
  name: {model}
  device: cpu
dataset:
  name: python-docs
  max_passages: 4
  max_len: 32
steps:
  - id: super_weights
    analysis: super_weights
    params: {{max_iterations: 3, batch_size: 4}}
  - id: vocab
    analysis: super_weight_vocab
    params: {{tokens: {tokens}, window_len: 32, stride: 31, bootstrap: 20, top_k: 5}}
expectations:
  - step: super_weights
    name: the planted weight is found
    that: "n_found == 1 and weights[0].layer == 0 and weights[0].row == {row} and weights[0].col == {col}"
  - step: super_weights
    name: restoring gives the baseline exactly
    that: "ppl.restored_exact and ppl.restored == ppl.baseline"
  - step: vocab
    that: "n_weights == 1 and weights[0].row == {row} and weights[0].col == {col}"
"""


def only_run_folder(tmp_path: Path, name: str) -> Path:
    folders = list((tmp_path / "runs" / name).iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def test_planted_super_weight_is_found_and_analysed_through_the_cli(
    planted_dir, write_spec, run_cli, tmp_path
):
    spec = write_spec(SPEC.format(model=planted_dir, tokens=62, row=ROW, col=COL))
    code, out, _ = run_cli("run", spec)
    assert code == 0, out
    assert "2 passed in" in out
    folder = only_run_folder(tmp_path, "planted")
    cases = json.loads((folder / "manifest.json").read_text())["cases"]
    detected = cases["super_weights"]["summary"]
    assert detected["weights"][0]["value"] == 10.0
    assert detected["strongest"]["ppl_ratio"] != 1.0
    rows = (folder / "data/super_weights/super_weights.csv").read_text().splitlines()
    assert rows[1].split(",")[3:6] == ["0", str(ROW), str(COL)]  # layer, row, col
    for plot in (
        "detection_iterations",
        "super_weight_distribution",
        "impact_comparison",
        "combined_analysis",
    ):
        assert (folder / f"plots/super_weights/{plot}.png").read_bytes()[:4] == b"\x89PNG"
    card = json.loads((folder / "data/vocab/super_weights.jsonl").read_text().splitlines()[0])
    assert (card["layer"], card["row"], card["col"], card["tensor"]) == (0, ROW, COL, "down_proj")
    assert (folder / f"plots/vocab/super_weights/down_proj-L0-R{ROW}-C{COL}-deltas.png").exists()
    assert (folder / f"plots/vocab/neurons/0-{COL}-effects.png").exists()
    report = (folder / "report.md").read_text()
    assert "### Super weights of" in report and "### Super weights and the vocabulary" in report


def test_windows_that_do_not_fit_fail_the_case_with_a_fitting_setting(
    planted_dir, write_spec, run_cli, tmp_path
):
    spec = write_spec(SPEC.format(model=planted_dir, tokens=5000, row=ROW, col=COL))
    code, out, _ = run_cli("run", spec)
    assert code == 2  # bad input: the case errors with what would fit, the run exits as for a bad spec
    assert "the window settings do not fit this dataset and model" in out
    error = json.loads((only_run_folder(tmp_path, "planted") / "manifest.json").read_text())["cases"][
        "vocab"
    ]["error"]
    assert "tokens (5000) exceeds the 124 text tokens of the dataset (4 passages × 31)" in error
    assert "A setting that fits: tokens: 124, window_len: 32, stride: 31" in error


def test_stride_longer_than_the_window_is_a_spec_error(write_spec, run_cli):
    spec = write_spec("""
        name: bad-windows
        steps:
          - id: vocab
            analysis: super_weight_vocab
            params: {weights: [[0, 1, 2]], window_len: 512, stride: 600}
    """)
    code, out, err = run_cli("validate", spec)
    assert code == 2
    text = out + err
    assert "spec.yaml:5" in text
    assert "stride (600) is larger than window_len (512)" in text


def test_committed_olmo_spec_fails_fast_offline(run_cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    code, out, err = run_cli("run", SPECS / "olmo_super_weights.yaml")
    assert code == 2
    assert "Cannot load model 'allenai/OLMo-1B-hf'" in out + err
    assert time.perf_counter() - started < 30


SMOLLM2_SPEC = """
name: smollm2-quick
seed: 0
model: {name: smollm2-135m, device: cpu}
dataset: {name: python-docs, max_passages: 4, max_len: 64}
steps:
  - id: super_weights
    analysis: super_weights
    params: {layers: "0-12", max_iterations: 1, batch_size: 4}
  - id: vocab
    analysis: super_weight_vocab
    params:
      {max_weights: 1, tokens: 126, window_len: 64, stride: 63, cascade_layers: "10,11,12", bootstrap: 0}
expectations:
  - step: super_weights
    that: "[strongest.layer, strongest.row, strongest.col] == [11, 507, 1229] and strongest.ppl_ratio > 2"
  - step: super_weights
    that: "ppl.random_control_ratio < 1.01 and ppl.restored_exact"
  - step: vocab
    that: "weights[0].deltas.loss > 100 * abs(weights[0].random_coord_delta.loss)"
  - step: vocab
    that: "weights[0].layer == 11"
"""


@pytest.mark.slow
def test_embedded_model_super_weight_is_layer_11_row_507_col_1229(write_spec, run_cli, tmp_path):
    code, out, _ = run_cli("run", write_spec(SMOLLM2_SPEC))
    assert code == 0, out
    summary = json.loads((only_run_folder(tmp_path, "smollm2-quick") / "manifest.json").read_text())
    weights = summary["cases"]["super_weights"]["summary"]["weights"]
    assert {(w["layer"], w["row"], w["col"]) for w in weights} >= {(2, 507, 90), (11, 507, 1229)}

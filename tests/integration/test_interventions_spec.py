"""SAE specs end to end through the CLI: train an SAE, intervene with it, read the files a user opens."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import runner.models.hub
import runner.saes.loading

SPECS = Path(__file__).resolve().parents[2] / "specs"

# identity_max_abs is exactly 0 with both methods: the fast path skips alpha-1 rows; the loop runs them
# with a hook that adds an exact 0 through the clean pass's computation (the same blocks on the same
# batch, the same unembedding of the same positions), so it gets the clean logits bit for bit.
TRAIN_THEN_INTERVENE = """
name: tiny-sae
seed: 3
model:
  name: {model}
dataset:
  name: text.txt
  max_passages: 16
  max_len: 16
steps:
  - id: train
    analysis: train_sae
    params: {{layer: 1, site: resid_pre, d_sae: 32, k: 4, epochs: 10, train_batch_size: 32, lr: 0.004}}
  - id: interventions
    analysis: sae_interventions
    params:
      sae: {{from_step: train}}
      hook: resid_post
      layers: "0"
      feature_source: top_frequency
      features_per_layer: 3
      alpha_sweep: [0, 1, 4]
      batch_size: 4
    sweep:
      product:
        method: [fast, loop]
expectations:
  - step: interventions
    name: alpha 1 is the clean model
    that: "identity_max_abs == 0"
  - step: train
    that: "l0 > 0 and dead_fraction_train < 1"
"""


@pytest.fixture
def tiny_sae_spec(write_spec, tmp_path: Path, tiny_llama_dir: Path) -> Path:
    from pydoc_data.topics import topics

    (tmp_path / "text.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    return write_spec(TRAIN_THEN_INTERVENE.format(model=tiny_llama_dir))


def run_folder(tmp_path: Path, name: str) -> Path:
    [folder] = list((tmp_path / "runs" / name).iterdir())
    return folder


def test_trained_sae_feeds_interventions_and_both_methods_agree(
    tiny_sae_spec: Path, run_cli, tmp_path: Path
) -> None:
    code, out, _ = run_cli("run", tiny_sae_spec)
    assert code == 0, out
    assert "3 passed in" in out.strip().splitlines()[-1]
    folder = run_folder(tmp_path, "tiny-sae")
    manifest = json.loads((folder / "manifest.json").read_text())
    cases = manifest["cases"]
    assert set(cases) == {"train", "interventions[method=fast]", "interventions[method=loop]"}
    note = "blocks.0.hook_resid_post is served by the SAE trained on blocks.1.hook_resid_pre"
    assert any(note in n for n in cases["interventions[method=fast]"]["notes"])
    assert cases["interventions[method=fast]"]["summary"]["forward"] == "lean"
    fast = pd.read_csv(folder / "data" / "interventions[method=fast]" / "per_feature_metrics.csv")
    loop = pd.read_csv(folder / "data" / "interventions[method=loop]" / "per_feature_metrics.csv")
    assert len(fast) == 3 * 4 and list(fast.hook.unique()) == ["blocks.0.hook_resid_post"]  # alpha 2 added
    # Other kernels: Δloss and KL agree to float32 rounding (1e-5: 20 ulps at |log p| < 8). Firing
    # positions come from the same clean pass; top-1 changes agree exactly, as no top-1 token of this
    # data lies within 64 float32 ulps of a tie (see `near_ties` in tests/analyses/test_sae_interventions.py).
    for column in ("delta_loss", "kl"):
        assert (fast[column] - loop[column]).abs().max() < 1e-5, column
    for column in ("firing_fraction", "fraction_affected"):
        assert fast[column].tolist() == loop[column].tolist(), column
    assert (folder / "plots" / "interventions[method=fast]" / "layer_vs_dloss_alpha2.png").exists()
    report = (folder / "report.md").read_text()
    assert "### SAE training: `blocks.1.hook_resid_pre`" in report
    assert "### SAE feature interventions: `scale`" in report


def test_trained_sae_folder_loads_as_an_sae_directory(
    tiny_sae_spec: Path, write_spec, run_cli, tmp_path: Path
) -> None:
    from sae_lens import SAE

    assert run_cli("run", tiny_sae_spec, "-k", "train")[0] == 0
    data = run_folder(tmp_path, "tiny-sae") / "data" / "train"
    assert SAE.load_from_disk(data).cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    spec = Path(tiny_sae_spec).read_text().replace("sae: {from_step: train}", f"sae: {{path: {data}}}")
    code, out, _ = run_cli("run", write_spec(spec, "from_path.yaml"), "-k", "fast")
    assert code == 0, out


def test_committed_sae_specs_validate(run_cli) -> None:
    for name in ("gpt2_interventions.yaml", "smollm2_interventions.yaml", "smollm2_train_sae.yaml"):
        code, out, _ = run_cli("validate", SPECS / name)
        assert code == 0, out


def test_seed_default_spec_keeps_the_seed_settings() -> None:
    import yaml

    spec = yaml.safe_load((SPECS / "gpt2_interventions.yaml").read_text())
    params = spec["steps"][0]["params"]
    assert (spec["model"]["name"], spec["seed"]) == ("gpt2-small", 1234)
    assert (spec["dataset"]["name"], spec["dataset"]["max_passages"], spec["dataset"]["max_len"]) == (
        "wikitext-2",
        200,
        256,
    )
    assert params["sae"] == {"release": "gpt2-small-res-jb"}
    # resid_pre: Neuronpedia's {L}-res-jb labels (the spec's features CSV) are blocks.{L}.hook_resid_pre's
    assert (params["hook"], params["layers"], params["alpha"]) == ("resid_pre", "0-11", 2.0)
    assert params["alpha_sweep"] == [0, 0.5, 1, 2, 4]
    assert (params["feature_source"], params["features_per_layer"], params["batch_size"]) == ("csv", 5, 16)


def test_seed_default_spec_fails_fast_offline(
    run_cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The loaders read these from runner.models.hub (runner.saes.loading imports hub_reachable from there
    # when it runs) and _release_cached from runner.saes.loading.
    monkeypatch.setattr(runner.models.hub, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(runner.models.hub, "in_hf_cache", lambda repo_id: False)
    monkeypatch.setattr(runner.saes.loading, "_release_cached", lambda repo_id, folder: False)
    start = time.perf_counter()
    code, out, err = run_cli("run", SPECS / "gpt2_interventions.yaml", "--output-dir", tmp_path / "runs")
    assert code == 2
    assert time.perf_counter() - start < 30
    assert "gpt2-small" in out and "smollm2-135m" in out
    assert "Traceback" not in out + err


@pytest.mark.slow
def test_embedded_interventions_spec_runs_offline(run_cli, tmp_path: Path) -> None:
    # The committed spec on fewer passages and the first two features of its CSV, to keep CI short;
    # model, SAE and alphas are the spec's own. Only the exactness expectation is kept: on 8 passages
    # and 2 features the sign of a loss change is not the spec's claim.
    spec = yaml.safe_load((SPECS / "smollm2_interventions.yaml").read_text())
    spec["dataset"]["max_passages"] = 8
    spec["expectations"] = [e for e in spec["expectations"] if "identity_max_abs" in e["that"]]
    params = spec["steps"][0]["params"]
    features = pd.read_csv(SPECS / params["features_csv"]).head(2)
    features.to_csv(tmp_path / "features.csv", index=False)
    params["features_csv"] = "features.csv"
    path = tmp_path / "smollm2_interventions.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    code, out, _ = run_cli("run", path, "--output-dir", tmp_path / "runs")
    assert code == 0, out
    folder = next((tmp_path / "runs" / "smollm2-interventions").iterdir())
    [case] = json.loads((folder / "manifest.json").read_text())["cases"].values()
    assert case["summary"]["layers"]["12"]["sae_hook"] == "blocks.12.hook_resid_post"
    assert case["summary"]["forward"] == "lean"  # the lean forward passed its check on SmolLM2's weights
    table = pd.read_csv(next((folder / "data").iterdir()) / "per_feature_metrics.csv")
    assert set(table.alpha) == {0.0, 0.5, 1.0, 2.0, 4.0}
    assert table.feature.drop_duplicates().tolist() == features.feature.tolist()
    assert table.label.drop_duplicates().tolist() == features.label.tolist()
    assert (table[table.alpha == 1.0][["delta_loss", "kl"]] == 0).all().all()  # fast path: rows skipped

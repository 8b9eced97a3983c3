"""super_weight_comparison, on real super_weights results of two tiny models.

The upstream cases are produced by running ``super_weights`` on the planted tiny GPT-2-style model
(two planted super weights) and on the tiny Llama; every expected number is read from those
summaries or computed from them in the test.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.image import imread

from analyses.super_weight_comparison import SuperWeightComparisonParams, super_weight_comparison
from analyses.super_weight_vocab import SuperWeightVocabParams, SuperWeightVocabResult
from analyses.super_weights import SuperWeightsParams, SuperWeightsResult, super_weights
from runner.artifacts import RunFolder
from runner.datasets import TokenDataset
from runner.errors import RunnerError
from runner.models import LoadedModel, hooked_llama_from_hf
from runner.results import result_bytes, result_from_files
from runner.step import FinishedCase, StepContext, StepOutput

LAYER, NEURON = 1, 5


@pytest.fixture(scope="module")
def planted(tiny_model: LoadedModel) -> LoadedModel:
    """The tiny GPT-2-style model with neuron 5 of layer 1 always near 200 and two big output weights."""
    model = copy.deepcopy(tiny_model.model)
    with torch.no_grad():
        model.blocks[LAYER].mlp.b_in[NEURON] = 200.0
        model.blocks[LAYER].mlp.W_out[NEURON] *= 0.01
        model.blocks[LAYER].mlp.W_out[NEURON, 7] = 10.0
        model.blocks[LAYER].mlp.W_out[NEURON, 9] = 8.0
    return LoadedModel("planted-gpt2", model, tiny_model.tokenizer, "tiny model with planted weights", {})


@pytest.fixture(scope="module")
def llama(tiny_llama: Any, tiny_tokenizer: Any) -> LoadedModel:
    model = hooked_llama_from_hf(copy.deepcopy(tiny_llama), tiny_tokenizer)
    return LoadedModel("tiny-llama", model, tiny_tokenizer, "tiny llama", {})


def run_super_weights(loaded: LoadedModel, case_id: str, **params: Any) -> FinishedCase[SuperWeightsResult]:
    """One finished ``super_weights`` case, as the executor hands it to later steps (result reloaded)."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, loaded.model.cfg.d_vocab, (6, 10), generator=generator)  # (n, max_len)
    resources = {"model": loaded, "dataset": TokenDataset("random", tokens, fingerprint="x")}
    ctx = StepContext(case_id=case_id, seed=0, device="cpu", resources=resources.__getitem__)
    settings = SuperWeightsParams(**{"spike_threshold": 50.0, "max_iterations": 3, **params})
    output = super_weights(ctx, settings)
    result = result_from_files(SuperWeightsResult, *result_bytes(output.result))
    return FinishedCase(case_id, "super_weights", "super_weights", settings, loaded.name, result)


@pytest.fixture(scope="module")
def upstream(planted: LoadedModel, llama: LoadedModel) -> list[FinishedCase[SuperWeightsResult]]:
    """super_weights on two models: the planted one (two weights) and the tiny Llama (one weight found
    in layer 0 with a threshold low enough for its random weights)."""
    return [
        run_super_weights(planted, "super_weights[model.name=planted-gpt2]"),
        run_super_weights(
            llama, "super_weights[model.name=tiny-llama]", spike_threshold=1e-3, layers="0", max_iterations=1
        ),
    ]


def compare(cases: list[FinishedCase[SuperWeightsResult]], **params: Any) -> tuple[StepOutput, StepContext]:
    """The comparison as the executor runs it: no resources, only the finished cases."""

    def no_resource(kind: str) -> Any:
        raise AssertionError(f"the comparison asked for the {kind}")

    ctx = StepContext(
        case_id="comparison",
        seed=0,
        device="cpu",
        resources=no_resource,
        finished=lambda step_id: [c for c in cases if c.step_id == step_id],
    )
    return super_weight_comparison(ctx, SuperWeightComparisonParams(**params)), ctx


@pytest.fixture(scope="module")
def compared(upstream: list[FinishedCase[SuperWeightsResult]]) -> StepOutput:
    return compare(upstream)[0]


def test_upstream_cases_found_super_weights_in_both_models(
    upstream: list[FinishedCase[SuperWeightsResult]],
) -> None:
    """Guards the fixture: the comparison below compares two non-trivial results."""
    found = [c.result.n_found for c in upstream]
    assert found == [2, 1]


def test_json_has_each_models_count_coordinates_and_values(
    upstream: list[FinishedCase[SuperWeightsResult]], compared: StepOutput
) -> None:
    rows = compared.data["cross_model_summary.json"]["models"]
    assert [r["model"] for r in rows] == ["planted-gpt2", "tiny-llama"]
    for row, case in zip(rows, upstream, strict=True):
        result = case.result
        assert row["case"] == case.id
        assert row["n_super_weights"] == result.n_found == len(row["super_weights"])
        assert [(w["layer"], w["row"], w["col"], w["value"]) for w in row["super_weights"]] == [
            (w.layer, w.row, w.col, w.value) for w in result.weights
        ]
    planted = rows[0]["super_weights"]
    assert {(w["layer"], w["row"], w["col"]) for w in planted} == {(LAYER, 7, NEURON), (LAYER, 9, NEURON)}
    assert sorted(w["value"] for w in planted) == pytest.approx([8.0, 10.0])


def test_json_has_perplexity_ratios_against_the_controls(
    upstream: list[FinishedCase[SuperWeightsResult]], compared: StepOutput
) -> None:
    rows = compared.data["cross_model_summary.json"]["models"]
    for row, case in zip(rows, upstream, strict=True):
        assert case.result.ppl is not None
        ppl, got = case.result.ppl.model_dump(), row["perplexity"]
        assert got["baseline"] == ppl["baseline"]  # copied from the upstream result
        assert got["ratio_all"] == pytest.approx(ppl["all_zeroed"] / ppl["baseline"])
        for control in ("random_control", "magnitude_control"):
            assert got[f"{control}_ratio"] == pytest.approx(ppl[control] / ppl["baseline"])
            assert got[f"ratio_vs_{control}"] == pytest.approx(ppl["all_zeroed"] / ppl[control])
        assert row["accuracy"] is None  # not measured upstream


def test_json_tallies_are_keyed_by_model(
    upstream: list[FinishedCase[SuperWeightsResult]], compared: StepOutput
) -> None:
    data = compared.data["cross_model_summary.json"]
    ratios = {c.model_name: c.result.ppl.ratio_all for c in upstream if c.result.ppl}
    assert data["n_models"] == 2
    assert data["counts"] == {c.model_name: c.result.n_found for c in upstream}
    assert data["ratio_all"] == pytest.approx(ratios)
    assert data["largest_ratio_all"] == max(ratios, key=ratios.__getitem__)
    assert data["most_super_weights"] == ["planted-gpt2"]  # 2 planted against the Llama's 1


def test_files_are_written_and_the_png_opens(compared: StepOutput, tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.write_data("comparison", compared.data)
    [png] = folder.write_plots("comparison", compared.plots)
    written = json.loads((tmp_path / "data/comparison/cross_model_summary.json").read_text())
    assert [r["n_super_weights"] for r in written["models"]] == [
        r["n_found"] for r in compared.summary["models"]
    ]
    image = imread(tmp_path / png)
    assert png == "plots/comparison/model_comparison.png" and image.shape[0] > 100 and image.shape[1] > 100


def test_one_model_gives_a_note_and_still_writes_its_row(
    upstream: list[FinishedCase[SuperWeightsResult]],
) -> None:
    output, ctx = compare(upstream[:1])
    assert output.summary["n_models"] == 1
    assert any("Only one model (planted-gpt2)" in note for note in ctx.notes)
    assert output.data["cross_model_summary.json"]["counts"] == {"planted-gpt2": 2}


def test_no_upstream_case_gives_a_note_not_an_error() -> None:
    output, ctx = compare([])
    assert output.summary["n_models"] == 0 and output.plots == {}
    assert output.data["cross_model_summary.json"]["models"] == []
    assert any("Nothing to compare: Step 'super_weights' has no finished case" in note for note in ctx.notes)


def test_several_cases_of_one_model_are_kept_apart(upstream: list[FinishedCase[SuperWeightsResult]]) -> None:
    first = upstream[0]
    again = FinishedCase(
        "super_weights[x]", "super_weights", "super_weights", first.params, "planted-gpt2", first.result
    )
    output, _ = compare([first, again, upstream[1]])
    counts = output.data["cross_model_summary.json"]["counts"]
    assert counts == {
        first.id: 2,
        "super_weights[x]": 2,
        "tiny-llama": upstream[1].result.n_found,
    }


def test_from_step_that_is_not_super_weights_is_refused() -> None:
    vocab = SuperWeightVocabResult(
        model="tiny-llama", n_weights=0, windows={}, baselines=None, weights=[], neurons=[]
    )
    other = FinishedCase(
        "vocab", "vocab", "super_weight_vocab", SuperWeightVocabParams(), "tiny-llama", vocab
    )
    with pytest.raises(
        RunnerError,
        match=r"reads step 'vocab' as SuperWeightsResult, but that step runs analysis 'super_weight_vocab'",
    ):
        compare([other], from_step="vocab")


@pytest.mark.parametrize("template", ["super_weight_comparison.md.j2", "super_weight_comparison.html.j2"])
def test_report_partial_lists_models_counts_and_ratios(
    compared: StepOutput, render_partial: Callable[..., str], template: str
) -> None:
    text = render_partial(compared, template)
    rows = compared.summary["models"]
    assert "Super weights across 2 models" in text and "model_comparison" in text
    assert "planted-gpt2" in text and "tiny-llama" in text
    assert f"L{LAYER}: 7, {NEURON}" in text
    assert f"{rows[0]['ratio_all']:.3g}" in text
    most = "<code>planted-gpt2</code>." if template.endswith("html.j2") else "`planted-gpt2`."
    assert f"Most super weights: {most}" in text


@pytest.mark.parametrize("template", ["super_weight_comparison.md.j2", "super_weight_comparison.html.j2"])
def test_report_partial_says_when_there_is_nothing_to_compare(
    render_partial: Callable[..., str], template: str
) -> None:
    assert "No finished case of step" in render_partial(compare([])[0], template)

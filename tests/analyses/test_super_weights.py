"""super_weights and the weight-editing helpers, against independent computations on tiny models.

The planted model is the shared tiny GPT-2-style model with one neuron made to fire hugely on every
token (a large input bias) and two large entries in that neuron's output row, so that detection
must find one per probe pass: the larger first, the other once the first is zeroed.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from analyses._transformers_view import llama_transformers_view as hf_llama_view
from analyses._weights import (
    Neuron,
    SuperWeight,
    magnitude_controls,
    perplexity,
    token_losses,
    zeroed,
)
from analyses.super_weights import SuperWeightsParams, super_weights
from analyses.super_weights.compute import detect_super_weights, measure_spikes
from runner.artifacts import RunFolder
from runner.datasets import TokenDataset
from runner.errors import ResourceError
from runner.models import LoadedModel, hooked_llama_from_hf
from runner.step import StepContext, StepOutput

LAYER, NEURON, FIRST_ROW, SECOND_ROW = 1, 5, 7, 9


@pytest.fixture(scope="module")
def planted(tiny_model: LoadedModel) -> LoadedModel:
    """A copy of the tiny model with neuron 5 of layer 1 always near 200 and two big output weights.

    The rest of the neuron's output row is shrunk so that only the planted entries write above 50.
    """
    model = copy.deepcopy(tiny_model.model)
    with torch.no_grad():
        model.blocks[LAYER].mlp.b_in[NEURON] = 200.0  # gelu(200 + small) ≈ 200 at every position
        model.blocks[LAYER].mlp.W_out[NEURON] *= 0.01  # the rest of the row writes well below 50
        model.blocks[LAYER].mlp.W_out[NEURON, FIRST_ROW] = 10.0  # output ≈ 2000 on channel 7
        model.blocks[LAYER].mlp.W_out[NEURON, SECOND_ROW] = 8.0  # ≈ 1600 on channel 9: found second
    return LoadedModel("planted", model, tiny_model.tokenizer, "tiny model with planted weights", {})


@pytest.fixture(scope="module")
def dataset(planted: LoadedModel) -> TokenDataset:
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, planted.model.cfg.d_vocab, (6, 10), generator=generator)  # (n, max_len)
    return TokenDataset("random", tokens, fingerprint="x")


def run(
    loaded: LoadedModel, dataset: TokenDataset, seed: int = 0, **params: Any
) -> tuple[StepOutput, StepContext]:
    resources = {"model": loaded, "dataset": dataset}
    ctx = StepContext(case_id="case", seed=seed, device="cpu", resources=resources.__getitem__)
    return super_weights(ctx, SuperWeightsParams(**params)), ctx


def probe(loaded: LoadedModel) -> torch.Tensor:
    return loaded.model.to_tokens("Apple Inc. is a worldwide tech company.")  # (1, pos)


def state(model: Any) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: Any) -> None:
    after = model.state_dict()
    # Bit-exact: `zeroed` writes the saved values back, a copy and not a computation.
    assert all(torch.equal(before[name], after[name]) for name in before)


def manual_losses(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy from the logits, by hand: ``-log softmax(logits)[next token]``."""
    with torch.no_grad():
        logits = model(tokens, return_type="logits").double()  # (B, T, vocab)
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    return -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]  # (B, T-1)


# --- weight editing ------------------------------------------------------------------------------------


def test_super_weight_indexes_w_out_transposed() -> None:
    weight = SuperWeight(layer=2, row=3968, col=7003)
    assert weight.index() == (7003, 3968)
    assert weight.label() == "L2-R3968-C7003"


def test_zeroed_zeroes_inside_and_restores_bit_exact(tiny_model: LoadedModel) -> None:
    model = copy.deepcopy(tiny_model.model)
    before = state(model)
    edits = [SuperWeight(0, 3, 4), Neuron(0, 4), SuperWeight(1, 31, 63)]  # overlapping regions
    with zeroed(model, edits):
        assert float(model.blocks[0].mlp.W_out.detach()[4, 3]) == 0.0
        assert torch.count_nonzero(model.blocks[0].mlp.W_out[4]) == 0
        assert float(model.blocks[1].mlp.W_out.detach()[63, 31]) == 0.0
        assert torch.count_nonzero(model.blocks[0].mlp.W_out[5]) == model.cfg.d_model
    assert_same_state(before, model)


def test_zeroed_restores_after_an_exception(tiny_model: LoadedModel) -> None:
    model = copy.deepcopy(tiny_model.model)
    before = state(model)
    with pytest.raises(KeyError), zeroed(model, [Neuron(1, 0)]):
        raise KeyError("inside")
    assert_same_state(before, model)


def test_zeroed_leaves_gradients_enabled_inside(tiny_model: LoadedModel) -> None:
    model = copy.deepcopy(tiny_model.model)
    with zeroed(model, [SuperWeight(0, 1, 1)]):
        assert torch.is_grad_enabled()


def test_token_losses_match_cross_entropy_from_logits(tiny_model: LoadedModel, dataset: TokenDataset) -> None:
    losses = token_losses(tiny_model.model, dataset.tokens, batch_size=4)
    expected = manual_losses(tiny_model.model, dataset.tokens)
    assert losses.shape == (6, 9)
    assert torch.allclose(losses, expected, rtol=1e-5, atol=1e-5)
    assert perplexity(losses) == pytest.approx(math.exp(float(expected.mean())), rel=1e-6)


def test_token_losses_do_not_depend_on_batch_size(tiny_model: LoadedModel, dataset: TokenDataset) -> None:
    one = token_losses(tiny_model.model, dataset.tokens, batch_size=1)
    all_at_once = token_losses(tiny_model.model, dataset.tokens, batch_size=6)
    assert torch.allclose(one, all_at_once, rtol=1e-6, atol=1e-6)


# --- detection -----------------------------------------------------------------------------------------


def test_spikes_are_the_largest_abs_entries_of_cached_activations(planted: LoadedModel) -> None:
    tokens = probe(planted)
    spikes = measure_spikes(planted.model, tokens, [0, 1])
    with torch.no_grad():
        _, cache = planted.model.run_with_cache(tokens)
    for spike in spikes:
        post = cache[f"blocks.{spike.layer}.mlp.hook_post"][0]  # (pos, d_mlp)
        out = cache[f"blocks.{spike.layer}.hook_mlp_out"][0]  # (pos, d_model)
        assert abs(spike.input_value) == pytest.approx(float(post.abs().max()))
        assert abs(spike.output_value) == pytest.approx(float(out.abs().max()))
        assert spike.input_value == pytest.approx(float(post[spike.input_position, spike.input_channel]))
        assert spike.output_value == pytest.approx(float(out[spike.output_position, spike.output_channel]))


def test_detection_finds_planted_weights_one_per_pass(planted: LoadedModel) -> None:
    before = state(planted.model)
    detection = detect_super_weights(
        planted.model, probe(planted), layers=[0, 1], threshold=50, max_iterations=10
    )
    found = [(f.weight.layer, f.weight.row, f.weight.col, f.iteration, f.value) for f in detection.found]
    assert found == [(LAYER, FIRST_ROW, NEURON, 0, 10.0), (LAYER, SECOND_ROW, NEURON, 1, 8.0)]
    assert detection.converged and len(detection.passes) == 3
    assert_same_state(before, planted.model)


def test_detection_stops_at_max_iterations_unconverged(planted: LoadedModel) -> None:
    detection = detect_super_weights(
        planted.model, probe(planted), layers=[0, 1], threshold=50, max_iterations=1
    )
    assert [f.weight for f in detection.found] == [SuperWeight(LAYER, FIRST_ROW, NEURON)]
    assert not detection.converged


def test_nothing_found_below_threshold_lists_top_candidates(
    planted: LoadedModel, dataset: TokenDataset
) -> None:
    output, ctx = run(planted, dataset, spike_threshold=1e6, perplexity=False)
    assert output.summary["n_found"] == 0 and output.summary["ppl"] is None
    top = output.summary["top_candidates"][0]
    assert (top["layer"], top["row"], top["col"]) == (LAYER, FIRST_ROW, NEURON)
    assert "No layer has both spikes above spike_threshold=1e+06" in ctx.notes[0]
    assert list(output.plots) == ["detection_iterations.png"]


def test_nothing_found_with_perplexity_measures_only_the_baseline(
    planted: LoadedModel, dataset: TokenDataset
) -> None:
    output, _ = run(planted, dataset, spike_threshold=1e6)
    summary = output.summary
    assert summary["n_found"] == 0 and summary["controls"] is None
    assert summary["ppl"]["baseline"] == pytest.approx(ppl_with(planted, dataset, []), rel=1e-5)
    assert summary["ppl"]["all_zeroed"] is None and summary["ppl"]["restored"] is None  # nothing zeroed


# --- the analysis --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def result(planted: LoadedModel, dataset: TokenDataset) -> tuple[StepOutput, StepContext]:
    return run(planted, dataset, control_each=True, batch_size=4)


def ppl_with(planted: LoadedModel, dataset: TokenDataset, zero: list[tuple[int, int, int]]) -> float:
    """Perplexity by hand: copy the model, zero ``W_out[col, row]`` directly, exp(mean CE)."""
    model = copy.deepcopy(planted.model)
    with torch.no_grad():
        for layer, row, col in zero:
            model.blocks[layer].mlp.W_out[col, row] = 0.0
    return math.exp(float(manual_losses(model, dataset.tokens).mean()))


def test_perplexities_match_direct_computation(
    planted: LoadedModel, dataset: TokenDataset, result: tuple[StepOutput, StepContext]
) -> None:
    summary = result[0].summary
    first, second = (LAYER, FIRST_ROW, NEURON), (LAYER, SECOND_ROW, NEURON)
    assert summary["ppl"]["baseline"] == pytest.approx(ppl_with(planted, dataset, []), rel=1e-5)
    assert summary["weights"][0]["ppl"] == pytest.approx(ppl_with(planted, dataset, [first]), rel=1e-5)
    assert summary["weights"][1]["ppl"] == pytest.approx(ppl_with(planted, dataset, [second]), rel=1e-5)
    assert summary["ppl"]["all_zeroed"] == pytest.approx(
        ppl_with(planted, dataset, [first, second]), rel=1e-5
    )
    ratio = summary["ppl"]["all_zeroed"] / summary["ppl"]["baseline"]
    assert summary["ppl"]["ratio_all"] == pytest.approx(ratio)


def test_restored_perplexity_equals_baseline_exactly(
    planted: LoadedModel, result: tuple[StepOutput, StepContext]
) -> None:
    ppl = result[0].summary["ppl"]
    # The same computation: one model, its weights written back bit for bit, the same batches.
    assert ppl["restored"] == ppl["baseline"]
    assert ppl["restored_exact"] is True and ppl["weights_restored_exact"] is True
    assert float(planted.model.blocks[LAYER].mlp.W_out.detach()[NEURON, FIRST_ROW]) == 10.0


def test_magnitude_controls_are_largest_ordinary_weights(planted: LoadedModel) -> None:
    found = [SuperWeight(LAYER, FIRST_ROW, NEURON), SuperWeight(LAYER, SECOND_ROW, NEURON)]
    controls = magnitude_controls(planted.model, found)
    w_out = planted.model.blocks[LAYER].mlp.W_out.detach().clone()
    w_out[NEURON, FIRST_ROW] = w_out[NEURON, SECOND_ROW] = 0  # the super weights are excluded
    order = torch.argsort(w_out.abs().flatten(), descending=True)[:2].tolist()
    expected = [SuperWeight(LAYER, flat % w_out.shape[1], flat // w_out.shape[1]) for flat in order]
    assert controls == expected


def test_controls_are_ordinary_weights_of_the_same_tensor(
    planted: LoadedModel, dataset: TokenDataset, result: tuple[StepOutput, StepContext]
) -> None:
    controls = result[0].summary["controls"]
    found = {(w["layer"], w["row"], w["col"]) for w in result[0].summary["weights"]}
    for group in ("random", "magnitude"):
        coords = [(c["layer"], c["row"], c["col"]) for c in controls[group]]
        assert len(set(coords)) == 2 and not set(coords) & found
        assert all(layer == LAYER for layer, _, _ in coords)
        for control, (layer, row, col) in zip(controls[group], coords, strict=True):
            weight = float(planted.model.blocks[layer].mlp.W_out.detach()[col, row])
            assert control["value"] == weight  # read back, not computed
            assert control["ppl"] == pytest.approx(ppl_with(planted, dataset, [(layer, row, col)]), rel=1e-5)


def test_random_controls_follow_the_case_seed(planted: LoadedModel, dataset: TokenDataset) -> None:
    def coords(seed: int) -> list[tuple[int, int]]:
        output, _ = run(planted, dataset, seed=seed, perplexity=True, batch_size=6)
        return [(c["row"], c["col"]) for c in output.summary["controls"]["random"]]

    assert coords(1) == coords(1)
    assert coords(1) != coords(2)


def test_summary_names_the_strongest_weight(result: tuple[StepOutput, StepContext]) -> None:
    summary = result[0].summary
    ratios = [w["ppl_ratio"] for w in summary["weights"]]
    # Picked from the weights' records: the same numbers, not recomputed.
    assert summary["strongest"]["ppl_ratio"] == max(ratios)
    assert summary["ppl"]["max_single_ratio"] == max(ratios)
    assert summary["n_found"] == 2 and summary["converged"] is True and summary["iterations"] == 3


def test_data_files_use_the_seed_names(result: tuple[StepOutput, StepContext], tmp_path: Path) -> None:
    written = RunFolder(tmp_path).write_data("case", result[0].data)
    names = {Path(p).relative_to("data/case").as_posix() for p in written}
    assert {
        "super_weights.csv",
        "super_weights.jsonl",
        "detection_spikes.csv",
        "analysis.json",
        "combined_analysis.json",
        "individual_analyses/sw_0_analysis.json",
        "individual_analyses/sw_1_analysis.json",
    } <= names
    rows = (tmp_path / "data/case/super_weights.csv").read_text().splitlines()
    assert rows[0].startswith("index,model,tensor,layer,row,col,value")
    assert rows[1].startswith(f"0,planted,down_proj,{LAYER},{FIRST_ROW},{NEURON},10.0")


def test_plots_are_the_seed_figures(result: tuple[StepOutput, StepContext], tmp_path: Path) -> None:
    written = RunFolder(tmp_path).write_plots("case", result[0].plots)
    assert sorted(Path(p).name for p in written) == [
        "combined_analysis.png",
        "detection_iterations.png",
        "impact_comparison.png",
        "super_weight_distribution.png",
    ]
    impact = result[0].plots["impact_comparison.png"].axes[0]
    assert impact.get_yscale() == "log"


def test_layers_beyond_the_model_name_the_valid_range(planted: LoadedModel, dataset: TokenDataset) -> None:
    with pytest.raises(ResourceError, match=r"layer 4 does not exist .* which has 2 layers \(0-1\)"):
        run(planted, dataset, layers="0-1,4")


def test_params_reject_unknown_keys_and_bad_threshold() -> None:
    with pytest.raises(ValidationError, match="extra"):
        SuperWeightsParams(spike_treshold=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="greater than 0"):
        SuperWeightsParams(spike_threshold=0)


def test_every_param_has_a_description() -> None:
    assert all(field.description for field in SuperWeightsParams.model_fields.values())


# --- report partials ------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["super_weights.md.j2", "super_weights.html.j2"])
def test_report_partial_lists_weights_and_perplexities(
    result: tuple[StepOutput, StepContext], render_partial: Callable[..., str], template: str
) -> None:
    text = render_partial(result[0], template)
    summary = result[0].summary
    assert "Super weights" in text
    assert f"{summary['ppl']['baseline']:.4g}" in text
    assert str(FIRST_ROW) in text and str(NEURON) in text
    assert "combined_analysis" in text


@pytest.mark.parametrize("template", ["super_weights.md.j2", "super_weights.html.j2"])
def test_report_partial_handles_nothing_found(
    planted: LoadedModel, dataset: TokenDataset, render_partial: Callable[..., str], template: str
) -> None:
    output, _ = run(planted, dataset, spike_threshold=1e6, perplexity=False)
    text = render_partial(output, template)
    assert "No weight passed" in text


# --- the transformers view and accuracy through lm-eval --------------------------------------------------


@pytest.fixture(scope="module")
def llama(tiny_llama: Any, tiny_tokenizer: Any) -> LoadedModel:
    """The tiny transformers Llama as a HookedTransformer with raw weights (grouped KV heads, RoPE)."""
    model = hooked_llama_from_hf(copy.deepcopy(tiny_llama), tiny_tokenizer)
    return LoadedModel("tiny-llama", model, tiny_tokenizer, "tiny llama", {})


def test_hf_view_computes_the_same_logits_as_the_hooked_model(llama: LoadedModel, tiny_llama: Any) -> None:
    tokens = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        view = hf_llama_view(llama.model)(tokens).logits
        original = tiny_llama(tokens).logits
        hooked = llama.model(tokens)
    assert torch.allclose(view, hooked, atol=1e-4)
    assert torch.allclose(view, original, atol=1e-4)


def test_hf_view_shares_down_projections_with_the_hooked_model(llama: LoadedModel) -> None:
    view = hf_llama_view(llama.model)
    down = view.model.layers[1].mlp.down_proj.weight
    original = float(down[3, 4])
    assert original == float(llama.model.blocks[1].mlp.W_out.detach()[4, 3])  # one storage: the same value
    with zeroed(llama.model, [SuperWeight(1, 3, 4)]):
        assert float(down[3, 4]) == 0.0
    assert float(down[3, 4]) == original


def test_hf_view_refuses_other_architectures(tiny_model: LoadedModel) -> None:
    with pytest.raises(ResourceError, match="only Llama-architecture models"):
        hf_llama_view(tiny_model.model)


QUESTIONS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "Rome"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "five", "six"], "answer": 0},
    {"question": "The sky on a clear day is", "choices": ["green", "blue", "red"], "answer": 1},
    {
        "question": "Water freezes at zero degrees",
        "choices": ["Fahrenheit", "Kelvin", "Celsius"],
        "answer": 2,
    },
    {"question": "A week has seven", "choices": ["days", "hours", "years"], "answer": 0},
    {"question": "The opposite of hot is", "choices": ["warm", "cold", "loud"], "answer": 1},
]

TASK_YAML = """
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local multiple-choice lm-eval task: a JSONL file and the YAML that describes it."""
    directory = tmp_path_factory.mktemp("spec") / "tasks"
    directory.mkdir()
    data = directory / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (directory / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    return directory


def hand_accuracy(model: Any, tokenizer: Any) -> float:
    """lm-eval's ``acc`` by hand: pick the choice whose tokens after ``question + " "`` are most likely."""
    correct = 0
    for item in QUESTIONS:
        context = tokenizer(item["question"])["input_ids"]
        scores = []
        for choice in item["choices"]:
            whole = tokenizer(f"{item['question']} {choice}")["input_ids"]
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([whole]))[0].double(), dim=-1)  # (T, V)
            scores.append(sum(float(log_probs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        correct += int(int(np.argmax(scores)) == item["answer"])
    return correct / len(QUESTIONS)


def run_accuracy(llama: LoadedModel, dataset: TokenDataset, spec_dir: Path, **params: Any) -> StepOutput:
    """super_weights on the tiny Llama: a low threshold finds one weight in layer 0, then accuracy."""
    resources = {"model": llama, "dataset": dataset}
    ctx = StepContext(
        case_id="case", seed=0, device="cpu", resources=resources.__getitem__, spec_dir=spec_dir
    )
    settings = {"spike_threshold": 1e-3, "layers": "0", "max_iterations": 1, "perplexity": False}
    return super_weights(ctx, SuperWeightsParams(**{**settings, **params}))


@pytest.fixture(scope="module")
def with_accuracy(llama: LoadedModel, dataset: TokenDataset, task_dir: Path) -> StepOutput:
    pytest.importorskip("lm_eval")
    return run_accuracy(llama, dataset, task_dir.parent, accuracy_tasks=["tiny_mc"], task_dir="tasks")


def test_accuracy_matches_multiple_choice_scored_by_hand(
    llama: LoadedModel, with_accuracy: StepOutput
) -> None:
    row = with_accuracy.summary["accuracy"]["tiny_mc"]
    weight = with_accuracy.summary["weights"][0]
    edited = copy.deepcopy(llama.model)
    with torch.no_grad():
        edited.blocks[weight["layer"]].mlp.W_out[weight["col"], weight["row"]] = 0.0
    assert row["metric"] == "acc,none" and row["n"] == len(QUESTIONS)
    assert row["baseline"] == pytest.approx(hand_accuracy(llama.model, llama.tokenizer))
    assert row["all_zeroed"] == pytest.approx(hand_accuracy(edited, llama.tokenizer))
    assert "accuracy_comparison.png" in with_accuracy.plots


@pytest.mark.parametrize("template", ["super_weights.md.j2", "super_weights.html.j2"])
def test_report_partial_shows_accuracy(
    with_accuracy: StepOutput, render_partial: Callable[..., str], template: str
) -> None:
    text = render_partial(with_accuracy, template)
    assert "Accuracy" in text and "tiny_mc" in text and "acc,none" in text


def test_unknown_accuracy_task_suggests_close_names(
    llama: LoadedModel, dataset: TokenDataset, task_dir: Path
) -> None:
    pytest.importorskip("lm_eval")
    with pytest.raises(
        ResourceError, match=r"lm-eval knows no task 'tiny_mcq'\.\n  'tiny_mcq': Did you mean 'tiny_mc'"
    ):
        run_accuracy(llama, dataset, task_dir.parent, accuracy_tasks=["tiny_mcq"], task_dir="tasks")


def test_accuracy_without_lm_eval_says_what_to_install(
    llama: LoadedModel, dataset: TokenDataset, task_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(ResourceError, match=r"pip install lm-eval"):
        run_accuracy(llama, dataset, task_dir.parent, accuracy_tasks=["tiny_mc"], task_dir="tasks")


def test_accuracy_on_another_architecture_fails_before_any_work(
    tiny_model: LoadedModel, dataset: TokenDataset, task_dir: Path
) -> None:
    pytest.importorskip("lm_eval")
    with pytest.raises(ResourceError, match="only Llama-architecture models"):
        run_accuracy(tiny_model, dataset, task_dir.parent, accuracy_tasks=["tiny_mc"], task_dir="tasks")

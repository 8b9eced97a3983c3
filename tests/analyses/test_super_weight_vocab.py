"""super_weight_vocab against independent computations on tiny models.

Vocabulary effects are checked against finite differences through the model's own final norm (with
its scale pinned) and unembedding; interventions against cross-entropies computed by hand from the
logits of a copy of the model whose weights were edited directly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from analyses.super_weight_vocab import SuperWeightVocabParams, super_weight_vocab
from analyses.super_weight_vocab.compute import (
    METRICS,
    STOPWORDS,
    Vocabulary,
    build_windows,
    enrichment,
    moments,
    neuron_effects,
    token_classes,
    window_metrics,
)
from analyses.super_weights import SuperWeightsParams, SuperWeightsResult, WeightRecord
from runner.artifacts import RunFolder
from runner.datasets import TokenDataset
from runner.errors import ResourceError, RunnerError
from runner.models import LoadedModel, hooked_llama_from_hf
from runner.step import FinishedCase, StepContext, StepOutput

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
BOS = 1  # the tiny tokenizer's <|bos|>
LAYER, NEURON, ROW = 1, 5, 7
WEIGHT = [LAYER, ROW, NEURON]
WINDOWS = {"tokens": 36, "window_len": 10, "stride": 9}  # 4 windows of BOS + 9 text tokens, no overlap


@pytest.fixture(scope="module")
def planted(tiny_model: LoadedModel) -> LoadedModel:
    """The tiny model with neuron 5 of layer 1 firing near 200 and writing 2000 into channel 7."""
    model = copy.deepcopy(tiny_model.model)
    with torch.no_grad():
        model.blocks[LAYER].mlp.b_in[NEURON] = 200.0
        model.blocks[LAYER].mlp.W_out[NEURON, ROW] = 10.0
    return LoadedModel("planted", model, tiny_model.tokenizer, "tiny model with a planted weight", {})


@pytest.fixture(scope="module")
def llama(tiny_llama: Any, tiny_tokenizer: Any) -> LoadedModel:
    """The tiny transformers Llama as a HookedTransformer: RMSNorm with a non-trivial final gain."""
    model = hooked_llama_from_hf(tiny_llama, tiny_tokenizer)
    return LoadedModel("tiny-llama", model, tiny_tokenizer, "tiny llama", {})


@pytest.fixture(scope="module")
def dataset() -> TokenDataset:
    generator = torch.Generator().manual_seed(5)
    body = torch.randint(3, 320, (5, 9), generator=generator)  # ids 0-2 are special tokens
    tokens = torch.cat([torch.full((5, 1), BOS), body], dim=1)  # (5, 10): BOS + 9 text tokens
    return TokenDataset("random", tokens, fingerprint="x")


def context(
    loaded: LoadedModel, dataset: TokenDataset, finished: list[FinishedCase] | None = None, seed: int = 0
) -> StepContext:
    return StepContext.standalone(
        model=loaded,
        dataset=dataset,
        seed=seed,
        case_id="case",
        finished={"super_weights": list(finished or [])},
    )


def run(loaded: LoadedModel, dataset: TokenDataset, **params: Any) -> tuple[StepOutput, StepContext]:
    ctx = context(loaded, dataset)
    return super_weight_vocab(ctx, SuperWeightVocabParams(**params)), ctx


@pytest.fixture(scope="module")
def result(planted: LoadedModel, dataset: TokenDataset) -> tuple[StepOutput, StepContext]:
    return run(planted, dataset, weights=[WEIGHT], cascade_layers=[0, 1], bootstrap=50, top_k=5, **WINDOWS)


def windows_of(dataset: TokenDataset) -> torch.Tensor:
    """The four windows the WINDOWS settings cut, by hand: the text stream in chunks of 9, BOS first."""
    stream = dataset.tokens[:, 1:].reshape(-1)[:36].view(4, 9)
    return torch.cat([torch.full((4, 1), BOS), stream], dim=1)  # (4, 10)


def hand_metrics(model: Any, tokens: torch.Tensor, stop_ids: list[int]) -> dict[str, float]:
    """Loss, entropy, top-2 margin and stopword mass from the logits, averaged over positions 0..T-2."""
    with torch.no_grad():
        logits = model(tokens).double()[:, :-1]  # (B, T-1, V)
    probs = torch.softmax(logits, dim=-1)
    loss = -torch.log(probs.gather(-1, tokens[:, 1:, None])[..., 0])
    entropy = -(probs * torch.log(probs)).sum(-1)
    top = probs.topk(2, dim=-1).values
    stop = probs[..., stop_ids].sum(-1)
    values = {
        "loss": loss,
        "entropy": entropy,
        "topk_margin": top[..., 0] - top[..., 1],
        "stopword_mass": stop,
    }
    return {name: float(value.mean()) for name, value in values.items()}


def edited(loaded: LoadedModel, zero_row: bool = False) -> Any:
    """A copy of the model with the weight (or its neuron's whole output row) zeroed by hand."""
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        if zero_row:
            model.blocks[LAYER].mlp.W_out[NEURON, :] = 0.0
        else:
            model.blocks[LAYER].mlp.W_out[NEURON, ROW] = 0.0
    return model


def stop_ids_of(loaded: LoadedModel) -> list[int]:
    strs = loaded.tokenizer.batch_decode([[i] for i in range(loaded.model.cfg.d_vocab)])
    return [i for i, s in enumerate(strs) if s.strip().lower() in STOPWORDS]


# --- vocabulary effects --------------------------------------------------------------------------------


def pinned_scale_logit_change(loaded: LoadedModel, direction: torch.Tensor) -> torch.Tensor:
    """logits(x + d) - logits(x) through ln_final and W_U with the norm's scale pinned to 1."""
    model = loaded.model
    x = torch.randn(1, 1, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    model.ln_final.hook_scale.add_hook(lambda scale, hook: torch.ones_like(scale))
    try:
        with torch.no_grad():
            change = model.unembed(model.ln_final(x + direction)) - model.unembed(model.ln_final(x))
    finally:
        model.reset_hooks()
    return change[0, 0].double()  # (V,)


@pytest.mark.parametrize("which", ["planted", "llama"])
def test_vocab_effects_equal_logit_change_through_final_norm_and_unembedding(
    which: str, request: pytest.FixtureRequest
) -> None:
    loaded: LoadedModel = request.getfixturevalue(which)
    effects, _ = neuron_effects(loaded.model, LAYER, NEURON)
    direction = loaded.model.blocks[LAYER].mlp.W_out.detach()[NEURON]  # (d_model,)
    expected = pinned_scale_logit_change(loaded, direction)
    assert np.allclose(effects, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_llama_final_norm_gain_is_not_trivial(llama: LoadedModel) -> None:
    # Otherwise the test above could not tell a missing gain from a present one.
    assert not torch.allclose(llama.model.ln_final.w, torch.ones_like(llama.model.ln_final.w))


def test_cosine_variant_is_cosine_similarity_with_unembedding_columns(llama: LoadedModel) -> None:
    effects, cosine = neuron_effects(llama.model, LAYER, NEURON)
    direction = llama.model.blocks[LAYER].mlp.W_out.detach()[NEURON] * llama.model.ln_final.w.detach()
    expected = torch.nn.functional.cosine_similarity(direction[:, None], llama.model.W_U.detach(), dim=0)
    assert np.allclose(cosine, expected.numpy(), atol=1e-5)


def test_moments_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    values = np.random.default_rng(0).gamma(2.0, size=5000)
    shape = moments(values)
    assert shape["var"] == pytest.approx(values.var())
    assert shape["skew"] == pytest.approx(stats.skew(values))
    assert shape["kurt"] == pytest.approx(stats.kurtosis(values, fisher=True))


def test_token_classes_sort_typical_tokens() -> None:
    classes = token_classes(["1999", " (", " the", "\n", " Python", "ing", "snake_case", " ."])
    assert classes["digits_years"].tolist() == [True, False, False, False, False, False, False, False]
    assert classes["punctuation_brackets"][[1, 7]].all() and not classes["punctuation_brackets"][0]
    assert classes["function_words"].tolist() == [False, False, True, False, False, False, False, False]
    assert classes["whitespace_newlines"][3] and classes["capitalized_words"][4]
    assert classes["subword_continuations"][5] and classes["code_identifiers"][6]


def test_enrichment_ranks_the_promoted_class_first() -> None:
    strs = [str(i) for i in range(50)] + [f" word{i}" for i in range(450)]
    vocab = Vocabulary(strs, strs, token_classes(strs))
    effects = np.random.default_rng(0).normal(size=500)
    effects[:50] += 4.0  # promote the digit tokens
    rows = enrichment(effects, vocab, top_k=20)
    digits = rows[0]
    assert digits["class"] == "digits_years"
    expected = (effects[:50].mean() - effects.mean()) / effects.std()
    assert digits["score"] == pytest.approx(expected)
    assert digits["top_up_share"] == 1.0 and digits["base_rate"] == 0.1


def test_neuron_card_lists_top_tokens_by_effect(
    planted: LoadedModel, result: tuple[StepOutput, StepContext]
) -> None:
    card = result[0].data["neurons.jsonl"][0]
    effects, _ = neuron_effects(planted.model, LAYER, NEURON)  # the analysis' own computation, repeated
    assert [t["id"] for t in card["top_tokens_up"]] == np.argsort(-effects)[:5].tolist()
    assert [t["id"] for t in card["top_tokens_down"]] == np.argsort(effects)[:5].tolist()
    first = card["top_tokens_up"][0]
    assert first["str"] == planted.tokenizer.decode([first["id"]])
    assert first["effect"] == pytest.approx(float(effects.max()))
    assert card["label"] in {"prediction", "suppression", "none"}


# --- windows ---------------------------------------------------------------------------------------------


def test_windows_rejoin_the_stream_and_put_bos_first(dataset: TokenDataset) -> None:
    windows = build_windows(dataset, BOS, 64, SuperWeightVocabParams(**WINDOWS))
    assert torch.equal(windows.tokens, windows_of(dataset))
    assert windows.starts == [0, 9, 18, 27] and windows.bos and windows.unused == 0


def test_overlapping_windows_start_every_stride(dataset: TokenDataset) -> None:
    windows = build_windows(dataset, BOS, 64, SuperWeightVocabParams(tokens=40, window_len=10, stride=4))
    stream = dataset.tokens[:, 1:].reshape(-1)
    assert windows.starts == [0, 4, 8, 12, 16, 20, 24, 28]
    assert torch.equal(windows.tokens[3, 1:], stream[12:21])
    assert windows.unused == 40 - (28 + 9)


def test_windows_without_bos_use_whole_passages(dataset: TokenDataset) -> None:
    windows = build_windows(dataset, None, 64, SuperWeightVocabParams(tokens=20, window_len=10, stride=10))
    assert torch.equal(windows.tokens, dataset.tokens.reshape(-1)[:20].view(2, 10))


def test_too_many_tokens_names_the_passages_needed_and_a_fitting_setting(dataset: TokenDataset) -> None:
    params = SuperWeightVocabParams(tokens=100, window_len=10, stride=9)
    with pytest.raises(ResourceError) as caught:
        build_windows(dataset, BOS, 64, params)
    message = str(caught.value)
    assert "tokens (100) exceeds the 45 text tokens of the dataset (5 passages × 9)" in message
    assert "raise dataset.max_passages to 12" in message
    assert "A setting that fits: tokens: 45, window_len: 10, stride: 9" in message


def test_window_longer_than_model_context_is_refused_with_a_fitting_setting(dataset: TokenDataset) -> None:
    params = SuperWeightVocabParams(tokens=40, window_len=20, stride=10)
    with pytest.raises(ResourceError) as caught:
        build_windows(dataset, BOS, 8, params)
    message = str(caught.value)
    assert "window_len (20) exceeds the model's context of 8 tokens" in message
    recommended = message.rsplit("A setting that fits: ", 1)[1]
    assert recommended == "tokens: 35, window_len: 8, stride: 7"
    fitting = dict(item.split(": ") for item in recommended.split(", "))
    build_windows(dataset, BOS, 8, SuperWeightVocabParams(**{k: int(v) for k, v in fitting.items()}))


def test_stride_beyond_text_of_a_bos_window_is_refused(dataset: TokenDataset) -> None:
    with pytest.raises(ResourceError, match=r"stride \(10\) exceeds the 9 text tokens of a window"):
        build_windows(dataset, BOS, 64, SuperWeightVocabParams(tokens=40, window_len=10, stride=10))


def test_window_errors_are_raised_by_the_analysis(planted: LoadedModel, dataset: TokenDataset) -> None:
    with pytest.raises(ResourceError, match="the window settings do not fit this dataset and model"):
        run(planted, dataset, weights=[WEIGHT], tokens=30000, window_len=1024, stride=512)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"window_len": 10, "stride": 11}, r"stride \(11\) is larger than window_len \(10\)"),
        ({"tokens": 5, "window_len": 10, "stride": 5}, r"window_len \(10\) is larger than tokens \(5\)"),
        ({"window_len": 2, "stride": 1, "drop_first_token": True}, "drop_first_token needs window_len >= 3"),
    ],
)
def test_params_refuse_windows_that_cannot_work(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SuperWeightVocabParams(**params)


# --- interventions ---------------------------------------------------------------------------------------


def test_window_metrics_match_hand_computation(planted: LoadedModel, dataset: TokenDataset) -> None:
    tokens = windows_of(dataset)
    stop_ids = stop_ids_of(planted)
    with torch.no_grad():
        logits = planted.model(tokens)
    means, probs = window_metrics(logits, tokens, first=0, stop_ids=torch.tensor(stop_ids), margin_k=2)
    expected = hand_metrics(planted.model, tokens, stop_ids)
    for metric in METRICS:
        assert float(means[metric].mean()) == pytest.approx(expected[metric], rel=1e-4, abs=1e-6)
    assert float(probs.sum()) == pytest.approx(4 * 9, rel=1e-5)  # one distribution per scored position


def test_baselines_and_deltas_match_hand_computation(
    planted: LoadedModel, dataset: TokenDataset, result: tuple[StepOutput, StepContext]
) -> None:
    card = result[0].data["super_weights.jsonl"][0]
    tokens, stop_ids = windows_of(dataset), stop_ids_of(planted)
    base = hand_metrics(planted.model, tokens, stop_ids)
    zeroed = hand_metrics(edited(planted), tokens, stop_ids)
    neuron = hand_metrics(edited(planted, zero_row=True), tokens, stop_ids)
    for metric in METRICS:
        assert card["baselines"][metric] == pytest.approx(base[metric], rel=1e-4, abs=1e-6)
        assert card["deltas"][metric] == pytest.approx(zeroed[metric] - base[metric], rel=1e-3, abs=1e-5)
        expected = neuron[metric] - base[metric]
        assert card["controls"]["neuron_zero_delta"][metric] == pytest.approx(expected, rel=1e-3, abs=1e-5)
    assert abs(card["deltas"]["loss"]) > 1e-3  # the planted weight matters


def test_drop_first_token_scores_every_position_but_the_first(
    planted: LoadedModel, dataset: TokenDataset
) -> None:
    output, _ = run(
        planted, dataset, weights=[WEIGHT], drop_first_token=True, cascade=False, bootstrap=0, **WINDOWS
    )
    tokens = windows_of(dataset)
    with torch.no_grad():
        logits = planted.model(tokens).double()
    log_probs = torch.log_softmax(logits[:, 1:-1], dim=-1)  # positions 1..T-2
    loss = -log_probs.gather(-1, tokens[:, 2:, None])[..., 0]
    assert output.summary["baselines"]["loss"] == pytest.approx(float(loss.mean()), rel=1e-4)
    assert output.summary["windows"]["scored_positions"] == 4 * 8


def test_random_control_is_another_coordinate_of_the_same_tensor(
    planted: LoadedModel, dataset: TokenDataset, result: tuple[StepOutput, StepContext]
) -> None:
    control = result[0].data["super_weights.jsonl"][0]["controls"]["random_coord"]
    assert control["layer"] == LAYER and (control["row"], control["col"]) != (ROW, NEURON)
    model = copy.deepcopy(planted.model)
    with torch.no_grad():
        model.blocks[LAYER].mlp.W_out[control["col"], control["row"]] = 0.0
    tokens, stop_ids = windows_of(dataset), stop_ids_of(planted)
    expected = (
        hand_metrics(model, tokens, stop_ids)["loss"] - hand_metrics(planted.model, tokens, stop_ids)["loss"]
    )
    delta = result[0].data["super_weights.jsonl"][0]["controls"]["random_coord_delta"]["loss"]
    assert delta == pytest.approx(expected, abs=1e-5)


def test_cascade_at_the_last_layer_equals_the_output_change(result: tuple[StepOutput, StepContext]) -> None:
    card = result[0].data["super_weights.jsonl"][0]
    cascade = card["cascade"]
    assert cascade["layers"] == [0, 1]
    assert cascade["delta_entropy"][-1] == pytest.approx(card["deltas"]["entropy"], rel=1e-4, abs=1e-6)
    assert cascade["delta_margin"][-1] == pytest.approx(card["deltas"]["topk_margin"], rel=1e-4, abs=1e-6)


def test_cascade_before_the_edited_layer_does_not_change(
    planted: LoadedModel, dataset: TokenDataset, result: tuple[StepOutput, StepContext]
) -> None:
    cascade = result[0].data["super_weights.jsonl"][0]["cascade"]
    # Exact: up to layer 0's output the baseline and zeroed runs are the same computation (the zeroed
    # weight is in layer 1; same windows, same batches), so the two lenses read identical residuals.
    assert cascade["delta_entropy"][0] == 0.0 and cascade["delta_margin"][0] == 0.0


def test_bootstrap_interval_brackets_the_mean_delta(result: tuple[StepOutput, StepContext]) -> None:
    card = result[0].data["super_weights.jsonl"][0]
    for metric in METRICS:
        ci = card["bootstrap"][metric]
        assert ci["ci_2.5"] <= ci["mean"] <= ci["ci_97.5"]
        assert ci["mean"] == pytest.approx(card["deltas"][metric], abs=1e-9)


def test_bootstrap_zero_disables_intervals(planted: LoadedModel, dataset: TokenDataset) -> None:
    output, _ = run(planted, dataset, weights=[WEIGHT], bootstrap=0, cascade=False, **WINDOWS)
    assert output.data["super_weights.jsonl"][0]["bootstrap"] is None
    assert output.summary["weights"][0]["loss_ci"] is None


def test_probability_changes_list_the_largest_mean_changes(
    planted: LoadedModel, dataset: TokenDataset, result: tuple[StepOutput, StepContext]
) -> None:
    tokens = windows_of(dataset)
    with torch.no_grad():
        before = torch.softmax(planted.model(tokens).double()[:, :-1], -1).mean((0, 1))
        after = torch.softmax(edited(planted)(tokens).double()[:, :-1], -1).mean((0, 1))
    change = (after - before).numpy()
    listed = result[0].data["super_weights.jsonl"][0]["token_prob_changes"]
    assert [t["id"] for t in listed["up"]] == np.argsort(-change)[:5].tolist()
    assert listed["up"][0]["delta_prob"] == pytest.approx(float(change.max()), rel=1e-3)


def test_weights_are_restored_bit_exact(planted: LoadedModel, dataset: TokenDataset) -> None:
    before = {k: v.clone() for k, v in planted.model.state_dict().items()}
    run(planted, dataset, weights=[WEIGHT], bootstrap=0, **WINDOWS)
    # Bit-exact: `zeroed` writes the saved values back, a copy and not a computation.
    assert all(torch.equal(before[k], v) for k, v in planted.model.state_dict().items())


# --- reading the detection step ----------------------------------------------------------------------------


def finished(model_name: str, weights: list[dict[str, Any]]) -> FinishedCase[SuperWeightsResult]:
    """A finished ``super_weights`` case on ``model_name`` that found ``weights`` (the rest left empty)."""
    records = [
        WeightRecord(value=1.0, iteration=0, input_value=100.0, output_value=100.0, **w) for w in weights
    ]
    result = SuperWeightsResult(
        model=model_name,
        n_found=len(records),
        weights=records,
        strongest=None,
        ppl=None,
        controls=None,
        accuracy=None,
        converged=True,
        iterations=1,
        spike_threshold=50.0,
        probe_tokens=[],
        top_candidates=[],
    )
    params = SuperWeightsParams()
    return FinishedCase("super_weights", "super_weights", "super_weights", params, model_name, result)


def test_weights_come_from_the_detection_step_strongest_first(
    planted: LoadedModel, dataset: TokenDataset
) -> None:
    detected = [
        {"layer": 0, "row": 3, "col": 4, "ppl_ratio": 1.1},
        {"layer": LAYER, "row": ROW, "col": NEURON, "ppl_ratio": 9.0},
    ]
    ctx = context(planted, dataset, [finished("planted", detected)])
    params = SuperWeightVocabParams(max_weights=1, cascade=False, bootstrap=0, **WINDOWS)
    output = super_weight_vocab(ctx, params)
    assert [(w["layer"], w["row"], w["col"]) for w in output.summary["weights"]] == [(LAYER, ROW, NEURON)]
    assert output.data["super_weights.jsonl"][0]["detection"]["ppl_ratio"] == 9.0


def test_detection_step_on_another_model_is_refused(planted: LoadedModel, dataset: TokenDataset) -> None:
    ctx = context(planted, dataset, [finished("gpt2-small", [])])
    with pytest.raises(
        ResourceError, match=r"step 'super_weights' ran on \['gpt2-small'\], not on 'planted'"
    ):
        super_weight_vocab(ctx, SuperWeightVocabParams(**WINDOWS))


def test_missing_detection_step_says_to_list_it_first(planted: LoadedModel, dataset: TokenDataset) -> None:
    with pytest.raises(RunnerError, match="Step 'super_weights' has no finished case"):
        super_weight_vocab(context(planted, dataset), SuperWeightVocabParams(**WINDOWS))


def test_no_detected_weights_is_a_note_not_an_error(planted: LoadedModel, dataset: TokenDataset) -> None:
    ctx = context(planted, dataset, [finished("planted", [])])
    output = super_weight_vocab(ctx, SuperWeightVocabParams(**WINDOWS))
    assert output.summary["n_weights"] == 0
    assert "found no super weights" in ctx.notes[0]


def test_weights_outside_the_tensor_are_refused(planted: LoadedModel, dataset: TokenDataset) -> None:
    with pytest.raises(ResourceError, match="L1-R99-C5 is outside layer 1's down_proj, which has 32 rows"):
        run(planted, dataset, weights=[[1, 99, 5]], **WINDOWS)


def test_weights_in_missing_layers_name_the_valid_layers(planted: LoadedModel, dataset: TokenDataset) -> None:
    with pytest.raises(
        ResourceError, match=r"layer 7 does not exist in model 'planted', which has 2 layers \(0-1\)"
    ):
        run(planted, dataset, weights=[[7, 0, 0]], **WINDOWS)


# --- files, plots, report --------------------------------------------------------------------------------


def test_data_files_follow_the_seed_schemas(result: tuple[StepOutput, StepContext], tmp_path: Path) -> None:
    written = RunFolder(tmp_path).write_data("case", result[0].data)
    assert {Path(p).name for p in written} >= {
        "neurons.jsonl",
        "super_weights.jsonl",
        "neurons.csv",
        "super_weights.csv",
    }
    card = result[0].data["super_weights.jsonl"][0]
    assert set(card) >= {
        "model",
        "tensor",
        "layer",
        "row",
        "col",
        "baselines",
        "deltas",
        "controls",
        "cascade",
        "bootstrap",
    }
    assert set(card["controls"]) >= {"random_coord_delta", "neuron_zero_delta"}
    neuron = result[0].data["neurons.jsonl"][0]
    assert set(neuron) >= {
        "model",
        "layer",
        "neuron",
        "moments",
        "moments_cos",
        "top_tokens_up",
        "top_tokens_down",
    }
    assert set(neuron["top_tokens_up"][0]) == {"id", "tok", "str", "effect"}
    header = (tmp_path / "data/case/super_weights.csv").read_text().splitlines()[0]
    assert header.startswith("model,tensor,layer,row,col,value,baseline_loss")


def test_plots_are_named_as_the_seed_names_them(result: tuple[StepOutput, StepContext]) -> None:
    assert sorted(result[0].plots) == [
        f"neurons/{LAYER}-{NEURON}-effects.png",
        f"super_weights/down_proj-L{LAYER}-R{ROW}-C{NEURON}-cascade.png",
        f"super_weights/down_proj-L{LAYER}-R{ROW}-C{NEURON}-deltas.png",
    ]


@pytest.mark.parametrize("template", ["super_weight_vocab.md.j2", "super_weight_vocab.html.j2"])
def test_report_partial_shows_deltas_and_neurons(
    result: tuple[StepOutput, StepContext], render_partial: Callable[..., str], template: str
) -> None:
    output = result[0]
    text = render_partial(output, template)
    assert f"L{LAYER} R{ROW} C{NEURON}" in text and f"L{LAYER} N{NEURON}" in text
    assert f"{output.summary['weights'][0]['deltas']['loss']:.4g}" in text


def test_every_param_has_a_description() -> None:
    assert all(field.description for field in SuperWeightVocabParams.model_fields.values())


def test_stopword_mass_uses_common_function_words() -> None:
    assert {"the", "and", "of", "to", "a", "in"} <= STOPWORDS

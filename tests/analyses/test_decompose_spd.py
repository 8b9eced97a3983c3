"""decompose_spd: SPD recovers a planted one-component-per-feature decomposition; its losses are right.

The planted model: 4 features on an identity embedding, neuron i reads feature i and writes it back
(``mlp_in = mlp_out = I``), so the model computes ``relu(x) + x`` with exactly one rank-one piece of
each weight per feature. SPD, knowing none of that, must find one ``mlp_in`` component per feature.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from analyses._spd import (
    IMPORTANCE_EPS,
    Decomposition,
    SpdConfig,
    SpdTraining,
    annealed_p,
    faithfulness,
    load_spd_checkpoint,
    losses,
    lr_at,
    spd_from_arrays,
)
from analyses._toy_model import ResidMLP, ToyConfig, toy_tensors
from analyses.decompose_spd import DecomposeSpdParams, DecomposeSpdResult, decompose_spd
from analyses.decompose_spd.compute import settings_of
from analyses.train_toy_model import TrainToyModelResult
from runner.artifacts import RunFolder
from runner.step import FinishedCase, StepContext, StepOutput

N = 4


def planted_model() -> ResidMLP:
    model = ResidMLP(ToyConfig(n_features=N, d_embed=N, d_mlp=N, n_layers=1, feature_probability=0.3))
    with torch.no_grad():
        for tensor in (model.W_E, model.W_U, model.layers[0].mlp_in.weight, model.layers[0].mlp_out.weight):
            tensor.copy_(torch.eye(N))
    return model.requires_grad_(False).eval()


def as_finished_case(model: ResidMLP, step_id: str = "train") -> FinishedCase[TrainToyModelResult]:
    result = TrainToyModelResult(
        toy_config=model.config.to_json(),
        n_features=N,
        d_embed=N,
        d_mlp=N,
        n_layers=1,
        steps=0,
        final_loss=0.0,
        identity_loss=0.0,
        one_hot_error=0.0,
        seconds=0.0,
        tensors={k: v.numpy() for k, v in toy_tensors(model).items()},
    )
    return FinishedCase(step_id, step_id, "train_toy_model", None, "toy", result)  # type: ignore[arg-type]


PARAMS = {
    "C": 8,
    "steps": 800,
    "batch_size": 256,
    "lr": 1e-2,
    "importance_minimality_coeff": 3e-3,
    "pnorm": 1.0,
    "faithfulness_warmup_steps": 100,
    "eval_batches": 2,
}


@pytest.fixture(scope="module")
def decomposed() -> StepOutput:
    ctx = StepContext.standalone(case_id="decompose", finished={"train": [as_finished_case(planted_model())]})
    return decompose_spd(ctx, DecomposeSpdParams(**PARAMS))


def test_each_planted_feature_gets_exactly_one_mlp_in_component(decomposed: StepOutput) -> None:
    result = decomposed.result
    assert isinstance(result, DecomposeSpdResult)
    assert result.exactly_one_mlp_in == 1.0, result.active_counts
    # One component per feature, and a different one for each feature.
    assert len(set(result.top_component["layers.0.mlp_in"])) == N


def test_the_found_components_are_the_planted_rank_one_pieces(decomposed: StepOutput) -> None:
    result = decomposed.result
    assert isinstance(result, DecomposeSpdResult)
    V, U = result.tensors["V.layers-0-mlp_in"], result.tensors["U.layers-0-mlp_in"]
    for feature, c in enumerate(result.top_component["layers.0.mlp_in"]):
        piece = np.outer(V[:, c], U[c])  # (d_in, d_out): the component as a weight, x @ piece
        direction = piece / np.linalg.norm(piece)
        # The planted piece is e_f e_f^T; the learnt one points the same way (cosine above 0.9).
        assert direction[feature, feature] > 0.9, (feature, direction.round(2))


def test_reported_faithfulness_is_the_mean_squared_weight_delta(decomposed: StepOutput) -> None:
    result = decomposed.result
    assert isinstance(result, DecomposeSpdResult)
    t = result.tensors
    squares, count = 0.0, 0
    for name in result.modules:
        key = name.replace(".", "-")
        delta = t[f"target.{name}.weight"] - (t[f"V.{key}"] @ t[f"U.{key}"]).T
        squares, count = squares + float((delta.astype(np.float64) ** 2).sum()), count + delta.size
    # float64 numpy against the float32 torch computation: equal to float32 rounding.
    assert result.losses["faithfulness"] == pytest.approx(squares / count, rel=1e-4)


def test_checkpoint_files_reload_the_same_decomposition(decomposed: StepOutput, tmp_path: Path) -> None:
    RunFolder(tmp_path).write_data("decompose", decomposed.data)
    model = load_spd_checkpoint(tmp_path / "data" / "decompose")
    result = decomposed.result
    assert isinstance(result, DecomposeSpdResult)
    for name, value in result.tensors.items():
        assert np.array_equal(model.state_dict()[name].numpy(), value), name
    rebuilt = spd_from_arrays(model.config, result.tensors)
    assert float(faithfulness(rebuilt)) == float(faithfulness(model))  # same tensors, same computation


def test_params_carry_every_training_setting() -> None:
    settings = settings_of(DecomposeSpdParams(**PARAMS))
    assert settings == SpdTraining(
        C=8,
        ci_hidden=(16,),
        steps=800,
        batch_size=256,
        lr=1e-2,
        importance_minimality_coeff=3e-3,
        pnorm=1.0,
        faithfulness_warmup_steps=100,
    )


def test_params_carry_the_schedules() -> None:
    params = DecomposeSpdParams(
        lr_schedule="cosine",
        lr_warmup_pct=0.1,
        p_anneal_start_frac=0.2,
        p_anneal_final_p=1.0,
        p_anneal_end_frac=0.8,
    )
    settings = settings_of(params)
    assert (settings.lr_schedule, settings.lr_warmup_pct) == ("cosine", 0.1)
    assert (settings.p_anneal_start_frac, settings.p_anneal_final_p, settings.p_anneal_end_frac) == (
        0.2,
        1.0,
        0.8,
    )
    with pytest.raises(ValidationError, match="p_anneal_end_frac"):
        DecomposeSpdParams(p_anneal_start_frac=0.8, p_anneal_final_p=1.0, p_anneal_end_frac=0.5)


def test_p_anneals_linearly_between_its_fractions() -> None:
    settings = SpdTraining(pnorm=2.0, p_anneal_start_frac=0.25, p_anneal_final_p=0.5, p_anneal_end_frac=0.75)
    # Hand values of the repository's _get_linear_annealed_p: flat, linear from 2 to 0.5, flat.
    assert [annealed_p(settings, f) for f in (0.0, 0.25, 0.5, 0.75, 1.0)] == pytest.approx(
        [2.0, 2.0, 1.25, 0.5, 0.5], abs=1e-12
    )
    assert annealed_p(SpdTraining(pnorm=2.0), 0.9) == 2.0  # no final p: no annealing


def test_learning_rate_warms_up_then_follows_a_half_cosine() -> None:
    settings = SpdTraining(steps=110, lr=1e-2, lr_schedule="cosine", lr_warmup_pct=10 / 110)
    assert lr_at(settings, 0) == pytest.approx(1e-3)
    assert lr_at(settings, 9) == pytest.approx(1e-2)
    assert lr_at(settings, 10) == pytest.approx(1e-2)  # cosine starts at the full rate
    assert lr_at(settings, 10 + 99 // 2) == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 49 / 99)))
    assert lr_at(settings, 109) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(SpdTraining(lr=3e-3), 500) == 3e-3  # constant


def test_importance_minimality_uses_the_p_of_that_point_in_training() -> None:
    model = planted_model()
    decomposition = Decomposition(
        model,
        SpdConfig(model.config, ("layers.0.mlp_in", "layers.0.mlp_out"), C=3),
        torch.Generator().manual_seed(0),
    )
    x = torch.tensor([[0.5, 0.0, -0.3, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.9, 0.0, 0.0]])
    settings = SpdTraining(pnorm=2.0, p_anneal_start_frac=0.0, p_anneal_final_p=1.0, p_anneal_end_frac=0.5)
    inputs = {"layers.0.mlp_in": x @ model.W_E}
    inputs["layers.0.mlp_out"] = torch.relu(inputs["layers.0.mlp_in"] @ model.layers[0].mlp_in.weight.T)
    with torch.no_grad():
        for frac, p in ((0.0, 2.0), (0.25, 1.5), (0.9, 1.0)):
            expected = 0.0
            for name, h in inputs.items():  # the upper leaky-hard sigmoid written out
                g = decomposition.pre_sigmoid(name, h)
                upper = torch.where(g > 1, 1 + 0.01 * (g - 1), g.clamp(0, 1))
                expected += float(((upper + IMPORTANCE_EPS) ** p).mean(0).sum())
            got = losses(decomposition, x, settings, torch.Generator().manual_seed(1), frac)
            # float32 sums in another order (empty rows deduplicated): relative 1e-5
            assert float(got["importance_minimality"]) == pytest.approx(expected, rel=1e-5)


def test_report_partial_states_the_recovery(
    decomposed: StepOutput, render_partial: Callable[..., str]
) -> None:
    text = render_partial(decomposed, "decompose_spd.md.j2", step_id="decompose")
    assert "**100%** of the 4 features activate exactly one `mlp_in` component" in text
    assert "| `layers.0.mlp_in` | 100% |" in text

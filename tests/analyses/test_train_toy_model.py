"""train_toy_model: SPD's toy residual MLP learns its labels and saves a checkpoint that reloads exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from analyses._toy_model import load_toy_checkpoint, sparse_features, toy_labels
from analyses.train_toy_model import TrainToyModelParams, TrainToyModelResult, train_toy_model
from runner.artifacts import RunFolder
from runner.step import StepContext, StepOutput

SMALL = {
    "n_features": 6,
    "d_embed": 24,
    "d_mlp": 4,
    "feature_probability": 0.2,
    "steps": 300,
    "batch_size": 256,
}


@pytest.fixture(scope="module")
def trained() -> StepOutput:
    return train_toy_model(StepContext.standalone(case_id="train"), TrainToyModelParams(**SMALL))


def test_training_beats_the_model_without_mlps(trained: StepOutput) -> None:
    result = trained.result
    assert isinstance(result, TrainToyModelResult)
    # relu(x) + x cannot be read off x W_E W_U alone; the MLPs must add relu(x).
    assert result.final_loss < 0.5 * result.identity_loss


def test_embedding_is_fixed_unit_norm_and_tied(trained: StepOutput) -> None:
    tensors = trained.result.tensors  # type: ignore[attr-defined]
    np.testing.assert_allclose(np.linalg.norm(tensors["W_E"], axis=1), 1.0, rtol=1e-6)
    assert np.array_equal(tensors["W_U"], tensors["W_E"].T)  # a copy, not a computation


def test_checkpoint_files_reload_the_same_model(trained: StepOutput, tmp_path: Path) -> None:
    RunFolder(tmp_path).write_data("train", trained.data)
    model = load_toy_checkpoint(tmp_path / "data" / "train")
    for name, value in trained.result.tensors.items():  # type: ignore[attr-defined]
        assert np.array_equal(model.state_dict()[name].numpy(), value), name


def test_loss_of_saved_model_matches_an_independent_computation(trained: StepOutput, tmp_path: Path) -> None:
    RunFolder(tmp_path).write_data("train", trained.data)
    model = load_toy_checkpoint(tmp_path / "data" / "train")
    t = {k: torch.as_tensor(v) for k, v in trained.result.tensors.items()}  # type: ignore[attr-defined]
    x = sparse_features(64, SMALL["n_features"], 0.5, torch.Generator().manual_seed(3))
    residual = x @ t["W_E"]
    residual = (
        residual + torch.relu(residual @ t["layers.0.mlp_in.weight"].T) @ t["layers.0.mlp_out.weight"].T
    )
    # Same operations in a different association order: equal to float32 rounding (1e-5 relative).
    torch.testing.assert_close(model(x), residual @ t["W_U"], rtol=1e-5, atol=1e-6)
    assert torch.equal(toy_labels(x, torch.ones(SMALL["n_features"])), torch.relu(x) + x)


def test_random_label_coefficients_lie_in_one_to_two() -> None:
    params = TrainToyModelParams(**{**SMALL, "steps": 1, "label_coeffs": "random"})
    coeffs = train_toy_model(StepContext.standalone(), params).result.tensors["label_coeffs"]  # type: ignore[attr-defined]
    assert coeffs.min() >= 1 and coeffs.max() <= 2 and len(set(coeffs.tolist())) == SMALL["n_features"]


def test_report_partial_states_the_losses(trained: StepOutput, render_partial: Callable[..., str]) -> None:
    text = render_partial(trained, "train_toy_model.md.j2", step_id="train")
    assert "6 features, d_embed 24, 1 × 4 neurons" in text
    assert "source: {from_step: train}" in text
    assert "plots/train/training_loss.png" in text

"""Train SPD's toy residual MLP (``resid_mlp``): sparse features computed by MLPs in superposition.

After Braun et al. 2025 ("Interpretability in Parameter Space") and the SPD repository's
``spd/experiments/resid_mlp/train_resid_mlp.py``: ``n_features`` features, each active with probability
``feature_probability`` and then uniform in (-1, 1), enter a residual stream of width ``d_embed``
through a fixed random embedding ``W_E`` (unit-norm rows, frozen; ``W_U = W_E^T``, frozen); each of
``n_layers`` blocks adds ``mlp_out(relu(mlp_in(residual)))``. The labels are ``relu(c_i * x_i) + x_i``
(``act_plus_resid``; ``c = 1`` or ``c ~ U[1, 2]`` drawn from ``label_seed``); the loss is the
importance-weighted MSE of the output read off through ``W_U`` (importance ``importance_val ** i`` for
feature i); AdamW (weight decay 0.01) with a half-cosine learning-rate decay.

The model is saved as ``resid_mlp.safetensors`` + ``resid_mlp_config.json`` in the case's data folder
(never a pickle) and carried by the result, so ``decompose_spd`` and ``magnitude_sweep`` read it with
``source: {from_step: <step id>}`` or ``source: {path: <that folder>}``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from runner.registry import analysis
from runner.results import Array, JSONValue, StepResult
from runner.step import StepContext, StepOutput


class TrainToyModelParams(BaseModel):
    """Parameters of ``train_toy_model`` (defaults: SPD's one-layer model, 100 / 1000 / 50)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    n_features: int = Field(default=100, ge=1)
    """Input (and output) features. SPD: 100 for one and two layers."""
    d_embed: int = Field(default=1000, ge=1)
    """Width of the residual stream. SPD: 1000."""
    d_mlp: int = Field(default=50, ge=1)
    """Neurons per MLP. SPD: 50 for one layer, 25 for two (fewer than features: superposition)."""
    n_layers: int = Field(default=1, ge=1)
    """Residual MLP blocks."""
    feature_probability: float = Field(default=0.01, gt=0, le=1)
    """Probability that a feature is active in a sample (then uniform in (-1, 1)). SPD: 0.01."""
    label_coeffs: Literal["ones", "random"] = "ones"
    """`ones`: labels `relu(x) + x` (SPD's trivial coefficients, its default); `random`: `relu(c x) + x`
    with `c ~ U[1, 2]` per feature, drawn from `label_seed`."""
    label_seed: int = 0
    """Seed of the random label coefficients."""
    importance_val: float = Field(default=1.0, gt=0)
    """Feature i's loss weight is `importance_val ** i` (1: every feature counts the same)."""
    in_bias: bool = False
    """Give `mlp_in` a bias (SPD: no)."""
    out_bias: bool = False
    """Give `mlp_out` a bias (SPD: no)."""
    steps: int = Field(default=1000, ge=1)
    """Optimizer steps. SPD: 1000 for one layer, 10000 for three."""
    batch_size: int = Field(default=2048, ge=1)
    """Samples per step (drawn fresh every step)."""
    lr: float = Field(default=3e-3, gt=0)
    """Peak AdamW learning rate, decayed to 0 along a half cosine."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""
    final_loss_batches: int = Field(default=10, ge=1)
    """Batches averaged for the final loss (SPD: 10)."""


class TrainToyModelResult(StepResult):
    """The trained toy model (read by later steps) and how well it learnt its labels."""

    toy_config: JSONValue
    """The model's config (`resid_mlp_config.json`): sizes, biases, feature probability."""
    n_features: int
    d_embed: int
    d_mlp: int
    n_layers: int
    steps: int
    final_loss: float
    """Importance-weighted MSE per output element, averaged over `final_loss_batches` fresh batches."""
    identity_loss: float
    """The same loss for the model with its MLPs removed (output `x W_E W_U`): what the MLPs must beat."""
    one_hot_error: float
    """Mean over features of |output_i - label_i| for the one-hot input e_i (magnitude 1)."""
    seconds: float
    tensors: dict[str, Array]
    """Every tensor of the model by parameter name (`W_E`, `layers.0.mlp_in.weight`, `label_coeffs`, ...)."""


@analysis("train_toy_model", params=TrainToyModelParams, result=TrainToyModelResult, needs=())
def train_toy_model(ctx: StepContext, params: TrainToyModelParams) -> StepOutput:
    """Train SPD's toy residual MLP on sparse features (offline, seconds to a minute on a CPU)."""
    from analyses.train_toy_model.compute import run

    return run(ctx, params)

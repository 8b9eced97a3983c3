"""Stochastic Parameter Decomposition (SPD) of a toy residual MLP, with causal-importance gates.

Bushnaq, Braun, Sharkey 2025, "Stochastic Parameter Decomposition", as implemented in the SPD
repository (goodfire-ai/spd; defaults from ``spd/experiments/resid_mlp/resid_mlp1_config.yaml``). Every
``layers.*.mlp_in`` and ``layers.*.mlp_out`` weight becomes C rank-one components ``V[:, c] U[c, :]``;
a scalar MLP per component (1 -> 16 -> 1, GELU) maps its inner activation ``x @ V[:, c]`` to a
pre-sigmoid value whose leaky-hard sigmoid is the component's causal importance (CI) in [0, 1].
Training minimises stochastic reconstruction (components masked by ``ci + (1 - ci) r``, ``r ~ U(0, 1)``,
plus the weight delta ``W - (V U)^T`` masked by one ``U(0, 1)`` number per sample), its layerwise form,
importance minimality ``sum_c mean ci^p`` and optionally faithfulness ``mean (W - (V U)^T)^2``, after a
faithfulness warm-up; ``analyses/_spd.py`` states each term.

The known answer on the toy model is one ``mlp_in`` component per feature. The result reports, per
feature, how many components of each weight have CI above ``ci_threshold`` for the feature's one-hot
input at magnitude 1 (``exactly_one_mlp_in``: the fraction of features with exactly one, counted over
every layer's ``mlp_in``), and the decomposition's faithfulness and reconstruction losses on fresh
batches. The decomposition is saved as ``spd_model.safetensors`` + ``spd_config.json`` (the target model
included) and carried by the result, for ``magnitude_sweep`` (``source: {from_step: ...}`` or a path).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from analyses._toy_sources import CheckpointSource
from runner.registry import analysis
from runner.results import Array, JSONValue, StepResult
from runner.step import StepContext, StepOutput


class DecomposeSpdParams(BaseModel):
    """Parameters of ``decompose_spd`` (defaults: the repository's ``resid_mlp1_config.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    source: CheckpointSource = CheckpointSource(from_step="train")
    """The toy model to decompose: `{from_step: <train_toy_model step>}` or `{path: <its data folder>}`."""
    C: int = Field(default=100, ge=1)
    """Components per decomposed weight (the repository: 100 for `mlp_in` and `mlp_out`)."""
    ci_hidden: tuple[int, ...] = Field(default=(16,), min_length=1)
    """Hidden widths of each component's causal-importance MLP (`gate_hidden_dims`: [16])."""
    steps: int = Field(default=30_000, ge=1)
    """Optimizer steps (the repository's config: 30000; the committed spec uses fewer on a smaller model)."""
    batch_size: int = Field(default=2048, ge=1)
    """Samples per step, drawn fresh from the toy model's sparse feature distribution."""
    lr: float = Field(default=2e-3, gt=0)
    """AdamW learning rate (no weight decay), scheduled by `lr_schedule`."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """`constant` (the repository's config) or `cosine` (half cosine from `lr` to 0)."""
    lr_warmup_pct: float = Field(default=0.0, ge=0, lt=1)
    """Fraction of the steps with a linear learning-rate warm-up from 0."""
    stochastic_recon_coeff: float = Field(default=1.0, ge=0)
    """Weight of the stochastic reconstruction loss (every weight masked at once)."""
    stochastic_recon_layerwise_coeff: float = Field(default=1.0, ge=0)
    """Weight of the layerwise stochastic reconstruction loss (one weight masked at a time)."""
    importance_minimality_coeff: float = Field(default=1e-3, ge=0)
    """Weight of importance minimality `sum_c mean ci^p` (the repository's `resid_mlp1_config.yaml`:
    1e-3 at p = 2 for 100 features). It balances an MSE averaged over the `n_features` outputs while
    the penalty grows with the number of active features, so scale it by 100 / n_features for other
    sizes."""
    pnorm: float = Field(default=2.0, gt=0)
    """The p of importance minimality (at the start of training when annealed)."""
    p_anneal_start_frac: float = Field(default=1.0, ge=0, le=1)
    """Fraction of training after which p moves linearly to `p_anneal_final_p` (1: no annealing)."""
    p_anneal_final_p: float | None = Field(default=None, gt=0)
    """The p reached at `p_anneal_end_frac` and kept after it (None: no annealing)."""
    p_anneal_end_frac: float = Field(default=1.0, ge=0, le=1)
    """Fraction of training at which p reaches `p_anneal_final_p`."""
    faithfulness_coeff: float = Field(default=0.0, ge=0)
    """Weight of the faithfulness loss during training (the repository's config: none; the warm-up
    and the masked weight delta keep the components faithful)."""
    use_delta_component: bool = True
    """Add the weight delta `W - (V U)^T`, masked by one U(0, 1) number per sample, in the
    reconstruction losses."""
    n_mask_samples: int = Field(default=1, ge=1)
    """Stochastic masks drawn per step."""
    faithfulness_warmup_steps: int = Field(default=200, ge=0)
    """Steps fitting the summed components to the weights before training (AdamW)."""
    faithfulness_warmup_lr: float = Field(default=0.01, gt=0)
    """Learning rate of the warm-up."""
    faithfulness_warmup_weight_decay: float = Field(default=0.1, ge=0)
    """Weight decay of the warm-up."""
    ci_threshold: float = Field(default=0.1, ge=0, le=1)
    """A component is active for a feature when its CI for the one-hot input exceeds this."""
    eval_batches: int = Field(default=10, ge=1)
    """Fresh batches for the reported losses."""

    @model_validator(mode="after")
    def _anneal_order(self) -> DecomposeSpdParams:
        if self.p_anneal_final_p is not None and self.p_anneal_end_frac < self.p_anneal_start_frac:
            raise ValueError(
                f"p_anneal_end_frac ({self.p_anneal_end_frac}) must be >= p_anneal_start_frac "
                f"({self.p_anneal_start_frac})"
            )
        return self


class DecomposeSpdResult(StepResult):
    """The decomposition (read by ``magnitude_sweep``) and how well it recovers the known answer."""

    spd_config: JSONValue
    """`spd_config.json`: the toy model's config, the decomposed weights, C, the CI MLP widths."""
    modules: list[str]
    C: int
    n_features: int
    steps: int
    ci_threshold: float
    exactly_one_mlp_in: float
    """Fraction of features whose one-hot input activates exactly one component over all `mlp_in`
    weights (the known answer: 1)."""
    exactly_one: dict[str, float]
    """Per weight: fraction of features activating exactly one of its components."""
    mean_active: dict[str, float]
    """Per weight: mean number of active components per feature."""
    active_counts: dict[str, list[int]]
    """Per weight: active components for each feature's one-hot input."""
    top_component: dict[str, list[int]]
    """Per weight: the component of largest CI for each feature."""
    alive: dict[str, int]
    """Per weight: components active for at least one feature's one-hot input."""
    losses: dict[str, float]
    """On `eval_batches` fresh batches: `faithfulness` (mean squared weight delta), `stochastic_recon`,
    `stochastic_recon_layerwise`, `ci_masked_recon` (masks = CI, no delta), `importance_minimality`."""
    ci_l0: dict[str, float]
    """Per weight, on the same batches: mean number of components with CI above the threshold per sample."""
    warmup_faithfulness: float | None
    """Faithfulness after the warm-up."""
    seconds: float
    ci_one_hot: dict[str, Array]
    """Per weight: `(n_features, C)` CI for each feature's one-hot input at magnitude 1."""
    tensors: dict[str, Array]
    """Every tensor of the decomposition by name: `target.*` (the toy model), `V.*`, `U.*`, `gates.*`."""


@analysis("decompose_spd", params=DecomposeSpdParams, result=DecomposeSpdResult, needs=())
def decompose_spd(ctx: StepContext, params: DecomposeSpdParams) -> StepOutput:
    """Decompose a toy residual MLP with SPD; count each feature's active components (CI gates)."""
    from analyses.decompose_spd.compute import run

    return run(ctx, params)

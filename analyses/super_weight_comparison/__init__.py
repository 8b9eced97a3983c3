"""Cross-model comparison of super weights: how many each model has, where, and what removing them does.

The seed's "Cross-Model Analysis" (``comprehensive_super_weight_analysis.py``: ``cross_model_summary.json``
and ``model_comparison.png``), after Yu et al. 2024, "The Super Weight in Large Language Models". It
loads no model: it reads the finished cases of an earlier ``super_weights`` step, one per model when
the spec sweeps ``model.name`` (a step that needs no model runs once, after every model's cases).

Per model: the number of super weights and their coordinates and values, the baseline perplexity,
the perplexity ratio with all of them zeroed and with each matched control set zeroed (a random
coordinate and the largest ordinary weight of the same tensors), how many times more the super
weights hurt than each control, and lm-eval accuracy changes when the step measured them.
Perplexities are per token of each model's own tokenizer, so ratios compare across models and
absolute values do not.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from runner.registry import analysis
from runner.results import JSONValue, StepResult
from runner.step import StepContext, StepOutput


class SuperWeightComparisonParams(BaseModel):
    """Parameters of ``super_weight_comparison``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    from_step: str = Field(default="super_weights", min_length=1)
    """The id of the ``super_weights`` step to compare; list it before this step. Its cases on every
    model of a ``model.name`` sweep are compared (several cases on one model are listed apart)."""


class ModelComparison(BaseModel):
    """One upstream case (one model) in the comparison."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    key: str
    """The model's name, or the case id when one model has several cases."""
    model: str
    case: str
    n_found: int
    weights: list[list[int]]
    """``[layer, row, col]`` of each super weight."""
    strongest: JSONValue
    baseline: float | None
    """Baseline perplexity (per token of the model's own tokenizer)."""
    ratio_all: float | None
    """Perplexity ratio with every super weight zeroed."""
    random_control_ratio: float | None
    magnitude_control_ratio: float | None
    ratio_vs_random_control: float | None
    """``ratio_all`` over the random control's ratio: how many times more the super weights hurt."""
    ratio_vs_magnitude_control: float | None
    accuracy: JSONValue
    """Per task: metric, n, baseline, all_zeroed, random_control and their deltas (None if not measured)."""


class SuperWeightComparisonResult(StepResult):
    """The comparison across the models of a ``super_weights`` step."""

    from_step: str
    n_models: int
    most_super_weights: list[str]
    """The model(s) with the most super weights (several when tied)."""
    largest_ratio_all: str | None
    """The model whose perplexity rises most with its super weights zeroed."""
    models: list[ModelComparison]


@analysis(
    "super_weight_comparison",
    params=SuperWeightComparisonParams,
    result=SuperWeightComparisonResult,
    needs=(),
)
def super_weight_comparison(ctx: StepContext, params: SuperWeightComparisonParams) -> StepOutput:
    """Compare super weights and their perplexity / accuracy impact across models (loads no model)."""
    from analyses.super_weight_comparison.compute import run

    return run(ctx, params)

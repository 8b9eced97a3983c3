"""Activation importance: how large each dimension of a hook site is, or how much the loss depends on it.

For every chosen layer this reads one TransformerLens hook site (MLP activations after the
nonlinearity by default, or a residual-stream / attention / MLP output) over every token position of
every passage of the dataset, and reduces it to one number per dimension:

- ``aggregate_by: values``: the activation itself, ``x``. Forward passes only, under
  ``torch.no_grad()``, stopping after the last chosen layer.
- ``aggregate_by: gradients``: ``dL/dx``, the gradient of the next-token cross-entropy with respect to
  the activation (the quantity gradient-based attribution methods such as gradient × activation build
  on). One backward pass per batch serves every chosen layer, and no parameter gradients are computed.

``mean`` keeps the sign (the direction of the effect), ``mean_abs`` measures magnitude. An optional
``power`` (``sign(x) * |x|**p``) is applied after averaging, then an optional normalization rescales each
layer so that ``sum(|x|)`` (``sum_abs``) or ``sum(x)`` (``sum``) equals the number of dimensions, which
makes layers of different widths comparable.

Replaces the seed script ``layer_gradient_analysis.py`` and keeps its file names
(``layer_{L}_{variant}_gradients.npy``, ``consolidated_results.npz``, ``metadata.json``,
``timing_stats.json``). Two deliberate differences:

- The loss is the SUM of the per-token cross-entropies over the batch, not the batch mean, so a token's
  gradient does not depend on the batch size or passage length. Gradients are therefore
  ``B * (T - 1)`` times larger than the seed's; normalized variants are unaffected. Means are taken over
  all ``B * T`` positions; the gradient at a passage's last position is zero (it predicts nothing).
- ``consolidated_results.npz`` holds arrays only (it loads without ``allow_pickle``); the metadata the
  seed pickled into it is in ``metadata.json``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runner.hooks import Site
from runner.params import Indices
from runner.registry import analysis
from runner.results import Array, JSONValue, StepResult
from runner.saes import SAESource
from runner.step import StepContext, StepOutput


class ActivationImportanceParams(BaseModel):
    """Parameters of ``activation_importance`` (the seed's flags, minus the dataset ones)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    layers: Indices | None = None
    """Layers to analyse: ``"0-23"``, ``"0,5,10"``, an int or a list. Default: every layer of the model."""

    site: Site = "mlp_post"
    """Hook site: ``mlp_post`` is ``blocks.{L}.mlp.hook_post`` (d_mlp dims); the others are
    ``blocks.{L}.hook_<site>`` (d_model dims): ``resid_pre``, ``resid_mid``, ``resid_post``, ``mlp_out``,
    ``attn_out``."""

    sae: SAESource | None = None
    """Importance over an SAE's features at ``site`` (the seed's ``sae_gradient_analysis.py``), d_sae
    dims per layer: ``values`` are the feature activations; ``gradients`` the loss gradient with
    respect to them with the SAE spliced in at that layer alone and its error term kept (so the
    forward pass is the model's): ``W_dec[f] · dLoss/dactivation`` at every position. Sources as in
    ``sae_interventions``: ``{name: ...}``, ``{release: ...}``, ``{path: ...}``, ``{from_step: ...}``."""

    aggregate_by: Literal["values", "gradients"] = "values"
    """``values``: the activations (forward only, fast).
    ``gradients``: d(summed next-token loss)/d(activation)."""

    aggregation_mode: Literal["mean", "mean_abs", "both"] = "mean_abs"
    """``mean``: signed mean (direction); ``mean_abs``: mean absolute value (magnitude); ``both``."""

    power: float | tuple[float, ...] | None = None
    """Power applied after averaging, before normalization, keeping the sign (``sign(x)*|x|**p``).
    Must be positive. A list (or ``"0.5,1.0,2.0"``) uses its first value and says so in a note."""

    normalization: Literal["none", "sum", "sum_abs", "both"] = "sum_abs"
    """The seed's ``--normalize_gradients``: rescale each layer so ``sum(|x|)`` (``sum_abs``) or ``sum(x)``
    (``sum``) equals its dimension; ``none`` keeps raw values; ``both`` outputs both variants."""

    batch_size: int = Field(default=4, ge=1)
    """Passages per forward (and backward) pass. Results do not depend on it."""

    forward: Literal["lean", "transformer_lens"] = "lean"
    """Blocks the passages run through: `lean` (TransformerLens' blocks with weights read in place and
    scaled-dot-product attention, checked against its forward when the run starts; where the check
    fails or the architecture is not covered, a note says so and TransformerLens' runs) or
    `transformer_lens` (its own forward). Same numbers to float32 rounding."""

    layer_histograms: bool = True
    """One histogram PNG per layer and variant, `layer_{L}_{variant}_hist.png`, as the seed wrote them.
    `all_layers_{variant}_hist.png` shows every layer's histogram in one image (a row per layer);
    `false` skips the per-layer files, which take longer to write than the values take to compute."""

    top_k: int = Field(default=10, ge=1)
    """How many dimensions of largest ``|value|`` per layer go into the summary and ``top_dimensions.csv``."""

    @field_validator("power", mode="before")
    @classmethod
    def _read_power(cls, value: Any) -> Any:
        """Read the seed's ``"0.5,1.0,2.0"`` form; a one-element list is just that number."""
        if isinstance(value, str):
            try:
                value = [float(part) for part in value.split(",") if part.strip()]
            except ValueError:
                raise ValueError(f"cannot read {value!r} as a number or numbers like '0.5,1.0,2.0'") from None
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("power list is empty: give a number, a list of numbers, or leave it out")
            return value[0] if len(value) == 1 else tuple(value)
        return value

    @field_validator("power")
    @classmethod
    def _check_power(cls, value: float | tuple[float, ...] | None) -> float | tuple[float, ...] | None:
        values = value if isinstance(value, tuple) else () if value is None else (value,)
        bad = [p for p in values if not (math.isfinite(p) and p > 0)]
        if bad:
            raise ValueError(f"power must be a positive finite number, got {bad[0]}")
        return value


class Peak(BaseModel):
    """The largest |value| of the first variant over every layer and dimension."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    layer: int
    variant: str
    dim: int
    value: float


class ActivationImportanceResult(StepResult):
    """Per-layer importance vectors and their statistics (``peak.value``, ``layers[3].mean_abs.max``)."""

    variants: list[str]
    """``mean_abs``, ``mean``, or with ``normalization: both`` ``{mode}_norm_{sum_abs|sum}``."""
    layers: dict[int, dict[str, JSONValue]]
    """Per layer and variant: mean, std, max, min, sum_abs, argmax and the ``top`` [dim, value] pairs."""
    peak: Peak
    dims: dict[int, int]
    """Dimensions per layer (d_mlp or d_model)."""
    n_tokens: int
    aggregate_by: Literal["values", "gradients"]
    site: Site
    sae: JSONValue = None
    """Per layer, the SAE whose features are the dims (source, hook, d_sae), or ``None``."""
    power: float | None
    normalization: str
    model: str
    importance: dict[int, dict[str, Array]]
    """The importance vectors themselves, per layer and variant: ``(dims,)`` float64 arrays."""


@analysis(
    "activation_importance",
    params=ActivationImportanceParams,
    result=ActivationImportanceResult,
    needs=("model", "dataset", "saes"),
)
def activation_importance(ctx: StepContext, params: ActivationImportanceParams) -> StepOutput:
    """Per-dimension mean / mean |·| of activations or loss gradients at one hook site, per layer."""
    from analyses.activation_importance.compute import run

    return run(ctx, params)

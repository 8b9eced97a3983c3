"""Magnitude sweeps: how neurons, outputs and causal-importance gates respond as one input grows.

The seed is the SPD repository's ``spd/scripts/magnitude_sweep/magnitude_sweep.py`` with its sibling
``ablation_sweep.py`` (goodfire-ai/spd; Bushnaq, Braun, Sharkey 2025, "Stochastic Parameter
Decomposition"). Two analyses share this package:

``magnitude_sweep`` (toy models; loads no language model). The one-hot input ``m * e_i`` of feature
``feature_idx`` is fed at ``n_steps`` magnitudes, ``linspace(-max, max)`` (``range: symmetric``, what the
seed's code sweeps) or ``linspace(0, max)`` (``positive``, what its docs say), all in one batched
forward. Recorded per magnitude: every MLP neuron (after the ReLU, or before with ``pre_activation``),
every output, and for a decomposition, per decomposed weight, each component's CI, the gates'
pre-sigmoid outputs and their inputs (inner activations ``x @ V``). One grid per decomposed weight,
named as the seed names it (``unified_grid_feature_{i}_layers_{L}_{mlp_in|mlp_out}.png``): every
neuron, the output feature, and for the components whose CI exceeds ``ci_threshold`` somewhere (at
most 10), their CI, gate outputs and gate inputs. With ``ablation`` (the sibling script), each active
component's CI is zeroed in turn, the components masked by the CI re-run the sweep, and lines are
fitted separately to negative and positive magnitudes (the slopes of the output feature, of each
neuron and of each gate input); grids go to ``ablation_{weight}_component_{c}/``.

``magnitude_sweep_lm`` (language models). The same sweep along a direction added at a hook of a
TransformerLens model, over a prompt: a one-hot residual dimension, an MLP neuron (its activation, i.e.
its output direction), or an SAE feature's decoder direction (``from_step`` of ``train_sae`` counts).
Recorded: later MLP neurons, the logits of chosen tokens and, with ``gates``, an SAE at a later hook
playing the gates' role (its features are the components, its pre-activations the pre-sigmoid
outputs, its hook's activations the gate inputs).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from analyses._toy_sources import CheckpointSource
from runner.hooks import Site
from runner.params import Indices
from runner.registry import analysis
from runner.results import Array, StepResult
from runner.saes import SAESource
from runner.step import StepContext, StepOutput


class SweepGrid(BaseModel):
    """The seed's sweep and plotting options, shared by both analyses."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    n_steps: int = Field(default=100, ge=2)
    """Magnitudes swept (the seed's default: 100)."""
    max_magnitude: float = Field(default=2.0, gt=0)
    """Largest magnitude (the seed's default: 2.0)."""
    range: Literal["symmetric", "positive"] = "symmetric"
    """`symmetric`: `linspace(-max, max)` (what the seed's code sweeps); `positive`: `linspace(0, max)`
    (what its README says)."""
    ci_threshold: float = Field(default=0.1, ge=0)
    """A component (or gate feature) is active when its CI exceeds this at some magnitude."""
    max_components: int = Field(default=10, ge=1)
    """At most this many active components are plotted (the seed: 10); all are recorded."""
    figsize_per_subplot: tuple[float, float] = (2.0, 1.5)
    """Inches per subplot (width, height)."""
    dpi: int = Field(default=150, ge=20, le=600)
    """Resolution of the grids."""


class MagnitudeSweepParams(SweepGrid):
    """Parameters of ``magnitude_sweep`` (the seed's config, minus `model_path`, `device`, `output_dir`)."""

    source: CheckpointSource = CheckpointSource(from_step="decompose")
    """The model swept: a decomposition (`{from_step: <decompose_spd step>}`, or its data folder as
    `path`) or a bare toy model (a `train_toy_model` step or folder: neurons and outputs only)."""
    feature_idx: int = Field(default=0, ge=0)
    """The feature whose one-hot input is swept."""
    pre_activation: bool = False
    """Record neurons before the ReLU instead of after."""
    components: bool | None = None
    """Record and plot CI, gate outputs and gate inputs. Default: when the source has gates (a
    decomposition); `true` on a bare toy model is an error."""
    ablation: bool = False
    """The sibling `ablation_sweep.py`: zero each active component's CI in turn and re-sweep through the
    components masked by the CI; fits slopes for negative and positive magnitudes. Needs gates."""


class ComponentAblation(BaseModel):
    """One active component ablated: the re-swept output feature's slopes."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    module: str
    component: int
    slope_negative: float | None
    """Least-squares slope of the output feature over the negative magnitudes (None in `positive` range)."""
    slope_positive: float
    max_output_change: float
    """Largest |ablated - baseline| of the output feature over the sweep."""


class MagnitudeSweepResult(StepResult):
    """Every swept value (arrays, in the result's NPZ and in ``magnitude_sweep.npz``) and their summary."""

    source: str
    feature_idx: int
    n_features: int
    magnitudes: Array
    """`(n_steps,)`."""
    neurons: dict[int, Array]
    """Per layer: `(n_steps, d_mlp)` neuron activations."""
    outputs: Array
    """`(n_steps, n_features)`: the model's outputs."""
    output_slopes: dict[str, float | None]
    """`negative` / `positive`: least-squares slopes of the output feature (the target model)."""
    has_components: bool
    ci: dict[str, Array]
    """Per decomposed weight: `(n_steps, C)` causal importance."""
    pre_sigmoid: dict[str, Array]
    """Per decomposed weight: `(n_steps, C)` gate outputs before the sigmoid."""
    gate_inputs: dict[str, Array]
    """Per decomposed weight: `(n_steps, C)` inner activations `x @ V`."""
    active_components: dict[str, list[int]]
    """Per decomposed weight: components whose CI exceeds `ci_threshold` somewhere, by largest CI."""
    max_ci: dict[str, list[float]]
    """Their largest CI over the sweep, in the same order."""
    component_output: Array | None
    """`(n_steps, n_features)`: the output of the components masked by the CI (None without gates)."""
    ablations: list[ComponentAblation]
    ablation_outputs: dict[str, Array]
    """`<weight>/<component>` → `(n_steps,)` output feature with that component's CI zeroed."""


@analysis("magnitude_sweep", params=MagnitudeSweepParams, result=MagnitudeSweepResult, needs=())
def magnitude_sweep(ctx: StepContext, params: MagnitudeSweepParams) -> StepOutput:
    """Sweep a toy feature's one-hot magnitude: neurons, output, CI gates (the SPD seed's grids)."""
    from analyses.magnitude_sweep.toy import run

    return run(ctx, params)


class Direction(BaseModel):
    """What is added at the hook, times the magnitude: give exactly one of the three."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    neuron: tuple[int, int] | None = None
    """`[layer, neuron]`: the neuron's activation (`blocks.{layer}.mlp.hook_post`), which adds its
    output direction `W_out[neuron]` to the residual stream. SmolLM2-135M's super weight: `[11, 1229]`."""
    residual: tuple[int, int] | None = None
    """`[layer, dimension]`: a one-hot direction of the residual stream at `site` of that layer."""
    site: Site = "resid_pre"
    """Hook site of a `residual` direction."""
    sae_feature: int | None = Field(default=None, ge=0)
    """An SAE feature: its decoder direction added at the SAE's hook (the step's `sae` names the SAE)."""

    @model_validator(mode="after")
    def _check_one(self) -> Direction:
        given = [n for n in ("neuron", "residual", "sae_feature") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of `neuron`, `residual` or `sae_feature`; got {given or 'none'}"
            )
        return self


class MagnitudeSweepLmParams(SweepGrid):
    """Parameters of ``magnitude_sweep_lm``."""

    direction: Direction = Direction(neuron=(11, 1229))
    """The direction swept (default: SmolLM2-135M's super-weight neuron, layer 11, neuron 1229)."""
    sae: SAESource | None = None
    """The SAE of `direction.sae_feature` (`name`, `release`, `path` or `from_step` of a `train_sae` step)."""
    mode: Literal["add", "set"] = "add"
    """`add`: the hook's value plus magnitude x direction; `set`: a neuron's activation or a residual
    dimension set to the magnitude (not for SAE features)."""
    prompt: str = "Apple Inc. is a worldwide tech company."
    """The text run through the model (the super-weight paper's probe sentence), BOS prepended."""
    positions: Literal["all", "read"] = "all"
    """Where the direction is added: at every position, or only at `read_position`."""
    read_position: int = -1
    """The token position whose neurons, gates and logits are recorded (negative counts from the end)."""
    record_layers: Indices | None = None
    """MLP layers whose neurons are recorded. Default: every layer after the hook's (its own for a neuron)."""
    max_neurons: int = Field(default=16, ge=1)
    """Neurons plotted: over every recorded layer, those whose activation changes most in the sweep."""
    tokens: tuple[str, ...] = ()
    """Tokens whose logits are recorded (each must be one token). The tokens whose logit rises and
    falls most between the smallest and largest magnitude are always added."""
    top_tokens: int = Field(default=5, ge=0)
    """How many most-rising and most-falling tokens are added to `tokens`."""
    gates: SAESource | None = None
    """An SAE at a later hook playing the gates' role: its features' activations are the CI, their
    pre-activations the pre-sigmoid outputs, their inner activations (input times encoder column) the
    gate inputs."""
    gates_layer: int | None = Field(default=None, ge=0)
    """The layer of the `gates` SAE (for sources that hold one SAE per layer); default: its own hook."""
    batch_size: int = Field(default=32, ge=1)
    """Magnitudes per forward pass."""

    @model_validator(mode="after")
    def _check_sae(self) -> MagnitudeSweepLmParams:
        if (self.direction.sae_feature is None) != (self.sae is None):
            raise ValueError(
                "`direction.sae_feature` and `sae` go together: the feature and the SAE it is in"
            )
        if self.mode == "set" and self.direction.sae_feature is not None:
            raise ValueError(
                "`mode: set` sets a neuron or a residual dimension; an SAE feature is swept with `add`"
            )
        return self


class MagnitudeSweepLmResult(StepResult):
    """The LM sweep: recorded neurons, logits and gate features per magnitude."""

    model: str
    hook: str
    """Where the direction is added."""
    direction: str
    """What is swept, in words."""
    prompt_tokens: list[str]
    read_position: int
    """The recorded position, counted from the start."""
    magnitudes: Array
    baseline_value: float | None
    """The hook's value along a one-hot direction at the read position without intervention."""
    neurons: dict[int, Array]
    """Per recorded layer: `(n_steps, d_mlp)` activations at the read position."""
    top_neurons: list[tuple[int, int]]
    """`[layer, neuron]` of the neurons that change most over the sweep (plotted), largest first."""
    neuron_range: list[float]
    """Their (max - min) over the sweep, in the same order."""
    tokens: list[str]
    logits: Array
    """`(n_steps, len(tokens))` logits of `tokens` at the read position."""
    logit_slopes: dict[str, dict[str, float | None]]
    """Per token: least-squares slopes over the `negative` and `positive` magnitudes."""
    gate_hook: str | None
    gate_features: list[int]
    """SAE features active (above `ci_threshold`) somewhere in the sweep, by largest activation."""
    gate_max: list[float]
    ci: Array | None
    """`(n_steps, n_active)` activations of `gate_features` (the CI's role)."""
    pre_sigmoid: Array | None
    """`(n_steps, n_active)` their pre-activations (`inner + b_enc`)."""
    gate_inputs: Array | None
    """`(n_steps, n_active)` their inner activations: the SAE's processed input times `W_enc[:, f]`."""


@analysis(
    "magnitude_sweep_lm",
    params=MagnitudeSweepLmParams,
    result=MagnitudeSweepLmResult,
    needs=("model", "saes"),
)
def magnitude_sweep_lm(ctx: StepContext, params: MagnitudeSweepLmParams) -> StepOutput:
    """Sweep a direction's magnitude at a hook of a language model: later neurons, logits, SAE gates."""
    from analyses.magnitude_sweep.lm import run

    return run(ctx, params)

"""How ``magnitude_sweep`` computes on toy models; ``__init__.py`` declares it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from analyses._spd import Decomposition, lower_leaky
from analyses._toy_loading import load_source
from analyses._toy_model import ResidMLP, small_work_threads
from analyses.magnitude_sweep import ComponentAblation, MagnitudeSweepParams, MagnitudeSweepResult, SweepGrid
from analyses.magnitude_sweep.plots import Panel, draw_grid, fit_slopes
from runner.errors import ResourceError
from runner.step import StepContext, StepOutput

__all__ = ["Sweep", "magnitudes_of", "run", "sweep"]


@dataclass
class Sweep:
    """Everything one batched forward over the magnitudes records."""

    outputs: Tensor
    """``(n_steps, n_features)``."""
    neurons: dict[int, Tensor]
    """Layer → ``(n_steps, d_mlp)``."""
    ci: dict[str, Tensor] = field(default_factory=dict)
    pre_sigmoid: dict[str, Tensor] = field(default_factory=dict)
    gate_inputs: dict[str, Tensor] = field(default_factory=dict)


def magnitudes_of(grid: SweepGrid) -> Tensor:
    """``linspace(-max, max, n)`` (symmetric) or ``linspace(0, max, n)`` (positive)."""
    low = -grid.max_magnitude if grid.range == "symmetric" else 0.0
    return torch.linspace(low, grid.max_magnitude, grid.n_steps)


def sweep(
    target: ResidMLP,
    decomposition: Decomposition | None,
    feature: int,
    magnitudes: Tensor,
    *,
    pre_activation: bool = False,
    ci_override: dict[str, Tensor] | None = None,
) -> Sweep:
    """All magnitudes of ``feature``'s one-hot input in one batched forward.

    Without ``ci_override`` the target model runs and, with a decomposition, the gates read its
    weights' inputs. With ``ci_override`` (weight → ``(n_steps, C)``) the components masked by those CI
    values replace every decomposed weight (the ablation sweep), and the gates read their inputs.
    """
    x = torch.zeros(len(magnitudes), target.config.n_features)
    x[:, feature] = magnitudes  # (n_steps, n_features): row s is magnitudes[s] * e_feature
    inputs: dict[str, Tensor] = {}
    hidden: dict[int, Tensor] = {}
    replace = None
    if ci_override is not None:
        assert decomposition is not None
        replace = {name: decomposition.masked(name, ci) for name, ci in ci_override.items()}
    with torch.no_grad():
        outputs = target(x, replace=replace, inputs=inputs, hidden=hidden, pre_activation=pre_activation)
        result = Sweep(outputs, hidden)
        if decomposition is not None:
            for name in decomposition.config.modules:
                result.gate_inputs[name] = decomposition.inner(name, inputs[name])  # (n_steps, C)
                result.pre_sigmoid[name] = decomposition.gates[name.replace(".", "-")](
                    result.gate_inputs[name]
                )
                result.ci[name] = lower_leaky(result.pre_sigmoid[name])
    if ci_override is not None:
        result.ci = dict(ci_override)
    return result


def run(ctx: StepContext, params: MagnitudeSweepParams) -> StepOutput:
    """The seed's magnitude sweep (and ablation sweep) on a toy model or its decomposition."""
    where = f"magnitude_sweep case {ctx.case_id}"
    loaded = load_source(ctx, params.source, where=where)
    n_features = loaded.target.config.n_features
    if params.feature_idx >= n_features:
        raise ResourceError(
            f"{where}: feature_idx {params.feature_idx} is out of range: the toy model from "
            f"{loaded.origin} has {n_features} features (0-{n_features - 1}).\n"
            "Set `feature_idx` within that range."
        )
    components = params.components if params.components is not None else loaded.decomposition is not None
    if (components or params.ablation) and loaded.decomposition is None:
        asked = "`ablation: true`" if params.ablation else "`components: true`"
        raise ResourceError(
            f"{where}: {asked} needs causal-importance gates, but {loaded.origin} is a bare toy model "
            "(train_toy_model) with no decomposition.\nPoint `source` at a `decompose_spd` step or folder, "
            "or leave out `components` and `ablation` to sweep neurons and outputs only."
        )
    decomposition = loaded.decomposition if components else None
    magnitudes = magnitudes_of(params)
    with small_work_threads(params.n_steps * loaded.target.config.d_embed):
        base = sweep(
            loaded.target, decomposition, params.feature_idx, magnitudes, pre_activation=params.pre_activation
        )
        return _output(ctx, params, loaded.origin, loaded.target, decomposition, magnitudes, base)


def _active(ci: dict[str, Tensor], threshold: float) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """Per weight: components whose CI exceeds ``threshold`` somewhere, by largest CI first."""
    active, peaks = {}, {}
    for name, values in ci.items():
        peak = values.max(0).values  # (C,)
        order = [int(c) for c in torch.argsort(peak, descending=True, stable=True) if peak[c] > threshold]
        active[name], peaks[name] = order, [float(peak[c]) for c in order]
    return active, peaks


def _output(
    ctx: StepContext,
    params: MagnitudeSweepParams,
    origin: str,
    target: ResidMLP,
    decomposition: Decomposition | None,
    magnitudes: Tensor,
    base: Sweep,
) -> StepOutput:
    m = magnitudes.numpy()
    feature = params.feature_idx
    active, peaks = _active(base.ci, params.ci_threshold)
    negative, positive = fit_slopes(m, base.outputs[:, feature].numpy())
    plots: dict[str, Figure] = {}
    component_output = None
    ablations: list[ComponentAblation] = []
    ablation_outputs: dict[str, np.ndarray] = {}
    if decomposition is not None:
        masked = sweep(
            target,
            decomposition,
            feature,
            magnitudes,
            ci_override=base.ci,
            pre_activation=params.pre_activation,
        )
        component_output = masked.outputs.numpy()
        if params.ablation:
            ablations, ablation_outputs = _ablations(
                params, target, decomposition, magnitudes, base, masked, active, plots
            )
    for name in _grid_names(target, decomposition):
        plots[f"unified_grid_feature_{feature}_{name.replace('.', '_')}.png"] = _grid(
            params, m, base, name, active
        )
    result = MagnitudeSweepResult(
        source=origin,
        feature_idx=feature,
        n_features=target.config.n_features,
        magnitudes=m,
        neurons={layer: v.numpy() for layer, v in base.neurons.items()},
        outputs=base.outputs.numpy(),
        output_slopes={"negative": negative if params.range == "symmetric" else None, "positive": positive},
        has_components=decomposition is not None,
        ci={k: v.numpy() for k, v in base.ci.items()},
        pre_sigmoid={k: v.numpy() for k, v in base.pre_sigmoid.items()},
        gate_inputs={k: v.numpy() for k, v in base.gate_inputs.items()},
        active_components=active,
        max_ci=peaks,
        component_output=component_output,
        ablations=ablations,
        ablation_outputs=ablation_outputs,
    )
    return StepOutput(result=result, data={"magnitude_sweep.npz": _npz(result)}, plots=plots)


def _grid_names(target: ResidMLP, decomposition: Decomposition | None) -> list[str]:
    """One grid per decomposed weight (the seed's files); per layer for a bare toy model."""
    if decomposition is not None:
        return list(decomposition.config.modules)
    return [f"layers.{i}" for i in range(target.config.n_layers)]


def _grid(
    params: MagnitudeSweepParams,
    m: np.ndarray,
    sweep_: Sweep,
    name: str,
    active: dict[str, list[int]],
    fit: bool = False,
    title_suffix: str = "",
) -> Figure:
    layer = int(name.split(".")[1])
    feature = params.feature_idx
    neurons = sweep_.neurons[layer].numpy()
    panels = [Panel(f"Neuron {n}", neurons[:, n], "neuron", fit) for n in range(neurons.shape[1])]
    panels.append(Panel(f"Output feature {feature}", sweep_.outputs[:, feature].numpy(), "output", fit))
    shown = active.get(name, [])[: params.max_components]
    if name in sweep_.ci:
        panels += [Panel(f"CI component {c}", sweep_.ci[name][:, c].numpy(), "ci") for c in shown]
        panels += [
            Panel(f"Gate output {c}", sweep_.pre_sigmoid[name][:, c].numpy(), "gate_output") for c in shown
        ]
        panels += [
            Panel(f"Gate input {c}", sweep_.gate_inputs[name][:, c].numpy(), "gate_input", fit) for c in shown
        ]
    kind = "pre-activation" if params.pre_activation else "post-ReLU"
    title = (
        f"{name}: neurons ({kind}), output and active CI components (feature {feature} swept){title_suffix}"
    )
    return draw_grid(m, panels, title, params.figsize_per_subplot, params.dpi)


def _ablations(
    params: MagnitudeSweepParams,
    target: ResidMLP,
    decomposition: Decomposition,
    magnitudes: Tensor,
    base: Sweep,
    masked: Sweep,
    active: dict[str, list[int]],
    plots: dict[str, Figure],
) -> tuple[list[ComponentAblation], dict[str, np.ndarray]]:
    """The sibling script: each active component's CI zeroed in turn, the masked components re-swept."""
    m = magnitudes.numpy()
    feature = params.feature_idx
    reference = masked.outputs[:, feature].numpy()
    rows, outputs = [], {}
    for name, components in active.items():
        for component in components:
            ci = {k: v.clone() for k, v in base.ci.items()}
            ci[name][:, component] = 0.0
            ablated = sweep(
                target,
                decomposition,
                feature,
                magnitudes,
                ci_override=ci,
                pre_activation=params.pre_activation,
            )
            y = ablated.outputs[:, feature].numpy()
            negative, positive = fit_slopes(m, y)
            assert positive is not None
            rows.append(
                ComponentAblation(
                    module=name,
                    component=component,
                    slope_negative=negative if params.range == "symmetric" else None,
                    slope_positive=positive,
                    max_output_change=float(np.abs(y - reference).max()),
                )
            )
            outputs[f"{name}/{component}"] = y
            folder = f"ablation_{name.replace('.', '_')}_component_{component}"
            suffix = f"\nablated: {name} component {component}"
            for grid_name in decomposition.config.modules:
                file = f"{folder}/unified_grid_feature_{feature}_{grid_name.replace('.', '_')}.png"
                plots[file] = _grid(params, m, ablated, grid_name, active, fit=True, title_suffix=suffix)
    return rows, outputs


def _npz(result: MagnitudeSweepResult) -> dict[str, np.ndarray]:
    """Every swept value under a flat key (``ci/layers.0.mlp_in``), for ``np.load``."""
    arrays: dict[str, np.ndarray] = {"magnitudes": result.magnitudes, "outputs": result.outputs}
    arrays.update({f"neurons/layer_{k}": v for k, v in result.neurons.items()})
    for key, group in (
        ("ci", result.ci),
        ("pre_sigmoid", result.pre_sigmoid),
        ("gate_inputs", result.gate_inputs),
    ):
        arrays.update({f"{key}/{name}": v for name, v in group.items()})
    if result.component_output is not None:
        arrays["component_outputs"] = result.component_output
    arrays.update({f"ablation/{k}": v for k, v in result.ablation_outputs.items()})
    return arrays

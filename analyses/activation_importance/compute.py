"""How ``activation_importance`` computes; ``__init__.py`` declares it (params, result, registration)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.layout_engine import PlaceHolderLayoutEngine
from matplotlib.ticker import MaxNLocator, NullLocator

from analyses._lean_forward import LeanForward, checked_lean_forward
from analyses._tensors import (
    DimAccumulator,
    frozen_parameters,
    normalize,
    signed_power,
    top_by_abs,
    vector_stats,
)
from analyses.activation_importance import ActivationImportanceParams, ActivationImportanceResult
from runner.errors import ResourceError
from runner.hooks import hook_name, require_layers
from runner.models import require_hooks
from runner.saes.loading import LoadedSAE
from runner.step import StepContext, StepOutput

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["run"]

Mode = Literal["mean", "mean_abs"]
Norm = Literal["none", "sum", "sum_abs"]
Results = dict[int, dict[str, np.ndarray]]  # layer → variant → (D,) float64
FwdHooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]
PADDING = "right"
"""Passages are never padded; ``right`` keeps TransformerLens from masking tokens whose id is the pad
id, which it does when the tokenizer pads on the left."""


@dataclass
class Timing:
    """Wall-clock seconds of the batch loop (and of the whole computation, before plotting)."""

    batch_seconds: list[float] = field(default_factory=list)
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass
class Measurement:
    """What one case computed, before it is laid out as files, summary and plots."""

    results: Results
    hooks: dict[int, str]  # layer → hook name
    power: float | None
    n_tokens: int
    timing: Timing
    saes: dict[int, LoadedSAE] = field(default_factory=dict)  # layer → SAE whose features are the dims


def run(ctx: StepContext, params: ActivationImportanceParams) -> StepOutput:
    """Per-dimension mean / mean |·| of activations or loss gradients at one hook site, per layer."""
    start = time.perf_counter()
    layers = _resolve_layers(ctx, params)
    where = f"activation_importance case {ctx.case_id}"
    saes: dict[int, LoadedSAE] = {}
    if params.sae is not None:
        loaded = ctx.saes(params.sae, layers=tuple(layers), site=params.site, where=where)
        saes = {sae.layer: sae for sae in loaded}
    hooks = {layer: saes[layer].hook_name if saes else hook_name(params.site, layer) for layer in layers}
    require_hooks(ctx.model, list(hooks.values()), where=where)
    power = _resolve_power(ctx, params.power)
    accumulators, timing = _accumulate(ctx, params, hooks, saes)
    results = _variants(ctx, accumulators, params, power)
    timing.total_seconds = time.perf_counter() - start
    m = Measurement(results, hooks, power, next(iter(accumulators.values())).count, timing, saes)
    return StepOutput(  # notes are recorded through ctx.note
        result=_summary(ctx, params, m), data=_data_files(ctx, params, m), plots=_plots(ctx, params, results)
    )


# --- parameters against the model -----------------------------------------------------------------


def _resolve_layers(ctx: StepContext, params: ActivationImportanceParams) -> list[int]:
    where = f"activation_importance case {ctx.case_id}"
    return sorted(require_layers(params.layers, ctx.model.n_layers, model=ctx.model.name, where=where))


def _resolve_power(ctx: StepContext, power: float | tuple[float, ...] | None) -> float | None:
    if isinstance(power, tuple):
        ctx.note(
            f"Multiple power values given {list(power)}; using the first one, {power[0]}. "
            "Sweep `power` to compare several."
        )
        return power[0]
    return power


# --- the batch loop ---------------------------------------------------------------------------------


def _accumulate(
    ctx: StepContext,
    params: ActivationImportanceParams,
    hooks: dict[int, str],
    saes: dict[int, LoadedSAE] | None = None,
) -> tuple[dict[int, DimAccumulator], Timing]:
    """Stream the dataset through the model once, accumulating per-dimension sums per layer (of the
    SAE's features at layers in ``saes``)."""
    model = ctx.model.model
    dataset = ctx.dataset
    if len(dataset) == 0:
        raise ResourceError(f"activation_importance case {ctx.case_id}: the dataset has no passages.")
    if params.aggregate_by == "gradients" and dataset.max_len < 2:
        raise ResourceError(
            f"activation_importance case {ctx.case_id}: gradients need passages of at least 2 tokens "
            f"(a next-token loss), but dataset.max_len is {dataset.max_len}. Raise `dataset.max_len`."
        )
    accumulators = {layer: DimAccumulator() for layer in hooks}
    timing = Timing()
    device = next(model.parameters()).device
    lean = (
        checked_lean_forward(ctx, model, "Ran TransformerLens' own blocks")
        if params.forward == "lean"
        else None
    )
    batches = ctx.progress(
        dataset.batches(params.batch_size), dataset.n_batches(params.batch_size), "batches"
    )
    with frozen_parameters(model):
        for tokens in batches:
            batch_start = time.perf_counter()
            if params.aggregate_by == "values":
                forward, backward = _values_step(model, lean, tokens.to(device), hooks, accumulators, saes)
            else:
                forward, backward = _gradients_step(model, lean, tokens.to(device), hooks, accumulators, saes)
            timing.batch_seconds.append(time.perf_counter() - batch_start)
            timing.forward_seconds += forward
            timing.backward_seconds += backward
    return accumulators, timing


def _values_step(
    model: HookedTransformer,
    lean: LeanForward | None,
    tokens: torch.Tensor,
    hooks: dict[int, str],
    accumulators: dict[int, DimAccumulator],
    saes: dict[int, LoadedSAE] | None = None,
) -> tuple[float, float]:
    """One forward pass that stops after the last chosen layer; returns (forward, backward) seconds."""

    def adder(accumulator: DimAccumulator, sae: LoadedSAE | None) -> Any:
        def hook(act: torch.Tensor, hook: Any) -> None:
            accumulator.add(act if sae is None else sae.encode(act))  # (B, T, D) or (B, T, d_sae)

        return hook

    saes = saes or {}
    fwd_hooks: FwdHooks = [
        (name, adder(accumulators[layer], saes.get(layer))) for layer, name in hooks.items()
    ]
    stop = max(hooks) + 1
    start = time.perf_counter()
    with torch.no_grad():
        if lean is None:
            model.run_with_hooks(
                tokens, return_type=None, stop_at_layer=stop, padding_side=PADDING, fwd_hooks=fwd_hooks
            )
        else:
            with model.hooks(fwd_hooks=fwd_hooks):
                lean.run(_embed(model, tokens), 0, stop)
    return time.perf_counter() - start, 0.0


def _embed(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The residual stream entering block 0 ``(B, T, d_model)``, as TransformerLens' forward makes it."""
    return model(tokens, stop_at_layer=0, padding_side=PADDING)


def _gradients_step(
    model: HookedTransformer,
    lean: LeanForward | None,
    tokens: torch.Tensor,
    hooks: dict[int, str],
    accumulators: dict[int, DimAccumulator],
    saes: dict[int, LoadedSAE] | None = None,
) -> tuple[float, float]:
    """One forward and one backward pass for all layers; returns (forward, backward) seconds."""
    acts: dict[int, torch.Tensor] = {}

    def capturer(layer: int) -> Any:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            # Parameters are frozen, so the earliest hooked activation has no graph: make it the leaf
            # the backward pass starts from. Later ones depend on it through the residual stream.
            if not act.requires_grad:
                act = act.detach().requires_grad_(True)
            acts[layer] = act
            return act

        return hook

    fwd_hooks: FwdHooks = [(name, capturer(layer)) for layer, name in hooks.items()]
    start = time.perf_counter()
    with torch.enable_grad():
        if lean is None:
            loss_per_token = model.run_with_hooks(
                tokens, return_type="loss", loss_per_token=True, padding_side=PADDING, fwd_hooks=fwd_hooks
            )
            loss = loss_per_token.sum()  # (B, T-1) → (): a sum, so per-token gradients ignore batch size
        else:
            with model.hooks(fwd_hooks=fwd_hooks):
                resid = lean.run(_embed(model, tokens), 0, model.cfg.n_layers)  # (B, T, d_model)
            loss = _summed_next_token_loss(model, resid, tokens)
        middle = time.perf_counter()
        layers = list(acts)
        grads = torch.autograd.grad(loss, [acts[layer] for layer in layers])
    saes = saes or {}
    for layer, grad in zip(layers, grads, strict=True):
        sae = saes.get(layer)
        if sae is not None:
            grad = _feature_gradient(sae, acts[layer].detach(), grad)
        accumulators[layer].add(grad)  # grad: (B, T, D) or (B, T, d_sae)
    return middle - start, time.perf_counter() - middle


def _feature_gradient(sae: LoadedSAE, act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The loss gradient with respect to the SAE's feature activations ``(B, T, d_sae)``, given the
    gradient with respect to the activation ``act`` ``(B, T, d)`` the SAE reads.

    With the SAE spliced in at this hook and its error term kept, the activation is
    ``decode(f) + error`` and the forward pass is unchanged, so ``dLoss/df = W_dec · dLoss/dact``
    (times the decoder's run-time input scale where the SAE normalizes its input).
    """
    w_dec = sae.sae.W_dec  # (d_sae, d)
    scale = sae.decoder_scale(act).to(w_dec.dtype)  # (B, T, 1)
    with torch.no_grad():
        return torch.matmul(grad.to(w_dec.dtype), w_dec.T) * scale


def _summed_next_token_loss(
    model: HookedTransformer, resid: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """TransformerLens' per-token next-token loss, summed, from the last residual stream ``(B, T, d_model)``.

    The same ``ln_final``, unembedding and logit soft cap as its forward, except that ``W_U`` is read in
    place (its ``Unembed`` copies the matrix, 113 MB for SmolLM2, on every call), a zero ``b_U`` is not
    added, and log-softmax and gather are one ``cross_entropy``. The last position predicts nothing.
    """
    from transformer_lens.utilities.activation_functions import apply_softcap

    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    logits = torch.matmul(resid, model.unembed.W_U)  # (B, T, d_vocab)
    if model.unembed.b_U.any():
        logits = logits + model.unembed.b_U
    logits = apply_softcap(logits, model.cfg.output_logits_soft_cap)
    targets = F.pad(tokens[:, 1:], (0, 1), value=-100)  # (B, T): the next token; -100 is ignored
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100)


# --- from sums to variants ---------------------------------------------------------------------------


def _modes(params: ActivationImportanceParams) -> list[Mode]:
    """Magnitude first, so that ``variants[0]`` (used by ``peak`` and the overview) is ``mean_abs``."""
    return ["mean_abs", "mean"] if params.aggregation_mode == "both" else [params.aggregation_mode]


def _norms(params: ActivationImportanceParams) -> list[Norm]:
    return ["sum_abs", "sum"] if params.normalization == "both" else [params.normalization]


def variant_names(params: ActivationImportanceParams) -> list[str]:
    """``mean_abs``, ``mean`` or, with ``normalization: both``, ``{mode}_norm_{sum_abs|sum}``."""
    if params.normalization != "both":
        return list(_modes(params))
    return [f"{mode}_norm_{norm}" for mode in _modes(params) for norm in _norms(params)]


def _variants(
    ctx: StepContext,
    accumulators: dict[int, DimAccumulator],
    params: ActivationImportanceParams,
    power: float | None,
) -> Results:
    """Mean / mean_abs per layer, then the power, then each normalization."""
    results: Results = {}
    for layer, accumulator in accumulators.items():
        raw = {"mean": accumulator.mean(), "mean_abs": accumulator.mean_abs()}  # each (D,)
        results[layer] = {}
        for mode in _modes(params):
            powered = raw[mode] if power is None else signed_power(raw[mode], power)
            for norm in _norms(params):
                name = mode if params.normalization != "both" else f"{mode}_norm_{norm}"
                results[layer][name], ok = normalize(powered, norm)
                if not ok:
                    ctx.note(
                        f"layer {layer} {name}: cannot normalize by {norm} (it is zero); kept raw values"
                    )
    return results


# --- summary and data files -----------------------------------------------------------------------


def _layer_summary(values: np.ndarray, top_k: int) -> dict[str, Any]:
    return {**vector_stats(values), "top": [[dim, value] for dim, value in top_by_abs(values, top_k)]}


def _summary(
    ctx: StepContext, params: ActivationImportanceParams, m: Measurement
) -> ActivationImportanceResult:
    """What expectations read: ``peak.value``, ``layers[3].mean_abs.max``, ``dims[3]``…"""
    results = m.results
    variants = variant_names(params)
    first = variants[0]
    peak_layer = max(results, key=lambda layer: float(np.abs(results[layer][first]).max()))
    peak_dim, peak_value = top_by_abs(results[peak_layer][first], 1)[0]
    summary = {
        "variants": variants,
        "layers": {
            layer: {name: _layer_summary(values, params.top_k) for name, values in by_variant.items()}
            for layer, by_variant in results.items()
        },
        "peak": {"layer": peak_layer, "variant": first, "dim": peak_dim, "value": peak_value},
        "dims": {layer: int(by_variant[first].size) for layer, by_variant in results.items()},
        "n_tokens": m.n_tokens,
        "aggregate_by": params.aggregate_by,
        "site": params.site,
        "sae": {layer: sae.info for layer, sae in m.saes.items()} if m.saes else None,
        "power": m.power,
        "normalization": params.normalization,
        "model": ctx.model.name,
        "importance": results,
    }
    return ActivationImportanceResult.model_validate(summary)


def _data_files(ctx: StepContext, params: ActivationImportanceParams, m: Measurement) -> dict[str, Any]:
    """Every file of the case, under the seed's names where the seed had one."""
    results = m.results
    data: dict[str, Any] = {}
    for layer, by_variant in results.items():
        for name, values in by_variant.items():
            data[f"layer_{layer}_{name}_gradients.npy"] = values
    data["consolidated_results.npz"] = {
        f"layer_{layer}_{name}": values
        for layer, by_variant in results.items()
        for name, values in by_variant.items()
    }
    data["per_layer_stats.csv"] = _stats_rows(results)
    data["top_dimensions.csv"] = _top_rows(results, params.top_k)
    data["timing_stats.json"] = _timing_stats(m)
    data["timing_summary.txt"] = _timing_summary(ctx, m)
    data["metadata.json"] = _metadata(ctx, params, m, files=[*data, "metadata.json"])
    return data


def _stats_rows(results: Results) -> list[dict[str, Any]]:
    return [
        {"layer": layer, "variant": name, "dim": int(values.size), **vector_stats(values)}
        for layer, by_variant in results.items()
        for name, values in by_variant.items()
    ]


def _top_rows(results: Results, top_k: int) -> list[dict[str, Any]]:
    return [
        {"layer": layer, "variant": name, "rank": rank, "dim": dim, "value": value}
        for layer, by_variant in results.items()
        for name, values in by_variant.items()
        for rank, (dim, value) in enumerate(top_by_abs(values, top_k), start=1)
    ]


def _timing_stats(m: Measurement) -> dict[str, Any]:
    timing, n_tokens = m.timing, m.n_tokens
    loop_seconds = sum(timing.batch_seconds)
    return {
        "total_seconds": timing.total_seconds,
        "n_batches": len(timing.batch_seconds),
        "batch_seconds": timing.batch_seconds,
        "mean_batch_seconds": loop_seconds / max(len(timing.batch_seconds), 1),
        "forward_seconds": timing.forward_seconds,
        "backward_seconds": timing.backward_seconds,
        "n_tokens": n_tokens,
        "tokens_per_second": n_tokens / loop_seconds if loop_seconds > 0 else None,
    }


def _timing_summary(ctx: StepContext, m: Measurement) -> str:
    stats = _timing_stats(m)
    rate = f"{stats['tokens_per_second']:.0f} tokens/s" if stats["tokens_per_second"] else "n/a"
    return (
        f"activation_importance case {ctx.case_id} on {ctx.model.name}\n"
        f"total: {stats['total_seconds']:.2f} s (before plotting)\n"
        f"batches: {stats['n_batches']}, mean {stats['mean_batch_seconds']:.3f} s per batch\n"
        f"forward: {stats['forward_seconds']:.2f} s, backward: {stats['backward_seconds']:.2f} s\n"
        f"throughput: {m.n_tokens} tokens, {rate}\n"
    )


def _metadata(
    ctx: StepContext, params: ActivationImportanceParams, m: Measurement, files: list[str]
) -> dict[str, Any]:
    """The seed's ``metadata.json`` layout, plus what the seed pickled into its npz."""
    dataset, results, timing = ctx.dataset, m.results, m.timing
    return {
        "analysis_config": {
            "model_name": ctx.model.name,
            "aggregate_by": params.aggregate_by,
            "aggregation_mode": params.aggregation_mode,
            "power": m.power,
            "power_requested": params.power,
            "normalization_mode": params.normalization,
            "layers": list(m.hooks),
            "site": params.site,
            "hook_names": list(m.hooks.values()),
            "sae": {layer: sae.info for layer, sae in m.saes.items()} if m.saes else None,
            "dataset": dataset.name,
            "dataset_fingerprint": dataset.fingerprint,
            "num_samples": len(dataset),
            "max_length": dataset.max_len,
            "batch_size": params.batch_size,
            "n_tokens": m.n_tokens,
            "loss": "sum over batch and positions of next-token cross-entropy"
            if params.aggregate_by == "gradients"
            else None,
            "variants": variant_names(params),
        },
        "layer_statistics": {
            f"layer_{layer}_{name}": vector_stats(values)
            for layer, by_variant in results.items()
            for name, values in by_variant.items()
        },
        "dimension_sizes": {str(layer): int(next(iter(v.values())).size) for layer, v in results.items()},
        "timing": {
            "total_seconds": timing.total_seconds,
            "mean_batch_seconds": sum(timing.batch_seconds) / max(len(timing.batch_seconds), 1),
        },
        "files": files,
        "how_to_load": _how_to_load(results),
        "note": "consolidated_results.npz holds arrays only; "
        "this file holds the metadata the seed pickled into it.",
    }


def _how_to_load(results: Results) -> str:
    layer = next(iter(results))
    key = f"layer_{layer}_{next(iter(results[layer]))}"
    return (
        "import json\n"
        "import numpy as np\n"
        "data = np.load('consolidated_results.npz')  # arrays only: no allow_pickle needed\n"
        f"values = data['{key}']  # keys: layer_{{L}}_{{variant}}; list them with data.files\n"
        "with open('metadata.json') as f:\n"
        "    metadata = json.load(f)\n"
    )


# --- plots -----------------------------------------------------------------------------------------


def _quantity(params: ActivationImportanceParams) -> str:
    if params.sae is not None:
        return "SAE feature activation" if params.aggregate_by == "values" else "SAE feature loss gradient"
    return "activation" if params.aggregate_by == "values" else "loss gradient"


def _label(name: str, params: ActivationImportanceParams) -> str:
    """``mean_abs`` → ``mean_abs (sum_abs-normalized)``; ``both`` names already carry the norm."""
    if params.normalization in ("sum", "sum_abs"):
        return f"{name} ({params.normalization}-normalized)"
    return name


def _plots(ctx: StepContext, params: ActivationImportanceParams, results: Results) -> dict[str, Figure]:
    """Per-layer histograms (as the seed), a grid per variant, the overview, the mean-vs-mean_abs grid."""
    title = f"{ctx.model.name} · {params.site} {_quantity(params)}"
    plots: dict[str, Figure] = {}
    for name in variant_names(params):
        for layer, by_variant in results.items() if params.layer_histograms else ():
            plots[f"layer_{layer}_{name}_hist.png"] = _layer_histogram(
                by_variant[name], f"{title} · layer {layer}", _label(name, params)
            )
        plots[f"all_layers_{name}_hist.png"] = _histogram_heatmap(
            results, name, f"{title} · {_label(name, params)} per layer", _label(name, params)
        )
    first = variant_names(params)[0]
    plots["importance_by_layer.png"] = _overview(results, first, f"{title} · by layer", _label(first, params))
    if params.aggregation_mode == "both":
        plots["all_layers_combined.png"] = _combined_grid(results, title, params)
    return plots


def _histogram(ax: Any, values: np.ndarray, bins: int) -> None:
    """One filled step outline (fast to save) on a log count axis, so that outliers stay visible.

    No minor ticks: on a log axis they are most of a small figure's drawing time, and the decades
    are enough to read counts.
    """
    ax.hist(values, bins=bins, histtype="stepfilled", log=True, color="tab:blue")
    ax.yaxis.set_minor_locator(NullLocator())


def _fixed_margins(width: float, height: float) -> Figure:
    """A figure whose margins are set in inches, with no layout engine to measure its tick labels.

    A layout engine measures every label of every axes before drawing (the larger part of saving a
    30-axes grid); these margins fit the small fonts used here. It is saved as it is, not "tight".
    """
    fig = Figure(
        figsize=(width, height),
        layout=PlaceHolderLayoutEngine(adjust_compatible=True, colorbar_gridspec=True),
    )
    fig.subplots_adjust(
        left=0.6 / width,
        right=1 - 0.15 / width,
        bottom=0.5 / height,
        top=1 - 0.6 / height,
        wspace=0.35,
        hspace=0.6,
    )
    return fig


def _layer_histogram(values: np.ndarray, title: str, label: str) -> Figure:
    fig = _fixed_margins(4.5, 3.2)
    ax = fig.add_subplot()
    _histogram(ax, values, bins=50)
    ax.set(title=title, xlabel=label, ylabel="dimensions (log scale)")
    ax.title.set_fontsize(9)
    return fig


def _grid(n: int, title: str) -> tuple[Figure, list[Any]]:
    """``n`` small axes, six to a row."""
    cols = min(6, n)
    rows = -(-n // cols)
    fig = _fixed_margins(2.6 * cols, 2.1 * rows + 0.5)
    fig.suptitle(title)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _histogram_heatmap(results: Results, name: str, title: str, label: str) -> Figure:
    """Every layer's histogram in one image: a row per layer, dimensions per bin as colour (log scale).

    Bins are shared by all layers, so rows compare directly: log-spaced when every value is positive
    and they span more than two decades (normalized importances do), even otherwise. One image draws
    in a fraction of the time of a grid of small histograms, whose tick labels dominate saving it.
    """
    layers = list(results)
    values = [np.asarray(results[layer][name], dtype=np.float64) for layer in layers]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    logarithmic = low > 0 and high > 100 * low
    if logarithmic:
        edges = np.geomspace(low, high, 61)
    else:
        edges = np.linspace(low, high if high > low else low + 1.0, 61)
    counts = np.stack([np.histogram(v, bins=edges)[0] for v in values]).astype(np.float64)
    shown = np.ma.masked_equal(counts, 0)  # empty bins stay white
    fig = Figure(figsize=(7.5, 0.18 * len(layers) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.log10(edges) if logarithmic else edges
    mesh = ax.pcolormesh(x, np.arange(len(layers) + 1), shown, cmap="viridis", norm=LogNorm(vmin=1))
    ax.set_yticks(np.arange(len(layers)) + 0.5, [str(layer) for layer in layers], fontsize=6)
    ax.invert_yaxis()
    ax.set(title=title, xlabel=f"log10 {label}" if logarithmic else label, ylabel="layer")
    fig.colorbar(mesh, ax=ax, label="dimensions per bin")
    return fig


def _combined_grid(results: Results, title: str, params: ActivationImportanceParams) -> Figure:
    """Per dimension: signed mean (x) against mean |·| (y), each with the same normalization."""
    suffix = "_norm_sum_abs" if params.normalization == "both" else ""
    norm = "sum_abs" if params.normalization == "both" else params.normalization
    fig, axes = _grid(len(results), f"{title} · mean vs mean_abs per dimension (normalization: {norm})")
    for ax, (layer, by_variant) in zip(axes, results.items(), strict=True):
        # plot() with markers only draws the same dots as scatter() in a third of the time
        ax.plot(by_variant[f"mean{suffix}"], by_variant[f"mean_abs{suffix}"], ".", ms=2, alpha=0.5)
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_locator(MaxNLocator(4))
    fig.supxlabel("mean")
    fig.supylabel("mean_abs", x=0.004)
    return fig


def _overview(results: Results, name: str, title: str, label: str) -> Figure:
    """Max and mean (and min, when negative) of one variant per layer: where importance peaks."""
    layers = list(results)
    arrays = [results[layer][name] for layer in layers]
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(layers, [a.max() for a in arrays], marker="o", label="max")
    ax.plot(layers, [a.mean() for a in arrays], marker="s", label="mean")
    lows = [a.min() for a in arrays]
    if min(lows) < 0:
        ax.plot(layers, lows, marker="v", label="min")
    elif max(a.max() for a in arrays) > 30 * min(a.mean() for a in arrays) > 0:
        ax.set_yscale("log")  # a few outlier dimensions would otherwise flatten every other layer
    ax.set(title=title, xlabel="layer", ylabel=label)
    ax.legend()
    return fig

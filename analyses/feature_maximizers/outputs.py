"""The result, ``maximizers.jsonl`` and the PNGs of ``feature_maximizers``."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from analyses.feature_maximizers import FeatureMaximizersParams, FeatureMaximizersResult, Maximizer
from runner.saes.loading import LoadedSAE
from runner.step import StepContext, StepOutput

__all__ = ["build_output", "comparison_figure", "synthetic_figure"]


def build_output(
    ctx: StepContext,
    params: FeatureMaximizersParams,
    loaded: LoadedSAE,
    found: list[Maximizer],
    source: str,
    timing: dict[str, float],
    started: float,
) -> StepOutput:
    """The case's result, data files and figures."""
    start = time.perf_counter()
    model = ctx.model.name
    features = list(dict.fromkeys(m.feature for m in found))
    plots: dict[str, Figure] = {
        f"feature_{f}_synthetic.png": synthetic_figure(model, [m for m in found if m.feature == f])
        for f in features
    }
    if params.from_step is not None:
        plots["real_vs_synthetic_comparison.png"] = comparison_figure(model, found, params.methods)
    lines = "".join(json.dumps(m.model_dump(), ensure_ascii=False, allow_nan=False) + "\n" for m in found)
    timing["outputs"] = time.perf_counter() - start
    result = FeatureMaximizersResult(
        model=model,
        layer=loaded.layer,
        hook=loaded.hook_name,
        dataset_max_from=source,
        n_passages=len(ctx.dataset),
        init=params.init,
        maximizers=found,
        beats={m: sum(x.beats_dataset for x in found if x.method == m) for m in params.methods},
        n_features=len(features),
        seconds=time.perf_counter() - started,
        timing={k: round(v, 3) for k, v in timing.items()},
    )
    return StepOutput(result=result, data={"maximizers.jsonl": lines}, plots=plots)


def synthetic_figure(model: str, found: list[Maximizer]) -> Figure:
    """One feature: each method's tokens, coloured and labelled by activation, and the dataset's best."""
    from matplotlib import colormaps

    first = found[0]
    fig = Figure(figsize=(11, 1.2 + 1.1 * len(found)))
    ax = fig.add_subplot()
    ax.set_axis_off()
    title = f"{model} feature {first.feature}" + (f": {first.label}" if first.label else "")
    ax.set_title(f"{title}\nbest in the dataset {first.dataset_max:.2f}", fontsize=9, loc="left")
    scale = max([first.dataset_max, *(max(m.values) for m in found)]) or 1.0
    cmap = colormaps["Oranges"]
    ax.set_xlim(0, 1)
    ax.set_ylim(0, len(found))
    for row, found_one in enumerate(found):
        y = len(found) - row - 0.35
        ce = found_one.cross_entropy
        ax.text(
            0,
            y + 0.3,
            f"{found_one.method}: max {found_one.activation:.2f}, cross-entropy {ce:.2f} nats",
            fontsize=8,
        )
        width = 1.0 / max(len(found_one.tokens), 1)
        for k, (token, value) in enumerate(zip(found_one.tokens, found_one.values, strict=True)):
            shown = repr(token)[1:-1][:12]
            ax.text(
                k * width,
                y,
                shown,
                fontsize=7,
                va="center",
                bbox={"facecolor": cmap(float(np.clip(value / scale, 0, 1))), "edgecolor": "none"},
            )
            ax.text(k * width, y - 0.28, f"{value:.1f}", fontsize=6, va="center", color="grey")
    return fig


def comparison_figure(model: str, found: list[Maximizer], methods: list[Any]) -> Figure:
    """Per feature: the dataset's best activation next to each method's."""
    features = list(dict.fromkeys(m.feature for m in found))
    fig = Figure(figsize=(max(6, 1.4 * len(features)), 4))
    ax = fig.add_subplot()
    width = 0.8 / (len(methods) + 1)
    x = np.arange(len(features))
    best = {m.feature: m.dataset_max for m in found}
    ax.bar(x, [best[f] for f in features], width, label="dataset (real)", color="grey")
    for i, method in enumerate(methods, start=1):
        values = {m.feature: m.activation for m in found if m.method == method}
        ax.bar(x + i * width, [values.get(f, 0.0) for f in features], width, label=method)
    ax.set_xticks(x + width * len(methods) / 2, [str(f) for f in features])
    ax.set_xlabel("feature")
    ax.set_ylabel("largest activation")
    ax.set_title(f"{model}: real vs synthetic maximizers", fontsize=10)
    ax.legend(fontsize=8)
    return fig

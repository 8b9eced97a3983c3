"""How ``decompose_spd`` computes; ``__init__.py`` declares it (params, result, registration)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from analyses._spd import (
    SPD_CONFIG_FILE,
    SPD_WEIGHTS_FILE,
    Decomposition,
    SpdTraining,
    evaluate,
    feature_ci,
    spd_tensors,
    train_spd,
)
from analyses._toy_loading import load_source
from analyses._toy_model import ResidMLP, small_work_threads
from analyses.decompose_spd import DecomposeSpdParams, DecomposeSpdResult
from runner.step import StepContext, StepOutput

__all__ = ["run", "settings_of", "summarize"]


def run(ctx: StepContext, params: DecomposeSpdParams) -> StepOutput:
    """Decompose the source's toy model; count active components per feature; return the checkpoint."""
    started = time.perf_counter()
    where = f"decompose_spd case {ctx.case_id}"
    loaded = load_source(ctx, params.source, where=where)
    if loaded.decomposition is not None:
        ctx.note(f"{loaded.origin} is a decomposition: its target model is decomposed afresh")
    settings = settings_of(params)
    with small_work_threads(params.batch_size * loaded.target.config.d_embed):
        return _decompose(ctx, params, loaded.target, settings, started)


def _decompose(
    ctx: StepContext, params: DecomposeSpdParams, target: ResidMLP, settings: SpdTraining, started: float
) -> StepOutput:

    def progress(items: Iterable[int], total: int) -> Iterator[int]:
        return ctx.progress(items, total, "SPD steps")

    model, log = train_spd(target, settings, seed=ctx.seed, progress=progress)
    generator = torch.Generator().manual_seed(ctx.seed + 1)
    eval_losses = evaluate(model, settings, generator, params.eval_batches, params.ci_threshold)
    result = summarize(model, params, eval_losses, log.warmup_faithfulness, time.perf_counter() - started)
    return StepOutput(
        result=result,
        data={
            SPD_WEIGHTS_FILE: spd_tensors(model),
            SPD_CONFIG_FILE: model.config.to_json(),
            "feature_components.csv": _feature_rows(result),
            "training_log.csv": log.rows,
        },
        plots={"losses.png": _loss_plot(log.rows), "feature_ci.png": _ci_plot(result)},
    )


def settings_of(params: DecomposeSpdParams) -> SpdTraining:
    """The training hyperparameters carried by ``params`` (same names)."""
    names = SpdTraining.__dataclass_fields__
    return SpdTraining(**{k: v for k, v in params.model_dump().items() if k in names})


def summarize(
    model: Decomposition,
    params: DecomposeSpdParams,
    eval_losses: dict[str, Any],
    warmup: float | None,
    seconds: float,
) -> DecomposeSpdResult:
    """The result: per-feature active components at magnitude 1, losses, and the decomposition's tensors."""
    ci, _ = feature_ci(model, magnitude=1.0)
    active = {name: (c > params.ci_threshold) for name, c in ci.items()}  # (F, C) bool
    counts = {name: a.sum(-1) for name, a in active.items()}  # (F,)
    mlp_in = sum(c for name, c in counts.items() if name.endswith("mlp_in"))
    assert isinstance(mlp_in, torch.Tensor)
    return DecomposeSpdResult(
        spd_config=model.config.to_json(),
        modules=list(model.config.modules),
        C=model.config.C,
        n_features=model.config.toy.n_features,
        steps=params.steps,
        ci_threshold=params.ci_threshold,
        exactly_one_mlp_in=float((mlp_in == 1).float().mean()),
        exactly_one={name: float((c == 1).float().mean()) for name, c in counts.items()},
        mean_active={name: float(c.float().mean()) for name, c in counts.items()},
        active_counts={name: c.tolist() for name, c in counts.items()},
        top_component={name: c.argmax(-1).tolist() for name, c in ci.items()},
        alive={name: int(a.any(0).sum()) for name, a in active.items()},
        losses={k: v for k, v in eval_losses.items() if k != "ci_l0"},
        ci_l0=eval_losses["ci_l0"],
        warmup_faithfulness=warmup,
        seconds=seconds,
        ci_one_hot={name: c.numpy() for name, c in ci.items()},
        tensors={name: t.numpy() for name, t in spd_tensors(model).items()},
    )


def _feature_rows(result: DecomposeSpdResult) -> list[dict[str, object]]:
    rows = []
    for feature in range(result.n_features):
        row: dict[str, object] = {"feature": feature}
        for name in result.modules:
            ci = result.ci_one_hot[name][feature]
            row[f"{name}.active"] = result.active_counts[name][feature]
            row[f"{name}.top_component"] = result.top_component[name][feature]
            row[f"{name}.top_ci"] = float(ci.max())
        rows.append(row)
    return rows


def _loss_plot(rows: list[dict[str, float]]) -> Figure:
    figure = Figure(figsize=(10, 3.2), layout="constrained")
    steps = [r["step"] for r in rows]
    for i, (key, label) in enumerate(
        [
            ("stochastic_recon", "stochastic reconstruction"),
            ("stochastic_recon_layerwise", "layerwise stochastic reconstruction"),
            ("importance_minimality", "importance minimality"),
        ]
    ):
        ax = figure.add_subplot(1, 3, i + 1)
        ax.plot(steps, [r[key] for r in rows], lw=1.2)
        ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    return figure


def _ci_plot(result: DecomposeSpdResult) -> Figure:
    """Each weight's one-hot CI matrix, components ordered by the feature they serve (SPD's permuted plot)."""
    names = result.modules
    figure = Figure(figsize=(4.2 * len(names), 3.8), layout="constrained")
    for i, name in enumerate(names):
        ci = result.ci_one_hot[name]  # (F, C)
        order = np.argsort(ci.argmax(0) + (ci.max(0) <= result.ci_threshold) * ci.shape[0], kind="stable")
        ax = figure.add_subplot(1, len(names), i + 1)
        image = ax.imshow(ci[:, order], aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}: {100 * result.exactly_one[name]:.0f}% of features have one", fontsize=9)
        ax.set_xlabel("component (sorted by the feature it serves)", fontsize=8)
        ax.set_ylabel("feature (one-hot input, magnitude 1)", fontsize=8)
        ax.tick_params(labelsize=7)
        figure.colorbar(image, ax=ax, label="CI")
    return figure

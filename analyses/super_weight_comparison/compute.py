"""How ``super_weight_comparison`` computes; ``__init__.py`` declares it (params, result, registration)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analyses.super_weight_comparison import SuperWeightComparisonParams, SuperWeightComparisonResult
from analyses.super_weights import SuperWeightsResult
from runner.errors import RunnerError
from runner.step import FinishedCase, StepContext, StepOutput

__all__ = ["compare_models", "run"]

CONTROLS = (("random_control", "random coordinates"), ("magnitude_control", "largest ordinary weights"))
"""The control sets of ``super_weights`` (summary key prefix, label)."""


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _ratio(numerator: Any, denominator: Any) -> float | None:
    if numerator is None or denominator is None or float(denominator) == 0:
        return None
    return float(numerator) / float(denominator)


def _perplexity(ppl: dict[str, Any] | None) -> dict[str, Any] | None:
    """Baseline, all zeroed, the controls, and how much more the super weights hurt than each control."""
    if not ppl:
        return None
    row: dict[str, Any] = {
        "baseline": _number(ppl.get("baseline")),
        "all_zeroed": _number(ppl.get("all_zeroed")),
        "ratio_all": _number(ppl.get("ratio_all")),
        "n_tokens": ppl.get("n_tokens"),
    }
    for key, _ in CONTROLS:
        row[key] = _number(ppl.get(key))
        row[f"{key}_ratio"] = _number(ppl.get(f"{key}_ratio"))
        # "×N the control": the perplexity ratio of the super weights over that of the control.
        row[f"ratio_vs_{key}"] = _ratio(ppl.get("ratio_all"), ppl.get(f"{key}_ratio"))
    return row


def _accuracy(accuracy: dict[str, Any] | None) -> dict[str, Any] | None:
    """Per task: the metric, its value per condition, and the change from the baseline."""
    if not accuracy:
        return None
    table = {}
    for task, scores in accuracy.items():
        baseline = _number(scores.get("baseline"))
        row: dict[str, Any] = {"metric": scores.get("metric"), "n": scores.get("n"), "baseline": baseline}
        for condition in ("all_zeroed", "random_control"):
            value = _number(scores.get(condition))
            row[condition] = value
            row[f"delta_{condition}"] = None if value is None or baseline is None else value - baseline
        table[task] = row
    return table


def model_row(case: FinishedCase[SuperWeightsResult]) -> dict[str, Any]:
    """One upstream ``super_weights`` case as a row of the comparison."""
    result = case.result
    keys = ("layer", "row", "col", "value", "ppl_ratio")
    return {
        "model": case.model_name,
        "case": case.id,
        "n_super_weights": result.n_found,
        "super_weights": [w.model_dump(include=set(keys), exclude_none=True) for w in result.weights],
        "strongest": result.strongest.model_dump(exclude_none=True) if result.strongest else None,
        "converged": result.converged,
        "spike_threshold": result.spike_threshold,
        "perplexity": _perplexity(result.ppl.model_dump() if result.ppl else None),
        "accuracy": _accuracy(result.accuracy),
        "dataset": result.dataset,
    }


def compare_models(cases: list[FinishedCase[SuperWeightsResult]], from_step: str) -> dict[str, Any]:
    """``cross_model_summary.json``: one row per upstream case, and tallies keyed by model.

    Tallies are keyed by model name, or by case id for a model with several cases.
    """
    rows = [model_row(case) for case in cases]
    keys = _keys(rows)
    ratios = {
        key: r["perplexity"]["ratio_all"]
        for key, r in zip(keys, rows, strict=True)
        if r["perplexity"] and r["perplexity"]["ratio_all"] is not None
    }
    counts = {key: r["n_super_weights"] for key, r in zip(keys, rows, strict=True)}
    return {
        "from_step": from_step,
        "n_models": len({r["model"] for r in rows}),
        "models": rows,
        "counts": counts,
        "ratio_all": ratios,
        # Every model with the largest count (several when tied).
        "most_super_weights": [key for key, n in counts.items() if n == max(counts.values())],
        "largest_ratio_all": max(ratios, key=lambda key: ratios[key], default=None),
    }


def _keys(rows: list[dict[str, Any]]) -> list[str]:
    """Model names, or case ids where a model has several cases."""
    repeats = Counter(r["model"] for r in rows)
    return [r["model"] if repeats[r["model"]] == 1 else r["case"] for r in rows]


def _upstream(
    ctx: StepContext, params: SuperWeightComparisonParams
) -> list[FinishedCase[SuperWeightsResult]]:
    """The step's cases; none is a note, a step of another analysis an error."""
    try:
        ctx.outputs(params.from_step)
    except RunnerError as exc:
        ctx.note(f"Nothing to compare: {exc}")
        return []
    return ctx.outputs(params.from_step, SuperWeightsResult)


def run(ctx: StepContext, params: SuperWeightComparisonParams) -> StepOutput:
    """Compare super weights and their perplexity / accuracy impact across models (loads no model)."""
    cases = _upstream(ctx, params)
    comparison = compare_models(cases, params.from_step)
    rows = comparison["models"]
    if len({r["model"] for r in rows}) == 1:
        ctx.note(
            f"Only one model ({rows[0]['model']}) ran step {params.from_step!r}: there is nothing to compare "
            "it with. Sweep models with a spec-level `sweep: {product: {model.name: [...]}}`."
        )
    summary = {
        **{k: comparison[k] for k in ("from_step", "n_models", "most_super_weights", "largest_ratio_all")},
        "models": [_summary_row(key, r) for key, r in zip(_keys(rows), rows, strict=True)],
    }
    plots = {"model_comparison.png": _comparison_plot(rows)} if rows else {}
    result = SuperWeightComparisonResult.model_validate(summary)
    return StepOutput(result=result, data={"cross_model_summary.json": comparison}, plots=plots)


def _summary_row(key: str, row: dict[str, Any]) -> dict[str, Any]:
    """What expectations and the report read: ``models[0].n_found``, ``models[1].ratio_all``…"""
    ppl = row["perplexity"] or {}
    return {
        "key": key,
        "model": row["model"],
        "case": row["case"],
        "n_found": row["n_super_weights"],
        "weights": [[w["layer"], w["row"], w["col"]] for w in row["super_weights"]],
        "strongest": row["strongest"],
        **{
            key: ppl.get(key)
            for key in (
                "baseline",
                "ratio_all",
                "random_control_ratio",
                "magnitude_control_ratio",
                "ratio_vs_random_control",
                "ratio_vs_magnitude_control",
            )
        },
        "accuracy": row["accuracy"],
    }


# --- plot ------------------------------------------------------------------------------------------------


def _comparison_plot(rows: list[dict[str, Any]]) -> Figure:
    """Super weights per model; perplexity × baseline with them zeroed against the controls (log scale);
    accuracy change per task when measured."""
    labels = _keys(rows)
    tasks = sorted({task for r in rows for task in (r["accuracy"] or {})})
    n_panels = 3 if tasks else 2
    fig = Figure(figsize=(max(8.0, 1.6 * len(rows) * n_panels), 4.4), layout="constrained")
    axes = fig.subplots(1, n_panels)
    _count_panel(axes[0], rows, labels)
    _ratio_panel(axes[1], rows, labels)
    if tasks:
        _accuracy_panel(axes[2], rows, labels, tasks)
    fig.suptitle(f"Super weights across {len(rows)} model{'s' if len(rows) != 1 else ''}")
    return fig


def _count_panel(ax: Any, rows: list[dict[str, Any]], labels: list[str]) -> None:
    counts = [r["n_super_weights"] for r in rows]
    bars = ax.bar(range(len(rows)), counts, color="tab:purple")
    ax.bar_label(bars, fontsize=8)
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="super weights found", title="count")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max([*counts, 1]) * 1.2)


def _ratio_panel(ax: Any, rows: list[dict[str, Any]], labels: list[str]) -> None:
    conditions = [("ratio_all", "all super weights", "tab:red")] + [
        (f"{key}_ratio", label, color)
        for (key, label), color in zip(CONTROLS, ("tab:blue", "tab:green"), strict=True)
    ]
    width = 0.8 / len(conditions)
    for i, (key, label, color) in enumerate(conditions):
        points = [(j + (i - 1) * width, (r["perplexity"] or {}).get(key)) for j, r in enumerate(rows)]
        points = [(x, v) for x, v in points if v is not None and math.isfinite(v) and v > 0]
        if points:
            xs, values = zip(*points, strict=True)
            bars = ax.bar(xs, values, width, color=color, label=f"{label} zeroed")
            ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=6)
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="perplexity × baseline (log scale)", title="impact vs controls")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no perplexity measured", ha="center", va="center", transform=ax.transAxes)


def _accuracy_panel(ax: Any, rows: list[dict[str, Any]], labels: list[str], tasks: list[str]) -> None:
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        deltas = [((r["accuracy"] or {}).get(task) or {}).get("delta_all_zeroed") for r in rows]
        points = [(j + (i - (len(tasks) - 1) / 2) * width, d) for j, d in enumerate(deltas) if d is not None]
        if points:
            xs, values = zip(*points, strict=True)
            ax.bar(xs, values, width, label=task)
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="accuracy change, all super weights zeroed", title="lm-eval accuracy")
    ax.legend(fontsize=7)

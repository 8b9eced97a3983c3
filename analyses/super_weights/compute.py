"""How ``super_weights`` computes; ``__init__.py`` declares it (params, result, registration)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import yaml
from matplotlib.figure import Figure

from analyses._transformers_view import transformers_view
from analyses._weights import (
    TENSOR,
    Detection,
    Impact,
    Perplexities,
    SuperWeight,
    detect,
    down_proj,
    largest_entry,
    magnitude_controls,
    measure_impact,
    probe_tokens,
    random_controls,
    restore_note,
    zeroed,
)
from analyses.super_weights import SuperWeightsParams, SuperWeightsResult
from runner.errors import ResourceError
from runner.hooks import require_layers
from runner.models.hub import hub_reachable
from runner.models.loaded import require_hooks
from runner.registry import did_you_mean
from runner.step import StepContext, StepOutput

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["LayerSpike", "detect_super_weights", "measure_spikes", "perplexity_impact", "run"]

FwdHooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]


# --- detection ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpike:
    """The largest |input| and |output| of one layer's down projection on the probe."""

    layer: int
    input_value: float
    """Signed value of the largest-|·| entry of ``blocks.{L}.mlp.hook_post``."""
    input_position: int
    input_channel: int
    """The neuron (d_mlp index): the candidate's ``col``."""
    output_value: float
    """Signed value of the largest-|·| entry of ``blocks.{L}.hook_mlp_out``."""
    output_position: int
    output_channel: int
    """The residual channel (d_model index): the candidate's ``row``."""

    def passes(self, threshold: float) -> bool:
        """Whether both spikes exceed ``threshold``."""
        return abs(self.input_value) > threshold and abs(self.output_value) > threshold

    @property
    def strength(self) -> float:
        """The weaker of the two spikes, ``min(|input|, |output|)``: how far it is from passing."""
        return min(abs(self.input_value), abs(self.output_value))

    @property
    def weight(self) -> SuperWeight:
        """The candidate this spike points at."""
        return SuperWeight(self.layer, self.output_channel, self.input_channel)


def measure_spikes(model: HookedTransformer, tokens: torch.Tensor, layers: Sequence[int]) -> list[LayerSpike]:
    """One forward pass over ``tokens`` (``(1, pos)``): the largest |input| and |output| per layer."""
    peaks: dict[str, tuple[float, int, int]] = {}

    def record(act: torch.Tensor, hook: Any) -> None:
        peaks[hook.name] = largest_entry(act[0])  # act[0]: (pos, channels)

    names = [(f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out") for layer in layers]
    hooks: FwdHooks = [(name, record) for pair in names for name in pair]
    with torch.no_grad():
        model.run_with_hooks(tokens, return_type=None, stop_at_layer=max(layers) + 1, fwd_hooks=hooks)
    return [
        LayerSpike(layer, *peaks[inp], *peaks[out]) for layer, (inp, out) in zip(layers, names, strict=True)
    ]


def detect_super_weights(
    model: HookedTransformer,
    tokens: torch.Tensor,
    *,
    layers: Sequence[int],
    threshold: float,
    max_iterations: int,
    token_strings: Sequence[str] = (),
) -> Detection[LayerSpike]:
    """The paper's iterative detection on the probe ``tokens`` (``(1, pos)``); weights end as they began."""
    return detect(
        model,
        lambda _: measure_spikes(model, tokens, layers),
        lambda spike: spike.passes(threshold),
        max_iterations=max_iterations,
        probe_tokens=token_strings,
    )


# --- perplexity impact ----------------------------------------------------------------------------------


def perplexity_impact(ctx: StepContext, params: SuperWeightsParams, weights: Sequence[SuperWeight]) -> Impact:
    """Perplexity of the dataset as loaded, with each weight and all of them zeroed, with their random
    and magnitude controls zeroed together (and each alone with ``control_each``), and restored."""
    model = ctx.model.model
    where = f"super_weights case {ctx.case_id}: perplexity"
    bench = Perplexities.of_case(ctx, batch_size=params.batch_size, needed_by=where)
    controls = {
        "random": random_controls(model, weights, np.random.default_rng(ctx.seed)),
        "magnitude": magnitude_controls(model, weights),
    }
    return measure_impact(bench, weights, controls, control_each=params.control_each)


# --- accuracy through lm-evaluation-harness -------------------------------------------------------------

METRIC_PREFERENCE = ("acc,none", "exact_match,strict-match", "exact_match,flexible-extract", "acc_norm,none")
"""The metric reported per task: the first of these that lm-eval returns (else the first number)."""


@dataclass
class AccuracyRunner:
    """lm-eval, ready to score the case's model: checked before any slow work, run after perplexity."""

    simple_evaluate: Any
    model: Any
    """lm-eval's ``HFLM`` around the model's transformers view (:func:`transformers_view`)."""
    task_manager: Any

    def scores(self, params: SuperWeightsParams) -> dict[str, dict[str, Any]]:
        """lm-eval's ``results`` for the model as it is now."""
        results = self.simple_evaluate(
            model=self.model,
            tasks=list(params.accuracy_tasks),
            task_manager=self.task_manager,
            limit=params.accuracy_samples,
            log_samples=False,
            bootstrap_iters=1000,
            verbosity="ERROR",
        )
        return dict(results["results"]) if results else {}


def prepare_accuracy(ctx: StepContext, params: SuperWeightsParams) -> AccuracyRunner:
    """Check lm-eval, the tasks and the model, and wrap the model; every problem is a clear error."""
    lm_eval, hflm, task_manager = _lm_eval(ctx, params)
    view = transformers_view(ctx.model)  # its down projections share storage with the HookedTransformer
    wrapped = hflm(pretrained=view, tokenizer=ctx.model.tokenizer, batch_size=params.batch_size)
    return AccuracyRunner(lm_eval.simple_evaluate, wrapped, task_manager)


def measure_accuracy(
    ctx: StepContext, params: SuperWeightsParams, runner: AccuracyRunner, weights: Sequence[SuperWeight]
) -> dict[str, dict[str, Any]]:
    """Each task's score as loaded, with every super weight zeroed, and with the random controls zeroed.

    The view lm-eval runs shares the down projections of the ``HookedTransformer``, so the same
    :func:`zeroed` edits apply to it.
    """
    model = ctx.model.model
    randoms = random_controls(model, weights, np.random.default_rng(ctx.seed))

    def evaluate(label: str, zero: Sequence[SuperWeight]) -> dict[str, dict[str, Any]]:
        scores: dict[str, dict[str, Any]] = {}
        with zeroed(model, zero):
            for _ in ctx.progress([label], 1, f"accuracy: {label}"):  # one step: shows what is running
                scores = runner.scores(params)
        return scores

    conditions = {"baseline": evaluate("baseline", [])}
    if weights:
        conditions["all_zeroed"] = evaluate("all super weights zeroed", weights)
        conditions["random_control"] = evaluate("random controls zeroed", randoms)
    return _accuracy_table(params.accuracy_tasks, conditions)


def _lm_eval(ctx: StepContext, params: SuperWeightsParams) -> tuple[Any, Any, Any]:
    """lm-eval's module, ``HFLM`` and a ``TaskManager`` knowing ``task_dir``; clear errors otherwise."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ResourceError(
            f"super_weights case {ctx.case_id}: `accuracy_tasks` needs lm-evaluation-harness, which is not "
            "installed.\nInstall it with `pip install lm-eval` (or `pip install -e .[eval]`), or leave "
            "`accuracy_tasks` empty."
        ) from None
    include = None
    if params.task_dir is not None:
        include = (ctx.spec_dir / params.task_dir).resolve()
        if not include.is_dir():
            raise ResourceError(
                f"super_weights case {ctx.case_id}: task_dir {include} is not a folder.\n"
                "Point `task_dir` (relative to the spec file) at a folder of lm-eval task YAML files."
            )
    remote = [task for task in params.accuracy_tasks if task not in _local_tasks(include)]
    # Indexing lm-eval's own thousands of task files takes seconds: only when a task may be one of them.
    manager = TaskManager(
        include_path=str(include) if include else None, include_defaults=bool(remote), verbosity="ERROR"
    )
    _check_tasks(ctx, params, manager, remote)
    return lm_eval, HFLM, manager


def _check_tasks(ctx: StepContext, params: SuperWeightsParams, manager: Any, remote: list[str]) -> None:
    known = list(manager.all_tasks)
    unknown = [task for task in params.accuracy_tasks if task not in known]
    if unknown:
        hints = "".join(f"\n  {task!r}:{did_you_mean(task, known) or ' no close name.'}" for task in unknown)
        raise ResourceError(
            f"super_weights case {ctx.case_id}: lm-eval knows no task "
            f"{', '.join(map(repr, unknown))}.{hints}\n"
            "Use lm-eval task names (`lm-eval ls tasks`), or define the task in a YAML file under `task_dir`."
        )
    if remote and not hub_reachable():
        raise ResourceError(
            f"super_weights case {ctx.case_id}: accuracy tasks {remote} download their data from the Hugging "
            "Face hub, which is not reachable from this machine.\n"
            "Run online, define local tasks under `task_dir`, or leave `accuracy_tasks` empty."
        )


def _local_tasks(include: Path | None) -> set[str]:
    """Task names defined by the YAML files under ``include`` (their ``task:`` keys and file stems)."""
    names: set[str] = set()
    for path in include.rglob("*.yaml") if include else ():
        names.add(path.stem)
        try:
            task = yaml.safe_load(path.read_text()).get("task")
        except (yaml.YAMLError, AttributeError, OSError):  # lm-eval's `!function` tags, non-mappings
            continue
        names.update([task] if isinstance(task, str) else [t for t in task or [] if isinstance(t, str)])
    return names


def _main_metric(scores: dict[str, Any]) -> str | None:
    for name in METRIC_PREFERENCE:
        if isinstance(scores.get(name), int | float):
            return name
    numbers = [
        k for k, v in scores.items() if isinstance(v, int | float) and "stderr" not in k and k != "sample_len"
    ]
    return numbers[0] if numbers else None


def _accuracy_table(
    tasks: Sequence[str], conditions: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """Per task: the metric used, its value under each condition, and every number lm-eval returned."""
    table: dict[str, dict[str, Any]] = {}
    for task in tasks:
        baseline = conditions["baseline"].get(task, {})
        metric = _main_metric(baseline)
        row: dict[str, Any] = {"metric": metric, "n": baseline.get("sample_len")}
        for condition, results in conditions.items():
            scores = results.get(task, {})
            row[condition] = scores.get(metric) if metric else None
            row[f"{condition}_all"] = {k: v for k, v in scores.items() if isinstance(v, int | float)}
        if row.get("all_zeroed") is not None and row["baseline"] is not None:
            row["drop"] = row["baseline"] - row["all_zeroed"]
        table[task] = row
    return table


# --- the analysis ---------------------------------------------------------------------------------------


def run(ctx: StepContext, params: SuperWeightsParams) -> StepOutput:
    """Detect super weights on a probe text; measure what zeroing them does to perplexity (and accuracy)."""
    start = time.perf_counter()
    loaded = ctx.model
    layers = _resolve_layers(ctx, params)
    accuracy_runner = prepare_accuracy(ctx, params) if params.accuracy_tasks else None
    tokens = probe_tokens(loaded.model, params.probe_text, params.prepend_bos)  # (1, pos)
    strings = [str(loaded.tokenizer.decode([t])) for t in tokens[0].tolist()]
    detection = detect_super_weights(
        loaded.model,
        tokens,
        layers=layers,
        threshold=params.spike_threshold,
        max_iterations=params.max_iterations,
        token_strings=strings,
    )
    _note_detection(ctx, params, detection)
    weights = [f.weight for f in detection.found]
    impact = perplexity_impact(ctx, params, weights) if params.perplexity else None
    if note := restore_note(impact, "super_weights"):
        ctx.note(note)
    accuracy = measure_accuracy(ctx, params, accuracy_runner, weights) if accuracy_runner else None
    records = _weight_records(ctx, detection, impact)
    summary = _summary(ctx, params, detection, impact, records, accuracy)
    data = _data_files(ctx, params, detection, impact, records, summary, time.perf_counter() - start)
    plots = _plots(ctx, params, detection, impact, records)
    if accuracy:
        data["accuracy.json"] = accuracy
        plots["accuracy_comparison.png"] = _accuracy_plot(accuracy, ctx.model.name)
    return StepOutput(result=SuperWeightsResult.model_validate(summary), data=data, plots=plots)


def _resolve_layers(ctx: StepContext, params: SuperWeightsParams) -> list[int]:
    where = f"super_weights case {ctx.case_id}"
    layers = sorted(require_layers(params.layers, ctx.model.n_layers, model=ctx.model.name, where=where))
    hooks = [f"blocks.{layer}.{site}" for layer in layers for site in ("mlp.hook_post", "hook_mlp_out")]
    require_hooks(ctx.model, hooks, where=where)
    for layer in layers:
        down_proj(ctx.model.model, layer)  # a clear error for MoE or unusual MLPs, before any work
    return layers


def _note_detection(ctx: StepContext, params: SuperWeightsParams, detection: Detection[LayerSpike]) -> None:
    if not detection.found:
        best = max(detection.passes[0], key=lambda s: s.strength)
        ctx.note(
            f"No layer has both spikes above spike_threshold={params.spike_threshold:g}. The strongest is "
            f"layer {best.layer}: |input| {abs(best.input_value):.3g}, "
            f"|output| {abs(best.output_value):.3g}. "
            "See `top_candidates`; lower `spike_threshold` to test them."
        )
    elif not detection.converged:
        last = [f for f in detection.found if f.iteration == len(detection.passes) - 1]
        ctx.note(
            f"Detection stopped at max_iterations={params.max_iterations} while still finding new weights "
            f"({len(last)} in the last pass, at layers {sorted({f.weight.layer for f in last})}). "
            "Raise `max_iterations`, or restrict `layers`, to let it converge."
        )


def _weight_records(
    ctx: StepContext, detection: Detection[LayerSpike], impact: Impact | None
) -> list[dict[str, Any]]:
    """One row per detected weight: where, how large, what revealed it, what zeroing it does."""
    records = []
    for i, found in enumerate(detection.found):
        spike = found.spike
        record: dict[str, Any] = {
            "index": i,
            "model": ctx.model.name,
            "tensor": TENSOR,
            **found.weight.as_dict(),
            "value": found.value,
            "iteration": found.iteration,
            "input_value": spike.input_value,
            "output_value": spike.output_value,
            "input_position": spike.input_position,
            "output_position": spike.output_position,
            "token": _token(detection, spike.input_position),
        }
        if impact is not None:
            record["ppl"] = impact.single[i]
            record["ppl_ratio"] = impact.single[i] / impact.baseline
        records.append(record)
    return records


def _token(detection: Detection[LayerSpike], position: int) -> str:
    """The probe token at ``position`` (empty when the strings were not given)."""
    tokens = detection.probe_tokens
    return tokens[position] if position < len(tokens) else ""


def _control_records(impact: Impact, name: str) -> list[dict[str, Any]]:
    """Each control of set ``name``: where, its value, and perplexity with it alone zeroed (if measured)."""
    control = impact.controls[name]
    rows = []
    for i, (weight, value) in enumerate(zip(control.weights, control.values, strict=True)):
        row: dict[str, Any] = {**weight.as_dict(), "value": value}
        if control.each:
            row["ppl"] = control.each[i]
            row["ppl_ratio"] = control.each[i] / impact.baseline
        rows.append(row)
    return rows


def _ppl_summary(impact: Impact | None) -> dict[str, Any] | None:
    if impact is None:
        return None
    random, magnitude = impact.controls["random"].together, impact.controls["magnitude"].together
    return {
        "baseline": impact.baseline,
        "all_zeroed": impact.all_zeroed,
        "ratio_all": impact.ratio(impact.all_zeroed),
        "max_single_ratio": impact.max_ratio(impact.single),
        "random_control": random,
        "random_control_ratio": impact.ratio(random),
        "magnitude_control": magnitude,
        "magnitude_control_ratio": impact.ratio(magnitude),
        "restored": impact.restored,
        "restored_exact": impact.restored_exact,
        "weights_restored_exact": impact.weights_restored_exact,
        "n_tokens": impact.n_tokens,
    }


def _top_candidates(detection: Detection[LayerSpike], k: int) -> list[dict[str, Any]]:
    """The first pass's layers ranked by their weaker spike, ``min(|input|, |output|)``."""
    ranked = sorted(detection.passes[0], key=lambda s: -s.strength)
    return [
        {**s.weight.as_dict(), "input_value": s.input_value, "output_value": s.output_value}
        for s in ranked[:k]
    ]


def _summary(
    ctx: StepContext,
    params: SuperWeightsParams,
    detection: Detection[LayerSpike],
    impact: Impact | None,
    records: list[dict[str, Any]],
    accuracy: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What expectations read: ``n_found``, ``ppl.ratio_all``, ``strongest.row``, ``accuracy.piqa.drop``…"""
    keys = ("layer", "row", "col", "value", "iteration", "input_value", "output_value", "ppl", "ppl_ratio")
    weights = [{k: r[k] for k in keys if k in r} for r in records]
    strongest = max(weights, key=lambda w: w.get("ppl_ratio", abs(w["output_value"])), default=None)
    return {
        "model": ctx.model.name,
        "n_found": len(records),
        "weights": weights,
        "strongest": strongest,
        "ppl": _ppl_summary(impact),
        "controls": None
        if impact is None or not records
        else {
            "random": _control_records(impact, "random"),
            "magnitude": _control_records(impact, "magnitude"),
        },
        "accuracy": None
        if accuracy is None
        else {
            task: {k: v for k, v in row.items() if not k.endswith("_all")} for task, row in accuracy.items()
        },
        "converged": detection.converged,
        "iterations": len(detection.passes),
        "spike_threshold": params.spike_threshold,
        "probe_tokens": detection.probe_tokens,
        "top_candidates": _top_candidates(detection, params.top_candidates),
        "dataset": _dataset_facts(ctx, params),
    }


def _spike_rows(detection: Detection[LayerSpike], threshold: float) -> list[dict[str, Any]]:
    found = {(f.iteration, f.weight) for f in detection.found}
    return [
        {
            "iteration": i,
            **asdict(s),
            "passes_threshold": s.passes(threshold),
            "detected": (i, s.weight) in found,
        }
        for i, spikes in enumerate(detection.passes)
        for s in spikes
    ]


def _data_files(
    ctx: StepContext,
    params: SuperWeightsParams,
    detection: Detection[LayerSpike],
    impact: Impact | None,
    records: list[dict[str, Any]],
    summary: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """The seed's per-model JSON files, plus flat tables of the weights and of every probe pass."""
    config = {
        **params.model_dump(mode="json"),
        "model": ctx.model.name,
        "dataset": _dataset_facts(ctx, params),
    }
    data: dict[str, Any] = {
        "super_weights.csv": pd.DataFrame(
            records, columns=list(records[0]) if records else ["index", "layer"]
        ),
        "super_weights.jsonl": records,
        "detection_spikes.csv": _spike_rows(detection, params.spike_threshold),
        "analysis.json": {"config": config, "summary": summary, "seconds": seconds},
    }
    if impact is not None and records:
        base = impact.baseline
        for record in records:
            data[f"individual_analyses/sw_{record['index']}_analysis.json"] = {
                "super_weight": record,
                "perplexity_analysis": {
                    "baseline_perplexity": base,
                    "modified_perplexity": record["ppl"],
                    "perplexity_ratio": record["ppl_ratio"],
                    "n_tokens": impact.n_tokens,
                },
            }
        data["combined_analysis.json"] = {
            "super_weights": [{k: r[k] for k in ("layer", "row", "col", "value")} for r in records],
            "perplexity_analysis": summary["ppl"],
            "controls": summary["controls"],
        }
    return data


def _dataset_facts(ctx: StepContext, params: SuperWeightsParams) -> dict[str, Any] | None:
    if not params.perplexity:
        return None
    dataset = ctx.dataset
    return {
        "name": dataset.name,
        "fingerprint": dataset.fingerprint,
        "passages": len(dataset),
        "max_len": dataset.max_len,
    }


# --- plots -----------------------------------------------------------------------------------------------


def _plots(
    ctx: StepContext,
    params: SuperWeightsParams,
    detection: Detection[LayerSpike],
    impact: Impact | None,
    records: list[dict[str, Any]],
) -> dict[str, Figure]:
    name = ctx.model.name
    plots = {"detection_iterations.png": _detection_plot(detection, params.spike_threshold, name)}
    if records:
        plots["super_weight_distribution.png"] = _distribution_plot(records, params.spike_threshold, name)
    if impact is not None and records:
        plots["impact_comparison.png"] = _impact_plot(impact, records, name)
        plots["combined_analysis.png"] = _combined_plot(impact, name)
    return plots


def _detection_plot(detection: Detection[LayerSpike], threshold: float, model_name: str) -> Figure:
    """Largest |input| and |output| per layer, one line per probe pass; detected weights starred."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    found = {(f.iteration, f.weight.layer) for f in detection.found}
    for ax, side in zip(axes, ("input", "output"), strict=True):
        for i, spikes in enumerate(detection.passes):
            layers = [s.layer for s in spikes]
            values = [max(abs(getattr(s, f"{side}_value")), 1e-6) for s in spikes]
            (line,) = ax.plot(layers, values, marker=".", label=f"pass {i}", alpha=0.8)
            starred = [(layer, v) for layer, v in zip(layers, values, strict=True) if (i, layer) in found]
            if starred:
                ax.scatter(*zip(*starred, strict=True), marker="*", s=160, color=line.get_color(), zorder=3)
        ax.axhline(threshold, color="gray", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        channel = "hook_post, d_mlp" if side == "input" else "hook_mlp_out, d_model"
        ax.set(yscale="log", xlabel="layer", ylabel=f"max |{side}| ({channel})", title=f"down_proj {side}")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{model_name} · super weight detection (★ = detected)")
    return fig


def _distribution_plot(records: list[dict[str, Any]], threshold: float, model_name: str) -> Figure:
    """Input spike against output spike of every detected weight, labelled by position."""
    fig = Figure(figsize=(6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    xs = [abs(r["input_value"]) for r in records]
    ys = [abs(r["output_value"]) for r in records]
    points = ax.scatter(xs, ys, c=[r["layer"] for r in records], cmap="viridis", s=50)
    placed: list[tuple[float, float]] = []  # (log10 x, log10 y) of the points labelled so far
    for r, x, y in zip(records, xs, ys, strict=True):
        at = (math.log10(max(x, 1e-30)), math.log10(max(y, 1e-30)))
        # Points this close (in decades) would print their labels over each other: step down a line.
        crowd = sum(abs(at[0] - px) < 0.6 and abs(at[1] - py) < 0.15 for px, py in placed)
        placed.append(at)
        ax.annotate(
            f"L{r['layer']} R{r['row']} C{r['col']}",
            (x, y),
            fontsize=7,
            xytext=(4, 3 - 9 * crowd),
            textcoords="offset points",
        )
    ax.axvline(threshold, color="gray", linestyle="--", linewidth=1)
    ax.axhline(threshold, color="gray", linestyle="--", linewidth=1)
    ax.set(
        xscale="log", yscale="log", xlabel="|input spike| (neuron col)", ylabel="|output spike| (channel row)"
    )
    fig.colorbar(points, ax=ax, label="layer")
    ax.set_title(f"{model_name} · detected super weights", fontsize=10)
    return fig


def _bars(ax: Any, labels: list[str], values: list[float], colors: list[str], baseline: float) -> None:
    bars = ax.bar(range(len(values)), values, color=colors)
    ax.set_yscale("log")
    ax.axhline(baseline, color="black", linewidth=1, linestyle=":")
    ax.set_xticks(range(len(values)), labels, rotation=45, ha="right", fontsize=7)
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=6
        )
    ax.set_ylabel("perplexity (log scale)")


def _impact_plot(impact: Impact, records: list[dict[str, Any]], model_name: str) -> Figure:
    """Baseline against each super weight zeroed alone (and each control, with ``control_each``)."""
    labels = ["baseline"] + [f"L{r['layer']} R{r['row']} C{r['col']}" for r in records]
    values = [impact.baseline] + [r["ppl"] for r in records]
    colors = ["tab:gray"] + ["tab:red"] * len(records)
    for name, label, color in (("random", "random", "tab:blue"), ("magnitude", "largest", "tab:green")):
        control = impact.controls[name]
        labels += [f"{label} {c.label()}" for c in control.weights[: len(control.each)]]
        values += control.each
        colors += [color] * len(control.each)
    fig = Figure(figsize=(max(5.0, 0.45 * len(values) + 2), 4.2), layout="constrained")
    _bars(fig.add_subplot(), labels, values, colors, impact.baseline)
    fig.suptitle(f"{model_name} · perplexity with one weight zeroed (dotted: baseline)", fontsize=10)
    return fig


def _combined_plot(impact: Impact, model_name: str) -> Figure:
    """Baseline, all super weights zeroed, each matched control set, and the restored model."""
    conditions = [
        ("baseline", impact.baseline, "tab:gray"),
        ("all super weights\nzeroed", impact.all_zeroed, "tab:red"),
        ("random coords\nzeroed", impact.controls["random"].together, "tab:blue"),
        ("largest ordinary\nweights zeroed", impact.controls["magnitude"].together, "tab:green"),
        ("restored", impact.restored, "tab:gray"),
    ]
    kept = [
        (label, value, color)
        for label, value, color in conditions
        if value is not None and math.isfinite(value)
    ]
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    labels, values, colors = (list(x) for x in zip(*kept, strict=True))
    _bars(fig.add_subplot(), labels, values, colors, impact.baseline)
    fig.suptitle(f"{model_name} · combined effect ({len(impact.single)} super weights)", fontsize=10)
    return fig


def _accuracy_plot(accuracy: dict[str, dict[str, Any]], model_name: str) -> Figure:
    """Each task's score as loaded, with every super weight zeroed, and with the random controls zeroed."""
    conditions = [("baseline", "tab:gray"), ("all_zeroed", "tab:red"), ("random_control", "tab:blue")]
    tasks = list(accuracy)
    fig = Figure(figsize=(max(5.0, 1.6 * len(tasks) + 2), 4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(conditions)
    for i, (condition, color) in enumerate(conditions):
        values = [accuracy[t].get(condition) for t in tasks]
        xs = [j + (i - 1) * width for j, v in enumerate(values) if v is not None]
        ax.bar(
            xs, [v for v in values if v is not None], width, color=color, label=condition.replace("_", " ")
        )
    ax.set_xticks(range(len(tasks)), [f"{t}\n({accuracy[t]['metric']})" for t in tasks], fontsize=8)
    ax.set(ylim=(0, 1), ylabel="score")
    ax.legend(fontsize=8)
    ax.set_title(f"{model_name} · lm-eval accuracy", fontsize=10)
    return fig

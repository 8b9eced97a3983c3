"""How ``moe_super_weights`` computes; ``__init__.py`` declares it (params, result, registration)."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from analyses._moe import (
    ExpertPeak,
    RouterCounts,
    experts_of,
    measure_expert_peaks,
    measure_router,
    moe_layers,
)
from analyses._weights import (
    Detection,
    Impact,
    Perplexities,
    SuperWeight,
    detect,
    measure_impact,
    probe_tokens,
    random_controls,
    restore_note,
)
from analyses.moe_super_weights import MoESuperWeightsParams, MoESuperWeightsResult
from runner.errors import ResourceError
from runner.hooks import require_layers
from runner.models.loaded import LoadedModel, require_hooks
from runner.step import StepContext, StepOutput

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "STATUSES",
    "CausalScores",
    "ExpertSpike",
    "RouterStats",
    "SearchText",
    "candidates",
    "detect_moe_super_weights",
    "router_stats",
    "run",
    "score_candidates",
    "unique_candidates",
]

Status = Literal["super_weight", "rare_expert", "low_co_spike", "zeroed", "below_threshold"]
STATUSES: tuple[Status, ...] = ("super_weight", "rare_expert", "low_co_spike", "zeroed", "below_threshold")
"""Verdicts on a measured expert, in the order they are checked (see :meth:`ExpertSpike.status`)."""


# --- router statistics --------------------------------------------------------------------------------------


@dataclass
class RouterStats:
    """Per layer, each expert's routing over the router-analysis passages."""

    passages: int
    experts_per_token: int
    floor: float
    counts: dict[int, RouterCounts]

    def p_active(self, layer: int, expert: int) -> float:
        """Fraction of tokens whose top-k selection includes ``expert`` in ``layer``."""
        return float(self.counts[layer].p_active()[expert])

    def is_rare(self, layer: int, expert: int) -> bool:
        """Whether the expert's ``p_active`` is below the floor."""
        return self.p_active(layer, expert) < self.floor

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer and expert (``router_stats.csv``)."""
        rows = []
        for layer, counts in self.counts.items():
            n = max(counts.n_tokens, 1)
            for expert in range(counts.n_experts):
                rows.append(
                    {
                        "layer": layer,
                        "expert": expert,
                        "n_tokens": counts.n_tokens,
                        "selected": int(counts.selected[expert]),
                        "p_active": float(counts.selected[expert]) / n,
                        "top1_fraction": float(counts.top1[expert]) / n,
                        "mean_prob": float(counts.prob_sum[expert]) / n,
                        "rare": self.is_rare(layer, expert),
                    }
                )
        return rows

    def layer_facts(self) -> list[dict[str, Any]]:
        """Per layer: the lists of ``p_active``, ``top1_fraction``, ``mean_prob``, rare experts, balance."""
        facts = []
        for layer, counts in self.counts.items():
            n = max(counts.n_tokens, 1)
            p_active = (counts.selected / n).tolist()
            share = counts.selected / max(float(counts.selected.sum()), 1.0)  # each expert's share of slots
            entropy = -float((share[share > 0] * share[share > 0].log()).sum())
            facts.append(
                {
                    "layer": layer,
                    "n_tokens": counts.n_tokens,
                    "p_active": p_active,
                    "top1_fraction": (counts.top1 / n).tolist(),
                    "mean_prob": (counts.prob_sum / n).tolist(),
                    "rare_experts": [e for e in range(counts.n_experts) if self.is_rare(layer, e)],
                    "load_balance": entropy / math.log(counts.n_experts) if counts.n_experts > 1 else 1.0,
                }
            )
        return facts


def router_stats(
    model: HookedTransformer, passages: torch.Tensor, layers: Sequence[int], *, batch_size: int, floor: float
) -> RouterStats:
    """Routing of ``layers`` over every token of ``passages`` (``(n, max_len)``)."""
    batches = [passages[i : i + batch_size] for i in range(0, len(passages), batch_size)]
    counts = measure_router(model, batches, layers)
    return RouterStats(len(passages), int(model.cfg.experts_per_token or 0), floor, counts)


# --- detection ----------------------------------------------------------------------------------------------


@dataclass
class SearchText:
    """The token batches detection runs: the probe first, then any searched passages."""

    batches: list[torch.Tensor]
    """``(B, pos)`` token tensors on the model's device."""
    names: list[list[str]]
    """Per batch, per row: ``"probe"`` or ``"passage 3"``."""
    decode: Callable[[int], str]

    def locate(self, source: int, at: tuple[int, int]) -> tuple[str, int, str]:
        """``(text name, position, token string)`` of ``(row, position)`` in batch ``source``."""
        row, position = at
        return self.names[source][row], position, self.decode(int(self.batches[source][row, position]))


@dataclass(frozen=True)
class ExpertSpike:
    """One expert's down-projection spikes in one probe pass, with what the routing checks say."""

    layer: int
    expert: int
    n_routed: int
    """Tokens routed to the expert in the searched text (probe and passages)."""
    input_value: float
    input_channel: int
    input_text: str
    input_position: int
    input_token: str
    output_value: float
    output_channel: int
    output_text: str
    output_position: int
    output_token: str
    co_spike: float
    """Share of the output spike written by ``W[row, col]`` at the output spike's token."""
    p_active: float
    """The expert's routing frequency from the router statistics."""
    status: Status

    @property
    def weight(self) -> SuperWeight:
        """The candidate weight this spike points at."""
        return SuperWeight(self.layer, self.output_channel, self.input_channel, expert=self.expert)

    @property
    def strength(self) -> float:
        """The weaker of the two spikes, ``min(|input|, |output|)``: how far it is from passing."""
        return min(abs(self.input_value), abs(self.output_value))


@dataclass(frozen=True)
class Verdicts:
    """The thresholds that turn spikes into statuses."""

    spike_threshold: float
    p_active_floor: float
    co_spike_threshold: float

    def status(self, spike_strength: float, p_active: float, co_spike: float, known: bool) -> Status:
        """The first that applies: below threshold, already zeroed, rare expert, low co-spike."""
        if spike_strength <= self.spike_threshold:
            return "below_threshold"
        if known:
            return "zeroed"
        if p_active < self.p_active_floor:
            return "rare_expert"
        if co_spike < self.co_spike_threshold:
            return "low_co_spike"
        return "super_weight"


def candidates(detection: Detection[ExpertSpike]) -> list[tuple[int, ExpertSpike]]:
    """``(pass, spike)`` of every measurement whose two spikes passed the threshold."""
    return [
        (i, s) for i, spikes in enumerate(detection.passes) for s in spikes if s.status != "below_threshold"
    ]


def unique_candidates(detection: Detection[ExpertSpike]) -> list[ExpertSpike]:
    """Each candidate weight once (its first appearance), super weights first, then by strength."""
    first: dict[SuperWeight, ExpertSpike] = {}
    for _, spike in candidates(detection):
        if spike.status != "zeroed":
            first.setdefault(spike.weight, spike)
    return sorted(first.values(), key=lambda s: (s.status != "super_weight", -s.strength))


def detect_moe_super_weights(
    model: HookedTransformer,
    text: SearchText,
    *,
    layers: Sequence[int],
    router: RouterStats,
    verdicts: Verdicts,
    max_iterations: int,
    probe_tokens: Sequence[str] = (),
) -> Detection[ExpertSpike]:
    """Iterative per-expert detection on ``text``; every weight ends as it began."""

    def measure(known: set[SuperWeight]) -> list[ExpertSpike]:
        peaks = measure_expert_peaks(model, text.batches, layers)
        return [_spike(model, key, peaks[key], text, router, verdicts, known) for key in sorted(peaks)]

    return detect(
        model,
        measure,
        lambda spike: spike.status == "super_weight",
        max_iterations=max_iterations,
        probe_tokens=probe_tokens,
    )


def _spike(
    model: HookedTransformer,
    key: tuple[int, int],
    peak: ExpertPeak,
    text: SearchText,
    router: RouterStats,
    verdicts: Verdicts,
    known: set[SuperWeight],
) -> ExpertSpike:
    """An :class:`ExpertPeak` with its places named, its co-spike and its status (weights as they are now)."""
    layer, expert = key
    weight = SuperWeight(layer, peak.output_channel, peak.input_channel, expert=expert)
    through = float(peak.input_at_output[weight.col]) * weight.value(model)
    co_spike = through / peak.output_value if peak.output_value != 0 else 0.0
    p_active = router.p_active(layer, expert)
    strength = min(abs(peak.input_value), abs(peak.output_value))
    return ExpertSpike(
        layer,
        expert,
        peak.n_routed,
        peak.input_value,
        weight.col,
        *text.locate(peak.input_source, peak.input_at),
        peak.output_value,
        weight.row,
        *text.locate(peak.output_source, peak.output_at),
        co_spike,
        p_active,
        verdicts.status(strength, p_active, co_spike, weight in known),
    )


# --- causal scoring -----------------------------------------------------------------------------------------


@dataclass
class CausalScores:
    """The scored candidates (super weights first, then by strength) and perplexity with each, its
    random control, all super weights and all their controls zeroed (see :func:`measure_impact`)."""

    scored: list[ExpertSpike]
    impact: Impact


def score_candidates(
    ctx: StepContext, params: MoESuperWeightsParams, detection: Detection[ExpertSpike]
) -> CausalScores:
    """Perplexity of the dataset under every condition; weights are restored after each one."""
    model = ctx.model.model
    where = f"moe_super_weights case {ctx.case_id}: causal scoring"
    bench = Perplexities.of_case(ctx, batch_size=params.batch_size, needed_by=where)
    scored = unique_candidates(detection)[: params.max_scored]
    weights = [s.weight for s in scored]
    controls = {"random": random_controls(model, weights, np.random.default_rng(ctx.seed))}
    accepted = [i for i, s in enumerate(scored) if s.status == "super_weight"]
    impact = measure_impact(bench, weights, controls, together=accepted, control_each=True)
    return CausalScores(scored, impact)


# --- the analysis -------------------------------------------------------------------------------------------


def run(ctx: StepContext, params: MoESuperWeightsParams) -> StepOutput:
    """Detect super weights per expert of a mixture-of-experts model, with router statistics and checks."""
    start = time.perf_counter()
    loaded = ctx.model
    layers = _resolve_layers(ctx, params)
    router = _router(ctx, params, layers)
    text, probe_strings = _search_text(ctx, params)
    detection = detect_moe_super_weights(
        loaded.model,
        text,
        layers=layers,
        router=router,
        verdicts=Verdicts(params.spike_threshold, params.p_active_floor, params.co_spike_threshold),
        max_iterations=params.max_iterations,
        probe_tokens=probe_strings,
    )
    _note_detection(ctx, params, detection, layers, lambda key: router.is_rare(*key))
    scores = score_candidates(ctx, params, detection) if params.causal_scoring else None
    if note := restore_note(scores.impact if scores else None, "moe_super_weights"):
        ctx.note(note)
    records = _weight_records(detection, scores)
    candidate_rows = _candidate_records(detection, scores)
    summary = _summary(ctx, params, layers, router, detection, scores, records)
    data = {
        "router_stats.csv": pd.DataFrame(router.rows()),
        "router_stats.json": {
            "passages": router.passages,
            "experts_per_token": router.experts_per_token,
            "p_active_floor": router.floor,
            "layers": router.layer_facts(),
        },
        "expert_spikes.csv": _spike_rows(detection),
        "candidates.jsonl": candidate_rows,
        "candidates.csv": _frame(candidate_rows, ["iteration", "layer", "expert", "row", "col", "status"]),
        "super_weights.jsonl": records,
        "super_weights.csv": _frame(records, ["layer", "expert", "row", "col", "value"]),
        "analysis.json": {
            "config": {**params.model_dump(mode="json"), "model": ctx.model.name},
            "summary": summary,
            "seconds": time.perf_counter() - start,
        },
    }
    plots = {"moe_analysis.png": _moe_plot(router, detection, params, ctx.model.name)}
    if scores is not None and scores.scored:
        data["causal_scores.csv"] = _causal_rows(scores)
        plots["causal_scores.png"] = _causal_plot(scores, ctx.model.name)
    return StepOutput(result=MoESuperWeightsResult.model_validate(summary), data=data, plots=plots)


def _resolve_layers(ctx: StepContext, params: MoESuperWeightsParams) -> list[int]:
    """The MoE layers to search; a dense model, or a dense or missing layer, is a clear error."""
    loaded = ctx.model
    moe = moe_layers(loaded.model)
    if not moe:
        mlp = type(loaded.model.blocks[0].mlp).__name__ if loaded.n_layers else "none"
        raise ResourceError(
            f"moe_super_weights case {ctx.case_id}: model {loaded.name!r} is dense: none of its "
            f"{loaded.n_layers} layers has a mixture-of-experts MLP (they use {mlp}).\n"
            "For a dense model use the `super_weights` analysis (`analysis: super_weights`); "
            "moe_super_weights needs a MoE model such as allenai/OLMoE-1B-7B-0924 or "
            "mistralai/Mixtral-8x7B-v0.1."
        )
    where = f"moe_super_weights case {ctx.case_id}"
    hint = (
        f"Its mixture-of-experts layers are {_ranges(moe)}: set `layers` among them, or leave it "
        "out to search all of them (the `super_weights` analysis searches dense layers)."
    )
    try:
        layers = sorted(require_layers(params.layers or moe, loaded.n_layers, model=loaded.name, where=where))
    except ResourceError as error:
        raise ResourceError(f"{error}\n{hint}") from None
    dense = [layer for layer in layers if layer not in moe]
    if dense:
        raise ResourceError(f"{where}: layers {dense} of model {loaded.name!r} have dense MLPs.\n{hint}")
    hooks = [
        f"blocks.{layer}.mlp.{name}"
        for layer in layers
        for name in ("hook_expert_indices", "hook_expert_weights")
    ]
    require_hooks(loaded, hooks, where=where)
    return layers


def _ranges(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` → ``'0-2,5'`` (the `layers` syntax)."""
    parts: list[str] = []
    start = prev = layers[0]
    for layer in [*layers[1:], None]:
        if layer is not None and layer == prev + 1:
            prev = layer
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        if layer is not None:
            start = prev = layer
    return ",".join(parts)


def _router(ctx: StepContext, params: MoESuperWeightsParams, layers: list[int]) -> RouterStats:
    tokens = ctx.dataset.tokens
    n = min(params.router_analysis_samples, len(tokens))
    if n < params.router_analysis_samples:
        ctx.note(
            f"router_analysis_samples={params.router_analysis_samples} but the dataset has {len(tokens)} "
            f"passages: router statistics use all {n}. Raise `dataset.max_passages` to use more."
        )
    return router_stats(
        ctx.model.model, tokens[:n], layers, batch_size=params.batch_size, floor=params.p_active_floor
    )


def _search_text(ctx: StepContext, params: MoESuperWeightsParams) -> tuple[SearchText, list[str]]:
    """The probe (one batch), then the first ``search_passages`` passages in batches."""
    loaded: LoadedModel = ctx.model
    probe = probe_tokens(loaded.model, params.probe_text, params.prepend_bos)  # (1, pos)
    device = probe.device
    batches, names = [probe], [["probe"]]
    passages = ctx.dataset.tokens[: params.search_passages] if params.search_passages else None
    if passages is not None:
        if len(passages) < params.search_passages:
            ctx.note(
                f"search_passages={params.search_passages} but the dataset has {len(passages)} passages: "
                "all of them are searched."
            )
        for i in range(0, len(passages), params.batch_size):
            batch = passages[i : i + params.batch_size]
            batches.append(batch.to(device))
            names.append([f"passage {i + j}" for j in range(len(batch))])

    def decode(token: int) -> str:
        return str(loaded.tokenizer.decode([token]))

    return SearchText(batches, names, decode), [decode(t) for t in probe[0].tolist()]


def _note_detection(
    ctx: StepContext,
    params: MoESuperWeightsParams,
    detection: Detection[ExpertSpike],
    layers: list[int],
    router_rare: Callable[[tuple[int, int]], bool],
) -> None:
    first = detection.passes[0]
    searched = {(s.layer, s.expert) for s in first}
    unrouted = [
        (layer, e)
        for layer in layers
        for e in range(len(experts_of(ctx.model.model, layer)))
        if (layer, e) not in searched
    ]
    reachable = [key for key in unrouted if not router_rare(key)]
    if reachable:
        where = "the probe" + (f" or {params.search_passages} passages" if params.search_passages else "")
        ctx.note(
            f"{len(reachable)} experts that are not rare received no token of {where} and were not "
            f"searched (e.g. layer {reachable[0][0]} expert {reachable[0][1]}). Raise `search_passages` "
            "to route more tokens to them."
        )
    rejected = Counter(s.status for s in unique_candidates(detection) if s.status != "super_weight")
    if not detection.found:
        best = max(first, key=lambda s: s.strength, default=None)
        why = (
            f"Strongest: layer {best.layer} expert {best.expert} (|input| {abs(best.input_value):.3g}, "
            f"|output| {abs(best.output_value):.3g}, co-spike {best.co_spike:.3g}, p_active "
            f"{best.p_active:.3g}: {best.status})."
            if best
            else ""
        )
        counts = ", ".join(f"{n} {status}" for status, n in sorted(rejected.items()))
        ctx.note(
            "No super weight accepted"
            + (f" (rejected candidates: {counts})" if counts else "")
            + f". {why} See `top_candidates`; lower `spike_threshold`, `p_active_floor` or "
            "`co_spike_threshold` to accept more."
        )
    elif not detection.converged:
        ctx.note(
            f"Detection stopped at max_iterations={params.max_iterations} while still accepting new weights. "
            "Raise `max_iterations`, or restrict `layers`, to let it converge."
        )


# --- records, summary, data files ---------------------------------------------------------------------------


def _spike_record(spike: ExpertSpike) -> dict[str, Any]:
    record = asdict(spike)
    return {
        **spike.weight.as_dict(),
        **{
            k: v for k, v in record.items() if k not in ("layer", "expert", "input_channel", "output_channel")
        },
    }


def _scored_index(scores: CausalScores | None) -> dict[SuperWeight, int]:
    return {} if scores is None else {s.weight: i for i, s in enumerate(scores.scored)}


def _causal_fields(
    scores: CausalScores | None, index: dict[SuperWeight, int], weight: SuperWeight
) -> dict[str, Any]:
    """What zeroing ``weight`` and its random control did, if the weight was scored."""
    if scores is None or weight not in index:
        return {}
    i, impact = index[weight], scores.impact
    control = impact.controls["random"]
    return {
        "ppl": impact.single[i],
        "ppl_ratio": impact.single[i] / impact.baseline,
        "control": control.weights[i].as_dict(),
        "control_value": control.values[i],
        "control_ppl": control.each[i],
        "control_ppl_ratio": control.each[i] / impact.baseline,
    }


def _weight_records(detection: Detection[ExpertSpike], scores: CausalScores | None) -> list[dict[str, Any]]:
    """One row per accepted super weight."""
    index = _scored_index(scores)
    return [
        {
            "index": i,
            **_spike_record(found.spike),
            "value": found.value,
            "iteration": found.iteration,
            **_causal_fields(scores, index, found.spike.weight),
        }
        for i, found in enumerate(detection.found)
    ]


def _candidate_records(
    detection: Detection[ExpertSpike], scores: CausalScores | None
) -> list[dict[str, Any]]:
    """One row per candidate of every pass (both spikes above the threshold), with its status."""
    index = _scored_index(scores)
    return [
        {"iteration": i, **_spike_record(spike), **_causal_fields(scores, index, spike.weight)}
        for i, spike in candidates(detection)
    ]


def _frame(records: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """A flat table (control coordinates spread into ``control_*`` columns), with headers even when empty."""
    flat = []
    for record in records:
        row = {k: v for k, v in record.items() if k != "control"}
        row.update({f"control_{k}": v for k, v in record.get("control", {}).items()})
        flat.append(row)
    return pd.DataFrame(flat) if flat else pd.DataFrame(columns=columns)


def _spike_rows(detection: Detection[ExpertSpike]) -> list[dict[str, Any]]:
    return [{"iteration": i, **_spike_record(s)} for i, spikes in enumerate(detection.passes) for s in spikes]


def _causal_rows(scores: CausalScores) -> list[dict[str, Any]]:
    index = _scored_index(scores)
    return [
        {
            **spike.weight.as_dict(),
            "status": spike.status,
            **{k: v for k, v in _causal_fields(scores, index, spike.weight).items() if k != "control"},
            **{f"control_{k}": v for k, v in scores.impact.controls["random"].weights[i].as_dict().items()},
            "baseline_ppl": scores.impact.baseline,
        }
        for i, spike in enumerate(scores.scored)
    ]


def _causal_summary(scores: CausalScores | None) -> dict[str, Any] | None:
    if scores is None:
        return None
    impact = scores.impact
    control = impact.controls["random"]
    return {
        "baseline": impact.baseline,
        "n_tokens": impact.n_tokens,
        "n_scored": len(scores.scored),
        "all_zeroed": impact.all_zeroed,
        "ratio_all": impact.ratio(impact.all_zeroed),
        "controls_zeroed": control.together,
        "controls_ratio": impact.ratio(control.together),
        "max_single_ratio": impact.max_ratio(impact.single),
        "max_control_ratio": impact.max_ratio(control.each),
        "restored": impact.restored,
        "restored_exact": impact.restored_exact,
        "weights_restored_exact": impact.weights_restored_exact,
    }


def _router_summary(router: RouterStats) -> dict[str, Any]:
    facts = router.layer_facts()
    everything = [p for layer in facts for p in layer["p_active"]]
    rare = [[layer["layer"], e] for layer in facts for e in layer["rare_experts"]]
    return {
        "passages": router.passages,
        "n_tokens": facts[0]["n_tokens"] if facts else 0,
        "layers": [layer["layer"] for layer in facts],
        "p_active": [layer["p_active"] for layer in facts],
        "load_balance": [layer["load_balance"] for layer in facts],
        "min_p_active": min(everything, default=None),
        "max_p_active": max(everything, default=None),
        "n_rare": len(rare),
        "rare": rare,
    }


def _summary(
    ctx: StepContext,
    params: MoESuperWeightsParams,
    layers: list[int],
    router: RouterStats,
    detection: Detection[ExpertSpike],
    scores: CausalScores | None,
    records: list[dict[str, Any]],
) -> dict[str, Any]:
    """What expectations read: ``n_found``, ``weights[0].expert``, ``router.p_active``, ``causal``…"""
    keys = (
        "layer",
        "expert",
        "row",
        "col",
        "value",
        "iteration",
        "input_value",
        "output_value",
        "co_spike",
        "p_active",
        "n_routed",
        "input_token",
        "ppl",
        "ppl_ratio",
        "control_ppl_ratio",
    )
    weights = [{k: r[k] for k in keys if k in r} for r in records]
    strongest = max(weights, key=lambda w: w.get("ppl_ratio", abs(w["output_value"])), default=None)
    unique = unique_candidates(detection)
    cfg = ctx.model.model.cfg
    return {
        "model": ctx.model.name,
        "moe_layers": layers,
        "num_experts": int(cfg.num_experts or 0),
        "experts_per_token": int(cfg.experts_per_token or 0),
        "n_found": len(records),
        "weights": weights,
        "strongest": strongest,
        "n_candidates": len(unique),
        "rejected": {
            status: sum(1 for s in unique if s.status == status) for status in ("rare_expert", "low_co_spike")
        },
        "router": _router_summary(router),
        "causal": _causal_summary(scores),
        "converged": detection.converged,
        "iterations": len(detection.passes),
        "spike_threshold": params.spike_threshold,
        "p_active_floor": params.p_active_floor,
        "co_spike_threshold": params.co_spike_threshold,
        "probe_tokens": detection.probe_tokens,
        "top_candidates": [
            {
                **s.weight.as_dict(),
                **{
                    k: getattr(s, k)
                    for k in ("input_value", "output_value", "co_spike", "p_active", "status")
                },
            }
            for s in sorted(detection.passes[0], key=lambda s: -s.strength)[: params.top_candidates]
        ],
    }


# --- plots --------------------------------------------------------------------------------------------------

STATUS_COLORS = {
    "super_weight": "tab:red",
    "rare_expert": "tab:purple",
    "low_co_spike": "tab:orange",
    "zeroed": "tab:gray",
    "below_threshold": "tab:blue",
}


def _moe_plot(
    router: RouterStats, detection: Detection[ExpertSpike], params: MoESuperWeightsParams, model_name: str
) -> Figure:
    """Expert activation per layer (router), the first pass's spikes per expert, input against output."""
    layers = list(router.counts)
    n_experts = max(c.n_experts for c in router.counts.values())
    p_active = np.full((len(layers), n_experts), np.nan)
    strength = np.full((len(layers), n_experts), np.nan)
    for i, layer in enumerate(layers):
        p_active[i, : router.counts[layer].n_experts] = router.counts[layer].p_active().numpy()
    row_of = {layer: i for i, layer in enumerate(layers)}
    for spike in detection.passes[0]:
        strength[row_of[spike.layer], spike.expert] = max(spike.strength, 1e-6)
    fig = Figure(
        figsize=(min(max(13.0, 0.25 * n_experts + 10), 22.0), max(4.2, 0.28 * len(layers) + 2)),
        layout="constrained",
    )
    ax_router, ax_spikes, ax_scatter = fig.subplots(1, 3, width_ratios=[1, 1, 0.9])
    image = ax_router.imshow(p_active, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    fig.colorbar(image, ax=ax_router, label="p_active (fraction of tokens routed)")
    rare = [
        (e, row_of[layer])
        for layer in layers
        for e in range(router.counts[layer].n_experts)
        if router.is_rare(layer, e)
    ]
    if rare:
        ax_router.scatter(
            *zip(*rare, strict=True),
            marker="x",
            color="tab:red",
            s=18,
            label=f"p_active < {params.p_active_floor:g}",
        )
        ax_router.legend(fontsize=7, loc="upper right")
    ax_router.set(
        title=f"router: {router.passages} passages",
        xlabel="expert",
        ylabel="layer",
        yticks=range(len(layers)),
        yticklabels=layers,
    )
    image = ax_spikes.imshow(np.log10(strength), aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(image, ax=ax_spikes, label="log10 min(|input|, |output|), pass 0")
    for status, marker in (("super_weight", "*"), ("low_co_spike", "o"), ("rare_expert", "x")):
        points = [(s.expert, row_of[s.layer]) for s in detection.passes[0] if s.status == status]
        if points:
            ax_spikes.scatter(
                *zip(*points, strict=True),
                marker=marker,
                s=70,
                facecolors="none" if marker == "o" else None,
                color=STATUS_COLORS[status],
                label=status.replace("_", " "),
            )
    if any(s.status != "below_threshold" for s in detection.passes[0]):
        ax_spikes.legend(fontsize=7, loc="upper right")
    ax_spikes.set(
        title="candidate spikes per expert (blank: no routed token)",
        xlabel="expert",
        yticks=range(len(layers)),
        yticklabels=layers,
    )
    for spike in (s for spikes in detection.passes[:1] for s in spikes):
        ax_scatter.scatter(
            max(abs(spike.input_value), 1e-6),
            max(abs(spike.output_value), 1e-6),
            s=18,
            color=STATUS_COLORS[spike.status],
        )
    for s in (s for s in detection.passes[0] if s.status == "super_weight"):
        ax_scatter.annotate(
            f"L{s.layer} E{s.expert}\nR{s.output_channel} C{s.input_channel}",
            (abs(s.input_value), abs(s.output_value)),
            fontsize=6,
            xytext=(4, 3),
            textcoords="offset points",
        )
    for status, color in STATUS_COLORS.items():
        ax_scatter.scatter([], [], color=color, s=18, label=status.replace("_", " "))
    ax_scatter.axvline(params.spike_threshold, color="gray", linestyle="--", linewidth=1)
    ax_scatter.axhline(params.spike_threshold, color="gray", linestyle="--", linewidth=1)
    ax_scatter.set(
        xscale="log",
        yscale="log",
        xlabel="|input spike| (neuron col)",
        ylabel="|output spike| (channel row)",
        title="every routed expert, pass 0",
    )
    ax_scatter.legend(fontsize=6)
    fig.suptitle(f"{model_name} · mixture-of-experts super weights ({len(detection.found)} found)")
    return fig


def _causal_plot(scores: CausalScores, model_name: str) -> Figure:
    """Perplexity ratio with each scored candidate zeroed, next to its random control (bars start at 1)."""
    impact = scores.impact
    labels = [s.weight.label() for s in scores.scored]
    ratios = [p / impact.baseline for p in impact.single]
    controls = [p / impact.baseline for p in impact.controls["random"].each]
    values = ratios + controls
    log = max(values) / min(values) > 10  # a log axis only when the effects span orders of magnitude
    xs = np.arange(len(labels))
    fig = Figure(figsize=(max(5.0, 0.6 * len(labels) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    colors = [STATUS_COLORS[s.status] for s in scores.scored]
    ax.bar(xs - 0.2, [r - 1 for r in ratios], 0.4, bottom=1.0, color=colors, label="candidate zeroed")
    ax.bar(
        xs + 0.2, [c - 1 for c in controls], 0.4, bottom=1.0, color="tab:gray", label="random entry zeroed"
    )
    ax.axhline(1.0, color="black", linewidth=1, linestyle=":")
    if log:
        ax.set_yscale("log")
    ax.set_xticks(xs, labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("perplexity ÷ baseline" + (" (log scale)" if log else ""))
    ax.legend(fontsize=7)
    ax.set_title(f"{model_name} · causal scores (colour: status; grey: same expert's control)", fontsize=9)
    return fig

"""What ``sae_interventions`` returns: per-feature and per-layer tables, the features used, snippets,
timing, the typed result the report and expectations read, and the plots."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analyses._sae_tensors import shift_to_logits
from analyses.sae_interventions import SaeInterventionsParams, SaeInterventionsResult
from analyses.sae_interventions.scoring import Result
from analyses.sae_interventions.workload import Workload
from runner.step import StepContext, StepOutput

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["build_output"]


def build_output(
    ctx: StepContext, params: SaeInterventionsParams, workload: Workload, result: Result, seconds: float
) -> StepOutput:
    """The case's data files, typed result and plots from what the batches accumulated."""
    tokenizer = ctx.model.tokenizer
    rows = _feature_rows(ctx.model.model, workload, result, params.top_k_tokens, tokenizer)
    layer_rows = _layer_rows(workload, rows)
    snippets = _snippet_rows(workload, result, ctx.dataset.tokens, tokenizer, params.snippet_context)
    data: dict[str, Any] = {
        "per_feature_metrics.csv": [_flat(row) for row in rows],
        "per_feature_metrics.jsonl": rows,
        "per_layer_summary.csv": layer_rows,
        "features.csv": _features_table(workload, result),
        "snippets.jsonl": snippets,
        "snippets.md": _snippets_text(workload, snippets, params.alpha),
        "timing.json": _timing(result, seconds, params),
    }
    plots = _plots(ctx.model.name, workload, rows, params.alpha)
    summary = _summary(ctx, params, workload, result, rows, seconds)
    summary["features_at_alpha"] = _headline_rows(rows, summary["alpha"])
    summary["examples"] = _examples(snippets, summary["alpha"])
    return StepOutput(result=SaeInterventionsResult.model_validate(summary), data=data, plots=plots)


def _headline_rows(rows: list[dict[str, Any]], alpha: float) -> list[dict[str, Any]]:
    """The per-feature table of the report: the headline alpha, five tokens each way."""
    keys = ("layer", "feature", "label", "delta_loss", "kl", "delta_loss_where_fires", "firing_fraction")
    return [
        {
            **{k: row[k] for k in keys},
            "tokens_affected": row["tokens_affected"],
            "promoted": [t["token"] for t in row["top_promoted"][:5]],
            "suppressed": [t["token"] for t in row["top_suppressed"][:5]],
        }
        for row in rows
        if row["alpha"] == alpha
    ]


def _examples(snippets: list[dict[str, Any]], alpha: float, n: int = 8) -> list[dict[str, Any]]:
    """The snippets of largest KL at the headline alpha, at most one per (layer, feature)."""
    seen: set[tuple[int, int]] = set()
    out: list[dict[str, Any]] = []
    for snip in sorted((s for s in snippets if s["alpha"] == alpha), key=lambda s: -s["kl"]):
        if (snip["layer"], snip["feature"]) not in seen and len(out) < n:
            seen.add((snip["layer"], snip["feature"]))
            out.append({**snip, "context": " ".join(snip["context"].split())[-160:]})
    return out


def _token_text(tokenizer: Any, token: int) -> str:
    return str(tokenizer.decode([token]))


def _top_tokens(values: torch.Tensor, k: int, tokenizer: Any, largest: bool) -> list[dict[str, Any]]:
    top = values.topk(min(k, values.numel()), largest=largest)
    return [
        {"token": _token_text(tokenizer, int(i)), "id": int(i), "logit_delta": float(v)}
        for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


def _feature_rows(
    model: HookedTransformer, workload: Workload, result: Result, k: int, tokenizer: Any
) -> list[dict[str, Any]]:
    """One row per (layer, feature, alpha), with the means the seed reports."""
    totals, counts, n = result.totals, result.counts, result.n_predicting
    logit_sums = shift_to_logits(model, totals.logit_sum, totals.in_vocab_space)  # (n_interventions, V)
    logit_sums_fire = shift_to_logits(model, totals.logit_sum_fire, totals.in_vocab_space)
    rows = []
    for iv in workload.interventions:
        loaded = workload.saes[iv.layer]
        fire_pred = int(counts.fire_predicting[iv.layer, iv.slot])
        mean_delta = logit_sums[iv.index] / n  # (V,)
        fire_delta = logit_sums_fire[iv.index] / max(fire_pred, 1)
        rows.append(
            {
                "layer": loaded.layer,
                "hook": loaded.hook_name,
                "sae_hook": loaded.sae_hook,
                "feature": iv.feature,
                "label": workload.labels[iv.layer][iv.slot],
                "mode": workload.mode,
                "alpha": iv.alpha,
                "delta_loss": float(totals.delta_loss[iv.index]) / n,
                "kl": float(totals.kl[iv.index]) / n,
                "delta_loss_where_fires": float(totals.delta_loss_fire[iv.index]) / fire_pred
                if fire_pred
                else None,
                "kl_where_fires": float(totals.kl_fire[iv.index]) / fire_pred if fire_pred else None,
                "firing_fraction": int(counts.fire_tokens[iv.layer, iv.slot])
                / max(counts.eligible_tokens, 1),
                "passages_with_feature": int(counts.fire_passages[iv.layer, iv.slot]),
                "tokens_intervened": int(totals.intervened[iv.index]),
                "tokens_affected": int(totals.changed_top1[iv.index]),
                "fraction_affected": float(totals.changed_top1[iv.index]) / n,
                "top_promoted": _top_tokens(mean_delta, k, tokenizer, largest=True),
                "top_suppressed": _top_tokens(mean_delta, k, tokenizer, largest=False),
                "top_promoted_where_fires": _top_tokens(fire_delta, k, tokenizer, largest=True)
                if fire_pred
                else [],
                "top_suppressed_where_fires": _top_tokens(fire_delta, k, tokenizer, largest=False)
                if fire_pred
                else [],
            }
        )
    return rows


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row: token lists become ``'tok' (+1.23); ...`` strings."""

    def text(tokens: list[dict[str, Any]]) -> str:
        return "; ".join(f"{t['token']!r} ({t['logit_delta']:+.4g})" for t in tokens)

    return {key: text(value) if isinstance(value, list) else value for key, value in row.items()}


def _layer_rows(workload: Workload, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (layer, alpha): means and extremes over the layer's features."""
    out = []
    for loaded in workload.saes:
        for alpha in workload.alphas:
            group = [r for r in rows if r["layer"] == loaded.layer and r["alpha"] == alpha]
            strongest = max(group, key=lambda r: abs(r["delta_loss"]))
            out.append(
                {
                    "layer": loaded.layer,
                    "hook": loaded.hook_name,
                    "alpha": alpha,
                    "n_features": len(group),
                    "mean_delta_loss": float(np.mean([r["delta_loss"] for r in group])),
                    "max_delta_loss": max(r["delta_loss"] for r in group),
                    "min_delta_loss": min(r["delta_loss"] for r in group),
                    "mean_kl": float(np.mean([r["kl"] for r in group])),
                    "max_kl": max(r["kl"] for r in group),
                    "strongest_feature": strongest["feature"],
                    "mean_firing_fraction": float(np.mean([r["firing_fraction"] for r in group])),
                    "mean_fraction_affected": float(np.mean([r["fraction_affected"] for r in group])),
                }
            )
    return out


def _features_table(workload: Workload, result: Result) -> list[dict[str, Any]]:
    """The features used, in the seed's CSV format (layer, feature, label) so a spec can reuse them."""
    counts = result.counts
    return [
        {
            "layer": loaded.layer,
            "feature": feature,
            "label": workload.labels[i][slot],
            "firing_fraction": int(counts.fire_tokens[i, slot]) / max(counts.eligible_tokens, 1),
            "passages_with_feature": int(counts.fire_passages[i, slot]),
        }
        for i, (loaded, features) in enumerate(zip(workload.saes, workload.features, strict=True))
        for slot, feature in enumerate(features)
    ]


def _snippet_rows(
    workload: Workload, result: Result, tokens: torch.Tensor, tokenizer: Any, context: int
) -> list[dict[str, Any]]:
    out = []
    for iv in workload.interventions:
        for _, _, snip in sorted(result.totals.snippets[iv.index], key=lambda item: (-item[0], -item[1])):
            passage = tokens[snip.passage]
            before = passage[max(0, snip.position + 1 - context) : snip.position + 1].tolist()
            out.append(
                {
                    "layer": workload.saes[iv.layer].layer,
                    "feature": iv.feature,
                    "alpha": iv.alpha,
                    "passage": snip.passage,
                    "position": snip.position,
                    "kl": snip.kl,
                    "delta_loss": snip.delta_loss,
                    "context": tokenizer.decode(before),
                    "next_token": _token_text(tokenizer, snip.target),
                    "clean_top": _token_text(tokenizer, snip.clean_top),
                    "clean_top_prob": snip.clean_top_prob,
                    "intervened_top": _token_text(tokenizer, snip.new_top),
                    "intervened_top_prob": snip.new_top_prob,
                }
            )
    return out


def _snippets_text(workload: Workload, snippets: list[dict[str, Any]], alpha: float) -> str:
    """Markdown: per (layer, feature), the largest changes of prediction at the headline alpha."""
    shown = alpha if workload.mode != "ablate" else 0.0
    lines = [f"# Largest changes in prediction ({workload.mode}, alpha {shown:g})", ""]
    for snip in snippets:
        if snip["alpha"] != shown:
            continue
        context = " ".join(snip["context"].split())
        lines += [
            f"## layer {snip['layer']} feature {snip['feature']} · passage {snip['passage']} position "
            f"{snip['position']} · KL {snip['kl']:.4g} · Δloss {snip['delta_loss']:+.4g}",
            "",
            f"> …{context} ⟦{snip['next_token']!r}⟧",
            "",
            f"clean top prediction {snip['clean_top']!r} (p={snip['clean_top_prob']:.3f}) → intervened "
            f"{snip['intervened_top']!r} (p={snip['intervened_top_prob']:.3f})",
            "",
        ]
    return "\n".join(lines)


def _timing(result: Result, seconds: float, params: SaeInterventionsParams) -> dict[str, Any]:
    work = result.work
    return {
        "method": params.method,
        "batch_size": result.batch_size,
        "total_seconds": round(seconds, 3),
        **{name: getattr(work, name) for name in work.__dataclass_fields__},
    }


def _summary(
    ctx: StepContext,
    params: SaeInterventionsParams,
    workload: Workload,
    result: Result,
    rows: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    """What expectations read: ``layers[6].delta_loss``, ``top_effect.delta_loss``, ``identity_max_abs``…"""
    headline = params.alpha if workload.mode != "ablate" else 0.0
    layers: dict[int, Any] = {}
    for i, loaded in enumerate(workload.saes):
        mine = [r for r in rows if r["layer"] == loaded.layer]
        at = [r for r in mine if r["alpha"] == headline]
        layers[loaded.layer] = {
            "hook": loaded.hook_name,
            "sae_hook": loaded.sae_hook,
            "sae": loaded.info,
            "features": workload.features[i],
            "delta_loss": float(np.mean([r["delta_loss"] for r in at])),
            "kl": float(np.mean([r["kl"] for r in at])),
            "delta_loss_by_alpha": [
                float(np.mean([r["delta_loss"] for r in mine if r["alpha"] == a])) for a in workload.alphas
            ],
            "kl_by_alpha": [
                float(np.mean([r["kl"] for r in mine if r["alpha"] == a])) for a in workload.alphas
            ],
        }
    identity = [r for r in rows if workload.mode == "scale" and r["alpha"] == 1.0]
    top = max((r for r in rows if r["alpha"] == headline), key=lambda r: abs(r["delta_loss"]))
    work = result.work
    return {
        "model": ctx.model.name,
        "mode": workload.mode,
        "method": params.method,
        "forward": None if params.method == "loop" else "lean" if workload.lean else "transformer_lens",
        "alpha": headline,
        "alphas": list(workload.alphas),
        "feature_source": params.chosen_source,
        "n_passages": len(ctx.dataset),
        "n_tokens": result.n_predicting,
        "clean_loss": result.clean_loss_sum / result.n_predicting,
        "layers": layers,
        "top_effect": {k: top[k] for k in ("layer", "feature", "alpha", "delta_loss", "kl", "label")},
        "identity_max_abs": max((max(abs(r["delta_loss"]), abs(r["kl"])) for r in identity), default=None),
        "rows": {"run": work.rows_run, "identity": work.rows_identity, "not_firing": work.rows_not_firing},
        "seconds": round(seconds, 3),
    }


def _plots(model: str, workload: Workload, rows: list[dict[str, Any]], alpha: float) -> dict[str, Figure]:
    headline = alpha if workload.mode != "ablate" else 0.0
    plots = {f"layer_vs_dloss_alpha{headline:g}.png": _layer_plot(model, workload, rows, headline)}
    if len(workload.alphas) > 1:
        plots["alpha_response_dloss.png"] = _alpha_plot(
            model, workload, rows, "delta_loss", "Δ loss (nats/token)"
        )
        plots["alpha_response_kl.png"] = _alpha_plot(model, workload, rows, "kl", "KL(clean ‖ intervened)")
    return plots


def _layer_plot(model: str, workload: Workload, rows: list[dict[str, Any]], alpha: float) -> Figure:
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.add_subplot()
    at = [r for r in rows if r["alpha"] == alpha]
    ax.scatter([r["layer"] for r in at], [r["delta_loss"] for r in at], s=14, alpha=0.6, label="one feature")
    layers = [loaded.layer for loaded in workload.saes]
    means = [float(np.mean([r["delta_loss"] for r in at if r["layer"] == layer])) for layer in layers]
    ax.plot(layers, means, marker="o", color="tab:red", label="mean over features")
    ax.axhline(0, color="grey", linewidth=0.8)
    if len(layers) <= 12:  # whole layers only: one layer's axis would otherwise read 11.4 ... 12.6
        ax.set_xticks(layers)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
        title=f"{model} · {workload.mode} alpha {alpha:g} · Δ loss per layer",
        xlabel="layer",
        ylabel="Δ loss vs clean (nats/token)",
    )
    ax.legend(fontsize=8)
    return fig


def _alpha_plot(model: str, workload: Workload, rows: list[dict[str, Any]], key: str, label: str) -> Figure:
    n = len(workload.saes)
    cols = min(4, n)
    fig = Figure(figsize=(3.6 * cols, 2.9 * -(-n // cols) + 0.5), layout="constrained")
    # Two lines: one panel (a single layer) is narrower than the title on one line.
    fig.suptitle(f"{model} · {workload.mode}\n{label} against alpha", fontsize=10)
    for i, loaded in enumerate(workload.saes):
        ax = fig.add_subplot(-(-n // cols), cols, i + 1)
        for feature in workload.features[i]:
            mine = [r for r in rows if r["layer"] == loaded.layer and r["feature"] == feature]
            ax.plot([r["alpha"] for r in mine], [r[key] for r in mine], marker=".", label=str(feature))
        ax.set_title(f"layer {loaded.layer} ({loaded.site})", fontsize=9)
        ax.set_xlabel("alpha", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(workload.features[i]) <= 8:
            ax.legend(title="feature", fontsize=6, title_fontsize=6)
    return fig

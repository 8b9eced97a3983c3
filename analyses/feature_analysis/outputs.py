"""``feature_analysis``'s files, cards and result from the finished accumulators."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from analyses._features import neuronpedia_record
from analyses.feature_analysis import FeatureAnalysisParams, FeatureAnalysisResult, FeatureCard, LayerFeatures
from analyses.feature_analysis.compute import Analysed, token_texts, vocabulary
from runner.step import StepContext, StepOutput

__all__ = ["build_output", "card_features", "window_tokens"]

CARD_EXAMPLES = 8
"""Top examples shown on a card (all of them are in features.jsonl)."""
CARD_SAMPLES = 2
"""Samples per interval shown on a card."""


def window_tokens(tokens: np.ndarray, buffer: tuple[int, int]) -> Any:
    """``global token → (W,)`` token ids of its window in ``tokens`` ``(P, T)`` (-1 outside the passage)."""
    length = tokens.shape[1]
    padded = np.pad(tokens, ((0, 0), (buffer[0], buffer[1])), constant_values=-1)  # (P, T + W - 1)

    def window(token: int) -> np.ndarray:
        passage, position = divmod(token, length)
        return padded[passage, position : position + buffer[0] + buffer[1] + 1]

    return window


def build_output(
    ctx: StepContext,
    params: FeatureAnalysisParams,
    work: list[Analysed],
    timing: dict[str, float],
    started: float,
) -> StepOutput:
    """Files (features.jsonl, features.csv), plots, cards and the typed result."""
    from analyses.feature_analysis.plots import build_plots

    start = time.perf_counter()
    texts = token_texts(vocabulary(ctx))
    windows = window_tokens(ctx.dataset.tokens.numpy(), params.buffer)
    records, rows, cards, layers = [], [], [], {}
    for item in work:
        assert item.table is not None and item.effects is not None
        layer = item.loaded.layer
        correlated = item.correlations(params.correlated)
        for i in range(len(item.feature_ids)):
            extra: dict[str, Any] = {
                "layer": layer,
                "hook": item.loaded.hook_name,
                "label": item.labels.get(_id(item, i), ""),
            }
            if i in correlated:  # named as sae_vis' feature tables name them
                extra["correlated_features_indices"] = [c["feature"] for c in correlated[i]]
                extra["correlated_features_pearson"] = [c["pearson"] for c in correlated[i]]
            records.append(neuronpedia_record(item.table, item.effects, i, texts, windows, extra))
            rows.append(_csv_row(item, i, texts, windows))
        for i, why in card_features(ctx, params, item):
            cards.append(_card(item, i, why, texts, windows, correlated.get(i, [])))
        layers[layer] = _layer(item, texts)
    plots = build_plots(ctx.model.name, work, cards, texts) if cards or work else {}
    timing["outputs"] = time.perf_counter() - start
    result = FeatureAnalysisResult(
        model=ctx.model.name,
        dataset=ctx.dataset.fingerprint,
        n_passages=len(ctx.dataset),
        n_tokens=work[0].table.n_tokens if work and work[0].table else 0,
        layers=layers,
        cards=cards,
        seconds=round(time.perf_counter() - started, 3),
        timing={k: round(v, 3) for k, v in timing.items()},
    )
    return StepOutput(result=result, data={"features.jsonl": records, "features.csv": rows}, plots=plots)


def _id(item: Analysed, i: int) -> int:
    return int(item.feature_ids[i])


def card_features(ctx: StepContext, params: FeatureAnalysisParams, item: Analysed) -> list[tuple[int, str]]:
    """(row in the table, why) of the features with a card: listed ones, the CSV's, then selected."""
    assert item.table is not None
    row_of = {int(f): i for i, f in enumerate(item.feature_ids.tolist())}
    listed = [] if params.features == "all" else [(row_of[f], "listed") for f in params.features]
    chosen = dict(listed + [(row_of[f], "csv") for f in item.labels if f in row_of])
    picked = list(chosen.items())[: params.cards]
    room = params.cards - len(picked)
    if room > 0:
        picked += [(i, params.card_selection) for i in _select(ctx, params, item, set(chosen), room)]
    return picked


def _select(
    ctx: StepContext, params: FeatureAnalysisParams, item: Analysed, taken: set[int], n: int
) -> list[int]:
    assert item.table is not None
    density, mean = item.table.density, item.table.sum / max(item.table.n_tokens, 1)
    alive = np.array([i for i in np.flatnonzero(item.table.count > 0) if int(i) not in taken], dtype=np.int64)
    if alive.size == 0:
        return []
    if params.card_selection == "top_frequency":
        order = alive[np.lexsort((alive, -density[alive]))]  # densest first, ties by index
        return [int(i) for i in order[:n]]
    pool = alive
    if params.card_selection == "live":
        pool = alive[mean[alive] >= np.percentile(mean[alive], params.live_percentile)]
    rng = np.random.default_rng([ctx.seed, item.loaded.layer])
    return sorted(int(i) for i in rng.choice(pool, size=min(n, pool.size), replace=False))


def _example(example: tuple[float, int, np.ndarray], before: int, texts: Any, windows: Any) -> dict[str, Any]:
    """An example as a card shows it: its window's tokens and activations, and which token it is."""
    value, token, window = example
    ids = windows(int(token))
    inside = ids >= 0
    return {
        "tokens": texts(ids[inside]),
        "values": [round(float(v), 4) for v in window[inside]],
        "index": int(np.count_nonzero(inside[:before])),
        "value": round(float(value), 4),
    }


def _card(
    item: Analysed, i: int, why: str, texts: Any, windows: Any, correlated: list[dict[str, float]]
) -> FeatureCard:
    table, effects = item.table, item.effects
    assert table is not None and effects is not None
    counts, edges = table.histogram(i)
    before = table.buffer[0]
    intervals = [
        {
            "bin_min": iv["bin_min"],
            "bin_max": iv["bin_max"],
            "bin_contains": iv["bin_contains"],
            "examples": [_example(s, before, texts, windows) for s in iv["samples"][:CARD_SAMPLES]],
        }
        for iv in table.intervals(i)
    ]
    return FeatureCard(
        layer=item.loaded.layer,
        feature=_id(item, i),
        label=item.labels.get(_id(item, i), ""),
        why=why,
        density=float(table.density[i]),
        max=float(table.max[i]),
        mean=float(table.mean_nonzero[i]),
        quantiles=table.quantiles(i),
        decoder_norm=float(effects.decoder_norm[i]),
        examples=[_example(e, before, texts, windows) for e in table.top(i)[:CARD_EXAMPLES]],
        intervals=intervals,
        histogram={"heights": [int(c) for c in counts], "edges": [float(e) for e in edges]},
        promoted=_logits(texts(effects.pos_tokens[i]), effects.pos_values[i]),
        suppressed=_logits(texts(effects.neg_tokens[i]), effects.neg_values[i]),
        correlated=[{"feature": c["feature"], "pearson": round(c["pearson"], 4)} for c in correlated],
    )


def _logits(tokens: list[str], values: np.ndarray) -> list[Any]:
    return [{"token": t, "value": round(float(v), 4)} for t, v in zip(tokens, values, strict=True)]


def _top_token_texts(item: Analysed, i: int, texts: Any, windows: Any, n: int = 5) -> list[str]:
    assert item.table is not None
    centre = item.table.buffer[0]
    return [texts(windows(int(token))[centre : centre + 1])[0] for _, token, _ in item.table.top(i)[:n]]


def _csv_row(item: Analysed, i: int, texts: Any, windows: Any) -> dict[str, Any]:
    table, effects = item.table, item.effects
    assert table is not None and effects is not None
    _, q50, q90, q99 = table.quantiles(i)
    return {
        "layer": item.loaded.layer,
        "feature": _id(item, i),
        "label": item.labels.get(_id(item, i), ""),
        "density": float(table.density[i]),
        "count": int(table.count[i]),
        "max": float(table.max[i]),
        "mean": float(table.mean_nonzero[i]),
        "std": float(table.std_nonzero[i]),
        "q50": q50,
        "q90": q90,
        "q99": q99,
        "decoder_norm": float(effects.decoder_norm[i]),
        "top_tokens": "|".join(_top_token_texts(item, i, texts, windows)),
        "promoted": "|".join(texts(effects.pos_tokens[i][:5])),
        "suppressed": "|".join(texts(effects.neg_tokens[i][:5])),
    }


def _layer(item: Analysed, texts: Any) -> LayerFeatures:
    table = item.table
    assert table is not None
    density = table.density
    densest = np.lexsort((np.arange(len(density)), -density))[:10]
    return LayerFeatures(
        hook=item.loaded.hook_name,
        sae_hook=item.loaded.sae_hook,
        sae=item.loaded.info,
        d_sae=item.loaded.d_sae,
        n_features=len(density),
        n_alive=int((table.count > 0).sum()),
        n_dead=int((table.count == 0).sum()),
        mean_l0=float(table.count.sum() / max(table.n_tokens, 1)),
        density_quantiles=[float(q) for q in np.quantile(density, [0.1, 0.5, 0.9, 0.99])],
        densest=[
            {"feature": _id(item, int(i)), "density": float(density[i]), "max": float(table.max[i])}
            for i in densest
        ],
        feature_ids=table.feature_ids,
        density=density.astype(np.float64),
        max_activation=table.max.astype(np.float32),
        mean_activation=table.mean_nonzero,
        top_values=table.top_values.astype(np.float32),
        top_tokens=table.top_tokens.astype(np.int64),
    )

"""The seed's PNGs: ``feature_N_real.png`` per card, ``summary_N_real.png``, ``statistics_real.png``."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from analyses.feature_analysis import FeatureCard
from analyses.feature_analysis.compute import Analysed

__all__ = ["build_plots", "draw_tokens", "feature_figure"]

EXAMPLE_ROWS = 6
"""Examples drawn as coloured tokens on a feature's figure."""


def build_plots(model: str, work: list[Analysed], cards: list[FeatureCard], texts: Any) -> dict[str, Figure]:
    """Every figure of the case, by file name."""
    plots = {}
    for card in cards:
        suffix = f"_L{card.layer}" if len(work) > 1 else ""
        plots[f"feature_{card.feature}{suffix}_real.png"] = feature_figure(model, card, "real")
    if cards:
        plots[f"summary_{len(cards)}_real.png"] = _summary(model, cards)
    plots["statistics_real.png"] = _statistics(model, work)
    return plots


def draw_tokens(ax: Any, examples: list[Any], scale: float, title: str) -> None:
    """Examples as rows of tokens, each on a background whose strength is its activation / ``scale``."""
    ax.set_axis_off()
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(len(examples), 1))
    cmap = _colormap()
    for row, example in enumerate(examples):
        x, y = 0.0, len(examples) - row - 0.5
        for k, (token, value) in enumerate(zip(example["tokens"], example["values"], strict=True)):
            text = token.replace("\n", "⏎").replace("$", r"\$") or " "
            strength = 0.0 if not np.isfinite(value) or scale <= 0 else min(max(value / scale, 0.0), 1.0)
            weight = "bold" if k == example.get("index", -1) else "normal"
            ax.text(
                x, y, text, fontsize=7, family="monospace", va="center", ha="left", fontweight=weight,
                bbox={"boxstyle": "square,pad=0.1", "fc": cmap(strength), "ec": "none"},
            )  # fmt: skip
            x += 0.0105 * max(len(text), 1) + 0.004
            if x > 0.98:
                break
        ax.text(1.0, y, f"{example['value']:.3g}", fontsize=7, va="center", ha="right", color="0.3")


def _colormap() -> Any:
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("activation", ["#ffffff", "#ff9a3c"])


def feature_figure(model: str, card: FeatureCard, kind: str) -> Figure:
    """The seed's per-feature figure: statistics, coloured examples, logit effects, histogram."""
    fig = Figure(figsize=(11, 6.4), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[1.1, 1], width_ratios=[0.8, 1, 1])
    label = f" ({card.label})" if card.label else ""
    fig.suptitle(f"{model} layer {card.layer} feature {card.feature}{label}: {kind} activations", fontsize=11)
    stats = fig.add_subplot(grid[0, 0])
    stats.set_axis_off()
    _, q50, q90, q99 = card.quantiles
    lines = [
        f"density        {card.density:.3%}",
        f"sparsity       {1 - card.density:.3%}",
        f"max            {card.max:.4g}",
        f"mean (fired)   {card.mean:.4g}",
        f"median, q90    {q50:.3g}, {q90:.3g}",
        f"q99            {q99:.3g}",
        f"decoder norm   {card.decoder_norm:.4g}",
        f"card: {card.why}",
    ]
    stats.text(0, 1, "\n".join(lines), family="monospace", fontsize=8.5, va="top")
    draw_tokens(fig.add_subplot(grid[0, 1:]), list(card.examples[:EXAMPLE_ROWS]), card.max, "top activations")
    _logit_bars(fig.add_subplot(grid[1, 0:2]), card)
    hist = fig.add_subplot(grid[1, 2])
    edges = np.asarray(card.histogram["edges"])
    hist.bar(edges[:-1], card.histogram["heights"], width=np.diff(edges), align="edge", color="#ff9a3c")
    hist.set_title("non-zero activations", fontsize=9)
    hist.set_xlabel("activation", fontsize=8)
    hist.tick_params(labelsize=7)
    return fig


def _logit_bars(ax: Any, card: FeatureCard) -> None:
    rows = list(card.promoted[:8]) + list(card.suppressed[:8])
    names = [repr(r["token"])[1:-1] for r in rows]
    values = [r["value"] for r in rows]
    ax.barh(range(len(rows)), values, color=["#3c8dff" if v > 0 else "#ff5c5c" for v in values])
    ax.set_yticks(range(len(rows)), names, fontsize=7, family="monospace")
    ax.invert_yaxis()
    ax.axvline(0, color="0.3", lw=0.6)
    ax.set_title("logit effects of the decoder direction (W_dec · W_U)", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)


def _summary(model: str, cards: list[FeatureCard]) -> Figure:
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    names = [f"L{c.layer}/{c.feature}" for c in cards]
    for k, (key, title) in enumerate(
        [("density", "density"), ("max", "max activation"), ("mean", "mean (fired)")]
    ):
        ax = fig.add_subplot(1, 3, k + 1)
        ax.bar(range(len(cards)), [getattr(c, key) for c in cards], color="#ff9a3c")
        ax.set_xticks(range(len(cards)), names, rotation=60, fontsize=7, ha="right")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{model}: the {len(cards)} card features", fontsize=10)
    return fig


def _statistics(model: str, work: list[Analysed]) -> Figure:
    fig = Figure(figsize=(11, 3.2), layout="constrained")
    axes = [fig.add_subplot(1, 4, k + 1) for k in range(4)]
    for item in work:
        table, effects = item.table, item.effects
        assert table is not None and effects is not None
        alive = table.count > 0
        tag = f"layer {item.loaded.layer}"
        axes[0].hist(np.log10(table.density[alive]), bins=50, alpha=0.7, label=tag)
        axes[1].hist(table.max[alive], bins=50, alpha=0.7, label=tag)
        axes[2].scatter(np.log10(table.density[alive]), table.max[alive], s=3, alpha=0.5, label=tag)
        axes[3].hist(effects.decoder_norm, bins=50, alpha=0.7, label=tag)
    titles = ["log10 density (live)", "max activation", "max vs log10 density", "decoder norm"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    if len(work) > 1:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{model}: statistics of all analysed features", fontsize=10)
    return fig

"""The seed's unified grid: one small panel per swept quantity, colour-coded, sharing the magnitude axis."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = ["COLORS", "Panel", "draw_grid", "fit_slopes"]

COLORS = {
    "neuron": "tab:blue",
    "output": "tab:red",
    "ci": "tab:green",
    "gate_output": "tab:orange",
    "gate_input": "tab:purple",
}
LEGEND = {
    "neuron": "Neuron activations",
    "output": "Output",
    "ci": "Active CI components",
    "gate_output": "Gate outputs (pre-sigmoid)",
    "gate_input": "Gate inputs (inner acts)",
}
WRITER_DPI = 110
"""The run folder's PNG writer saves at this dpi; figures are scaled so the PNG has the asked dpi's pixels."""


@dataclass(frozen=True)
class Panel:
    """One subplot: a curve over the magnitudes."""

    title: str
    values: np.ndarray
    kind: str
    """A key of :data:`COLORS`."""
    fit: bool = False
    """Draw and print the negative / positive slopes (the ablation sweep's slope analysis)."""


def fit_slopes(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    """Least-squares slopes of ``y`` over ``x <= 0`` and over ``x >= 0`` (None with fewer than 2 points)."""

    def slope(mask: np.ndarray) -> float | None:
        return float(np.polyfit(x[mask], y[mask], 1)[0]) if mask.sum() >= 2 else None

    return slope(x <= 0), slope(x >= 0)


def draw_grid(
    magnitudes: np.ndarray,
    panels: list[Panel],
    title: str,
    figsize_per_subplot: tuple[float, float],
    dpi: int,
) -> Figure:
    """A roughly square grid of ``panels`` with the seed's colours, legend and axis labels."""
    scale = dpi / WRITER_DPI
    n_cols = max(1, math.ceil(math.sqrt(len(panels))))
    n_rows = max(1, math.ceil(len(panels) / n_cols))
    width, height = figsize_per_subplot
    figure = Figure(
        figsize=(n_cols * width * scale, n_rows * height * scale + 0.9 * scale), layout="constrained"
    )
    axes = figure.subplots(n_rows, n_cols, sharex=True, squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.plot(magnitudes, panel.values, color=COLORS[panel.kind], lw=1.5 * scale, alpha=0.85)
        ax.set_title(panel.title, fontsize=8 * scale)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=6 * scale)
        low, high = float(np.min(panel.values)), float(np.max(panel.values))
        if high > low:
            pad = 0.1 * (high - low)
            ax.set_ylim(low - pad, high + pad)
        if panel.fit:
            _draw_fit(ax, magnitudes, panel.values, scale)
    spare = list(axes.flat[len(panels) :])
    for ax in spare:
        ax.set_visible(False)
    kinds = [k for k in COLORS if any(p.kind == k for p in panels)]
    handles = [Line2D([0], [0], color=COLORS[k], lw=1.5 * scale, label=LEGEND[k]) for k in kinds]
    # In the grid's last empty cell, or beside the grid when it has none: in the figure's corner (the
    # seed's place) it covered the first row's last panel.
    if spare:
        spare[-1].set_visible(True)
        spare[-1].axis("off")
        spare[-1].legend(handles=handles, loc="center", fontsize=8 * scale)
    else:
        figure.legend(handles=handles, loc="outside right upper", fontsize=8 * scale)
    figure.suptitle(title, fontsize=11 * scale, x=0.02, ha="left")
    figure.supxlabel("Input magnitude", fontsize=9 * scale)
    figure.supylabel("Activation value", fontsize=9 * scale)
    return figure


def _draw_fit(ax: Any, x: np.ndarray, y: np.ndarray, scale: float) -> None:
    negative, positive = fit_slopes(x, y)
    texts = []
    for mask, slope, color, name in (
        (x >= 0, positive, "tab:green", "+"),
        (x <= 0, negative, "tab:blue", "-"),
    ):
        if slope is None:
            continue
        intercept = float(np.polyfit(x[mask], y[mask], 1)[1])
        ax.plot(x[mask], slope * x[mask] + intercept, ls="--", color=color, lw=scale)
        texts.append(f"{name}: {slope:.3f}")
    ax.text(
        0.03,
        0.95,
        "\n".join(texts),
        transform=ax.transAxes,
        fontsize=5.5 * scale,
        va="top",
    )

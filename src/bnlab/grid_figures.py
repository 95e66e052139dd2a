"""The grid report's figures: final val acc against each grid axis (one line per series,
95% CI bars over seeds), and for a two-axis grid a heat map per series with the numbers
in the cells.

Input is a table of cells (series x grid point -> mean, CI, n) built by
``bnlab.grid_report``; output PNG + SVG through ``bnlab.figures.save_figure``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.figures import SavedFigure, new_figure, save_figure
from bnlab.grid import GridAxis, GridPoint, format_value, point_label

ACC_LABEL = "final val acc (eval mode, 10,000 test images)"

# What an axis's numbers mean, for the x label.
AXIS_UNITS = {
    "bn_momentum": "BN momentum, PyTorch convention\n(weight of the new batch value)",
    "batch_size": "batch size (images per step)",
    "lr": "Adam learning rate",
    "epochs": "epochs",
    "bn_eps": "BN eps",
    "adam_eps": "Adam eps",
    "widths": "layer widths",
    "norm": "BN placement",
}


@dataclass(frozen=True)
class CellStat:
    """Final val acc of one series at one grid point, over seeds."""

    series: str
    point: GridPoint
    n: int
    mean: float
    ci_low: float
    ci_high: float
    min: float
    max: float

    def bar(self) -> tuple[float, float]:
        """The CI drawn as a bar: clipped to the range the seeds reached (a t-interval
        of two seeds can reach far below 0 and above 1)."""
        if self.n < 2 or not math.isfinite(self.ci_low):
            return self.mean, self.mean
        return max(self.ci_low, self.min), min(self.ci_high, self.max)


def axis_label(axis: GridAxis, *, scale: bool = True) -> str:
    unit = AXIS_UNITS.get(axis.name, axis.name)
    if scale and axis.spans_decades:
        unit += ", log scale"
    return unit


def tick_label(axis: GridAxis, value: Any) -> str:
    text = format_value(value)
    if axis.name == "bn_momentum" and isinstance(value, (int, float)):
        # Readers of the question think in Chainer's decay: say both.
        return f"{text}\n(Chainer decay {1 - value:g})"
    return text


def _positions(axis: GridAxis) -> tuple[np.ndarray, bool]:
    """x positions of the axis's values, and whether the x scale is logarithmic."""
    if axis.numeric and len(axis.values) > 1:
        return np.asarray(axis.values, dtype=np.float64), axis.spans_decades
    return np.arange(len(axis.values), dtype=np.float64), False


def _offset(x: np.ndarray, log: bool, k: int, n_series: int, span: float) -> np.ndarray:
    """Nudge series ``k`` sideways so that error bars at the same value do not overlap."""
    shift = (k - (n_series - 1) / 2) * 0.035
    return x * 10**shift if log else x + shift * span


def plot_axes(
    cells: Sequence[CellStat], axes: Sequence[GridAxis], series: Sequence[str], out_dir: Path
) -> SavedFigure | None:
    """One row per grid axis: final val acc against the axis's value, one panel per value
    combination of the other axes, one line per series with 95% CI bars."""
    by_key = {(c.series, c.point): c for c in cells}
    if not by_key:
        return None
    rows = []
    # An axis of one value has nothing to be plotted against (unless every axis is so).
    varied = [a for a in axes if len(a.values) > 1] or list(axes[:1])
    for i, axis in enumerate(axes):
        if axis not in varied:
            continue
        others = [a for j, a in enumerate(axes) if j != i]
        rows.append((axis, others, list(itertools.product(*(a.values for a in others)))))
    n_cols = max(len(r[2]) for r in rows)
    fig = new_figure(max(5.0, 4.2 * n_cols), 3.9 * len(rows) + 0.5)
    grid = np.asarray(fig.subplots(len(rows), n_cols, squeeze=False))
    y_low = max(0.0, min(c.bar()[0] for c in cells) - 0.02)
    y_high = min(1.0, max(c.bar()[1] for c in cells) + 0.01)
    for r, (axis, others, combos) in enumerate(rows):
        x, log = _positions(axis)
        span = float(np.ptp(x)) or 1.0
        for col in range(n_cols):
            ax = grid[r, col]
            if col >= len(combos):
                ax.set_visible(False)
                continue
            fixed = dict(zip((a.field for a in others), combos[col], strict=True))
            for k, name in enumerate(series):
                stats = []
                for value in axis.values:
                    point = tuple((a.field, value if a.field == axis.field else fixed[a.field]) for a in axes)
                    stats.append(by_key.get((name, point)))
                mean = np.asarray([s.mean if s else np.nan for s in stats])
                low = np.asarray([s.bar()[0] if s else np.nan for s in stats])
                high = np.asarray([s.bar()[1] if s else np.nan for s in stats])
                if np.all(np.isnan(mean)):
                    continue
                xs = _offset(x, log, k, len(series), span)
                yerr = np.vstack([np.nan_to_num(mean - low), np.nan_to_num(high - mean)])
                n = max((s.n for s in stats if s), default=0)
                ax.errorbar(
                    xs,
                    mean,
                    yerr=yerr,
                    marker="o",
                    ms=5,
                    capsize=4,
                    lw=1.6,
                    color=f"C{k % 10}",
                    label=f"{name} (n={n} seeds)",
                )
            if log:
                ax.set_xscale("log")
            elif not axis.numeric or len(axis.values) == 1:
                ax.set_xlim(-0.5, len(axis.values) - 0.5)
            ax.set_xticks(x, [tick_label(axis, v) for v in axis.values], fontsize=8)
            if log:
                ax.minorticks_off()  # ticks only at the grid's values
            title = point_label(tuple(fixed.items()))
            ax.set_title(title or f"final val acc against {axis.name}", fontsize=10)
            ax.set_xlabel(axis_label(axis), fontsize=9)
            ax.set_ylabel(ACC_LABEL, fontsize=8)
            ax.set_ylim(y_low, y_high)
            ax.grid(alpha=0.3)
    handles, labels = grid[0, 0].get_legend_handles_labels()
    # One panel is too narrow for the labels side by side.
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)) if n_cols > 1 else 1, fontsize=9)
    return save_figure(
        fig,
        out_dir,
        "grid_axes",
        "Final validation accuracy against each grid axis",
        "Each point: mean final val acc over seeds; bars: Student-t 95% interval of that mean, "
        "clipped to the range the seeds reached (none for one seed). Series at the same value are "
        "nudged sideways so their bars do not overlap. "
        "Panels in a row hold the other axes fixed at the value in their title.",
    )


def _cell_text(c: CellStat | None) -> str:
    if c is None:
        return "no run"
    if c.n < 2 or not math.isfinite(c.ci_high):
        return f"{c.mean:.3f}\n(n={c.n})"
    return f"{c.mean:.3f}\n±{(c.ci_high - c.ci_low) / 2:.3f}"


def plot_heatmaps(
    cells: Sequence[CellStat], axes: Sequence[GridAxis], series: Sequence[str], out_dir: Path
) -> SavedFigure | None:
    """For a two-axis grid: one heat map per series (rows: first axis, columns: second),
    mean final val acc and the 95% CI half width written in every cell, one colour scale."""
    if len(axes) != 2 or not cells:
        return None
    rows_axis, cols_axis = axes
    by_key = {(c.series, c.point): c for c in cells}
    means = [c.mean for c in cells if math.isfinite(c.mean)]
    if not means:
        return None
    vmin, vmax = min(means), max(means)
    if vmax - vmin < 0.01:
        vmin, vmax = vmin - 0.005, vmax + 0.005
    cell_w, cell_h = 1.25, 0.8
    width = max(4.0, len(series) * (len(cols_axis.values) * cell_w + 1.6) + 1.2)
    fig = new_figure(width, len(rows_axis.values) * cell_h + 2.0)
    panels = np.atleast_1d(fig.subplots(1, len(series), squeeze=False)[0])
    image = None
    for ax, name in zip(panels, series, strict=True):
        grid = np.full((len(rows_axis.values), len(cols_axis.values)), np.nan)
        for i, rv in enumerate(rows_axis.values):
            for j, cv in enumerate(cols_axis.values):
                c = by_key.get((name, ((rows_axis.field, rv), (cols_axis.field, cv))))
                if c is not None:
                    grid[i, j] = c.mean
                ax.text(
                    j,
                    i,
                    _cell_text(c),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if c is not None and (c.mean - vmin) / (vmax - vmin) < 0.35 else "black",
                )
        image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(cols_axis.values)), [tick_label(cols_axis, v) for v in cols_axis.values], fontsize=8)
        ax.set_yticks(range(len(rows_axis.values)), [tick_label(rows_axis, v) for v in rows_axis.values], fontsize=8)
        ax.set_xlabel(axis_label(cols_axis, scale=False), fontsize=9)
        ax.set_ylabel(axis_label(rows_axis, scale=False), fontsize=9)
        ax.set_title(name, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=list(panels), label="final val acc (mean over seeds)", shrink=0.9)
    title = f"Final validation accuracy over {rows_axis.name} x {cols_axis.name}"
    return save_figure(
        fig,
        out_dir,
        "grid_heatmap",
        title,
        "Each cell: mean final val acc over seeds and, below it, the half width of its Student-t 95% "
        "interval (n=1: one seed, no interval). One colour scale for every panel.",
    )

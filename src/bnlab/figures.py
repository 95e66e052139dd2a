"""The report's figures: validation curves over seeds, train vs validation, and the
picture of a BN's running statistics against each call site's batch statistics.

Bare matplotlib Figures on the Agg canvas (no pyplot state, safe in worker processes),
saved as PNG and SVG through temp-file-then-rename.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnlab.rundir import RunData, atomic_write_bytes, group_by_preset, safe_name
from bnlab.seedstats import CONFIDENCE, t_half_width


def curve_band(curves: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-epoch mean and t-interval of ``curves`` (runs x epochs); NaN band for one run."""
    n = curves.shape[0]
    mean = curves.mean(axis=0)
    if n < 2:
        return mean, np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    half = t_half_width(curves.std(axis=0, ddof=1), n, confidence)
    return mean, mean - half, mean + half


def new_figure(width: float, height: float):
    # A bare Figure on the Agg canvas: no pyplot state, no GUI backend, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@dataclass
class SavedFigure:
    """A saved figure: its files and the PNG bytes the HTML embeds."""

    name: str
    title: str
    png: Path
    svg: Path
    png_bytes: bytes
    caption: str = ""


def save_figure(fig, out_dir: Path, name: str, title: str, caption: str = "") -> SavedFigure:
    files = {}
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        # SVG text stays text (not paths), which keeps files small and searchable.
        fig.savefig(buf, format=fmt, dpi=110, metadata={"Date": None} if fmt == "svg" else None)
        # The constrained layout is in figure coordinates, the same for both formats: laying
        # it out once instead of at every save takes about a third off a figure's cost.
        fig.set_layout_engine("none")
        files[fmt] = buf.getvalue()
        atomic_write_bytes(out_dir / f"{name}.{fmt}", files[fmt])
    return SavedFigure(name, title, out_dir / f"{name}.png", out_dir / f"{name}.svg", files["png"], caption)


def _log_y(ax) -> None:
    """Log y axis (call after plotting) labelled in plain text, 1-2-5 per decade when the data
    spans few decades and powers of ten otherwise: readable, and far cheaper to lay out
    than matplotlib's default mathtext minor labels."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter, NullLocator

    low, high = ax.dataLim.y0, ax.dataLim.y1
    decades = math.log10(high / low) if low > 0 and high > low else 0.0
    ax.set_yscale("log")
    dense = decades <= 2.5
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if dense else (1.0,)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    if dense:  # labels at 1-2-5 already mark the scale; unlabelled minor ticks only cost drawing time
        ax.yaxis.set_minor_locator(NullLocator())


def epoch_axis(ax) -> None:
    """Ticks on whole epochs only: a 3-epoch run would otherwise get 0.25, 0.5, ..."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _curves(runs: Sequence[RunData], column: str) -> np.ndarray:
    length = min(len(r.history) for r in runs)
    return np.stack([r.column(column)[:length] for r in runs])


def _band_line(ax, curves: np.ndarray, label: str, color: str, style: str = "-") -> None:
    mean, lo, hi = curve_band(curves)
    epochs = np.arange(len(mean))
    n = curves.shape[0]
    ax.plot(epochs, mean, style, color=color, lw=1.4, label=f"{label} (n={n})")
    if n > 1:
        # A t-interval can leave the possible range (a negative loss on a log axis, an
        # accuracy above 1) when seeds disagree wildly; the band is drawn clipped to the
        # range the seeds actually reached.
        lo, hi = np.maximum(lo, curves.min(axis=0)), np.minimum(hi, curves.max(axis=0))
        ax.fill_between(epochs, lo, hi, color=color, alpha=0.2, lw=0)


def _complete_groups(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    groups = {p: [r for r in g if r.complete] for p, g in group_by_preset(runs).items()}
    return {p: g for p, g in groups.items() if g}


def plot_val_curves(runs: Sequence[RunData], out_dir: Path) -> SavedFigure | None:
    groups = _complete_groups(runs)
    if not groups:
        return None
    fig = new_figure(12, 4.4)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for i, (preset, group) in enumerate(groups.items()):
        color = f"C{i % 10}"
        _band_line(ax_acc, _curves(group, "val_acc"), preset, color)
        _band_line(ax_loss, _curves(group, "val_loss"), preset, color)
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="val acc (mean over seeds, 95% CI band)")
    ax_loss.set(xlabel="epoch", ylabel="validation loss (log scale)", title="val loss (mean over seeds, 95% CI band)")
    _log_y(ax_loss)  # the shared-BN runs' loss spikes would flatten every other curve
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        epoch_axis(ax)
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(6, len(labels)), fontsize=8)
    return save_figure(
        fig,
        out_dir,
        "val_curves",
        "Validation accuracy and loss per epoch",
        "Eval-mode (running statistics) accuracy and loss on the 10,000 test images after each "
        "epoch; line: mean over seeds, band: Student-t 95% interval of that mean, clipped to the "
        "range the seeds reached.",
    )


def plot_train_vs_val(runs: Sequence[RunData], out_dir: Path) -> SavedFigure | None:
    groups = _complete_groups(runs)
    if not groups:
        return None
    fig = new_figure(11, 2.4 * len(groups) + 0.4)
    axes = np.asarray(fig.subplots(len(groups), 2, squeeze=False))
    for row, (preset, group) in enumerate(groups.items()):
        for col, metric in enumerate(("acc", "loss")):
            ax = axes[row, col]
            _band_line(ax, _curves(group, f"train_{metric}"), "train", "C0")
            _band_line(ax, _curves(group, f"val_{metric}"), "val", "C3", "--")
            ax.set_title(f"{preset}: {metric}", fontsize=10)
            ax.grid(alpha=0.3)
            epoch_axis(ax)
            if metric == "loss":
                _log_y(ax)
            ax.legend(fontsize=7)
        axes[row, 0].set_ylabel("accuracy")
        axes[row, 1].set_ylabel("loss (log)")
    axes[-1, 0].set_xlabel("epoch")
    axes[-1, 1].set_xlabel("epoch")
    return save_figure(
        fig,
        out_dir,
        "train_vs_val",
        "Train against validation, per preset",
        "Train metrics are the program's own (training-mode forward for the Chainer programs, "
        "inference mode after each step for the TensorFlow ones); val is always eval mode. A "
        "gap that opens only in eval mode points at the running statistics, not at overfitting.",
    )


# ---------------------------------------------------------------------- BN trace picture


@dataclass
class TraceSeries:
    """One BN call site's batch statistics and its module's running statistics, per step."""

    label: str
    module: str
    batch_mean: np.ndarray  # (steps, channels)
    batch_var: np.ndarray
    run_mean: np.ndarray  # the module's running stats at the end of each step
    run_var: np.ndarray
    shared: bool  # the module is called at more than one site


def _site_label(name: str, site: int, shared: bool) -> str:
    if shared:
        return f"{name} call {site + 1} (after l{site + 1})"
    m = re.fullmatch(r"bn(\d+)", name)
    return f"{name} (after l{m.group(1)})" if m else name


def trace_series(trace: dict[str, np.ndarray]) -> list[TraceSeries]:
    """Split a bn_trace.npz into call sites. Each training step calls every site once, so
    the k-th row of a site is step k; a module's state at the end of a step is the running
    stats recorded after its last site's call."""
    values, module, site = trace["values"], trace["module"], trace["site"]
    names = [str(n) for n in trace["module_names"]]
    series = []
    for m, name in enumerate(names):
        sites = sorted(set(site[module == m].tolist()))
        if not sites:
            continue
        last = values[(module == m) & (site == sites[-1])]
        for s in sites:
            rows = values[(module == m) & (site == s)]
            steps = min(len(rows), len(last))
            series.append(
                TraceSeries(
                    _site_label(name, s, len(sites) > 1),
                    name,
                    rows[:steps, 0],
                    rows[:steps, 1],
                    last[:steps, 2],
                    last[:steps, 3],
                    len(sites) > 1,
                )
            )
    return series


_TRACE_ROWS = (("batch_mean", "run_mean", "mean"), ("batch_var", "run_var", "variance"))
_TRACE_YLABELS = ("channel mean (before BN)", "channel variance (log)")


def _trace_panel(ax, series: Sequence[TraceSeries], channel: int, row: int, x: np.ndarray, stride: int) -> None:
    """One channel's batch statistics per call site (thin) and running statistics per module (thick)."""
    batch, running, what = _TRACE_ROWS[row]
    drawn_modules: set[str] = set()
    for i, s in enumerate(series):
        color = f"C{i % 10}"
        ax.plot(
            x[::stride],
            getattr(s, batch)[::stride, channel],
            color=color,
            lw=0.7,
            alpha=0.45,
            label=f"batch statistics at {s.label}",
        )
        if s.module in drawn_modules:
            continue  # a shared module has ONE running line for all its call sites
        drawn_modules.add(s.module)
        ax.plot(
            x[::stride],
            getattr(s, running)[::stride, channel],
            color="black" if s.shared else color,
            lw=1.8,
            ls="-" if s.shared else "--",
            label=f"running statistics of {s.module}",
        )
    if what == "variance":
        _log_y(ax)
    ax.set_title(f"channel {channel}: {what}", fontsize=9)
    ax.set_ylabel(_TRACE_YLABELS[row], fontsize=8)
    ax.grid(alpha=0.3)
    epoch_axis(ax)


def _trace_caption(shared: bool) -> str:
    if shared:
        return (
            "One BatchNormalization module is called after l1 and after l2. Its batch statistics (thin lines) "
            "differ between the two call sites, but it keeps ONE running mean and variance (black), updated at "
            "both calls: it settles between the two distributions and describes neither. Eval mode normalizes "
            "both layers with it."
        )
    return (
        "One BatchNormalization module per layer: each running line (dashed) follows the batch statistics "
        "of its own call site, so eval mode normalizes each layer as training did."
    )


def steps_per_epoch(series: Sequence[TraceSeries], run: RunData) -> int:
    return max(1, len(series[0].batch_mean) // max(1, len(run.history)))


def plot_bn_trace(run: RunData, series: Sequence[TraceSeries], out_dir: Path, max_points: int = 800) -> SavedFigure:
    """The BN figure of one traced run (``series``: ``trace_series`` of its trace)."""
    steps = len(series[0].batch_mean)
    per_epoch = steps_per_epoch(series, run)
    x = np.arange(steps) / per_epoch
    stride = max(1, steps // max_points)  # thin the lines: every step would make huge SVGs
    channels = series[0].batch_mean.shape[1]
    fig = new_figure(3.3 * channels, 6.4)
    axes = np.asarray(fig.subplots(2, channels, squeeze=False))
    for c in range(channels):
        for row in range(2):
            _trace_panel(axes[row, c], series, c, row, x, stride)
        axes[1, c].set_xlabel("epoch")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle(
        f"{run.preset} (seed {run.seed}): BN running statistics against the batch statistics at each call site",
        fontsize=11,
    )
    return save_figure(
        fig,
        out_dir,
        f"bn_trace_{safe_name(run.preset)}",
        f"BN statistics: {run.preset} (seed {run.seed})",
        _trace_caption(any(s.shared for s in series)),
    )

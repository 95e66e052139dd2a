"""The report of a grid sweep: statistics over seeds per (series, grid point), the grid
figures (``bnlab.grid_figures``), and summary.{md,csv,json}, runs.csv and report.html.

A series is a preset ("question", "answer") or a result derived from one (the sharing
study adds "question, repaired": the doctor's repair of each shared run). Statistics are
``bnlab.report``'s: mean, sample sd, Student-t 95% interval, min, max over seeds.
"""

from __future__ import annotations

import csv
import html
import io
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.grid import GridAxis, GridPoint, format_value, point_label
from bnlab.grid_figures import CellStat, plot_axes, plot_heatmaps
from bnlab.jsonsafe import json_safe
from bnlab.report import LAST_EPOCHS, METRICS, OTHER_METRICS, run_metrics, seed_cells
from bnlab.report_format import CSS, figure_html, markdown_table, num, table_html
from bnlab.rundir import RUN_COMPLETE, RunData, atomic_write_json, atomic_write_text
from bnlab.seedstats import CONFIDENCE, Stats, describe

if typing.TYPE_CHECKING:
    from bnlab.sweep import RunOutcome, RunSpec


@dataclass(frozen=True)
class GridResult:
    """One run's result at one grid point: ``metrics`` (names from bnlab.report.METRICS)
    when it is complete, empty otherwise. Derived series give only what they have."""

    series: str
    point: GridPoint
    seed: int
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_dir: Path | None = None
    message: str = ""


ExtraResult = GridResult


@dataclass
class GridCell:
    """A series at a grid point: its results over seeds and their statistics."""

    series: str
    point: GridPoint
    results: list[GridResult]
    stats: dict[str, Stats]

    @property
    def not_complete(self) -> list[str]:
        return [f"seed {r.seed}: {r.status}" for r in self.results if r.status != RUN_COMPLETE]

    def stat(self) -> CellStat:
        s = self.stats["final_val_acc"]
        return CellStat(self.series, self.point, s.n, s.mean, s.ci_low, s.ci_high, s.min, s.max)


def results_of(specs: Sequence[RunSpec], outcomes: Sequence[RunOutcome]) -> list[GridResult]:
    """Each planned run's result, from its outcome (whose history is what is on disk)."""
    results = []
    for spec, o in zip(specs, outcomes, strict=True):
        complete = o.status == RUN_COMPLETE and bool(o.history)
        metrics = run_metrics(RunData(o.preset, o.seed, o.run_dir, o.status, list(o.history))) if complete else {}
        results.append(GridResult(spec.preset, spec.grid, spec.seed, o.status, metrics, o.run_dir, o.message))
    return results


def cells_of(results: Sequence[GridResult]) -> list[GridCell]:
    """Results grouped by (series, point), in order of first appearance."""
    groups: dict[tuple[str, GridPoint], list[GridResult]] = {}
    for r in results:
        groups.setdefault((r.series, r.point), []).append(r)
    cells = []
    for (series, point), group in groups.items():
        stats = {m: describe([r.metrics[m] for r in group if m in r.metrics]) for m, _, _ in METRICS}
        cells.append(GridCell(series, point, group, stats))
    return cells


# -------------------------------------------------------------------------------- tables


def stats_columns(axes: Sequence[GridAxis]) -> tuple[str, ...]:
    return (
        "series",
        *(a.name for a in axes),
        "runs",
        "final val acc (mean ± sd)",
        "95% CI",
        "min – max",
        "best val acc",
        f"last-{LAST_EPOCHS} val acc",
        "final val loss",
    )


def stats_rows(cells: Sequence[GridCell], axes: Sequence[GridAxis]) -> list[list[str]]:
    """One row per (grid point, series): points in grid order, series in plan order."""
    rank = {point: i for i, point in enumerate(dict.fromkeys(c.point for c in cells))}
    # One column per axis already: the grid's table leaves out the best val loss.
    others = [m for m in OTHER_METRICS if m != "best_val_loss"]
    return [
        [
            c.series,
            *(format_value(dict(c.point)[a.field]) for a in axes),
            *seed_cells(c.stats, c.not_complete, others),
        ]
        for c in sorted(cells, key=lambda c: rank[c.point])
    ]


def summary_csv(cells: Sequence[GridCell], axes: Sequence[GridAxis]) -> str:
    fields = ["n", "mean", "std", "ci_low", "ci_high", "min", "max"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["series", *(a.field for a in axes), "runs", "not_complete"]
        + [f"{m}_{f}" for m, _, _ in METRICS for f in fields]
    )
    for c in cells:
        values = dict(c.point)
        row: list[Any] = [
            c.series,
            *(format_value(values[a.field]) for a in axes),
            len(c.results),
            "; ".join(c.not_complete),
        ]
        for m, _, _ in METRICS:
            d = c.stats[m].to_dict()
            row += ["" if d[f] is None else d[f] for f in fields]
        writer.writerow(row)
    return out.getvalue()


def runs_csv(results: Sequence[GridResult], axes: Sequence[GridAxis]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["series", *(a.field for a in axes), "seed", "status", *(m for m, _, _ in METRICS), "run_dir", "message"]
    )
    for r in results:
        values = dict(r.point)
        writer.writerow(
            [
                r.series,
                *(format_value(values[a.field]) for a in axes),
                r.seed,
                r.status,
                *(r.metrics.get(m, "") for m, _, _ in METRICS),
                r.run_dir or "",
                r.message,
            ]
        )
    return out.getvalue()


def _point_json(point: GridPoint) -> dict[str, Any]:
    return {name: list(v) if isinstance(v, tuple) else v for name, v in point}


def summary_json(cells: Sequence[GridCell], axes: Sequence[GridAxis], results: Sequence[GridResult]) -> dict[str, Any]:
    return json_safe(
        {
            "confidence": CONFIDENCE,
            "axes": [
                {"field": a.field, "values": [list(v) if isinstance(v, tuple) else v for v in a.values]} for a in axes
            ],
            "cells": [
                {
                    "series": c.series,
                    "point": _point_json(c.point),
                    "runs": len(c.results),
                    "not_complete": c.not_complete,
                    "metrics": {m: c.stats[m].to_dict() for m, _, _ in METRICS},
                    "per_seed": {
                        m: {str(r.seed): r.metrics[m] for r in c.results if m in r.metrics} for m, _, _ in METRICS
                    },
                }
                for c in cells
            ],
            "runs": [
                {
                    "series": r.series,
                    "point": _point_json(r.point),
                    "seed": r.seed,
                    "status": r.status,
                    "metrics": r.metrics,
                    "run_dir": str(r.run_dir) if r.run_dir else None,
                    "message": r.message,
                }
                for r in results
            ],
        }
    )


def summary_markdown(cells: Sequence[GridCell], axes: Sequence[GridAxis], title: str) -> str:
    grid = " x ".join(f"{a.name} ({', '.join(format_value(v) for v in a.values)})" for a in axes)
    return "\n".join(
        [
            f"# {title}",
            "",
            f"Grid: {grid}.",
            "",
            f"## Statistics per grid point (sample sd, Student-t {CONFIDENCE:.0%} CI over seeds)",
            "",
            markdown_table(stats_columns(axes), stats_rows(cells, axes)),
            "",
        ]
    )


def render_html(
    cells: Sequence[GridCell],
    axes: Sequence[GridAxis],
    results: Sequence[GridResult],
    figures: Sequence[Any],
    title: str,
) -> str:
    grid = " x ".join(f"{a.name} ({', '.join(format_value(v) for v in a.values)})" for a in axes)
    failed = [
        [r.series, point_label(r.point), str(r.seed), r.status, r.message] for r in results if r.status != RUN_COMPLETE
    ]
    run_rows = [
        [
            r.series,
            point_label(r.point),
            str(r.seed),
            r.status,
            num(r.metrics["final_val_acc"]) if "final_val_acc" in r.metrics else "-",
            str(r.run_dir or "-"),
        ]
        for r in results
    ]
    parts = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f'<p class="small">Generated {time.strftime("%Y-%m-%d %H:%M:%S %Z")} from {len(results)} result(s). '
        f"Grid: {html.escape(grid)}. Final val acc is eval mode (running statistics) on the 10,000 test "
        "images after the last epoch.</p>",
    ]
    for fig in figures:
        parts += [f"<h2>{html.escape(fig.title)}</h2>", figure_html(fig)]
    if len(axes) != 2:
        parts.append('<p class="small">The heat map is drawn for grids of exactly two axes.</p>')
    parts += [
        f'<h2>Statistics per grid point</h2><p class="small">Sample standard deviation (ddof=1); '
        f"{CONFIDENCE:.0%} interval of the mean from Student's t; - where undefined.</p>",
        table_html(stats_columns(axes), stats_rows(cells, axes)),
    ]
    if failed:
        parts += [
            "<h2>Runs that did not complete</h2>",
            table_html(("series", "grid point", "seed", "status", "message"), failed),
        ]
    parts += [
        "<h2>Runs</h2>",
        table_html(("series", "grid point", "seed", "status", "final val acc", "directory"), run_rows),
        "</body></html>",
    ]
    return "\n".join(parts)


# -------------------------------------------------------------------------------- report


@dataclass
class GridReport:
    out_dir: Path
    html: Path
    markdown: Path
    csv: Path
    json: Path
    runs_csv: Path
    axes: list[GridAxis]
    cells: list[GridCell]
    figures: list[Any]

    def stats_table(self) -> str:
        return markdown_table(stats_columns(self.axes), stats_rows(self.cells, self.axes))


def build_grid_report(
    specs: Sequence[RunSpec],
    outcomes: Sequence[RunOutcome],
    axes: Sequence[GridAxis],
    out_dir: str | Path,
    *,
    extra: Sequence[GridResult] = (),
    title: str = "bnlab grid report",
) -> GridReport:
    """Write the grid report of a sweep's runs (plus ``extra`` derived results) to ``out_dir``."""
    out = Path(out_dir)
    results = results_of(specs, outcomes) + list(extra)
    cells = cells_of(results)
    series = list(dict.fromkeys(r.series for r in results))
    stats = [c.stat() for c in cells if c.stats["final_val_acc"].n]
    figures = [f for f in (plot_axes(stats, axes, series, out), plot_heatmaps(stats, axes, series, out)) if f]
    report = GridReport(
        out,
        out / "report.html",
        out / "summary.md",
        out / "summary.csv",
        out / "summary.json",
        out / "runs.csv",
        list(axes),
        cells,
        figures,
    )
    atomic_write_text(report.markdown, summary_markdown(cells, axes, title))
    atomic_write_text(report.csv, summary_csv(cells, axes))
    atomic_write_text(report.runs_csv, runs_csv(results, axes))
    atomic_write_json(report.json, summary_json(cells, axes, results))
    atomic_write_text(report.html, render_html(cells, axes, results, figures, title))
    return report

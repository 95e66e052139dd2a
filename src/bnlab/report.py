"""Statistics, tables, plots and the HTML report of a sweep's run directories (the
statistics of one metric over seeds are ``bnlab.seedstats``'s, the text and HTML pieces
``bnlab.report_format``'s, shared with the grid report).

Input: run directories as ``bnlab.train`` writes them (history.json, config.json,
environment.json and, for traced BN models, bn_trace.npz). Output: per-preset statistics
over seeds (mean, sample std, Student-t 95% interval, min, max), the question's claims judged
against each preset's accepted band, a markdown / CSV / JSON summary, PNG and SVG figures,
and one self-contained HTML file. Every file is written temp-file-then-rename.
"""

from __future__ import annotations

import csv
import functools
import html
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnlab import bnstats
from bnlab.errors import UsageError
from bnlab.figures import (
    SavedFigure,
    TraceSeries,
    plot_bn_trace,
    plot_train_vs_val,
    plot_val_curves,
    steps_per_epoch,
    trace_series,
)
from bnlab.jsonsafe import json_safe
from bnlab.presets import PresetRuns, Verdict, judge
from bnlab.report_format import CSS, ci_text, figure_html, markdown_table, mean_sd, num, table_html
from bnlab.rundir import RunData, atomic_write_json, atomic_write_text, group_by_preset, read_run
from bnlab.seedstats import CONFIDENCE, Stats, describe

LAST_EPOCHS = 10  # "last10_val_acc" averages this many final epochs: the shared-BN runs swing

# (name, label, higher is better)
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("final_val_acc", "final val acc", True),
    ("best_val_acc", "best val acc", True),
    ("last10_val_acc", f"val acc, mean of last {LAST_EPOCHS} epochs", True),
    ("final_val_loss", "final val loss", False),
    ("best_val_loss", "best val loss", False),
)

# What a metric can be: a t-interval of a mean may leave this range when seeds disagree
# (an accuracy CI up to 1.0021 was seen), so its bounds are clipped to it.
METRIC_RANGE: dict[str, tuple[float, float]] = {
    "final_val_acc": (0.0, 1.0),
    "best_val_acc": (0.0, 1.0),
    "last10_val_acc": (0.0, 1.0),
    "final_val_loss": (0.0, math.inf),
    "best_val_loss": (0.0, math.inf),
}
CLIP_NOTE = (
    "Interval bounds are clipped to the possible range (accuracy [0, 1], loss >= 0): with few seeds "
    "that disagree, a t-interval can reach past it."
)

# --------------------------------------------------------------------------- per preset


def run_metrics(run: RunData) -> dict[str, float]:
    acc, loss = run.column("val_acc"), run.column("val_loss")
    return {
        "final_val_acc": float(acc[-1]),
        "best_val_acc": float(acc.max()),
        "last10_val_acc": float(acc[-LAST_EPOCHS:].mean()),
        "final_val_loss": float(loss[-1]),
        "best_val_loss": float(loss.min()),
    }


@dataclass
class PresetSummary:
    preset: str
    n_runs: int
    epochs: int
    per_seed: dict[str, dict[int, float]]  # metric -> seed -> value, complete runs only
    stats: dict[str, Stats]
    not_complete: list[str]  # e.g. "seed 3: diverged"

    @property
    def seeds(self) -> list[int]:
        return sorted(self.per_seed["final_val_acc"])


def summarize(runs: Sequence[RunData], confidence: float = CONFIDENCE) -> dict[str, PresetSummary]:
    """Statistics per preset over its complete runs, in the order presets first appear."""
    summaries = {}
    for preset, group in group_by_preset(runs).items():
        done = [r for r in group if r.complete]
        per_seed = {name: {r.seed: run_metrics(r)[name] for r in done} for name, _, _ in METRICS}
        summaries[preset] = PresetSummary(
            preset,
            len(group),
            max((len(r.history) for r in done), default=0),
            per_seed,
            {
                name: describe(list(values.values()), confidence, METRIC_RANGE[name])
                for name, values in per_seed.items()
            },
            [f"seed {r.seed}: {r.status}" for r in group if not r.complete],
        )
    return summaries


# -------------------------------------------------------------------------------- tables


STAT_COLUMNS = (
    "preset",
    "runs",
    "final val acc (mean ± sd)",
    "95% CI",
    "min – max",
    "best val acc",
    f"last-{LAST_EPOCHS} val acc",
    "final val loss",
    "best val loss",
)


# The metrics after the final val acc in a statistics row, as mean ± sd.
OTHER_METRICS = ("best_val_acc", "last10_val_acc", "final_val_loss", "best_val_loss")


def seed_cells(
    stats: dict[str, Stats], not_complete: Sequence[str], others: Sequence[str] = OTHER_METRICS
) -> list[str]:
    """A statistics row after its name (the sweep's and the grid's tables): runs, the final
    val acc's mean ± sd, interval and range, then ``others`` as mean ± sd."""
    f = stats["final_val_acc"]
    runs = f"{f.n}" + (f" (+{len(not_complete)} not complete)" if not_complete else "")
    return [runs, mean_sd(f), ci_text(f), f"{num(f.min)} – {num(f.max)}", *(mean_sd(stats[m]) for m in others)]


def stats_rows(summaries: dict[str, PresetSummary]) -> list[list[str]]:
    return [[s.preset, *seed_cells(s.stats, s.not_complete)] for s in summaries.values()]


# The verdict second: on a narrow screen it stays in view while the claim scrolls.
VERDICT_COLUMNS = ("preset", "verdict", "final val acc", "the question's claim", "accepted band")


def verdict_rows(verdicts: Sequence[Verdict]) -> list[list[str]]:
    rows = []
    for v in verdicts:
        measured = "-" if v.value is None else f"{v.value:.4f} (mean of {v.n})"
        band = "-" if not math.isfinite(v.accept[0]) else f"[{v.accept[0]:.3f}, {v.accept[1]:.3f}]"
        label = v.label + (" (settings differ)" if v.deviations else "") + (" (one seed)" if v.caveat else "")
        rows.append([v.preset, label, measured, f'"{v.claim}"' if v.claim else "-", band])
    return rows


def summary_markdown(summaries: dict[str, PresetSummary], verdicts: Sequence[Verdict]) -> str:
    parts = ["# bnlab summary", "", "## Verdicts", "", markdown_table(VERDICT_COLUMNS, verdict_rows(verdicts)), ""]
    for v in verdicts:
        differ = f" Settings differ from the original program: {', '.join(v.deviations)}." if v.deviations else ""
        caveat = f" Caveat: {v.caveat}." if v.caveat else ""
        parts.append(f"- **{v.preset}**: {v.label}. " + "; ".join(v.reasons) + "." + differ + caveat)
    parts += [
        "",
        f"## Statistics over seeds (sample sd, Student-t {CONFIDENCE:.0%} CI)",
        "",
        markdown_table(STAT_COLUMNS, stats_rows(summaries)),
        "",
        CLIP_NOTE,
        "",
    ]
    return "\n".join(parts)


def summary_csv(summaries: dict[str, PresetSummary]) -> str:
    fields = ["n", "mean", "std", "ci_low", "ci_high", "min", "max"]
    header = ["preset", "runs", "epochs", "not_complete"] + [f"{m}_{f}" for m, _, _ in METRICS for f in fields]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for s in summaries.values():
        row: list[Any] = [s.preset, s.n_runs, s.epochs, "; ".join(s.not_complete)]
        for m, _, _ in METRICS:
            d = s.stats[m].to_dict()
            row += ["" if d[f] is None else d[f] for f in fields]
        writer.writerow(row)
    return out.getvalue()


def summary_json(summaries: dict[str, PresetSummary], verdicts: Sequence[Verdict]) -> dict[str, Any]:
    return json_safe(
        {
            "confidence": CONFIDENCE,
            "ci_clipped_to": {m: list(METRIC_RANGE[m]) for m, _, _ in METRICS},
            "presets": {
                s.preset: {
                    "runs": s.n_runs,
                    "epochs": s.epochs,
                    "seeds": s.seeds,
                    "not_complete": s.not_complete,
                    "metrics": {m: s.stats[m].to_dict() for m, _, _ in METRICS},
                    "per_seed": {m: {str(k): v for k, v in s.per_seed[m].items()} for m, _, _ in METRICS},
                }
                for s in summaries.values()
            },
            "verdicts": [v.to_dict() for v in verdicts],
        }
    )


# ------------------------------------------------------------------------- BN mismatch


def trace_mismatch(series: Sequence[TraceSeries], last_steps: int, eps: float) -> list[dict[str, Any]]:
    """How far each call site's batch statistics are from the running statistics that eval
    mode uses, over the last ``last_steps`` steps, by bnlab.bnstats's one definition (the
    doctor's): mean shift in running SDs, variance ratio batch / running, averaged over
    those steps and the traced channels (the ratio geometrically)."""
    out = []
    for s in series:
        k = min(last_steps, len(s.batch_mean))
        bm, bv, rm, rv = (a[-k:].ravel() for a in (s.batch_mean, s.batch_var, s.run_mean, s.run_var))
        out.append({"site": s.label, "module": s.module, **bnstats.distance(bm, bv, rm, rv, eps).as_dict()})
    return out


# ---------------------------------------------------------------------------------- HTML


def _verdicts_html(verdicts: Sequence[Verdict]) -> str:
    items = []
    for v in verdicts:
        css = "ok" if v.reproduced else ("bad" if v.reproduced is False else "small")
        text = (
            f'<h3>{html.escape(v.preset)}: <span class="{css}">{html.escape(v.label)}</span></h3>'
            f"<p>The question or answer says: <q>{html.escape(v.claim)}</q>.<br>"
            "Accepted band for the final val acc: "
            f"[{v.accept[0]:.3f}, {v.accept[1]:.3f}] ({html.escape(v.note)}).</p>"
            if v.claim
            else f"<h3>{html.escape(v.preset)}: {html.escape(v.label)}</h3>"
        )
        text += "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in v.reasons) + "</ul>"
        if v.caveat:
            text += f'<p class="small">Caveat: {html.escape(v.caveat)}.</p>'
        if v.deviations:
            text += (
                '<p class="small">These runs differ from the original program in: '
                + html.escape(", ".join(v.deviations))
                + ". The claim is about the original program's settings.</p>"
            )
        items.append(text)
    return "".join(items)


def _environment_html(runs: Sequence[RunData]) -> str:
    values: dict[str, dict[str, None]] = {}  # key -> distinct values, in order of appearance
    for run in runs:
        for key, value in run.environment.items():
            if key != "data_sha256":
                values.setdefault(key, {})[value if isinstance(value, str) else json.dumps(value)] = None
    env_rows = [[k, " | ".join(vs)] for k, vs in values.items()]
    sums: dict[str, dict[str, None]] = {}
    for run in runs:
        for fname, digest in (run.environment.get("data_sha256") or {}).items():
            sums.setdefault(fname, {})[digest] = None
    sum_rows = [[f, ", ".join(d)] for f, d in sums.items()]
    return (
        table_html(("key", "value (all distinct values over the runs)"), env_rows, long=(1,))
        + "<h3>Data sha256</h3>"
        + table_html(("file", "sha256"), sum_rows, long=(0, 1))
    )


def _mismatch_html(mismatches: dict[str, list[dict[str, Any]]]) -> str:
    rows = [
        [preset, m["site"], f"{m['mean_shift']:.2f}", f"{m['var_ratio']:.2f}"]
        for preset, ms in mismatches.items()
        for m in ms
    ]
    return (
        "<p>Over the last epoch of training, how far each call site's batch statistics are from the "
        "running statistics that eval mode normalizes with (the traced channels, averaged over the "
        "epoch's steps): <b>mean shift</b> = |batch mean - running mean| in running standard deviations "
        "(0 is a match), <b>variance ratio</b> = batch variance / running variance (1 is a match; "
        "averaged geometrically). These are the definitions <code>bnlab doctor</code> reports.</p>"
        + table_html(("preset", "call site", "mean shift (running SD)", "variance ratio (batch / running)"), rows)
    )


def render_html(
    summaries: dict[str, PresetSummary],
    verdicts: Sequence[Verdict],
    runs: Sequence[RunData],
    figures: Sequence[SavedFigure],
    bn_figures: Sequence[SavedFigure],
    mismatches: dict[str, list[dict[str, Any]]],
    title: str,
) -> str:
    run_rows = [
        [
            r.preset,
            str(r.seed),
            r.status,
            str(len(r.history)),
            num(r.history[-1].val_acc) if r.history else "-",
            str(r.run_dir),
            r.message,
        ]
        for r in runs
    ]
    parts = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f'<p class="small">Generated {time.strftime("%Y-%m-%d %H:%M:%S %Z")} from {len(runs)} run(s). '
        "The question: a Chainer MLP (784-100-100-10, BN + ReLU, Adam lr 0.01, batch 1000, 100 epochs) that "
        "applied ONE BatchNormalization after both hidden layers; the answer gave each layer its own.</p>",
        f'<h2>Statistics over seeds</h2><p class="small">Sample standard deviation (ddof=1); {CONFIDENCE:.0%} '
        "interval of the mean from Student's t; - where undefined (one seed).</p>",
        table_html(STAT_COLUMNS, stats_rows(summaries)),
        f'<p class="small">{html.escape(CLIP_NOTE)}</p>',
        '<h2>The question\'s claims</h2><p class="small">Each preset is one program of the question or the answer; '
        "a claim is judged only for runs with that program's settings (other settings: not judged).</p>",
        table_html(VERDICT_COLUMNS, verdict_rows(verdicts)),
        _verdicts_html(verdicts),
    ]
    for fig in figures:
        parts += [f"<h2>{html.escape(fig.title)}</h2>", figure_html(fig)]
    if bn_figures:
        parts.append("<h2>Why one shared BatchNormalization fails</h2>")
        parts.append(_mismatch_html(mismatches))
        for fig in bn_figures:
            parts += [f"<h3>{html.escape(fig.title)}</h3>", figure_html(fig)]
    run_header = ("preset", "seed", "status", "epochs", "final val acc", "directory", "message")
    parts += [
        "<h2>Runs</h2>",
        table_html(run_header, run_rows, long=(5, 6)),
        "<h2>Environment</h2>",
        _environment_html(runs),
        "</body></html>",
    ]
    return "\n".join(parts)


# -------------------------------------------------------------------------------- report


@dataclass
class Report:
    out_dir: Path
    html: Path
    markdown: Path
    csv: Path
    json: Path
    summaries: dict[str, PresetSummary]
    verdicts: list[Verdict]
    figures: list[SavedFigure]

    def verdict_table(self) -> str:
        return markdown_table(VERDICT_COLUMNS, verdict_rows(self.verdicts))


def _traced_runs(runs: Sequence[RunData]) -> list[tuple[RunData, list[TraceSeries]]]:
    """The first complete traced run of each preset; shared-BN presets first (they are the story)."""
    chosen: dict[str, tuple[RunData, list[TraceSeries]]] = {}
    for run in runs:
        if run.complete and run.preset not in chosen:
            trace = run.bn_trace()
            if trace is not None and len(trace["values"]):
                chosen[run.preset] = run, trace_series(trace)
    return sorted(chosen.values(), key=lambda rs: not any(s.shared for s in rs[1]))


def _bn_eps(run: RunData) -> float:
    try:
        return float(run.run_config().model.bn_eps)
    except ValueError:  # InputError: an unreadable config; its eps is then the default
        from bnlab.config import ModelConfig

        return ModelConfig().bn_eps


def verdicts_of(summaries: dict[str, PresetSummary], runs: Sequence[RunData]) -> list[Verdict]:
    """The presets' verdicts (bnlab.presets.judge) for these runs."""
    groups = group_by_preset(runs)
    return judge(
        {
            name: PresetRuns(s.per_seed["final_val_acc"], [r.config for r in groups[name]], s.not_complete)
            for name, s in summaries.items()
        }
    )


def _missing_runs(run_dirs: Sequence[Path], outcomes: Sequence[Any]) -> list[RunData]:
    """Runs that failed before writing a history: from their outcomes, so that the report
    still lists them with their reason."""
    by_dir = {Path(o.run_dir): o for o in outcomes}
    missing = []
    for d in run_dirs:
        o = by_dir.get(Path(d))
        if o is not None:
            missing.append(RunData(o.preset, o.seed, Path(d), o.status, list(o.history), o.message))
    return missing


def build_report(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    title: str = "bnlab report",
    outcomes: Sequence[Any] = (),
    on_step: Callable[[str], None] | None = None,
) -> Report:
    """Read the run directories and write summary.{md,csv,json}, the figures (PNG + SVG)
    and report.html (self-contained) into ``out_dir``. A run directory without a history
    (its run failed before it started) is reported from ``outcomes`` when given.
    ``on_step`` hears each step as it starts ("figure 2 of 4: ..."): the figures take
    seconds each."""
    step = on_step or (lambda text: None)
    out = Path(out_dir)
    dirs = [Path(d) for d in run_dirs]
    step(f"reading {len(dirs)} run director{'y' if len(dirs) == 1 else 'ies'}")
    read = {d: read_run(d) for d in dirs}
    runs = [r for r in read.values() if r is not None]
    runs += _missing_runs([d for d, r in read.items() if r is None], outcomes)
    if not runs:
        raise UsageError("no run directories to report on: run `bnlab compare` or `bnlab repro` first.")
    summaries = summarize(runs)
    verdicts = verdicts_of(summaries, runs)
    traced = _traced_runs(runs)
    figures: list[SavedFigure] = []
    bn_figures: list[SavedFigure] = []
    # (what, draw, the list it joins): the report's sections, in order.
    plots: list[tuple[str, Callable[[], SavedFigure | None], list[SavedFigure]]] = [
        ("validation curves", lambda: plot_val_curves(runs, out), figures),
        ("train against validation", lambda: plot_train_vs_val(runs, out), figures),
    ]
    plots += [
        (f"BN statistics of {run.preset}", functools.partial(plot_bn_trace, run, series, out), bn_figures)
        for run, series in traced
    ]
    for i, (what, draw, section) in enumerate(plots, 1):
        step(f"figure {i} of {len(plots)}: {what}")
        fig = draw()
        if fig is not None:
            section.append(fig)
    mismatches = {
        run.preset: trace_mismatch(series, steps_per_epoch(series, run), _bn_eps(run)) for run, series in traced
    }
    step("writing report.html and summary.{md,csv,json}")
    payload = summary_json(summaries, verdicts)
    payload["bn_mismatch"] = json_safe(mismatches)
    report = Report(
        out,
        out / "report.html",
        out / "summary.md",
        out / "summary.csv",
        out / "summary.json",
        summaries,
        verdicts,
        figures + bn_figures,
    )
    atomic_write_text(report.markdown, summary_markdown(summaries, verdicts))
    atomic_write_text(report.csv, summary_csv(summaries))
    atomic_write_json(report.json, payload)
    atomic_write_text(report.html, render_html(summaries, verdicts, runs, figures, bn_figures, mismatches, title))
    return report

"""Statistics, tables, plots and the HTML report of a sweep's run directories.

Input: run directories as ``bnlab.train`` writes them (history.json, config.json,
environment.json and, for traced BN models, bn_trace.npz). Output: per-preset statistics
over seeds (mean, sample std, Student-t 95% interval, min, max), the seed's claims judged
against each preset's accepted band, a markdown / CSV / JSON summary, PNG and SVG figures,
and one self-contained HTML file. Every file is written temp-file-then-rename.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from bnlab.train import EpochRecord, RunConfig, atomic_write_bytes, atomic_write_json, atomic_write_text

CONFIDENCE = 0.95
LAST_EPOCHS = 10  # "last10_val_acc" averages this many final epochs: the shared-BN runs swing

# (name, label, higher is better)
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("final_val_acc", "final val acc", True),
    ("best_val_acc", "best val acc", True),
    ("last10_val_acc", f"val acc, mean of last {LAST_EPOCHS} epochs", True),
    ("final_val_loss", "final val loss", False),
    ("best_val_loss", "best val loss", False),
)

# The answer fixes the question's model, so the question must also lose clearly to it on
# the same seeds: (the other preset, the least gap in final val acc).
BELOW_CHECKS: dict[str, tuple[str, float]] = {"question": ("answer", 0.08)}

# Config fields whose difference from a preset does not change what its claim is about.
_IRRELEVANT_TO_CLAIMS = {"train.seed", "train.device", "train.threads", "train.trace_bn_channels", "train.engine"}


# ----------------------------------------------------------------------------- statistics

@dataclass(frozen=True)
class Stats:
    """Summary of one metric over seeds; std is the sample one (ddof=1) and the interval
    is Student-t, so both are NaN for a single value."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    min: float
    max: float

    def to_dict(self) -> dict[str, float | int | None]:
        return json_safe(dict(self.__dict__))  # an undefined number is null


def t_half_width(std: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Half the width of the Student-t confidence interval of a mean of ``n`` values."""
    if n < 2 or not math.isfinite(std):
        return math.nan
    return float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)


def describe(values: Sequence[float], confidence: float = CONFIDENCE) -> Stats:
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return Stats(0, *(math.nan,) * 6)
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    half = t_half_width(std, n, confidence)
    return Stats(n, mean, std, mean - half, mean + half, float(x.min()), float(x.max()))


def curve_band(curves: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-epoch mean and t-interval of ``curves`` (runs x epochs); NaN band for one run."""
    n = curves.shape[0]
    mean = curves.mean(axis=0)
    if n < 2:
        return mean, np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * curves.std(axis=0, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


# ------------------------------------------------------------------------------ the runs

@dataclass
class RunData:
    """What one run directory holds, as read from disk."""

    preset: str
    seed: int
    run_dir: Path
    status: str
    history: list[EpochRecord]
    message: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def column(self, name: str) -> np.ndarray:
        return np.asarray([getattr(r, name) for r in self.history], dtype=np.float64)

    @property
    def complete(self) -> bool:
        return self.status == "complete" and bool(self.history)

    def bn_trace(self) -> dict[str, np.ndarray] | None:
        path = self.run_dir / "bn_trace.npz"
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_run(run_dir: str | os.PathLike) -> RunData:
    run_dir = Path(run_dir)
    saved = _read_json(run_dir / "history.json")
    if not saved:
        raise ValueError(f"{run_dir} has no readable history.json, so it is not a bnlab run directory "
                         "(or its run never started); train it with `bnlab compare` or `bnlab train`.")
    history = [EpochRecord(**r) for r in saved.get("history", [])]
    return RunData(saved.get("preset", run_dir.parent.name), int(saved.get("seed", -1)), run_dir,
                   saved.get("status", "unknown"), history, saved.get("message", ""),
                   _read_json(run_dir / "config.json"), _read_json(run_dir / "environment.json"))


def find_run_dirs(sweep_dir: str | os.PathLike) -> list[Path]:
    """OUT/runs/PRESET/seedN directories that hold a history, in preset then seed order."""
    from bnlab.experiments import ALL_PRESETS

    found = [p.parent for p in Path(sweep_dir).glob("runs/*/seed*/history.json")]
    rank = {name: i for i, name in enumerate(ALL_PRESETS)}

    def key(p: Path) -> tuple:
        digits = p.name[4:]
        return (rank.get(p.parent.name, len(rank)), p.parent.name, int(digits) if digits.isdigit() else -1)

    return sorted(found, key=key)


def group_by_preset(runs: Sequence[RunData]) -> dict[str, list[RunData]]:
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run.preset, []).append(run)
    return groups


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
    not_complete: list[str]                # e.g. "seed 3: diverged"

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
            preset, len(group), max((len(r.history) for r in done), default=0), per_seed,
            {name: describe(list(values.values()), confidence) for name, values in per_seed.items()},
            [f"seed {r.seed}: {r.status}" for r in group if not r.complete])
    return summaries


# ------------------------------------------------------------------------------ verdicts

@dataclass
class Verdict:
    """The seed's claim about one preset against what the runs measured."""

    preset: str
    claim: str
    accept: tuple[float, float]
    note: str
    value: float | None          # mean final val acc over complete seeds
    n: int
    seeds_in_band: int
    reproduced: bool | None      # None: no complete run, or no claim for this preset
    reasons: list[str]
    deviations: list[str]        # settings in which the runs differ from the seed's program

    @property
    def label(self) -> str:
        if self.reproduced is None:
            return "not judged"
        return "reproduced" if self.reproduced else "NOT reproduced"

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["accept"] = list(self.accept)
        d["verdict"] = self.label
        return d


def _deviations(preset_name: str, runs: Sequence[RunData]) -> list[str]:
    from bnlab.experiments import PRESETS, config_differences

    preset = PRESETS[preset_name]
    found: dict[str, None] = {}
    for run in runs:
        try:
            cfg = RunConfig.from_dict(run.config)
        except (KeyError, TypeError, ValueError):
            continue
        for name in config_differences(cfg, preset.config):
            if name not in _IRRELEVANT_TO_CLAIMS:
                value = _lookup(run.config, name)
                found[f"{name}={value} (seed's program: {_lookup(preset.config.to_dict(), name)})"] = None
    return list(found)


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return list(d) if isinstance(d, tuple) else d


def judge(summaries: dict[str, PresetSummary], runs: Sequence[RunData]) -> list[Verdict]:
    """One verdict per preset: its mean final val acc inside the preset's accepted band
    (and, per BELOW_CHECKS, far enough below another preset on the same seeds)."""
    from bnlab.experiments import PRESETS

    by_preset = group_by_preset(runs)
    verdicts = []
    for name, summary in summaries.items():
        preset = PRESETS.get(name)
        if preset is None:
            verdicts.append(Verdict(name, "", (math.nan, math.nan), "", None, 0, 0, None,
                                    ["not a bnlab preset: the seed makes no claim about it"], []))
            continue
        final = summary.per_seed["final_val_acc"]
        low, high = preset.accept
        stats = summary.stats["final_val_acc"]
        reasons: list[str] = []
        if not final:
            verdicts.append(Verdict(name, preset.seed_claim, preset.accept, preset.accept_note, None, 0, 0, None,
                                    ["no complete run"], _deviations(name, by_preset[name])))
            continue
        in_band = sum(low <= v <= high for v in final.values())
        ok = low <= stats.mean <= high
        reasons.append(f"mean final val acc {stats.mean:.4f} over {stats.n} seed(s) is "
                       f"{'inside' if ok else 'outside'} the accepted band [{low:.3f}, {high:.3f}]; "
                       f"{in_band} of {stats.n} seed(s) inside")
        if summary.not_complete:
            reasons.append("left out, not complete: " + ", ".join(summary.not_complete))
        if name in BELOW_CHECKS and BELOW_CHECKS[name][0] in summaries:
            other, least = BELOW_CHECKS[name]
            theirs = summaries[other].per_seed["final_val_acc"]
            common = sorted(set(final) & set(theirs))
            if common:
                gap = float(np.mean([theirs[s] - final[s] for s in common]))
                ok = ok and gap >= least
                reasons.append(f"{gap:.4f} below {other} on the same seed(s) {common} "
                               f"({'at least' if gap >= least else 'less than'} the required {least:.2f})")
        verdicts.append(Verdict(name, preset.seed_claim, preset.accept, preset.accept_note, stats.mean, stats.n,
                                in_band, ok, reasons, _deviations(name, by_preset[name])))
    return verdicts


# -------------------------------------------------------------------------------- tables

def _num(x: float, digits: int = 4) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _mean_sd(s: Stats) -> str:
    return _num(s.mean) if s.n < 2 else f"{_num(s.mean)} ± {_num(s.std)}"


def _ci(s: Stats) -> str:
    return "-" if s.n < 2 else f"[{_num(s.ci_low)}, {_num(s.ci_high)}]"


STAT_COLUMNS = ("preset", "runs", "final val acc (mean ± sd)", "95% CI", "min – max", "best val acc",
                f"last-{LAST_EPOCHS} val acc", "final val loss", "best val loss")


def stats_rows(summaries: dict[str, PresetSummary]) -> list[list[str]]:
    rows = []
    for s in summaries.values():
        f = s.stats["final_val_acc"]
        runs = f"{f.n}" + (f" (+{len(s.not_complete)} not complete)" if s.not_complete else "")
        rows.append([s.preset, runs, _mean_sd(f), _ci(f), f"{_num(f.min)} – {_num(f.max)}",
                     _mean_sd(s.stats["best_val_acc"]), _mean_sd(s.stats["last10_val_acc"]),
                     _mean_sd(s.stats["final_val_loss"]), _mean_sd(s.stats["best_val_loss"])])
    return rows


VERDICT_COLUMNS = ("preset", "final val acc", "seed's claim", "accepted band", "verdict")


def verdict_rows(verdicts: Sequence[Verdict]) -> list[list[str]]:
    rows = []
    for v in verdicts:
        measured = "-" if v.value is None else f"{v.value:.4f} (mean of {v.n})"
        band = "-" if not math.isfinite(v.accept[0]) else f"[{v.accept[0]:.3f}, {v.accept[1]:.3f}]"
        label = v.label + (" (settings differ)" if v.deviations else "")
        rows.append([v.preset, measured, f'"{v.claim}"' if v.claim else "-", band, label])
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def summary_markdown(summaries: dict[str, PresetSummary], verdicts: Sequence[Verdict]) -> str:
    parts = ["# bnlab summary", "", "## Verdicts", "", markdown_table(VERDICT_COLUMNS, verdict_rows(verdicts)), ""]
    for v in verdicts:
        differ = f" Settings differ from the seed's program: {', '.join(v.deviations)}." if v.deviations else ""
        parts.append(f"- **{v.preset}**: {v.label}. " + "; ".join(v.reasons) + "." + differ)
    parts += ["", f"## Statistics over seeds (sample sd, Student-t {CONFIDENCE:.0%} CI)", "",
              markdown_table(STAT_COLUMNS, stats_rows(summaries)), ""]
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


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def summary_json(summaries: dict[str, PresetSummary], verdicts: Sequence[Verdict]) -> dict[str, Any]:
    return json_safe({
        "confidence": CONFIDENCE,
        "presets": {s.preset: {
            "runs": s.n_runs, "epochs": s.epochs, "seeds": s.seeds, "not_complete": s.not_complete,
            "metrics": {m: s.stats[m].to_dict() for m, _, _ in METRICS},
            "per_seed": {m: {str(k): v for k, v in s.per_seed[m].items()} for m, _, _ in METRICS},
        } for s in summaries.values()},
        "verdicts": [v.to_dict() for v in verdicts],
    })


# --------------------------------------------------------------------------------- plots

def _figure(width: float, height: float):
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
        files[fmt] = buf.getvalue()
        atomic_write_bytes(out_dir / f"{name}.{fmt}", files[fmt])
    return SavedFigure(name, title, out_dir / f"{name}.png", out_dir / f"{name}.svg", files["png"], caption)


def _log_y(ax) -> None:
    """Log y axis (call after plotting) labelled in plain text, 1-2-5 per decade when the data
    spans few decades and powers of ten otherwise: readable, and far cheaper to lay out
    than matplotlib's default mathtext minor labels."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    low, high = ax.dataLim.y0, ax.dataLim.y1
    decades = math.log10(high / low) if low > 0 and high > low else 0.0
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())


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
    fig = _figure(12, 4.4)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for i, (preset, group) in enumerate(groups.items()):
        color = f"C{i % 10}"
        _band_line(ax_acc, _curves(group, "val_acc"), preset, color)
        _band_line(ax_loss, _curves(group, "val_loss"), preset, color)
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="val acc (mean over seeds, 95% CI band)")
    ax_loss.set(xlabel="epoch", ylabel="validation loss (log scale)", title="val loss (mean over seeds, 95% CI band)")
    _log_y(ax_loss)  # the shared-BN runs' loss spikes would flatten every other curve
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(6, len(labels)), fontsize=8)
    return save_figure(fig, out_dir, "val_curves", "Validation accuracy and loss per epoch",
                       "Eval-mode (running statistics) accuracy and loss on the 10,000 test images after each "
                       "epoch; line: mean over seeds, band: Student-t 95% interval of that mean, clipped to the "
                       "range the seeds reached.")


def plot_train_vs_val(runs: Sequence[RunData], out_dir: Path) -> SavedFigure | None:
    groups = _complete_groups(runs)
    if not groups:
        return None
    fig = _figure(11, 2.4 * len(groups) + 0.4)
    axes = np.asarray(fig.subplots(len(groups), 2, squeeze=False))
    for row, (preset, group) in enumerate(groups.items()):
        for col, metric in enumerate(("acc", "loss")):
            ax = axes[row, col]
            _band_line(ax, _curves(group, f"train_{metric}"), "train", "C0")
            _band_line(ax, _curves(group, f"val_{metric}"), "val", "C3", "--")
            ax.set_title(f"{preset}: {metric}", fontsize=10)
            ax.grid(alpha=0.3)
            if metric == "loss":
                _log_y(ax)
            ax.legend(fontsize=7)
        axes[row, 0].set_ylabel("accuracy")
        axes[row, 1].set_ylabel("loss (log)")
    axes[-1, 0].set_xlabel("epoch")
    axes[-1, 1].set_xlabel("epoch")
    return save_figure(fig, out_dir, "train_vs_val", "Train against validation, per preset",
                       "Train metrics are the program's own (training-mode forward for the Chainer programs, "
                       "inference mode after each step for the TensorFlow ones); val is always eval mode. A "
                       "gap that opens only in eval mode points at the running statistics, not at overfitting.")


# ---------------------------------------------------------------------- BN trace picture

@dataclass
class TraceSeries:
    """One BN call site's batch statistics and its module's running statistics, per step."""

    label: str
    module: str
    batch_mean: np.ndarray  # (steps, channels)
    batch_var: np.ndarray
    run_mean: np.ndarray    # the module's running stats at the end of each step
    run_var: np.ndarray
    shared: bool            # the module is called at more than one site


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
            series.append(TraceSeries(_site_label(name, s, len(sites) > 1), name, rows[:steps, 0], rows[:steps, 1],
                                      last[:steps, 2], last[:steps, 3], len(sites) > 1))
    return series


def trace_mismatch(series: Sequence[TraceSeries], last_steps: int) -> list[dict[str, Any]]:
    """How far the running statistics used at eval time are from each site's batch
    statistics over the last ``last_steps`` steps: mean |running mean - batch mean| in
    units of the batch std, and the geometric mean of running var / batch var."""
    out = []
    for s in series:
        k = min(last_steps, len(s.batch_mean))
        bm, bv, rm, rv = (a[-k:].astype(np.float64) for a in (s.batch_mean, s.batch_var, s.run_mean, s.run_var))
        shift = float(np.mean(np.abs(rm - bm) / np.sqrt(bv + 1e-12)))
        ratio = float(np.exp(np.mean(np.log((rv + 1e-12) / (bv + 1e-12)))))
        out.append({"site": s.label, "module": s.module, "mean_shift_in_std": shift, "var_ratio": ratio})
    return out


_TRACE_ROWS = (("batch_mean", "run_mean", "mean"), ("batch_var", "run_var", "variance"))


def _trace_panel(ax, series: Sequence[TraceSeries], channel: int, row: int, x: np.ndarray, stride: int) -> None:
    """One channel's batch statistics per call site (thin) and running statistics per module (thick)."""
    batch, running, what = _TRACE_ROWS[row]
    drawn_modules: set[str] = set()
    for i, s in enumerate(series):
        color = f"C{i % 10}"
        ax.plot(x[::stride], getattr(s, batch)[::stride, channel], color=color, lw=0.7, alpha=0.45,
                label=f"batch statistics at {s.label}")
        if s.module in drawn_modules:
            continue  # a shared module has ONE running line for all its call sites
        drawn_modules.add(s.module)
        ax.plot(x[::stride], getattr(s, running)[::stride, channel], color="black" if s.shared else color,
                lw=1.8, ls="-" if s.shared else "--", label=f"running statistics of {s.module}")
    if what == "variance":
        _log_y(ax)
    ax.set_title(f"channel {channel}: {what}", fontsize=9)
    ax.grid(alpha=0.3)


def _trace_caption(shared: bool) -> str:
    if shared:
        return ("One BatchNormalization module is called after l1 and after l2. Its batch statistics (thin lines) "
                "differ between the two call sites, but it keeps ONE running mean and variance (black), updated at "
                "both calls: it settles between the two distributions and describes neither. Eval mode normalizes "
                "both layers with it.")
    return ("One BatchNormalization module per layer: each running line (dashed) follows the batch statistics "
            "of its own call site, so eval mode normalizes each layer as training did.")


def plot_bn_trace(run: RunData, out_dir: Path,
                  max_points: int = 800) -> tuple[SavedFigure, list[dict[str, Any]]] | None:
    """The BN figure of one traced run, and its trace_mismatch over the last epoch."""
    trace = run.bn_trace()
    if trace is None or len(trace["values"]) == 0:
        return None
    series = trace_series(trace)
    steps = len(series[0].batch_mean)
    per_epoch = max(1, steps // max(1, len(run.history)))
    x = np.arange(steps) / per_epoch
    stride = max(1, steps // max_points)  # thin the lines: every step would make huge SVGs
    channels = series[0].batch_mean.shape[1]
    fig = _figure(3.3 * channels, 6.4)
    axes = np.asarray(fig.subplots(2, channels, squeeze=False))
    for c in range(channels):
        for row in range(2):
            _trace_panel(axes[row, c], series, c, row, x, stride)
        axes[1, c].set_xlabel("epoch")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle(f"{run.preset} (seed {run.seed}): BN running statistics against the batch statistics at each "
                 "call site", fontsize=11)
    saved = save_figure(fig, out_dir, f"bn_trace_{run.preset}", f"BN statistics: {run.preset} (seed {run.seed})",
                        _trace_caption(any(s.shared for s in series)))
    return saved, trace_mismatch(series, last_steps=per_epoch)


# ---------------------------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}.ok{color:#08660b;font-weight:600}
.bad{color:#a10d0d;font-weight:600}.small{color:#555;font-size:13px}code{background:#f5f5f5;padding:0 3px}"""


def _table_html(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure_html(fig: SavedFigure) -> str:
    data = base64.b64encode(fig.png_bytes).decode("ascii")
    return (f"<figure><img alt=\"{html.escape(fig.title)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption class=\"small\">{html.escape(fig.caption)} Files: <code>{html.escape(fig.png.name)}</code>, "
            f"<code>{html.escape(fig.svg.name)}</code>.</figcaption></figure>")


def _verdicts_html(verdicts: Sequence[Verdict]) -> str:
    items = []
    for v in verdicts:
        css = "ok" if v.reproduced else ("bad" if v.reproduced is False else "small")
        text = (f"<h3>{html.escape(v.preset)}: <span class=\"{css}\">{html.escape(v.label)}</span></h3>"
                f"<p>The seed says: <q>{html.escape(v.claim)}</q>.<br>Accepted band for the final val acc: "
                f"[{v.accept[0]:.3f}, {v.accept[1]:.3f}] ({html.escape(v.note)}).</p>" if v.claim else
                f"<h3>{html.escape(v.preset)}: {html.escape(v.label)}</h3>")
        text += "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in v.reasons) + "</ul>"
        if v.deviations:
            text += ("<p class=\"small\">These runs differ from the seed's program in: "
                     + html.escape(", ".join(v.deviations)) + ". The claim is about the seed's settings.</p>")
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
    return (_table_html(("key", "value (all distinct values over the runs)"), env_rows)
            + "<h3>Data sha256</h3>" + _table_html(("file", "sha256"), sum_rows))


def _mismatch_html(mismatches: dict[str, list[dict[str, Any]]]) -> str:
    rows = [[preset, m["site"], f"{m['mean_shift_in_std']:.2f}", f"{m['var_ratio']:.2f}"]
            for preset, ms in mismatches.items() for m in ms]
    return ("<p>Over the last epoch of training, how far the running statistics that eval mode uses are from "
            "each call site's batch statistics (first traced channels): |running mean - batch mean| in units "
            "of the batch std, and running var / batch var (1 means a match).</p>"
            + _table_html(("preset", "call site", "mean shift (batch std)", "var ratio"), rows))


def render_html(summaries: dict[str, PresetSummary], verdicts: Sequence[Verdict], runs: Sequence[RunData],
                figures: Sequence[SavedFigure], bn_figures: Sequence[SavedFigure],
                mismatches: dict[str, list[dict[str, Any]]], title: str) -> str:
    run_rows = [[r.preset, str(r.seed), r.status, str(len(r.history)),
                 _num(r.history[-1].val_acc) if r.history else "-", str(r.run_dir), r.message] for r in runs]
    parts = [
        f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p class=\"small\">Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {len(runs)} run(s). "
        "The seed: a Chainer MLP (784-100-100-10, BN + ReLU, Adam lr 0.01, batch 1000, 100 epochs) that applied ONE "
        "BatchNormalization after both hidden layers; the answer gave each layer its own.</p>",
        "<h2>The seed's claims</h2>", _table_html(VERDICT_COLUMNS, verdict_rows(verdicts)), _verdicts_html(verdicts),
        f"<h2>Statistics over seeds</h2><p class=\"small\">Sample standard deviation (ddof=1); {CONFIDENCE:.0%} "
        "interval of the mean from Student's t; - where undefined (one seed).</p>",
        _table_html(STAT_COLUMNS, stats_rows(summaries)),
    ]
    for fig in figures:
        parts += [f"<h2>{html.escape(fig.title)}</h2>", _figure_html(fig)]
    if bn_figures:
        parts.append("<h2>Why one shared BatchNormalization fails</h2>")
        parts.append(_mismatch_html(mismatches))
        for fig in bn_figures:
            parts += [f"<h3>{html.escape(fig.title)}</h3>", _figure_html(fig)]
    run_header = ("preset", "seed", "status", "epochs", "final val acc", "directory", "message")
    parts += ["<h2>Runs</h2>", _table_html(run_header, run_rows),
              "<h2>Environment</h2>", _environment_html(runs), "</body></html>"]
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


def _bn_figures(runs: Sequence[RunData], out_dir: Path) -> tuple[list[SavedFigure], dict[str, list[dict[str, Any]]]]:
    """The first complete traced run of each preset; shared-BN presets first (they are the story)."""
    chosen: dict[str, RunData] = {}
    for run in runs:
        if run.complete and run.preset not in chosen and (run.run_dir / "bn_trace.npz").exists():
            chosen[run.preset] = run
    shared_first = sorted(chosen.values(), key=lambda r: r.config.get("model", {}).get("norm") != "shared")
    figures, mismatches = [], {}
    for run in shared_first:
        made = plot_bn_trace(run, out_dir)
        if made:
            figures.append(made[0])
            mismatches[run.preset] = made[1]
    return figures, mismatches


def build_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 title: str = "bnlab report") -> Report:
    """Read the run directories and write summary.{md,csv,json}, the figures (PNG + SVG)
    and report.html (self-contained) into ``out_dir``."""
    out = Path(out_dir)
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("no run directories to report on: run `bnlab compare` or `bnlab repro` first.")
    summaries = summarize(runs)
    verdicts = judge(summaries, runs)
    figures = [f for f in (plot_val_curves(runs, out), plot_train_vs_val(runs, out)) if f]
    bn_figures, mismatches = _bn_figures(runs, out)
    payload = summary_json(summaries, verdicts)
    payload["bn_mismatch"] = json_safe(mismatches)
    report = Report(out, out / "report.html", out / "summary.md", out / "summary.csv", out / "summary.json",
                    summaries, verdicts, figures + bn_figures)
    atomic_write_text(report.markdown, summary_markdown(summaries, verdicts))
    atomic_write_text(report.csv, summary_csv(summaries))
    atomic_write_json(report.json, payload)
    atomic_write_text(report.html, render_html(summaries, verdicts, runs, figures, bn_figures, mismatches, title))
    return report

"""bnlab.report: statistics against hand-computed numbers and independent formulas, the
verdict rules, the markdown / CSV / JSON outputs, the figures and the self-contained HTML.

The figures and the file formats are checked on real (tiny) MNIST runs; the verdict rules on
hand-built histories, where the right answer is known in advance.
"""

import csv
import dataclasses
import html
import io
import json
import math
import re
import shutil
import statistics
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from bnlab import bnstats, figures, report
from bnlab.config import EpochRecord
from bnlab.presets import PRESETS
from bnlab.rundir import RunData, read_run
from bnlab.sweep import InlineExecutor, plan_sweep, run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = {"epochs": "2", "widths": "784,16,16,10"}


# ----------------------------------------------------------------------------- statistics


def test_describe_three_values_by_hand():
    s = report.describe([0.90, 0.92, 0.94])
    assert s.n == 3
    assert s.mean == pytest.approx(0.92)
    assert s.std == pytest.approx(0.02)  # sqrt((0.02^2 + 0 + 0.02^2) / (3 - 1))
    # Student t, 97.5% quantile, 2 degrees of freedom: 4.302653 (tables print 4.303).
    half = 4.302653 * 0.02 / math.sqrt(3)  # = 0.049683
    assert s.ci_low == pytest.approx(0.92 - half, abs=1e-6)
    assert s.ci_high == pytest.approx(0.92 + half, abs=1e-6)
    assert (s.min, s.max) == (pytest.approx(0.90), pytest.approx(0.94))


def test_describe_two_values_by_hand():
    s = report.describe([1.0, 3.0])
    assert s.std == pytest.approx(math.sqrt(2))
    # t(0.975, df=1) = 12.706205; sem = sqrt(2) / sqrt(2) = 1.
    assert (s.ci_low, s.ci_high) == (pytest.approx(2 - 12.706205, abs=1e-5), pytest.approx(2 + 12.706205, abs=1e-5))


def test_describe_one_value_has_no_spread_and_zero_values_nothing():
    one = report.describe([0.5])
    assert one.n == 1 and one.mean == 0.5 and one.min == one.max == 0.5
    assert math.isnan(one.std) and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    assert one.to_dict()["std"] is None and one.to_dict()["mean"] == 0.5
    assert report.describe([]).n == 0 and math.isnan(report.describe([]).mean)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False, allow_subnormal=False), min_size=2, max_size=25))
def test_describe_agrees_with_independent_formulas(values):
    s = report.describe(values)
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    assert s.mean == pytest.approx(mean, abs=1e-12)
    assert s.std == pytest.approx(sd, abs=1e-12)
    if sd > 0:
        low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=mean, scale=sd / math.sqrt(len(values)))
        assert (s.ci_low, s.ci_high) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))
    assert (s.min, s.max) == (min(values), max(values))


def test_curve_band_is_describe_per_epoch():
    curves = np.random.default_rng(0).uniform(0.8, 1.0, size=(4, 6))
    mean, low, high = figures.curve_band(curves)
    for e in range(curves.shape[1]):
        s = report.describe(curves[:, e])
        assert (mean[e], low[e], high[e]) == (pytest.approx(s.mean), pytest.approx(s.ci_low), pytest.approx(s.ci_high))


# ------------------------------------------------------------------------------ verdicts


def test_an_accuracy_interval_is_clipped_to_0_1_and_the_outputs_say_so():
    # Three seeds at 1.0, 1.0, 0.99: the t-interval's upper end is about 1.011.
    raw = report.describe([1.0, 1.0, 0.99])
    assert raw.ci_high > 1.0
    runs = [fake_run("answer", seed, acc) for seed, acc in enumerate([1.0, 1.0, 0.99])]
    summaries = report.summarize(runs)
    stats = summaries["answer"].stats["final_val_acc"]
    assert stats.ci_high == 1.0 and stats.ci_low == pytest.approx(raw.ci_low)
    assert stats.mean == pytest.approx(raw.mean)  # only the interval's end moves
    row = report.stats_rows(summaries)[0]
    assert row[3] == f"[{raw.ci_low:.4f}, 1.0000]"
    payload = report.summary_json(summaries, report.verdicts_of(summaries, runs))
    assert payload["presets"]["answer"]["metrics"]["final_val_acc"]["ci_high"] == 1.0
    assert payload["ci_clipped_to"]["final_val_acc"] == [0.0, 1.0]
    assert report.CLIP_NOTE in report.summary_markdown(summaries, [])
    # A loss interval only stops at 0; a single value keeps its undefined (NaN) interval.
    assert report.describe([0.01, 0.01, 5.0], bounds=(0.0, math.inf)).ci_low == 0.0
    assert math.isnan(report.describe([0.5], bounds=(0.0, 1.0)).ci_high)


def fake_run(preset: str, seed: int, final_acc: float, status: str = "complete", **train_changes) -> RunData:
    """A run as if read from disk, with the preset's own settings unless changed."""
    cfg = PRESETS[preset].config
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, **train_changes))
    history = [EpochRecord(e, 0.1, 0.2, 0.97, acc, 1.0) for e, acc in enumerate([0.5, 0.6, final_acc])]
    return RunData(
        preset,
        seed,
        Path(f"/nowhere/{preset}/seed{seed}"),
        status,
        history if status == "complete" else history[:1],
        config=cfg.to_dict(),
    )


def verdicts_for(runs):
    return {v.preset: v for v in report.verdicts_of(report.summarize(runs), runs)}


def test_question_is_reproduced_inside_its_band_and_far_below_answer():
    runs = [
        fake_run("question", 0, 0.87),
        fake_run("question", 1, 0.88),
        fake_run("answer", 0, 0.980),
        fake_run("answer", 1, 0.985),
    ]
    v = verdicts_for(runs)
    assert v["question"].reproduced is True and v["question"].value == pytest.approx(0.875)
    assert v["question"].seeds_in_band == 2 and not v["question"].deviations
    assert any("0.1075 below answer" in r for r in v["question"].reasons)  # (0.11 + 0.105) / 2
    assert v["answer"].reproduced is True


def test_question_too_close_to_answer_is_not_reproduced_even_inside_its_band():
    runs = [fake_run("question", 0, 0.89), fake_run("answer", 0, 0.95)]  # gap 0.06 < 0.08
    v = verdicts_for(runs)
    assert v["question"].reproduced is False
    assert any("less than the required 0.08" in r for r in v["question"].reasons)
    assert v["answer"].reproduced is False  # 0.95 is below the answer's band [0.978, 1]


def test_the_gap_uses_only_seeds_both_presets_ran():
    # answer seed 7 has no question partner and must not dilute the gap.
    runs = [fake_run("question", 0, 0.85), fake_run("answer", 0, 0.98), fake_run("answer", 7, 0.0)]
    assert any("0.1300 below answer on the same seed(s) [0]" in r for r in verdicts_for(runs)["question"].reasons)


def test_other_settings_are_reported_and_diverged_runs_left_out():
    runs = [fake_run("no-bn", 0, 0.975, epochs=12), fake_run("no-bn", 1, 0.1, status="diverged", epochs=12)]
    summary = report.summarize(runs)["no-bn"]
    assert summary.stats["final_val_acc"].n == 1 and summary.not_complete == ["seed 1: diverged"]
    v = verdicts_for(runs)["no-bn"]
    # The claim is about the original program's 100 epochs: these runs are measured, not judged.
    assert v.reproduced is None and v.label == "not judged" and v.value == pytest.approx(0.975)
    assert v.deviations == ["train.epochs=12 (original program: 100)"]
    assert any("seed 1: diverged" in r for r in v.reasons)


def test_a_preset_without_complete_runs_is_not_judged():
    v = verdicts_for([fake_run("answer", 0, 0.2, status="diverged")])["answer"]
    assert v.reproduced is None and v.label == "not judged" and v.value is None


# ------------------------------------------------------------------------ BN trace maths


def test_trace_series_splits_a_shared_module_into_call_sites():
    # One shared module, 2 call sites, 3 steps, 1 channel; rows in call order.
    rows, module, site = [], [], []
    for step in range(3):
        for s in range(2):
            rows.append([[10.0 * s + step], [4.0], [step + 0.1 * s], [2.0 + s]])
            module.append(0)
            site.append(s)
    trace = {
        "values": np.asarray(rows, dtype=np.float32),
        "module": np.asarray(module),
        "site": np.asarray(site),
        "module_names": np.asarray(["bn"]),
    }
    first, second = report.trace_series(trace)
    assert first.label == "bn call 1 (after l1)" and second.label == "bn call 2 (after l2)"
    assert first.shared and second.shared
    np.testing.assert_allclose(first.batch_mean[:, 0], [0, 1, 2])
    np.testing.assert_allclose(second.batch_mean[:, 0], [10, 11, 12])
    # The state at the end of a step is the one after the LAST call: site 2's record.
    np.testing.assert_allclose(first.run_mean[:, 0], [0.1, 1.1, 2.1])
    np.testing.assert_allclose(first.run_var[:, 0], [3, 3, 3])
    (m1, m2) = report.trace_mismatch([first, second], last_steps=1, eps=1e-5)
    # Last step: running mean 2.1, var 3; site 1 batch mean 2, site 2 batch mean 12, batch var 4.
    # bnlab.bnstats's definition (the doctor's): shift in running SDs, ratio batch / running.
    assert m1["mean_shift"] == pytest.approx(0.1 / math.sqrt(3 + 1e-5), rel=1e-5)
    assert m2["mean_shift"] == pytest.approx(9.9 / math.sqrt(3 + 1e-5), rel=1e-5)
    assert m1["var_ratio"] == pytest.approx((4 + 1e-5) / (3 + 1e-5), rel=1e-5)
    assert m1 == {
        "site": first.label,
        "module": "bn",
        **bnstats.distance(
            first.batch_mean[-1:], first.batch_var[-1:], first.run_mean[-1:], first.run_var[-1:], 1e-5
        ).as_dict(),
    }


# ------------------------------------------------------------- outputs, on real MNIST runs


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """Tiny real runs: the shared-BN question and the per-layer answer, two seeds each."""
    out = tmp_path_factory.mktemp("sweep")
    specs = plan_sweep(["question", "answer"], [0, 1], out, TINY)
    outcomes = run_sweep(specs, InlineExecutor())
    assert [o.status for o in outcomes] == ["complete"] * 4
    return [s.run_dir for s in specs]


@pytest.fixture(scope="module")
def built(real_runs, tmp_path_factory):
    return report.build_report(real_runs, tmp_path_factory.mktemp("report"))


def saved_finals(run_dirs):
    """Final val acc per run, read straight from history.json (not through bnlab.report)."""
    return [json.loads((d / "history.json").read_text())["history"][-1]["val_acc"] for d in run_dirs]


def test_csv_and_json_hold_the_statistics_of_the_saved_histories(built, real_runs):
    question = saved_finals(real_runs[:2])
    rows = {r["preset"]: r for r in csv.DictReader(io.StringIO(built.csv.read_text()))}
    assert list(rows) == ["question", "answer"]
    assert float(rows["question"]["final_val_acc_mean"]) == pytest.approx(statistics.fmean(question))
    assert float(rows["question"]["final_val_acc_std"]) == pytest.approx(statistics.stdev(question))
    assert int(rows["question"]["final_val_acc_n"]) == 2 and rows["question"]["epochs"] == "2"
    payload = json.loads(built.json.read_text())
    metrics = payload["presets"]["question"]["metrics"]
    assert metrics["final_val_acc"]["mean"] == pytest.approx(statistics.fmean(question))
    assert metrics["final_val_acc"]["ci_low"] < metrics["final_val_acc"]["mean"] < metrics["final_val_acc"]["ci_high"]
    assert payload["presets"]["question"]["per_seed"]["final_val_acc"] == {"0": question[0], "1": question[1]}
    assert [v["preset"] for v in payload["verdicts"]] == ["question", "answer"]
    assert set(payload["bn_mismatch"]) == {"question", "answer"}


def test_markdown_has_the_verdict_and_statistics_tables(built, real_runs):
    text = built.markdown.read_text()
    assert "| preset | verdict | final val acc | the question's claim | accepted band |" in text
    assert "| preset | runs | final val acc (mean ± sd) | 95% CI |" in text
    mean = statistics.fmean(saved_finals(real_runs[:2]))
    assert re.search(rf"\| question \| 2 \| {mean:.4f} ± ", text)
    # Two-epoch runs are not the question's program, and the tables say so.
    assert "settings differ" in text and "train.epochs=2 (original program: 100)" in text


def test_single_run_statistics_are_null_not_nan_in_json(real_runs):
    runs = [read_run(real_runs[0])]
    summaries = report.summarize(runs)
    text = json.dumps(report.summary_json(summaries, report.verdicts_of(summaries, runs)), allow_nan=False)
    metrics = json.loads(text)["presets"]["question"]["metrics"]["final_val_acc"]
    assert metrics["n"] == 1 and metrics["std"] is None and metrics["ci_low"] is None
    assert next(csv.DictReader(io.StringIO(report.summary_csv(summaries))))["final_val_acc_std"] == ""


def test_figures_are_valid_png_and_svg(built):
    names = {f.name for f in built.figures}
    assert names == {"val_curves", "train_vs_val", "bn_trace_question", "bn_trace_answer"}
    for fig in built.figures:
        assert fig.png.read_bytes().startswith(PNG_MAGIC) and fig.png.read_bytes() == fig.png_bytes
        assert ElementTree.parse(fig.svg).getroot().tag.endswith("svg")


def test_html_is_self_contained_and_tells_the_story(built, real_runs):
    text = built.html.read_text()
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text, flags=re.I)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    assert "<script" not in text.lower() and "<link" not in text.lower() and "url(" not in text.lower()
    assert text.count("<img") == len(built.figures)
    env = json.loads((real_runs[0] / "environment.json").read_text())
    for digest in env["data_sha256"].values():
        assert digest in text
    assert "Why one shared BatchNormalization fails" in text
    assert PRESETS["question"].claim in text and "torch" in text


def test_real_trace_shows_one_running_stat_for_both_sites_of_the_shared_module(real_runs):
    question = report.trace_series(read_run(real_runs[0]).bn_trace())
    answer = report.trace_series(read_run(real_runs[2]).bn_trace())
    assert [s.module for s in question] == ["bn", "bn"] and all(s.shared for s in question)
    np.testing.assert_array_equal(question[0].run_mean, question[1].run_mean)
    assert [s.module for s in answer] == ["bn1", "bn2"] and not any(s.shared for s in answer)
    steps = 2 * 60  # 2 epochs of 60 minibatches of 1000
    assert all(len(s.batch_mean) == steps and s.batch_mean.shape[1] == 4 for s in question + answer)


def test_read_run_of_a_directory_without_history_is_none(tmp_path):
    assert read_run(tmp_path) is None


# --------------------------------------------------- what a reader sees: figures and 420 px


def drawn_figures(run_dirs, tmp_path, monkeypatch):
    """The matplotlib Figures of a report (caught at save time) with their names."""
    caught = {}
    real_save = figures.save_figure

    def catch(fig, out_dir, name, *args, **kwargs):
        caught[name] = fig
        return real_save(fig, out_dir, name, *args, **kwargs)

    monkeypatch.setattr(figures, "save_figure", catch)
    steps = []
    report.build_report(run_dirs, tmp_path / "report", on_step=steps.append)
    return caught, steps


def test_short_runs_get_whole_epoch_ticks_and_every_trace_panel_a_y_label(real_runs, tmp_path, monkeypatch):
    caught, steps = drawn_figures(real_runs, tmp_path, monkeypatch)
    assert {"val_curves", "train_vs_val", "bn_trace_question", "bn_trace_answer"} <= set(caught)
    for name, fig in caught.items():
        fig.canvas.draw()
        for ax in fig.axes:
            low, high = sorted(ax.get_xlim())
            shown = [t for t in ax.get_xticks() if low - 1e-9 <= t <= high + 1e-9]
            assert shown and all(float(t).is_integer() for t in shown), (name, ax.get_title(), shown)
            if name.startswith("bn_trace"):
                assert ax.get_ylabel(), (name, ax.get_title())
    # The report names each step as it starts: figures take seconds each on a busy machine.
    assert steps[0] == "reading 4 run directories"
    assert [s for s in steps if s.startswith("figure ")] == [
        "figure 1 of 4: validation curves",
        "figure 2 of 4: train against validation",
        "figure 3 of 4: BN statistics of question",
        "figure 4 of 4: BN statistics of answer",
    ]
    assert steps[-1].startswith("writing report.html")


def test_html_tables_scroll_at_phone_width_and_the_verdict_comes_second(built):
    text = built.html.read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text
    assert re.search(r"\.scroll\{overflow-x:auto", text)
    tables = re.findall(r"(.{0,30})<table>", text)
    assert tables and all(before.endswith('<div class="scroll">') for before in tables)
    assert text.count("<table>") == text.count('<div class="scroll"><table>')
    assert "<tr><th>preset</th><th>verdict</th><th>final val acc</th>" in text
    assert html.escape(report.CLIP_NOTE) in text
    # The BN table speaks bnlab.bnstats's (and the doctor's) language.
    assert "<th>mean shift (running SD)</th><th>variance ratio (batch / running)</th>" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs a headless chromium (Debian: apt-get install chromium)")
def test_at_420_px_nothing_is_cut_off_in_a_real_browser(built, tmp_path):
    """Chromium lays the report out in a 420 px frame (a window cannot be made that narrow);
    a script reports whether the page, or anything outside a scrolling box, is wider."""
    probe = (
        '<!doctype html><html><body style="margin:0"><iframe id="f" style="border:0;width:420px;'
        f'height:3000px" srcdoc="{html.escape(built.html.read_text(), quote=True)}"></iframe><script>'
        "document.getElementById('f').addEventListener('load',()=>{"
        "const d=document.getElementById('f').contentDocument;const w=d.documentElement.clientWidth;"
        "const cut=[...d.querySelectorAll('body *')].filter(e=>e.getBoundingClientRect().right>w+0.5"
        "&&(!e.closest('.scroll')||e.classList.contains('scroll'))).map(e=>e.tagName);"
        "document.title='probe '+JSON.stringify({window:w,page:d.documentElement.scrollWidth,cut:cut,"
        "tables:d.querySelectorAll('.scroll > table').length});});</script></body></html>"
    )
    page = tmp_path / "probe.html"
    page.write_text(probe)
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=600,2000",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r"<title>probe (\{.*?\})</title>", out.stdout)
    assert found, out.stderr[-2000:]
    seen = json.loads(found.group(1))
    assert 380 <= seen["window"] <= 420 and seen["tables"] >= 4, seen
    assert seen["page"] <= seen["window"], seen  # no sideways scrolling of the page
    assert seen["cut"] == [], seen  # wide content scrolls inside its own box

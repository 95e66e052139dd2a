"""Sweeps: planning, resuming (after Ctrl-C on a real `bnlab compare`, and over partial run
directories), diverged and failed runs as outcomes, output order and exit codes.

Every run is a tiny real one (784-16-16-10, 1-3 epochs) on the vendored MNIST files.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bnlab.cli import main
from bnlab.sweep import (
    DEFAULT_THREADS_PER_WORKER,
    InlineExecutor,
    InOrder,
    LocalProcessExecutor,
    SweepEvent,
    SweepProgress,
    default_workers,
    plan_sweep,
    run_sweep,
)

TINY = {"epochs": "1", "widths": "784,16,16,10"}
TINY_FLAGS = ["--set", "widths=784,16,16,10"]


def status_of(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "history.json").read_text())["status"]
    except (OSError, ValueError):
        return None


def complete_runs(out: Path) -> list[Path]:
    return sorted(d for d in out.glob("runs/*/seed*") if status_of(d) == "complete")


def mtimes(run_dirs) -> dict[Path, int]:
    return {d: (d / "history.json").stat().st_mtime_ns for d in run_dirs}


# -------------------------------------------------------------------------------- planning


def test_plan_sweep_orders_runs_and_traces_only_batch_norm_models(tmp_path):
    specs = plan_sweep(["no-bn", "question"], [3, 0], tmp_path, {"epochs": "2"})
    assert [(s.preset, s.seed) for s in specs] == [("no-bn", 3), ("no-bn", 0), ("question", 3), ("question", 0)]
    assert specs[2].run_dir == tmp_path / "runs" / "question" / "seed3"
    assert specs[2].config.train.seed == 3 and specs[2].config.train.epochs == 2
    assert specs[0].config.train.trace_bn_channels == 0  # nothing to trace without BN
    assert specs[2].config.train.trace_bn_channels == 4
    assert plan_sweep(["tensorflow"], [0], tmp_path)[0].config.train.trace_bn_channels == 4
    # An explicit setting wins over the sweep's default.
    assert plan_sweep(["question"], [0], tmp_path, {"trace_bn_channels": "2"})[0].config.train.trace_bn_channels == 2


def test_the_measured_default_is_one_worker_per_core_with_one_thread():
    assert DEFAULT_THREADS_PER_WORKER == 1
    assert LocalProcessExecutor().workers == default_workers() == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="workers must be >= 1"):
        LocalProcessExecutor(workers=0)


def test_in_order_releases_items_in_plan_order():
    seen = []
    in_order = InOrder(["a", "b", "c"], seen.append)
    in_order.add("c", 3)
    in_order.add("b", 2)
    assert seen == []
    in_order.add("a", 1)
    assert seen == [1, 2, 3]


def test_progress_total_drops_the_epochs_that_will_not_be_trained(tmp_path):
    specs = plan_sweep(["answer"], [0, 1], tmp_path, {"epochs": "3"})
    progress = SweepProgress(len(specs), sum(s.config.train.epochs for s in specs), file=io.StringIO())
    assert progress.bar.total == 6
    progress(SweepEvent("done", specs[0], outcome=None))  # finished on disk earlier
    progress(SweepEvent("start", specs[1]))
    progress(SweepEvent("epoch", specs[1], record=None))
    progress(SweepEvent("done", specs[1], outcome=None))  # diverged after one epoch
    assert (progress.bar.n, progress.bar.total) == (1, 1)
    progress.close()


def test_progress_clock_starts_at_the_first_epoch_back_dated_by_its_duration(tmp_path):
    import time

    from bnlab.config import EpochRecord

    specs = plan_sweep(["answer"], [0, 1], tmp_path, {"epochs": "2"})
    progress = SweepProgress(len(specs), 4, file=io.StringIO())
    created = progress.bar.start_t
    time.sleep(0.3)  # the workers start: not training time
    progress(SweepEvent("start", specs[0]))
    progress(SweepEvent("epoch", specs[0], record=EpochRecord(0, 1.0, 1.0, 0.5, 0.5, 0.2)))
    # The clock counts the first epoch (0.2 s), not the start-up before it.
    assert created + 0.3 <= progress.bar.start_t + 0.2 + 1e-6
    assert progress.bar.start_t <= time.time() - 0.2
    late = SweepProgress(1, 2, file=io.StringIO())
    late(SweepEvent("epoch", specs[0], record=EpochRecord(0, 1.0, 1.0, 0.5, 0.5, 60.0)))
    assert late.bar.start_t >= late._created  # never back-dated before the bar existed
    late.close()
    # Two runs in flight: each one's first epoch is half an epoch of the bar's time.
    pair = SweepProgress(2, 4, file=io.StringIO())
    time.sleep(0.3)
    pair(SweepEvent("start", specs[0]))
    pair(SweepEvent("start", specs[1]))
    before = time.time()
    pair(SweepEvent("epoch", specs[0], record=EpochRecord(0, 1.0, 1.0, 0.5, 0.5, 0.2)))
    assert before - 0.1 - 0.05 <= pair.bar.start_t <= time.time() - 0.1 + 1e-6
    pair.close()
    # The bar closes by itself when the last run is done: the report's time is not training time.
    for spec in specs:
        progress(SweepEvent("done", spec, outcome=None))
    assert progress.bar.disable  # tqdm's state after close()
    progress.close()  # again: harmless


# ------------------------------------------------------------------- resuming, in process


def test_resume_trains_only_unfinished_runs_and_clears_partial_directories(tmp_path):
    specs = plan_sweep(["answer", "no-bn"], [0, 1], tmp_path, TINY)
    run_sweep(specs[:1], InlineExecutor())  # answer seed 0 finished earlier
    finished = mtimes([specs[0].run_dir])
    partial = specs[1].run_dir  # answer seed 1: what a killed worker leaves behind
    partial.mkdir(parents=True)
    (partial / ".history.json.x.tmp").write_text("half a file")
    (partial / "history.json").write_text(json.dumps({"status": "running", "history": []}))

    events = []
    outcomes = run_sweep(specs, InlineExecutor(), events.append)
    assert [o.status for o in outcomes] == ["complete"] * 4
    assert [o.cached for o in outcomes] == [True, False, False, False]
    assert mtimes([specs[0].run_dir]) == finished
    assert not (partial / ".history.json.x.tmp").exists() and status_of(partial) == "complete"
    assert events[0].kind == "done" and events[0].outcome.cached  # announced before training
    assert [e.spec.label for e in events if e.kind == "start"] == ["answer seed 1", "no-bn seed 0", "no-bn seed 1"]
    assert sum(e.kind == "epoch" for e in events) == 3


def test_a_finished_run_with_other_settings_is_neither_reused_nor_overwritten(tmp_path, capsys):
    run_sweep(plan_sweep(["no-bn"], [0], tmp_path, TINY), InlineExecutor())
    history = tmp_path / "runs" / "no-bn" / "seed0" / "history.json"
    before = history.read_bytes()
    # Another thread count may change the last bits of a history: it is another run.
    with pytest.raises(ValueError, match="train.threads"):
        run_sweep(plan_sweep(["no-bn"], [0], tmp_path, {**TINY, "threads": "2"}), InlineExecutor())
    with pytest.raises(ValueError, match="train.epochs"):
        run_sweep(plan_sweep(["no-bn"], [0], tmp_path, {**TINY, "epochs": "2"}), InlineExecutor())
    argv = ["compare", "--presets", "no-bn", "--seeds", "0", "--epochs", "2", *TINY_FLAGS, "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "other settings" in capsys.readouterr().err
    assert history.read_bytes() == before


def test_diverged_and_failed_runs_are_outcomes_and_the_sweep_goes_on(tmp_path):
    diverging = plan_sweep(["no-bn"], [0], tmp_path, {**TINY, "lr": "1e30"})
    failing = plan_sweep(["answer"], [1], tmp_path, TINY, data_dir=tmp_path / "no-such-data-dir")
    fine = plan_sweep(["answer"], [0], tmp_path, TINY)
    outcomes = run_sweep(diverging + failing + fine, InlineExecutor())
    assert [o.status for o in outcomes] == ["diverged", "failed", "complete"]
    assert "diverged" in outcomes[0].message and status_of(diverging[0].run_dir) == "diverged"
    assert "no-such-data-dir" in outcomes[1].message
    # A diverged run is a result: it is not trained again; a failed one is.
    again = run_sweep(diverging + failing, InlineExecutor())
    assert [(o.status, o.cached) for o in again] == [("diverged", True), ("failed", False)]


# -------------------------------------------------------------- worker processes, the CLI


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (our subprocess and its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def wait_for(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the worker processes")
def test_ctrl_c_stops_the_workers_keeps_finished_runs_and_repro_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["--presets", "question,no-bn", "--seeds", "0-1", "--epochs", "3", *TINY_FLAGS, "--out", str(out)]
    marker = f"BNLAB_TEST_MARKER={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnlab", "compare", *args, "--workers", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: complete_runs(out), timeout=180)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    wait_for(lambda: not processes_with(marker), timeout=10)  # no worker outlives the command
    finished = complete_runs(out)
    assert 1 <= len(finished) < 4, "the interrupt should have landed while runs were left"
    before = mtimes(finished)

    assert main(["repro", *args, "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert len(complete_runs(out)) == 4
    assert {d: mtimes([d])[d] for d in finished} == before  # finished runs were not trained again
    headings = [line for line in text.splitlines() if line.startswith("== ")]
    assert headings == ["== question seed 0 ==", "== question seed 1 ==", "== no-bn seed 0 ==", "== no-bn seed 1 =="]
    assert "epoch  train/loss  val/loss  train/acc   val/acc" in text
    lines = text.splitlines()
    for preset in ("question", "no-bn"):
        assert any(
            line.startswith(f"{preset}: final val acc ") and "the question/answer says" in line for line in lines
        )
    report_path = Path(text.split("report: ")[1].split()[0])
    assert report_path == out / "report" / "report.html" and report_path.exists()


def test_compare_exits_1_when_runs_diverge_and_does_not_retrain_them(tmp_path, capsys):
    argv = [
        "compare",
        "--presets",
        "no-bn",
        "--seeds",
        "0-1",
        "--epochs",
        "2",
        "--lr",
        "1e30",
        *TINY_FLAGS,
        "--out",
        str(tmp_path),
        "--workers",
        "2",
    ]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "no-bn seed 0 diverged" in captured.err and "no-bn seed 1 diverged" in captured.err
    runs = [tmp_path / "runs" / "no-bn" / f"seed{s}" for s in (0, 1)]
    assert [status_of(d) for d in runs] == ["diverged", "diverged"]
    assert "not judged" in (tmp_path / "report" / "report.html").read_text()
    before = mtimes(runs)
    assert main(argv) == 1
    assert mtimes(runs) == before


def test_bad_sweep_input_exits_2(tmp_path, capsys):
    assert main(["compare", "--presets", "no-such-preset", "--out", str(tmp_path)]) == 2
    assert main(["repro", "--seeds", "3-1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'no-such-preset'" in err and "runs backwards" in err

"""Every infrastructure failure of issue 10, section 4, tried as a user would: the real CLI
(``bnlab.cli.main`` in-process, or ``python -m bnlab`` in a subprocess), real MNIST, tiny
runs (784-16-16-10, 1-3 epochs). Each test asserts the clear error: the exit code, no
traceback, the file or flag named, nothing written outside OUT, nothing half-written, the
user's files kept. The mount-based cases (a full disk, a read-only file system) are in
test_failures_fs.py.

Sweeps in this process run through ``InlineExecutor`` (the ``inline_workers`` fixture) so
that a monkeypatched engine is seen and no worker processes are spawned; the tests that
need real worker processes or a second process use subprocesses.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnlab import sweep
from bnlab.cli import main

TINY = ["--epochs", "1", "--set", "widths=784,16,16,10"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


# ------------------------------------------------------------------------------ helpers


def bnlab(argv, capsys):
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The last line bnlab printed to stderr (its one-paragraph error)."""
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_clear_error(err: str, *named: str) -> None:
    assert "Traceback" not in err, err
    last = error_line(err)
    assert last.startswith("bnlab: ") or last.startswith("bnlab doctor: "), err
    for text in named:
        assert text in last, (text, last)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: relative path -> (size, mtime)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".bnlab.lock" and p.suffix != ".tmp"
    }


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*.tmp")]


def history(run_dir: Path) -> dict:
    return json.loads((run_dir / "history.json").read_text())


def env_with_src(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (extra.pop("PREPEND", ""), SRC, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture
def inline_workers(monkeypatch):
    """`bnlab compare` trains its runs in this process, one after another."""
    monkeypatch.setattr(sweep, "LocalProcessExecutor", lambda workers=None, threads=1: sweep.InlineExecutor())


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A real finished sweep (answer seed 0, one tiny epoch) made by `bnlab compare`; tests
    copy it instead of training it again."""
    out = tmp_path_factory.mktemp("finished") / "sweep"
    mp = pytest.MonkeyPatch()
    mp.setattr(sweep, "LocalProcessExecutor", lambda workers=None, threads=1: sweep.InlineExecutor())
    try:
        assert main(["compare", "--presets", "answer", "--seeds", "0", *TINY, "--out", str(out)]) == 0
    finally:
        mp.undo()
    return out


def copy_sweep(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".bnlab.lock"))
    return dst


def wait_for(condition, timeout: float, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


def running_with_an_epoch(run_dir: Path) -> bool:
    try:
        saved = history(run_dir)
    except (OSError, ValueError):
        return False
    return saved["status"] == "running" and len(saved["history"]) >= 1


# ------------------------------------------------------------ two processes, one --out


def test_a_second_compare_on_the_same_out_stops_at_once_naming_the_first(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    args = [
        "compare",
        "--presets",
        "answer",
        "--seeds",
        "0",
        "--epochs",
        "5",
        "--set",
        "widths=784,16,16,10",
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "bnlab", *args],
        env=env_with_src(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = out / "runs" / "answer" / "seed0"
    try:
        wait_for(lambda: running_with_an_epoch(run_dir), timeout=240, proc=first)
        trained = []
        monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: trained.append(a))
        before = tree(out)
        code, _, err = bnlab(args, capsys)
        assert code == 2
        assert_clear_error(err, "in use by another bnlab process", f"pid {first.pid}", str(out))
        assert not trained  # the second process trained nothing
        after = tree(out)
        assert set(before) <= set(after)  # it deleted nothing (the first goes on writing)
        stdout, stderr = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, stderr
    saved = history(run_dir)
    assert saved["status"] == "complete" and [r["epoch"] for r in saved["history"]] == [0, 1, 2, 3, 4]
    assert (out / "report" / "report.html").exists()


# ------------------------------------------------------------- untrusted run directories


def test_a_tampered_preset_name_writes_nothing_outside_out(finished_sweep, tmp_path, capsys, inline_workers):
    from bnlab.errors import InputError
    from bnlab.report import build_report
    from bnlab.rundir import read_run

    out = copy_sweep(finished_sweep, tmp_path / "a" / "b" / "sweep")
    run_dir = out / "runs" / "answer" / "seed0"
    for name in ("history.json", "config.json"):
        saved = json.loads((run_dir / name).read_text())
        saved["preset"] = "../../somewhere/evil"
        (run_dir / name).write_text(json.dumps(saved))
    # A folder whose name is not a plain name is not taken as a preset's folder either.
    odd = out / "runs" / "..evil<script>" / "seed0"
    copy_sweep(run_dir, odd)
    before = tree(tmp_path)

    with pytest.raises(InputError, match=r"preset name '\.\./\.\./somewhere/evil' is not a plain name"):
        read_run(run_dir)
    with pytest.raises(InputError, match="history.json"):
        build_report([run_dir], out / "report")
    assert odd not in sweep.find_run_dirs(out)

    code, _, err = bnlab(["compare", "--presets", "answer", "--seeds", "0", *TINY, "--out", out], capsys)
    assert code == 0, err  # the tampered run cannot be vouched for: it is trained again
    assert history(run_dir)["preset"] == "answer" and history(run_dir)["status"] == "complete"
    after = tree(tmp_path)
    written = {p for p in after if before.get(p) != after[p]}
    assert "a/b/sweep/runs/answer/seed0/history.json" in written
    assert all(p.startswith("a/b/sweep/") for p in written), written
    assert set(before) <= set(after)
    assert not [p for p in tmp_path.rglob("*") if "evil" in p.name and "..evil<script>" not in str(p)]
    assert not (tmp_path / "somewhere").exists() and not (tmp_path / "a" / "somewhere").exists()


def test_a_history_json_holding_a_list_is_named_and_its_run_trained_again(
    finished_sweep, tmp_path, capsys, inline_workers
):
    from bnlab.errors import InputError
    from bnlab.rundir import read_run

    out = copy_sweep(finished_sweep, tmp_path / "sweep")
    run_dir = out / "runs" / "answer" / "seed0"
    (run_dir / "history.json").write_text("[1, 2, 3]")
    with pytest.raises(InputError, match=r"history\.json does not hold a bnlab history \(a JSON object\)"):
        read_run(run_dir)
    code, _, err = bnlab(["compare", "--presets", "answer", "--seeds", "0", *TINY, "--out", out], capsys)
    assert code == 0 and "Traceback" not in err
    assert history(run_dir)["status"] == "complete"


# ---------------------------------------------------- runs that fail before their history


def test_a_run_whose_directory_is_a_file_fails_with_its_own_reason_and_the_report_is_written(
    finished_sweep, tmp_path, capsys
):
    """Real worker processes: the worker's own error reaches the user."""
    out = copy_sweep(finished_sweep, tmp_path / "sweep")
    in_the_way = out / "runs" / "answer" / "seed1"
    in_the_way.write_text("a user's file where seed 1's folder goes\n")
    code, stdout, err = bnlab(
        ["compare", "--presets", "answer", "--seeds", "0-1", *TINY, "--out", out, "--workers", "1"], capsys
    )
    assert code == 1
    assert "Traceback" not in err and "has no readable history.json" not in err
    assert f"answer seed 1 failed: {in_the_way} is a file, not a folder" in err
    assert in_the_way.read_text() == "a user's file where seed 1's folder goes\n"
    html = (out / "report" / "report.html").read_text()
    assert "is a file, not a folder" in html and "failed" in html
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary  # the finished run is reported
    assert "answer seed 0: complete" in stdout


def test_a_run_that_fails_before_writing_is_recorded_failed_with_its_reason(
    finished_sweep, tmp_path, capsys, inline_workers, monkeypatch
):
    """A failure before the run's first file (here: moving the data to the device) is
    recorded in the run directory and in the report; the next invocation tries it again."""
    from bnlab.engines import torch as torch_engine

    def device_lost(*args, **kwargs):
        raise OSError("the device went away")

    out = copy_sweep(finished_sweep, tmp_path / "sweep")
    real_device_tensors = torch_engine.device_tensors
    monkeypatch.setattr(torch_engine, "device_tensors", device_lost)
    code, stdout, err = bnlab(["compare", "--presets", "answer", "--seeds", "0-1", *TINY, "--out", out], capsys)
    assert code == 1
    assert "Traceback" not in err and "has no readable history.json" not in err
    failed = out / "runs" / "answer" / "seed1"
    saved = history(failed)
    assert saved["status"] == "failed" and "OSError: the device went away" in saved["message"]
    assert "answer seed 1 failed: OSError: the device went away" in err
    assert "the device went away" in (out / "report" / "report.html").read_text()
    assert history(out / "runs" / "answer" / "seed0")["status"] == "complete"  # finished earlier, kept

    monkeypatch.setattr(torch_engine, "device_tensors", real_device_tensors)
    code, _, err = bnlab(["compare", "--presets", "answer", "--seeds", "0-1", *TINY, "--out", out], capsys)
    assert code == 0, err
    assert history(failed)["status"] == "complete"


def test_cuda_without_a_gpu_stops_before_training(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for command, extra in (("train", ["--preset", "answer"]), ("compare", ["--presets", "answer", "--seeds", "0"])):
        code, _, err = bnlab([command, *extra, *TINY, "--device", "cuda", "--out", tmp_path / command], capsys)
        assert code == 2
        assert_clear_error(err, "--device cuda", "no CUDA device", "--device cpu")
        assert not list((tmp_path / command).rglob("*.json"))


def test_a_missing_chainer_or_engine_is_named_before_anything_trains(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "chainer", None)  # as if Chainer were not installed
    for command, extra in (("train", ["--preset", "answer"]), ("compare", ["--presets", "answer", "--seeds", "0"])):
        code, _, err = bnlab([command, *extra, *TINY, "--engine", "chainer", "--out", tmp_path / command], capsys)
        assert code == 2
        assert_clear_error(err, "The chainer engine needs Chainer 7.8.1", "--engine torch")
        assert not list((tmp_path / command).rglob("*.json"))


def test_an_engine_missing_from_the_installation_is_a_usage_error(tmp_path, capsys, monkeypatch):
    from bnlab import engines

    monkeypatch.setitem(engines.ENGINES, "tensorflow", "bnlab.engines.no_such_engine_module")
    code, _, err = bnlab(
        ["train", "--preset", "answer", *TINY, "--engine", "tensorflow", "--out", tmp_path / "r"], capsys
    )
    assert code == 2
    assert_clear_error(err, "the tensorflow engine is not part of this bnlab installation", "--engine torch")


# -------------------------------------------------------------------- the user's files


def test_compare_keeps_a_users_files_when_a_run_restarts(tmp_path, capsys, inline_workers):
    out = tmp_path / "sweep"
    run_dir = out / "runs" / "answer" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("my notes\n")
    (run_dir / "history.json").write_text(
        json.dumps({"preset": "answer", "seed": 0, "status": "running", "history": []})
    )  # a run killed mid-way
    (run_dir / ".history.json.abc.tmp").write_text("half a file")
    code, _, err = bnlab(["compare", "--presets", "answer", "--seeds", "0", *TINY, "--out", out], capsys)
    assert code == 0, err
    assert (run_dir / "notes.txt").read_text() == "my notes\n"
    assert history(run_dir)["status"] == "complete" and no_temp_files(out)


def test_train_refuses_an_existing_run_directory_or_dot_without_overwrite(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    assert bnlab(["train", "--preset", "answer", *TINY, "--out", run_dir], capsys)[0] == 0
    (run_dir / "notes.txt").write_text("mine\n")
    before = tree(run_dir)
    code, _, err = bnlab(["train", "--preset", "answer", *TINY, "--seed", "1", "--out", run_dir], capsys)
    assert code == 2
    assert_clear_error(err, str(run_dir), "already holds a bnlab run", "--overwrite")
    assert tree(run_dir) == before

    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text("# the user's program\n")
    monkeypatch.chdir(work)
    code, _, err = bnlab(["train", "--preset", "answer", *TINY, "--out", "."], capsys)
    assert code == 2
    assert_clear_error(err, "already holds other files", "--out")
    assert sorted(p.name for p in work.iterdir()) == ["train.py"]  # not even a lock file

    code, _, err = bnlab(["train", "--preset", "answer", *TINY, "--seed", "1", "--out", run_dir, "--overwrite"], capsys)
    assert code == 0, err
    assert history(run_dir)["seed"] == 1 and (run_dir / "notes.txt").read_text() == "mine\n"


def test_out_an_existing_file_is_refused_and_kept(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("a user's file\n")
    for command, extra in (("train", ["--preset", "answer"]), ("compare", ["--presets", "answer", "--seeds", "0"])):
        code, _, err = bnlab([command, *extra, *TINY, "--out", target], capsys)
        assert code == 2
        assert_clear_error(err, str(target), "is a file, not a folder")
        assert target.read_text() == "a user's file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


# ------------------------------------------------------------ crashes, bugs and Ctrl-C


def _crash_in_evaluation(monkeypatch):
    from bnlab.engines import torch as torch_engine

    def crash(*args, **kwargs):
        raise RuntimeError("simulated bug in evaluate")

    monkeypatch.setattr(torch_engine, "evaluate", crash)


def test_an_unexpected_exception_is_a_bug_with_its_traceback_and_exit_1(tmp_path, capsys, monkeypatch):
    _crash_in_evaluation(monkeypatch)
    run_dir = tmp_path / "run"
    code, _, err = bnlab(["train", "--preset", "answer", *TINY, "--out", run_dir], capsys)
    assert code == 1
    assert "Traceback" in err and "RuntimeError: simulated bug in evaluate" in err
    assert error_line(err).startswith("bnlab: this is a bug in bnlab")
    saved = history(run_dir)  # recorded as failed, not left "running"
    assert saved["status"] == "failed" and "RuntimeError: simulated bug in evaluate" in saved["message"]


def test_a_crashed_run_is_failed_on_disk_and_in_the_report(tmp_path, capsys, monkeypatch, inline_workers):
    _crash_in_evaluation(monkeypatch)
    out = tmp_path / "sweep"
    code, _, err = bnlab(["compare", "--presets", "answer", "--seeds", "0", *TINY, "--out", out], capsys)
    assert code == 1
    assert "Traceback" not in err
    assert "answer seed 0 failed: RuntimeError: simulated bug in evaluate (at test_failures.py:" in err
    saved = history(out / "runs" / "answer" / "seed0")
    assert saved["status"] == "failed" and "simulated bug in evaluate" in saved["message"]
    html = (out / "report" / "report.html").read_text()
    assert "simulated bug in evaluate" in html and ">running<" not in html


def test_ctrl_c_in_train_says_a_rerun_restarts_from_epoch_0(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bnlab",
            "train",
            "--preset",
            "answer",
            "--epochs",
            "50",
            "--set",
            "widths=784,16,16,10",
            "--out",
            str(run_dir),
        ],
        env=env_with_src(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: running_with_an_epoch(run_dir), timeout=240, proc=proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "does not resume" in stderr and "again from epoch 0" in stderr and "--overwrite" in stderr
    saved = history(run_dir)
    assert saved["status"] == "interrupted" and 1 <= len(saved["history"]) < 50
    assert "interrupted after" in saved["message"] and no_temp_files(run_dir)


# -------------------------------------------------------------- values that name the flag


@pytest.mark.parametrize(
    "argv, named",
    [
        (["train", "--preset", "answer", "--set", "bn_eps=nan"], "model.bn_eps must be a positive number; got nan"),
        (["train", "--preset", "answer", "--set", "bn_eps=inf"], "model.bn_eps must be a positive number; got inf"),
        (["train", "--preset", "answer", "--set", "widths=10,10"], "model.widths must start at 784"),
        (["train", "--preset", "answer", "--seed", str(2**70)], "train.seed (--seed) must lie in [0, 2**63 - 1]"),
        (["train", "--preset", "answer", "--seed", str(2**63)], "train.seed (--seed) must lie in [0, 2**63 - 1]"),
        (["train", "--preset", "answer", "--batch-size", "70000"], "--batch-size 70000 is larger than the 60,000"),
        (["compare", "--presets", "answer", "--seeds", "a"], "--seeds 'a': 'a' is not a seed"),
        (["compare", "--presets", "answer", "--seeds", str(2**63)], "seeds must lie in [0, 2**63 - 1]"),
    ],
)
def test_bad_values_name_the_flag_and_write_nothing(argv, named, tmp_path, capsys):
    code, _, err = bnlab([*argv, "--epochs", "1", "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert_clear_error(err, named)
    assert not list(tmp_path.rglob("*.json"))


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--seed", "-1"], "--seed must lie in [0, 2**32 - 1]; got -1"),
        (["--seed", str(2**70)], "--seed must lie in [0, 2**32 - 1]"),
        (["--lr", "nan", "--train-steps", "2"], "--lr must be a positive number of at most 10; got nan"),
        (["--lr", "-1", "--train-steps", "2"], "--lr must be a positive number of at most 10; got -1.0"),
    ],
)
def test_doctor_seed_and_lr_name_the_flag(flags, named, capsys):
    model = Path(__file__).resolve().parents[1] / "examples" / "question_torch.py"
    code, _, err = bnlab(["doctor", f"{model}:MyModel", "--input-shape", "100,784", *flags], capsys)
    assert code == 2
    assert_clear_error(err, named)


def test_runs_trained_with_another_thread_count_are_not_reused(finished_sweep, tmp_path, capsys, inline_workers):
    out = copy_sweep(finished_sweep, tmp_path / "sweep")
    before = tree(out / "runs")
    code, _, err = bnlab(
        ["compare", "--presets", "answer", "--seeds", "0", *TINY, "--threads", "2", "--out", out], capsys
    )
    assert code == 2
    assert_clear_error(err, "trained with other settings", "train.threads", "another --out")
    assert tree(out / "runs") == before
    code, _, err = bnlab(
        ["compare", "--presets", "answer", "--seeds", "0", *TINY, "--threads", "1", "--out", out], capsys
    )
    assert code == 0, err
    assert tree(out / "runs") == before  # the same thread count: reused, not trained again

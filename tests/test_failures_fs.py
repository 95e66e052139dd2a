"""Infrastructure failures that need a real file system in a bad state (issue 10, section 4):
a full disk (ENOSPC) during train, compare and the report, and a read-only file system.

Each test mounts a small tmpfs (``mount -t tmpfs -o size=2m``; it needs root, and is
skipped with the reason when mounting is not permitted) and always unmounts it. The
asserted behaviour: a one-paragraph error naming the file and the reason, exit code 2 (1
when some runs of a sweep failed but the rest was reported), no traceback, nothing
half-written (no temp file left, every JSON file parses).
"""

import json
import subprocess
from pathlib import Path

import pytest

from bnlab import sweep
from test_failures import TINY, assert_clear_error, bnlab, history, no_temp_files


def _mount(target: Path, size: str = "2m") -> None:
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root")


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _remount_read_only(target: Path) -> None:
    done = subprocess.run(["mount", "-o", "remount,ro", str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount read-only ({done.stderr.strip()})")


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts 2 MB file systems under tmp_path on demand; unmounts them all afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "2m") -> Path:
        target = tmp_path / name
        _mount(target, size)
        mounted.append(target)
        return target

    try:
        yield mount
    finally:
        for target in reversed(mounted):
            _umount(target)


def fill(disk: Path, leave_bytes: int) -> None:
    """Fill ``disk`` with a file so that about ``leave_bytes`` stay free."""
    import os

    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler.bin").write_bytes(b"\0" * max(0, free - leave_bytes))


def all_json_parses(root: Path) -> bool:
    for path in root.rglob("*.json"):
        json.loads(path.read_text())
    return True


@pytest.fixture
def inline_workers(monkeypatch):
    monkeypatch.setattr(sweep, "LocalProcessExecutor", lambda workers=None, threads=1: sweep.InlineExecutor())


def test_train_on_a_full_disk_is_one_paragraph_and_leaves_no_half_file(tmpfs, capsys):
    disk = tmpfs("disk")
    fill(disk, leave_bytes=64 * 1024)  # room for the JSON files, not for the 370 KB checkpoint
    run_dir = disk / "run"
    code, _, err = bnlab(["train", "--preset", "answer", "--epochs", "1", "--out", run_dir], capsys)
    assert code == 2
    assert_clear_error(err, "cannot write", str(run_dir), "the disk is full")
    assert no_temp_files(disk) and all_json_parses(run_dir)
    assert history(run_dir)["status"] in ("failed", "running")  # what fit on the disk; never half a file
    assert not (run_dir / "checkpoint.pt").exists()


def test_compare_on_a_2mb_disk_says_the_report_could_not_be_written(tmpfs, capsys, inline_workers):
    from bnlab.errors import OutputError
    from bnlab.report import build_report

    disk = tmpfs("disk")
    # Room for the run (about 80 KB) but not for the report's figures and HTML (about 0.9 MB).
    fill(disk, leave_bytes=400 * 1024)
    out = disk / "sweep"
    code, _, err = bnlab(["compare", "--presets", "answer", "--seeds", "0", *TINY, "--out", out], capsys)
    assert code == 2
    assert_clear_error(
        err, "the report could not be written", "the disk is full", "1 of 1 complete", "rerun the same command"
    )
    assert history(out / "runs" / "answer" / "seed0")["status"] == "complete"  # the run itself is kept
    assert not (out / "report" / "report.html").exists() and no_temp_files(disk) and all_json_parses(out)
    # The report on its own (the library call) raises an OutputError naming the file, too.
    with pytest.raises(OutputError, match=r"cannot write .*: the disk is full"):
        build_report([out / "runs" / "answer" / "seed0"], out / "report")
    assert no_temp_files(disk)
    # With room again, the same command builds the report without training again.
    (disk / "filler.bin").unlink()
    before = (out / "runs" / "answer" / "seed0" / "history.json").stat().st_mtime_ns
    code, _, err = bnlab(["compare", "--presets", "answer", "--seeds", "0", *TINY, "--out", out], capsys)
    assert code == 0, err
    assert (out / "report" / "report.html").exists()
    assert (out / "runs" / "answer" / "seed0" / "history.json").stat().st_mtime_ns == before


def test_a_run_that_fills_the_disk_fails_with_the_reason_and_the_sweep_is_reported(
    tmpfs, capsys, inline_workers, tmp_path
):
    """ENOSPC inside one run of a sweep: that run fails with "the disk is full", and the
    report (on another disk) still lists it."""
    out = tmp_path / "sweep"
    run_disk = out / "runs" / "answer" / "seed0"
    tmpfs_dir = tmpfs("sweep/runs/answer/seed0")
    assert tmpfs_dir == run_disk
    fill(run_disk, leave_bytes=64 * 1024)  # room for the JSON files, not for the 370 KB checkpoint
    code, _, err = bnlab(["compare", "--presets", "answer", "--seeds", "0", "--epochs", "1", "--out", out], capsys)
    assert code == 1
    assert "Traceback" not in err
    assert "answer seed 0 failed: cannot write" in err and "the disk is full" in err
    assert "the disk is full" in (out / "report" / "report.html").read_text()
    assert no_temp_files(run_disk) and (run_disk / "filler.bin").exists()


def test_a_read_only_file_system_is_named(tmpfs, tmp_path, capsys, inline_workers):
    disk = tmpfs("ro")
    _remount_read_only(disk)
    for command, extra in (("train", ["--preset", "answer"]), ("compare", ["--presets", "answer", "--seeds", "0"])):
        code, _, err = bnlab([command, *extra, *TINY, "--out", disk / command], capsys)
        assert code == 2
        assert_clear_error(err, "cannot write", str(disk / command), "read-only")

    # One run directory of a sweep on a read-only file system: that run fails with the
    # reason, the other completes, and the report is written.
    out = tmp_path / "sweep"
    ro_run = tmpfs("sweep/runs/answer/seed1")
    _remount_read_only(ro_run)
    code, _, err = bnlab(["compare", "--presets", "answer", "--seeds", "0-1", *TINY, "--out", out], capsys)
    assert code == 1
    assert "Traceback" not in err and "has no readable history.json" not in err
    assert "answer seed 1 failed: cannot write" in err and "read-only" in err
    assert history(out / "runs" / "answer" / "seed0")["status"] == "complete"
    assert "read-only" in (out / "report" / "report.html").read_text()

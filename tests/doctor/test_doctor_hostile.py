"""``bnlab doctor`` under hostile and careless input (issue 22), tried as a user would: the real
CLI (``bnlab.cli.main`` in this process, or ``python -m bnlab`` in a subprocess where a real
signal or the real stdout is needed), real MNIST, real tmpfs mounts for a full or read-only
disk (the fixtures of tests/test_failures_fs.py; they skip without root).

Each case ends with exit 2 and one paragraph naming the problem and the fix (or with the right
verdict), never a traceback; ``--fix`` leaves OUT complete or as it was; ``--json`` stays
parseable whatever the model prints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bnlab.doctor import sources
from test_failures import TINY, assert_clear_error, bnlab, env_with_src, no_temp_files
from test_failures_fs import fill, tmpfs  # noqa: F401 - the fixture

MODEL = """
import os
import sys
import time
import torch
import torch.nn.functional as F
from torch import nn

{prelude}

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(784, 16, bias=False)
        self.bn1 = nn.BatchNorm1d(16)
        self.l2 = nn.Linear(16, 10)
        {init}

    def forward(self, x):
        {forward}
        return self.l2(F.relu(self.bn1(self.l1(x))))
"""


def model_file(folder: Path, prelude: str = "", init: str = "pass", forward: str = "pass", name="net.py") -> Path:
    path = folder / name
    path.write_text(MODEL.format(prelude=textwrap.dedent(prelude), init=init, forward=forward))
    return path


DATA = """
import numpy as np

def batches():
    rng = np.random.default_rng(0)
    return [(rng.standard_normal(({size}, 784), dtype=np.float32), {labels}) for _ in range({count})]
"""


def data_file(folder: Path, size: int = 8, count: int = 6, labels: str = "rng.integers(0, 10, {size})") -> str:
    """``FILE.py:batches``: ``count`` standard-normal batches of ``size`` with ``labels``."""
    (folder / "data.py").write_text(DATA.format(size=size, count=count, labels=labels.format(size=size)))
    return f"{folder / 'data.py'}:batches"


def doctor(argv, capsys) -> tuple[int, str, str]:
    return bnlab(["doctor", *argv], capsys)


def subprocess_doctor(argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bnlab", "doctor", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_with_src(),
        **kwargs,
    )


# ---------------------------------------------------------------- checkpoints, run directories


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real bnlab run directory (784-16-16-10, one epoch)."""
    from bnlab.cli import main

    run = tmp_path_factory.mktemp("runs") / "answer-seed0"
    assert main(["train", "--preset", "answer", *TINY, "--out", str(run), "--quiet"]) == 0
    return run


def test_an_empty_checkpoint_is_exit_2(tmp_path, capsys):
    (tmp_path / "empty.pt").touch()
    argv = [f"{model_file(tmp_path)}:Net", "--input-shape", "8,784", "--checkpoint", tmp_path / "empty.pt"]
    code, _, err = doctor(argv, capsys)
    assert code == 2
    assert_clear_error(err, "empty.pt is empty (0 bytes)", "torch.save(model.state_dict(), PATH)")


def test_a_run_directory_with_an_empty_checkpoint_is_exit_2(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "checkpoint.pt").write_bytes(b"")
    code, _, err = doctor([run], capsys)
    assert code == 2
    assert_clear_error(err, "checkpoint.pt is empty (0 bytes)")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_that_would_run_code_is_refused_as_such(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"l1.weight": _RunsCode()}, path)  # what torch.save writes for a hostile object
    code, _, err = doctor([f"{model_file(tmp_path)}:Net", "--input-shape", "8,784", "--checkpoint", path], capsys)
    assert code == 2
    assert_clear_error(err, "evil.pt was refused: loading it would run code", "system")
    assert "corrupt" not in err


# -------------------------------------------------------------------- sizes from user input


@pytest.mark.parametrize("shape", ["99999999999999999999,784", "40000000,784", "1000,1000,1000,1000"])
def test_an_input_shape_too_large_to_allocate_is_refused_before_allocating(shape, tmp_path, capsys):
    code, out, err = doctor([f"{model_file(tmp_path)}:Net", "--input-shape", shape], capsys)
    assert code == 2 and out == ""
    assert_clear_error(err, f"a probe batch of shape {shape}", "GiB", "of this machine's memory", "smaller batch")


def test_a_batch_size_too_large_to_allocate_is_refused_too(tmp_path, capsys):
    code, _, err = doctor([f"{model_file(tmp_path)}:Net", "--input-shape", "8,784", "--batch-size", "40000000"], capsys)
    assert code == 2
    assert_clear_error(err, "a probe batch of shape 40000000,784", "GiB")


def test_the_batches_kept_from_a_data_file_are_bounded(tmp_path, capsys, monkeypatch):
    # As on a machine with 64 KB for batches: 3 batches of 8x784 float32 exceed it.
    monkeypatch.setattr(sources, "memory_limit", lambda: 64 << 10)
    code, _, err = doctor([f"{model_file(tmp_path)}:Net", "--data", data_file(tmp_path, count=100)], capsys)
    assert code == 2
    assert_clear_error(err, "batches of", "lower --max-batches")


# ---------------------------------------------------------------------------- flags, messages


@pytest.mark.parametrize("lr", ["1e300", "inf", "nan", "0", "-0.1", "11"])
def test_an_insane_learning_rate_is_refused_with_the_reason(lr, tmp_path, capsys):
    code, _, err = doctor([f"{model_file(tmp_path)}:Net", "--input-shape", "8,784", "--lr", lr], capsys)
    assert code == 2
    assert_clear_error(err, "--lr must be a positive number of at most 10", "Adam")


def test_a_failing_backward_pass_does_not_blame_the_labels(tmp_path, capsys):
    prelude = """
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("backward refused")
    """
    path = model_file(tmp_path, prelude, forward="return self.l2(F.relu(self.bn1(Boom.apply(self.l1(x)))))")
    code, _, err = doctor([f"{path}:Net", "--input-shape", "8,784", "--train-steps", "2"], capsys)
    assert code == 2
    assert_clear_error(err, "training step 1 failed: RuntimeError: backward refused", "backward pass")
    assert "labels" not in err


def test_labels_outside_the_classes_blame_the_labels(tmp_path, capsys):
    path = data_file(tmp_path, labels="np.full({size}, 99)")
    code, _, err = doctor([f"{model_file(tmp_path)}:Net", "--data", path], capsys)
    assert code == 2
    assert_clear_error(err, "training step 1 failed", "labels fit the model's output")


def test_a_float64_model_is_probed_in_float64(tmp_path, capsys):
    path = model_file(tmp_path, init="self.double()")
    code, out, err = doctor([f"{path}:Net", "--input-shape", "64,784", "--train-steps", "3", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["exit_code"] == 0
    fixed = tmp_path / "fixed"
    code, _, err = doctor([f"{path}:Net", "--data", "mnist", "--train-steps", "2", "--fix", fixed], capsys)
    assert code == 0, err
    state = torch.load(fixed / "model.pt", weights_only=True)
    assert state["l1.weight"].dtype == torch.float64


# --------------------------------------------------------------- the user's code moves things


def test_a_model_that_changes_directory_moves_neither_fix_nor_data(tmp_path, capsys, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    model_file(work, prelude=f"os.chdir({str(elsewhere)!r})")
    data_file(work, size=32, count=12)
    (elsewhere / "data.py").write_text("def batches():\n    raise RuntimeError('the wrong data.py')\n")
    monkeypatch.chdir(work)
    code, out, err = doctor(["net.py:Net", "--data", "data.py:batches", "--train-steps", "2", "--fix", "out"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (work / "out").iterdir()) == ["HOW_TO_LOAD.txt", "model.pt", "repair.json"]
    assert list(elsewhere.iterdir()) == [elsewhere / "data.py"]
    assert f"wrote {work / 'out' / 'model.pt'}" in out
    assert Path.cwd() == work  # the process gets its working directory back


# ------------------------------------------------------------------------- stdout and --json


@pytest.mark.parametrize("output", [["--json"], ["--format", "json"], ["--format", "sarif"]])
def test_json_stays_parseable_whatever_the_model_prints(output, tmp_path):
    path = model_file(
        tmp_path,
        prelude='print("printed at import")\nos.write(1, b"written to fd 1 at import\\n")',
        forward='print("printed in forward"); os.write(1, b"fd 1 in forward\\n")',
    )
    child = subprocess_doctor([f"{path}:Net", "--input-shape", "16,784", "--train-steps", "2", *output])
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert json.loads(out)  # the report alone: a JSON report or a SARIF log
    for text in ("printed at import", "written to fd 1 at import", "printed in forward", "fd 1 in forward"):
        assert text in err and text not in out


def test_text_output_keeps_the_models_prints_in_place(tmp_path, capsys):
    path = model_file(tmp_path, prelude='print("printed at import")')
    code, out, _ = doctor([f"{path}:Net", "--input-shape", "16,784"], capsys)
    assert code == 0 and "printed at import" in out  # without --json nothing is moved


# -------------------------------------------------------------------------------- Ctrl-C


def _wait_for(condition, child: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_ctrl_c_says_what_the_doctor_left(tmp_path):
    marker = tmp_path / "forward-started"
    path = model_file(tmp_path, forward=f"open({str(marker)!r}, 'w').close(); time.sleep(0.2)")
    out_dir = tmp_path / "fixed"
    child = subprocess_doctor([f"{path}:Net", "--data", "mnist", "--fix", out_dir])
    _wait_for(marker.exists, child)
    os.kill(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130
    assert_clear_error(err, "bnlab doctor: interrupted", f"--fix {out_dir} is as it was")
    assert "resume" not in err and "finished runs" not in err
    assert not out_dir.exists()


def test_ctrl_c_while_the_repair_is_written_leaves_out_as_it_was(tmp_path):
    # 256 MB of weights: writing them takes long enough to be interrupted in the middle.
    path = model_file(tmp_path, init='self.register_buffer("ballast", torch.zeros(1 << 26))')
    out_dir = tmp_path / "fixed"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    child = subprocess_doctor(
        [f"{path}:Net", "--data", "mnist", "--train-steps", "0", "--batch-size", "2000", "--fix", out_dir]
    )
    _wait_for(lambda: any(p.name.startswith(".model.pt.") for p in out_dir.iterdir()), child, timeout=300)
    os.kill(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert_clear_error(err, "interrupted", "is as it was")
    assert sorted(p.name for p in out_dir.iterdir()) == ["notes.txt"]


# -------------------------------------------------------------- full and read-only disks


def _fix_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // 4096) * 4096  # what a file takes on a tmpfs


def test_a_full_disk_leaves_no_half_repair_and_the_rerun_works(tmpfs, tmp_path, capsys):  # noqa: F811
    path = model_file(tmp_path)
    argv = [f"{path}:Net", "--data", "mnist", "--train-steps", "0", "--fix"]
    measured = tmp_path / "measured"
    assert doctor([*argv, measured], capsys)[0] == 0
    disk = tmpfs("disk", "1m")
    # Room for model.pt and repair.json, not for HOW_TO_LOAD.txt: written one after the other,
    # the first two would be left without the third, and a rerun would refuse them.
    fill(disk, leave_bytes=_pages(measured / "model.pt") + _pages(measured / "repair.json"))
    out_dir = disk / "fixed"
    code, _, err = doctor([*argv, out_dir], capsys)
    assert code == 2
    assert_clear_error(err, f"cannot write {out_dir}", "the disk is full; free some space or choose another --fix")
    assert not out_dir.exists() and no_temp_files(disk)
    (disk / "filler.bin").unlink()
    code, _, err = doctor([*argv, out_dir], capsys)
    assert code == 0, err
    assert _fix_files(out_dir) == ["HOW_TO_LOAD.txt", "model.pt", "repair.json"]


def test_overwrite_without_room_for_the_new_set_keeps_the_earlier_repair(tmpfs, tmp_path, capsys):  # noqa: F811
    path = model_file(tmp_path)
    disk = tmpfs("disk", "1m")
    out_dir = disk / "fixed"
    argv = [f"{path}:Net", "--data", "mnist", "--train-steps", "0", "--fix", out_dir]
    assert doctor(argv, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    fill(disk, leave_bytes=_pages(out_dir / "model.pt") + _pages(out_dir / "repair.json"))
    code, _, err = doctor([*argv, "--overwrite", "--seed", "1"], capsys)
    assert code == 2
    assert_clear_error(err, "the disk is full", "--fix")
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before and no_temp_files(disk)


def test_fix_on_a_read_only_file_system_is_refused_before_the_work(tmpfs, tmp_path, capsys):  # noqa: F811
    path = model_file(tmp_path)
    disk = tmpfs("ro", "1m")
    (disk / "existing").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    for out_dir in (disk / "new" / "deeper", disk / "existing"):
        code, out, err = doctor([f"{path}:Net", "--data", "mnist", "--fix", out_dir], capsys)
        assert code == 2 and out == ""
        assert_clear_error(err, f"cannot write {out_dir}", "read-only; choose another --fix")
        assert "--out" not in err


@pytest.mark.parametrize("where", ["a-file", "a-file/sub"])
def test_fix_where_a_file_stands_is_refused_before_the_work(where, tmp_path, capsys):
    (tmp_path / "a-file").write_text("mine")
    code, out, err = doctor([f"{model_file(tmp_path)}:Net", "--data", "mnist", "--fix", tmp_path / where], capsys)
    assert code == 2 and out == ""
    assert_clear_error(err, "--fix")
    assert (tmp_path / "a-file").read_text() == "mine"

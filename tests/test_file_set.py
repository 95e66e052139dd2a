"""``rundir.write_file_set``: a set of files (the doctor's ``--fix`` output) appears whole or not
at all, on a real full disk, a real read-only file system and a real Ctrl-C."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnlab.errors import OutputError
from bnlab.rundir import write_file_set
from test_failures_fs import tmpfs  # noqa: F401 - the fixture


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_the_set_appears_and_user_files_stay(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    written = write_file_set(tmp_path, {"a.bin": b"1", "b.json": b"{}"}, option="--fix")
    assert [p.name for p in written] == ["a.bin", "b.json"]
    assert _names(tmp_path) == ["a.bin", "b.json", "notes.txt"]
    assert oct((tmp_path / "a.bin").stat().st_mode & 0o777) == "0o644"


def test_an_existing_file_stops_the_whole_set_before_anything_is_published(tmp_path):
    (tmp_path / "b.json").write_text("the user's")
    with pytest.raises(OutputError, match=r"--fix .*b.json already exists; nothing was written"):
        write_file_set(tmp_path, {"a.bin": b"1", "b.json": b"{}"}, option="--fix")
    assert _names(tmp_path) == ["b.json"] and (tmp_path / "b.json").read_text() == "the user's"


def test_replace_keeps_the_old_set_until_the_new_one_is_complete(tmp_path):
    write_file_set(tmp_path, {"a": b"old a", "b": b"old b"})
    write_file_set(tmp_path, {"a": b"new a", "b": b"new b"}, replace=True)
    assert (tmp_path / "a").read_bytes() == b"new a" and _names(tmp_path) == ["a", "b"]


def test_a_full_disk_leaves_nothing_and_names_the_option(tmpfs):  # noqa: F811
    disk = tmpfs("small", "1m")
    out = disk / "fixed"
    with pytest.raises(OutputError, match=r"the disk is full; free some space or choose another --fix"):
        write_file_set(out, {"small.txt": b"x", "big.bin": b"0" * (2 << 20)}, option="--fix")
    assert not out.exists() and _names(disk) == []


def test_a_read_only_file_system_is_named_with_the_option(tmpfs):  # noqa: F811
    disk = tmpfs("ro", "1m")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(OutputError, match=r"read-only; choose another --fix"):
        write_file_set(disk / "fixed" / "deeper", {"a": b"1"}, option="--fix")


CHILD = """
import sys
from pathlib import Path
from bnlab.rundir import write_file_set
write_file_set(Path(sys.argv[1]), {"first.txt": b"1", "huge.bin": b"0" * (1 << 28)}, option="--fix")
"""


def test_ctrl_c_while_staging_leaves_nothing(tmp_path):
    out = tmp_path / "fixed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(name.startswith(".huge.bin.") for name in _names(out)):  # the big file is being written
        assert child.poll() is None and time.monotonic() < deadline, "the child ended before the signal"
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    assert not out.exists()  # the folder it created is gone again, with the staged first.txt

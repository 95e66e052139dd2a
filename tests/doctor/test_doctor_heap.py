"""The ``bnlab doctor`` process keeps freed large blocks for reuse; ``bnlab.doctor.check`` does not.

Each case runs in a fresh interpreter (the setting is process-wide) and then counts the minor
page faults of mallocing, filling and freeing a 64 MiB block four times: under glibc's own
settings every round maps fresh pages (16384 faults a round), with the doctor's setting the
block is reused and faults once at most.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")
if not sys.platform.startswith("linux"):
    pytest.skip("mallopt is glibc's (Linux)", allow_module_level=True)

SRC = Path(__file__).resolve().parents[2] / "src"
ROUNDS, BLOCK = 4, 64 << 20
PAGES = BLOCK // os.sysconf("SC_PAGE_SIZE")

MODEL = """
from torch import nn

def build():
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
"""

# After the doctor's work, count the faults of ROUNDS x (malloc, fill, free) of one 64 MiB block.
FAULTS = f"""
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def churn():
    p = libc.malloc({BLOCK}); ctypes.memset(p, 1, {BLOCK}); libc.free(p)
churn()  # the first round may grow the heap: not counted
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({ROUNDS}):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_after(script: str, tmp_path: Path) -> int:
    (tmp_path / "tiny.py").write_text(MODEL)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("GLIBC_TUNABLES", None)  # the C library's own defaults, whatever the shell set
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script) + FAULTS],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


def test_the_doctor_command_reuses_freed_blocks(tmp_path: Path) -> None:
    script = """
    import contextlib, io
    from bnlab.doctor.command import main
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["tiny.py:build", "--input-shape", "16,8"]) in (0, 1)
    """
    assert _faults_after(script, tmp_path) < PAGES // 2


def test_the_library_leaves_the_allocator_alone(tmp_path: Path) -> None:
    script = """
    import torch
    import bnlab.doctor
    from tiny import build
    bnlab.doctor.check(build(), torch.randn(16, 8))
    """
    assert _faults_after(script, tmp_path) >= ROUNDS * PAGES * 9 // 10

"""Keeping the doctor's own output and paths apart from what the user's code does.

The doctor imports and runs code it did not write. That code may print (at import, in
``forward``), which would corrupt a machine-read report on stdout (``--json``), and it may
call ``os.chdir``, which would move every relative path the user typed. So the command line
resolves its paths before any user code runs (:func:`absolute`), sends what the user's code
prints to stderr while a machine-read report is due (:func:`prints_to_stderr`), and gives
the process its working directory back afterwards (:func:`kept_cwd`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def absolute(path: str | None) -> str | None:
    """``path`` made absolute against the working directory as it is now (None stays None)."""
    return None if path is None else os.path.abspath(path)


def absolute_spec(spec: str) -> str:
    """``FILE.py:NAME`` with FILE made absolute; anything else (a malformed spec the
    loader will explain) unchanged."""
    path, sep, name = spec.rpartition(":")
    return f"{os.path.abspath(path)}:{name}" if sep and path else spec


def _flush_c_stdio() -> None:
    """Flush C's stdio buffers (a C extension's printf), so they land where fd 1 points now."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def prints_to_stderr(enabled: bool = True) -> Iterator[None]:
    """While it lasts, Python's ``print`` and writes to file descriptor 1 (C extensions,
    subprocesses) go to stderr; stdout is left for the report printed afterwards."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    _flush_c_stdio()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedded interpreter): Python-level only
        saved = -1
    if saved >= 0:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        _flush_c_stdio()
        if saved >= 0:
            os.dup2(saved, 1)
            os.close(saved)


@contextlib.contextmanager
def kept_cwd() -> Iterator[None]:
    """Give the process back the working directory it had, whatever the user's code did."""
    before = os.getcwd()
    try:
        yield
    finally:
        try:
            now: str | None = os.getcwd()
        except OSError:  # the user's code removed the folder it moved to
            now = None
        if now != before:
            with contextlib.suppress(OSError):
                os.chdir(before)

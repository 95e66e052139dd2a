"""Keras for the doctor's tests, on its torch backend, or on the backend named by
BNLAB_TEST_KERAS_BACKEND (`make test` runs the Keras tests a second time with "tensorflow").

Keras reads KERAS_BACKEND once, at its first import; the variable is set only around
that import so that other tests' subprocesses do not inherit it.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest


def import_keras() -> ModuleType:
    """``keras`` on the torch backend (it shares the process with the torch tests) or the
    one BNLAB_TEST_KERAS_BACKEND names, or skip."""
    previous = os.environ.get("KERAS_BACKEND")
    os.environ["KERAS_BACKEND"] = os.environ.get("BNLAB_TEST_KERAS_BACKEND", "torch")
    try:
        return pytest.importorskip("keras")
    finally:
        if previous is None:
            os.environ.pop("KERAS_BACKEND", None)
        else:
            os.environ["KERAS_BACKEND"] = previous

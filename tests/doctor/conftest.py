"""Fixtures for the doctor's tests: one thread, real MNIST, the examples folder."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # the machine's cores are shared

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    """Folder of the real MNIST files, as ``bnlab.data`` finds it (skip if it can't)."""
    data = pytest.importorskip("bnlab.data")
    try:
        return str(data.load_mnist().source)
    except Exception as err:  # noqa: BLE001 - no data here: these tests can't run
        pytest.skip(f"MNIST not available: {err}")


@pytest.fixture(scope="session")
def mnist_arrays(mnist_dir):
    """MNIST as float32 (n, 784) arrays: (train_x, train_y, test_x, test_y)."""
    from bnlab.data import load_mnist, to_float

    data = load_mnist(mnist_dir)
    return (
        to_float(data.train_images),
        np.asarray(data.train_labels).astype(np.int64),
        to_float(data.test_images),
        np.asarray(data.test_labels).astype(np.int64),
    )


@pytest.fixture(scope="module")
def examples_on_path():
    """The examples importable by module name (``import question_torch``)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield EXAMPLES
    finally:
        sys.path.remove(str(EXAMPLES))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "full_zoo: the rest of the real-model zoo; runs with BNLAB_FULL_ZOO=1")

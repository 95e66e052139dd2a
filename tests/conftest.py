"""Shared fixtures: real MNIST (never a mock of the data path) and single-threaded torch."""

import signal

import pytest
import torch

# A shell without job control starts a background job with SIGINT ignored (`pytest &`), and
# an ignored signal stays ignored in every child: the Ctrl-C tests' `bnlab` processes would
# never see their SIGINT. A handled signal is reset to the default in a child, so handle it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # Tests share a 2-core machine with each other and with CI's other work.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist():
    from bnlab.data import load_mnist

    return load_mnist()


@pytest.fixture
def isolated_data_env(tmp_path, monkeypatch):
    """bnlab.data sees no user settings or system copy; its cache is tmp_path/"xdg"."""
    from bnlab import data

    for var in ["BNLAB_DATA_DIR", *data.ENV_MIRRORS.values()]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data, "SYSTEM_ROOT", tmp_path / "no-system")
    return tmp_path

"""Shared fixtures: real MNIST (never a mock of the data path) and single-threaded torch;
and the rule that a test never passes CI by skipping for want of a framework."""

import os
import re
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


# `make test` names the frameworks each environment must have (BNLAB_REQUIRE_FRAMEWORKS): a
# test that skips because one of them cannot be imported has found a broken install, not an
# optional extra, so it fails. A test skipping for want of Chainer must carry the `chainer`
# mark, or it would run in neither environment.
_MISSING = re.compile(r"could not import '([\w.]+)'")


def _required_frameworks() -> set[str]:
    return {name.strip() for name in os.environ.get("BNLAB_REQUIRE_FRAMEWORKS", "").split(",") if name.strip()}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return
    found = _MISSING.search(str(report.longrepr[2]))
    if found is None:
        return
    module = found.group(1).split(".")[0]
    if module in _required_frameworks():
        report.outcome = "failed"
        report.longrepr = f"{module} is required in this environment (BNLAB_REQUIRE_FRAMEWORKS) but: {found.group(0)}"
    elif module == "chainer" and item.get_closest_marker("chainer") is None:
        report.outcome = "failed"
        report.longrepr = "this test needs Chainer: mark it @pytest.mark.chainer so `make test-chainer` runs it"

"""The wheel a user installs: it carries the vendored MNIST (so bnlab trains offline), the
licence and the type marker. Built from a copy of the source tree, without network."""

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bnlab import data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = out.glob("bnlab-*.whl")
    return found


@pytest.mark.slow
def test_the_wheel_ships_mnist_the_licence_and_py_typed(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for fname, digest in data.SHA256["mnist"].items():
            member = f"bnlab/_data/mnist/{fname}"
            assert member in names, member
            assert hashlib.sha256(z.read(member)).hexdigest() == digest  # the canonical bytes
        assert {"bnlab/_data/mnist/SHA256SUMS", "bnlab/_data/mnist/README.md", "bnlab/py.typed"} <= names
        # setuptools >= 70 puts it under .dist-info/licenses/, older ones in .dist-info/.
        licence = next(n for n in names if ".dist-info/" in n and n.endswith("/LICENSE"))
        assert z.read(licence).decode().startswith("MIT License")
        # The attribution MNIST's licence (CC BY-SA 3.0) asks for travels with the files.
        assert "CC BY-SA 3.0" in z.read("bnlab/_data/mnist/README.md").decode()
        assert not any(n.startswith(("tests/", "data/")) for n in names)


def test_the_vendored_copy_is_found_inside_the_package(isolated_data_env):
    # The same relative place in a checkout (src/bnlab/_data) and in site-packages.
    assert data.VENDORED_ROOT == Path(data.__file__).resolve().parent / "_data"
    assert data.find_data_dir("mnist", download=False) == data.VENDORED_ROOT / "mnist"


@pytest.mark.slow
def test_installing_bnlab_leaves_numpy_2_alone(wheel):
    """bnlab's base dependencies accept numpy 2: `pip install` into a modern environment (the
    .venv this suite runs in has numpy 2, torch, TF, JAX) installs bnlab and nothing else; no
    downgrade to numpy<2 (which only Chainer 7.8.1 needs, in its own environment)."""
    import json

    import numpy

    assert int(numpy.__version__.split(".")[0]) >= 2, "the modern environment must hold numpy 2"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet", "--report", "-", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    would_install = {item["metadata"]["name"].lower() for item in json.loads(done.stdout)["install"]}
    assert would_install == {"bnlab"}, would_install

"""The doctor points at code: the line that creates each norm layer and the line of each call.

Line numbers are looked up in the model files by their text (``self.bn = ``), never written
down here, so editing an example does not break these tests -- moving a line does not fix them.
"""

from __future__ import annotations

import functools
import json
import sys
import textwrap
from pathlib import Path

import pytest

from bnlab.doctor import check, locations
from bnlab.doctor.command import main
from bnlab.doctor.findings import Report

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def line_of(path: Path, text: str, nth: int = 1) -> int:
    """1-based number of the ``nth`` line of ``path`` containing ``text``."""
    hits = [i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    assert len(hits) >= nth, f"{text!r} is not in {path} {nth} times"
    return hits[nth - 1]


def doctor_json(argv: list[str], capsys) -> dict:
    status = main([*argv, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert status == data["exit_code"]
    return data


def shared(data: dict) -> dict:
    found = [f for f in data["findings"] if f["check"] == "shared-bn"]
    assert len(found) == 1, data["findings"]
    return found[0]


def expect_question_lines(finding: dict, file: str, created: int, calls: list[int]) -> None:
    assert finding["definitions"] == [{"layer": "bn", "file": file, "line": created}]
    assert [(s["site"], s["file"], s["line"]) for s in finding["call_sites"]] == [
        (f"call {i} after l{i}", file, line) for i, line in enumerate(calls, 1)
    ]


# -- the question's model in each framework ------------------------------------------


def test_torch_question_names_creation_and_both_calls(monkeypatch, capsys, mnist_dir) -> None:
    monkeypatch.chdir(REPO)
    path = EXAMPLES / "question_torch.py"
    created = line_of(path, "self.bn = nn.BatchNorm1d")
    calls = [line_of(path, "self.bn(self.l1(x))"), line_of(path, "self.bn(self.l2(h))")]
    target = "examples/question_torch.py:MyModel"
    argv = [target, "--data", "mnist", "--data-dir", mnist_dir, "--train-steps", "0"]
    finding = shared(doctor_json(argv, capsys))
    expect_question_lines(finding, "examples/question_torch.py", created, calls)
    # The text report shows the same lines, each as file:line (clickable in editors).
    assert main(argv) == 1
    text = capsys.readouterr().out
    assert f"code: examples/question_torch.py:{created}: bn created" in text
    for i, line in enumerate(calls, 1):
        assert f"examples/question_torch.py:{line}: call {i} after l{i}" in text


# (text, n): the n-th line containing text; the subclassed model comes first in the file.
KERAS_LINES = {
    "MyModel": [("bn = layers.BatchNormalization", 1), ("self.bn(self.l1(x)", 1), ("self.bn(self.l2(h)", 1)],
    "functional_model": [("bn = layers.BatchNormalization", 2), ("(bn(", 1), ("(bn(", 2)],
}


@pytest.mark.parametrize("name", sorted(KERAS_LINES))
def test_keras_question_names_creation_and_both_calls(name: str, monkeypatch, capsys, mnist_dir) -> None:
    """Subclassed: calls read from the stack. Functional: the layer is applied while the
    graph is built (the probe runs it from Keras's graph): those lines are recorded then."""
    from keras_import import import_keras

    import_keras()
    monkeypatch.chdir(REPO)
    path = EXAMPLES / "question_keras.py"
    created, *calls = [line_of(path, text, nth) for text, nth in KERAS_LINES[name]]
    argv = [f"examples/question_keras.py:{name}", "--data", "mnist", "--data-dir", mnist_dir, "--train-steps", "2"]
    finding = shared(doctor_json(argv, capsys))
    expect_question_lines(finding, "examples/question_keras.py", created, calls)


@pytest.mark.chainer
def test_chainer_question_names_creation_and_both_calls(monkeypatch, capsys, mnist_dir) -> None:
    pytest.importorskip("chainer")
    monkeypatch.chdir(REPO)
    path = EXAMPLES / "question_chainer.py"
    created = line_of(path, "self.bn = L.BatchNormalization")
    calls = [line_of(path, "self.bn(self.l1(x))"), line_of(path, "self.bn(self.l2(h))")]
    argv = ["examples/question_chainer.py:MyModel", "--data", "mnist", "--data-dir", mnist_dir, "--train-steps", "2"]
    finding = shared(doctor_json(argv, capsys))
    expect_question_lines(finding, "examples/question_chainer.py", created, calls)


def test_flax_nnx_question_names_creation_and_both_calls(monkeypatch, capsys, mnist_dir) -> None:
    """nnx: the calls are read from the stack while JAX traces the forward pass."""
    pytest.importorskip("flax")
    monkeypatch.chdir(REPO)
    path = EXAMPLES / "question_flax.py"
    created = line_of(path, "self.bn = nnx.BatchNorm")
    calls = [line_of(path, "self.bn(self.l1(x))"), line_of(path, "self.bn(self.l2(h))")]
    argv = ["examples/question_flax.py:MyModel", "--data", "mnist", "--data-dir", mnist_dir, "--train-steps", "2"]
    finding = shared(doctor_json(argv, capsys))
    expect_question_lines(finding, "examples/question_flax.py", created, calls)


# -- how lines are found -------------------------------------------------------------


MODEL = """\
    from torch import nn
    import madebylib


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(6, 8)
            self.blocks = nn.Sequential(*[nn.BatchNorm1d(8) for _ in range(2)])  # in a list
            self.lib_bn = madebylib.make_bn(8)

        def forward(self, x):
            h = self.blocks(self.l1(x))
            return self.lib_bn(h)
    """

LIBRARY = """\
    from torch import nn


    def make_bn(channels):
        return nn.BatchNorm1d(channels)


    def apply(bn, x):
        return bn(x)
    """


@pytest.fixture
def user_and_library(tmp_path: Path, monkeypatch) -> Path:
    """A model file in the working directory, and a module in a site-packages folder."""
    site = tmp_path / "lib" / "site-packages"
    site.mkdir(parents=True)
    (site / "madebylib.py").write_text(textwrap.dedent(LIBRARY))
    model = tmp_path / "net.py"
    model.write_text(textwrap.dedent(MODEL))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.chdir(tmp_path)
    return model


def test_sequential_children_and_library_layers(user_and_library: Path, capsys) -> None:
    """Layers made in a comprehension inside Sequential get their line; a layer made inside
    an installed package names that package's file and says it is not the user's."""
    data = doctor_json(["net.py:Net", "--input-shape", "16,6"], capsys)
    layers = {entry["layer"]: entry for f in data["findings"] for entry in f["definitions"]}
    in_list = line_of(user_and_library, "nn.Sequential(")
    assert layers["blocks.0"] == {"layer": "blocks.0", "file": "net.py", "line": in_list}
    assert layers["blocks.1"]["line"] == in_list
    lib = layers["lib_bn"]
    assert lib["library"] == "madebylib" and lib["file"].endswith("madebylib.py")
    assert lib["line"] == line_of(Path(lib["file"]), "return nn.BatchNorm1d")
    main(["net.py:Net", "--input-shape", "16,6"])
    text = capsys.readouterr().out
    assert f"madebylib.py:{lib['line']}: lib_bn created (in madebylib, not your files)" in text
    assert f"net.py:{in_list}: blocks.0, blocks.1 created" in text  # one line of code, named once


def test_loader_puts_the_classes_back(user_and_library: Path) -> None:
    from torch import nn

    from bnlab.doctor.loader import load_model

    before = nn.modules.batchnorm._NormBase.__init__
    model = load_model("net.py:Net")
    assert nn.modules.batchnorm._NormBase.__init__ is before
    assert "__init__" not in vars(nn.BatchNorm1d)
    assert locations.created_at(model.l1) is None  # only norm layers are noted
    created = locations.created_at(model.blocks[0])
    assert created is not None
    assert created.to_dict() == {"file": "net.py", "line": line_of(user_and_library, "nn.Sequential(")}


class Shared:
    """A model built by the test itself (not through the doctor's loader)."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.l1, self.l2, self.bn = nn.Linear(6, 8), nn.Linear(8, 8), nn.BatchNorm1d(8)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                h = self.bn(self.l1(x))  # first call
                return self.bn(self.l2(h))  # second call

        return Net()


def test_api_model_has_call_lines_but_no_creation_line() -> None:
    """check() on a model built beforehand: the calls are found on the stack, the creation
    line is not known (the doctor did not see the model being built) and not invented."""
    import torch

    report = check(Shared.build(), torch.randn(32, 6))
    finding = report.by_check("shared-bn")[0]
    here = Path(__file__)
    assert finding.definitions == []
    assert [(s["file"], s["line"]) for s in finding.call_sites] == [
        (locations.shown(str(here)), line_of(here, "# first call")),
        (locations.shown(str(here)), line_of(here, "# second call")),
    ]
    assert "created" not in report.to_text()
    assert f"{Path(__file__).name}:{line_of(here, '# first call')}</code>" in report._repr_html_()
    assert Report.from_json(report.to_json()) == report


def _module(name: str, source: str, **names) -> dict:
    """Functions compiled as if they were module ``name`` (frames are classified by it)."""
    namespace = {"__name__": name, "sys": sys, **names}
    exec(compile(textwrap.dedent(source), f"/nowhere/{name.replace('.', '/')}.py", "exec"), namespace)
    return namespace


def test_innermost_frame_stops_at_the_doctor() -> None:
    """hook (bnlab) <- framework <- user code <- doctor: the user's line. hook <- framework
    <- doctor: nothing, not the line of whoever called the doctor (this test)."""
    hook = _module(
        "bnlab.doctor.fake_hook", "def hook():\n    return innermost(sys._getframe(0))\n", innermost=locations.innermost
    )
    framework = _module("torch.fake", "def run(f):\n    return f()\n")
    doctor = _module("bnlab.doctor.fake_probe", "def probe(f):\n    return f()\n")

    def user_forward():
        return framework["run"](hook["hook"])  # the user's line

    # functools.partial adds no Python frame of this file between the doctor and the framework
    found = doctor["probe"](functools.partial(framework["run"], user_forward))
    assert found is not None
    assert found.to_dict() == {"file": locations.shown(__file__), "line": line_of(Path(__file__), "# the user's line")}
    assert doctor["probe"](functools.partial(framework["run"], hook["hook"])) is None

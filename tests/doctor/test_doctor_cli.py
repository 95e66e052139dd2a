"""``bnlab doctor`` on the command line: exit codes 0 / 1 / 2 and their messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnlab.doctor.command import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

MLP_SOURCE = """
import torch.nn.functional as F
from torch import nn

class {name}(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(20, 16, bias=False)
        self.bn1 = nn.BatchNorm1d(16)
        self.l2 = nn.Linear(16, 16, bias=False)
        self.bn2 = {bn2}
        self.l3 = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.bn1(self.l1(x)))
        h = F.relu(self.bn2(self.l2(h)))
        return self.l3(h)

def build():
    return {name}()
"""


def write(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


@pytest.fixture
def answer_file(tmp_path: Path) -> str:
    return write(tmp_path, "answer.py", MLP_SOURCE.format(name="Net", bn2="nn.BatchNorm1d(16)"))


@pytest.fixture
def question_file(tmp_path: Path) -> str:
    return write(tmp_path, "question.py", MLP_SOURCE.format(name="Net", bn2="self.bn1"))


def test_healthy_model_exits_0(answer_file: str, capsys) -> None:
    assert main([f"{answer_file}:Net", "--input-shape", "64,20", "--train-steps", "40"]) == 0
    assert "-> exit 0" in capsys.readouterr().out


def test_shared_bn_exits_1(question_file: str, capsys) -> None:
    assert main([f"{question_file}:Net", "--input-shape", "64,20"]) == 1
    out = capsys.readouterr().out
    assert "ERROR [shared-bn]" in out and "after l1" in out and "after l2" in out


def test_zero_argument_function_as_name(question_file: str, capsys) -> None:
    assert main([f"{question_file}:build", "--input-shape", "32,20"]) == 1


def test_json_output(question_file: str, capsys) -> None:
    assert main([f"{question_file}:Net", "--input-shape", "32,20", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["exit_code"] == 1
    assert data["findings"][0]["check"] == "shared-bn"
    assert data["probe"]["input_shape"] == [32, 20]


def test_batch_size_replaces_first_dimension(answer_file: str, capsys) -> None:
    argv = [f"{answer_file}:Net", "--input-shape", "64,20", "--batch-size", "48", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["probe"]["input_shape"] == [48, 20]


def usage_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_syntax_error_file(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, "broken.py", "import torch\nclass Net(torch.nn.Module:\n    pass\n")
    err = usage_error([f"{path}:Net", "--input-shape", "4,4"], capsys)
    assert "could not import" in err and "broken.py" in err and "SyntaxError" in err
    assert "line 2" in err and "python " in err  # where, and what to do
    assert "Traceback" not in err and err.count("\n") == 1  # one paragraph


def test_file_whose_import_raises(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, "needs_gpu.py", "raise RuntimeError('CUDA device required')\n")
    err = usage_error([f"{path}:Net", "--input-shape", "4,4"], capsys)
    assert "needs_gpu.py" in err and "RuntimeError: CUDA device required" in err


def test_file_that_exits_on_import(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, "script.py", "import sys\nsys.exit(3)\n")
    err = usage_error([f"{path}:Net", "--input-shape", "4,4"], capsys)
    assert "SystemExit" in err and "__main__" in err


def test_bad_name_lists_candidates(answer_file: str, capsys) -> None:
    err = usage_error([f"{answer_file}:Nett", "--input-shape", "4,20"], capsys)
    assert "no attribute 'Nett'" in err and "Net" in err and "build" in err


@pytest.mark.parametrize(
    "target",
    ["no_colon.py", "missing_file.py:Net", ":Net"],
)
def test_bad_targets(target: str, capsys) -> None:
    usage_error([target, "--input-shape", "4,4"], capsys)


def test_constructor_needing_arguments(tmp_path: Path, capsys) -> None:
    path = write(
        tmp_path,
        "args.py",
        """
        from torch import nn

        class Net(nn.Module):
            def __init__(self, width):
                super().__init__()
        """,
    )
    err = usage_error([f"{path}:Net", "--input-shape", "4,4"], capsys)
    assert "Net()" in err and "TypeError" in err


def test_not_a_model(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, "other.py", "def Net():\n    return 42\n")
    err = usage_error([f"{path}:Net", "--input-shape", "4,4"], capsys)
    assert "Net() returned an int, not a keras.Model, a torch.nn.Module" in err


def test_a_value_that_is_neither_model_nor_function(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, "other.py", "Net = 42\nOther = 'x'\n")
    assert f"{path}:Net is an int, not a model class" in usage_error([f"{path}:Net", "--input-shape", "4,4"], capsys)
    assert f"{path}:Other is a str, not a model class" in usage_error([f"{path}:Other", "--input-shape", "4,4"], capsys)


def test_missing_input_source(answer_file: str, capsys) -> None:
    assert "--data mnist, --data FILE.py:NAME or --input-shape" in usage_error([f"{answer_file}:Net"], capsys)


def test_bad_input_shape(answer_file: str, capsys) -> None:
    usage_error([f"{answer_file}:Net", "--input-shape", "64;20"], capsys)
    usage_error([f"{answer_file}:Net", "--input-shape", "64"], capsys)


def test_input_shape_that_does_not_fit(answer_file: str, capsys) -> None:
    err = usage_error([f"{answer_file}:Net", "--input-shape", "8,21"], capsys)
    assert "forward pass failed" in err


def test_framework_mismatch(answer_file: str, capsys) -> None:
    argv = [f"{answer_file}:Net", "--input-shape", "8,20", "--framework", "chainer"]
    err = usage_error(argv, capsys)
    assert "torch model" in err


def test_argparse_errors_are_exit_2(capsys) -> None:
    assert main([]) == 2
    assert main(["x.py:Net", "--data", "cifar"]) == 2


def test_python_dash_m_entry_point(question_file: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    result = subprocess.run(
        [sys.executable, "-m", "bnlab.doctor", f"{question_file}:Net", "--input-shape", "32,20"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "shared-bn" in result.stdout


# -- real MNIST ------------------------------------------------------------------------


@pytest.fixture
def mnist_args(mnist_dir):
    def build(target: str, *extra: str) -> list[str]:
        return [target, "--data", "mnist", "--data-dir", mnist_dir, *extra]

    return build


def test_question_torch_on_mnist(mnist_args, capsys) -> None:
    code = main(mnist_args(f"{EXAMPLES}/question_torch.py:MyModel", "--train-steps", "60"))
    out = capsys.readouterr().out
    assert code == 1, out
    assert "ERROR [shared-bn]" in out
    assert "call 1 after l1" in out and "call 2 after l2" in out
    assert "1000x784 (MNIST test images)" in out


def test_answer_torch_on_mnist(mnist_args, capsys) -> None:
    target = f"{EXAMPLES}/answer_torch.py:MyModel"
    code = main(mnist_args(target, "--train-steps", "60", "--json"))
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert not [f for f in data["findings"] if f["severity"] != "info"]
    assert data["summary"]["train_eval"]["differ"] < 0.05


def test_conv_model_gets_images_shaped_for_it(mnist_args, tmp_path: Path, capsys) -> None:
    path = write(
        tmp_path,
        "convnet.py",
        """
        from torch import nn

        def build():
            return nn.Sequential(
                nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
        """,
    )
    code = main(mnist_args(f"{path}:build", "--batch-size", "100", "--train-steps", "5", "--json"))
    data = json.loads(capsys.readouterr().out)
    assert data["probe"]["input_shape"] == [100, 1, 28, 28]
    assert code == 0


@pytest.mark.chainer
def test_question_chainer_autodetected(mnist_args, capsys) -> None:
    pytest.importorskip("chainer")
    code = main(mnist_args(f"{EXAMPLES}/question_chainer.py:MyModel", "--json"))
    data = json.loads(capsys.readouterr().out)
    assert code == 1
    assert data["framework"] == "chainer" and data["probe"]["train_steps"] == 60
    shared = [f for f in data["findings"] if f["check"] == "shared-bn"]
    assert shared[0]["sites"] == ["call 1 after l1", "call 2 after l2"]


@pytest.mark.chainer
def test_answer_chainer_forced_framework(mnist_args, capsys) -> None:
    pytest.importorskip("chainer")
    code = main(mnist_args(f"{EXAMPLES}/answer_chainer.py:MyModel", "--framework", "chainer"))
    assert code == 0, capsys.readouterr().out


def test_a_chainer_model_without_chainer_names_the_chainer_environment(monkeypatch, capsys) -> None:
    """The modern environment (numpy 2, JAX) has no Chainer: a Chainer model file is one
    paragraph naming .venv-chainer and how to make it, exit 2, no traceback."""
    monkeypatch.setitem(sys.modules, "chainer", None)  # as in .venv, where Chainer is not installed
    code = main([f"{EXAMPLES}/question_chainer.py:MyModel", "--input-shape", "4,784"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "needs Chainer 7.8.1" in err and "make venv-chainer" in err and ".venv-chainer/bin/bnlab" in err

"""Models the doctor must handle, or refuse with its own one-paragraph message (exit 2)."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import doctor
from bnlab.doctor.command import main
from bnlab.doctor.errors import UnsupportedModel

REPO = Path(__file__).resolve().parents[2]


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(10, 16, bias=False)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.l1(x))))


class LazySmall(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.LazyLinear(16, bias=False)
        self.bn = nn.LazyBatchNorm1d()
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.l1(x))))


class TupleOut(Small):
    def forward(self, x):
        h = F.relu(self.bn(self.l1(x)))
        return self.out(h), h


class DictOut(Small):
    def forward(self, x):
        h = F.relu(self.bn(self.l1(x)))
        return {"features": h, "logits": self.out(h)}


class SharedInSequential(nn.Module):
    """One BN object placed twice in a Sequential (and nested in another)."""

    def __init__(self):
        super().__init__()
        bn = nn.BatchNorm2d(8)
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), bn, nn.ReLU()),
            nn.Conv2d(8, 8, 3, bias=False),
            bn,
            nn.ReLU(),
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class SharedAfterSequentialChild(nn.Module):
    """A shared BN (named '1' inside a Sequential) fed by children of Sequentials."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Sequential(nn.Linear(10, 16, bias=False)), nn.BatchNorm1d(16))
        self.more = nn.Sequential(nn.Linear(16, 16, bias=False))
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.features(x))
        h = F.relu(self.features[1](self.more[0](h)))
        return self.out(h)


def test_lazy_modules_are_materialized_on_the_copy() -> None:
    model = LazySmall()
    report = doctor.check(model, torch.randn(32, 10), train_steps=3)
    assert report.summary["layers"][0]["path"] == "bn"
    assert any("Lazy modules" in note for note in report.notes)
    assert isinstance(model.l1.weight, nn.parameter.UninitializedParameter)  # untouched


@pytest.mark.parametrize(("model", "where"), [(TupleOut, "output[0]"), (DictOut, "output['logits']")])
def test_tuple_and_dict_outputs_are_read_and_named(model, where) -> None:
    report = doctor.check(model(), torch.randn(32, 10), labels=torch.randint(0, 3, (32,)), train_steps=3)
    assert report.probe["train_steps"] == 3
    assert where in report.probe["output"]
    assert "acc_eval" in report.summary["train_eval"]


def test_torchscript_is_refused_clearly() -> None:
    with pytest.raises(UnsupportedModel, match="TorchScript"):
        doctor.check(torch.jit.script(Small()), torch.randn(8, 10))
    with pytest.raises(UnsupportedModel, match="TorchScript"):
        doctor.watch(torch.jit.script(Small()))


def _code_lines(fix_code: str) -> list[str]:
    return [line.split("  #")[0] for line in fix_code.splitlines() if line.startswith(("self.", "model."))]


@pytest.mark.parametrize(
    ("model", "x"),
    [
        (SharedInSequential, torch.randn(16, 3, 12, 12)),
        (SharedAfterSequentialChild, torch.randn(32, 10)),
    ],
)
def test_fix_sketches_are_valid_python_for_sequential_children(model, x) -> None:
    (finding,) = doctor.check(model(), x).by_check("shared-bn")
    lines = _code_lines(finding.fix_code)
    assert lines
    for line in lines:
        ast.parse(line)  # SyntaxError for self.1_features_0_0 or self.layer1.0.conv2
    assert "self.1" not in finding.fix_code and ".0." not in finding.fix_code


def test_shared_bn_in_sequential_sketch_replaces_the_second_place() -> None:
    (finding,) = doctor.check(SharedInSequential(), torch.randn(16, 3, 12, 12)).by_check("shared-bn")
    assert "model.features[2] = nn.BatchNorm2d(8, eps=1e-05, momentum=0.1)" in finding.fix_code


def test_numbers_print_as_written() -> None:
    model = SharedAfterSequentialChild()
    model.features[1].momentum = 1 - 0.9  # 0.09999999999999998
    assert model.features[1].momentum != 0.1  # the test really uses the awkward float
    keras_style = Small()
    keras_style.bn.momentum = 0.9
    for report in (doctor.check(model, torch.randn(32, 10)), doctor.check(keras_style, torch.randn(32, 10))):
        text = str(report)
        assert "momentum=0.1" in text, text
        assert "0.0999" not in text and "0.0999" not in report.to_json()


def write(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def test_sys_exit_in_the_constructor_is_exit_2(tmp_path: Path, capsys) -> None:
    path = write(
        tmp_path,
        "exits.py",
        """
        import sys
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                sys.exit(4)
    """,
    )
    assert main([f"{path}:Net", "--input-shape", "4,4"]) == 2
    err = capsys.readouterr().err
    assert "sys.exit" in err and "Net()" in err and "Traceback" not in err


def test_sys_exit_at_import_is_exit_2(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, "script.py", "import sys\nsys.exit(4)\n")
    assert main([f"{path}:Net", "--input-shape", "4,4"]) == 2
    assert "SystemExit: 4" in capsys.readouterr().err


def test_torchscript_file_is_exit_2(tmp_path: Path, capsys) -> None:
    path = write(
        tmp_path,
        "scripted.py",
        """
        import torch
        from torch import nn

        def build():
            return torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)))
    """,
    )
    assert main([f"{path}:build", "--input-shape", "8,4"]) == 2
    captured = capsys.readouterr()
    assert "TorchScript" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_lazy_model_with_mnist_data_finds_its_input_shape(tmp_path: Path, capsys) -> None:
    # --data mnist tries the MNIST shapes on copies: a Lazy model's uninitialized tensors
    # used to make that copy fail with torch's raw message.
    target = write(
        tmp_path,
        "lazy_net.py",
        """
        from torch import nn

        def Net():
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Linear(32, 10))
        """,
    )
    code = main([f"{target}:Net", "--data", "mnist", "--train-steps", "3"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "probe: 1000x784" in out.out and "Traceback" not in out.err


def test_the_doctors_errors_are_bnlabs_with_exit_code_2() -> None:
    """A notebook caller catches ``BnlabError`` for the doctor as for the rest of bnlab."""
    from bnlab.doctor import errors
    from bnlab.doctor.loader import LoadError
    from bnlab.errors import BnlabError

    for cls in (errors.ProbeError, errors.UnsupportedModel, errors.UsageError, errors.InputError, LoadError):
        assert issubclass(cls, BnlabError) and cls.exit_code == 2, cls
    scripted = torch.jit.script(Small())
    with pytest.raises(BnlabError, match="TorchScript"):
        doctor.check(scripted, torch.randn(8, 10))

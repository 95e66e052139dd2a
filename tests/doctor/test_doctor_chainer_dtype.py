"""The doctor on float64 and float16 Chainer models (the question's and the answer's MLP on
real MNIST): every forward pass the doctor makes is fed the model's floating dtype, so a
model built in float64 gets the same diagnosis as the float32 one instead of Chainer's
"Expect: x.dtype == W.dtype"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from examples_import import EXAMPLES

pytestmark = pytest.mark.chainer  # runs in .venv-chainer (make test-chainer)
chainer = pytest.importorskip("chainer")

import bnlab  # noqa: E402
from bnlab import doctor  # noqa: E402
from bnlab.doctor.backends.chainer.common import as_input, float_dtype  # noqa: E402
from bnlab.doctor.command import main  # noqa: E402

# The examples' classes, built in another dtype three ways: under using_config, with the
# dtype given to each link, and (in a process of its own) with the global config set.
MODELS = """
import importlib.util

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
from chainer import initializers


def _example(name):
    spec = importlib.util.spec_from_file_location(name, {examples!r} + "/" + name + ".py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MyModel


def question(dtype="float64"):
    with chainer.using_config("dtype", np.dtype(dtype)):
        return _example("question_chainer")()


def answer():
    with chainer.using_config("dtype", np.float64):
        return _example("answer_chainer")()


def question_float16():
    return question("float16")


def _linear(n_in, n_out):
    return L.Linear(
        n_in, n_out, initialW=initializers.HeNormal(dtype=np.float64), initial_bias=initializers.Zero(np.float64)
    )


class QuestionFloat64Links(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = _linear(784, 100)
            self.l2 = _linear(100, 100)
            self.l3 = _linear(100, 10)
            self.bn = L.BatchNormalization(100, decay=0.9, eps=0.001, dtype=np.float64)

    def forward(self, x):
        h = F.relu(self.bn(self.l1(x)))
        h = F.relu(self.bn(self.l2(h)))
        return self.l3(h)
"""

GLOBAL_FLOAT64 = """import chainer
import numpy

chainer.global_config.dtype = numpy.float64
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dtype") / "models.py"
    path.write_text(MODELS.format(examples=str(EXAMPLES)))
    return str(path)


def run(capsys, mnist_dir: str, target: str, *extra: str) -> tuple[int, dict]:
    code = main([target, "--data", "mnist", "--data-dir", mnist_dir, "--json", *extra])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out, captured.err
    return code, json.loads(captured.out)


def errors(data: dict) -> list[dict]:
    return [f for f in data["findings"] if f["severity"] == "error"]


def shared_bn(data: dict) -> list[tuple]:
    """The shared-bn findings, less the numbers (float32 and float64 runs round apart)."""
    keys = ("severity", "title", "where", "sites", "fix_code")
    return [tuple(str(f[k]) for k in keys) for f in data["findings"] if f["check"] == "shared-bn"]


def trained(data: dict, steps: int) -> None:
    probe = data["probe"]
    assert probe["train_steps"] == steps
    assert np.isfinite(probe["loss_first"]) and np.isfinite(probe["loss_last"]), probe
    assert probe["loss_last"] < probe["loss_first"] / 2, probe


def test_float64_question_is_diagnosed_as_the_float32_one(models, mnist_dir, capsys) -> None:
    code32, data32 = run(capsys, mnist_dir, f"{EXAMPLES}/question_chainer.py:MyModel")
    assert code32 == 1 and shared_bn(data32), data32["findings"]
    for target in ("question", "QuestionFloat64Links"):
        code, data = run(capsys, mnist_dir, f"{models}:{target}")
        assert code == code32, (target, data["findings"])
        assert shared_bn(data) == shared_bn(data32), target
        assert [f["check"] for f in errors(data)] == [f["check"] for f in errors(data32)], target
        trained(data, 60)


def test_float64_global_config_model_in_its_own_process(tmp_path: Path, mnist_dir: str) -> None:
    """``chainer.global_config.dtype = numpy.float64`` at the top of the user's file, as the
    user would write it (a process of its own: the setting is global)."""
    path = tmp_path / "global64.py"
    path.write_text(GLOBAL_FLOAT64 + (EXAMPLES / "question_chainer.py").read_text())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(bnlab.__file__).parents[1]))
    argv = [f"{path}:MyModel", "--data", "mnist", "--data-dir", mnist_dir, "--train-steps", "5", "--json"]
    result = subprocess.run(
        [sys.executable, "-m", "bnlab.doctor", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    assert [f["sites"] for f in errors(data)] == [["call 1 after l1", "call 2 after l2"]]
    trained(data, 5)


def test_float64_answer_is_healthy(models, mnist_dir, capsys) -> None:
    code, data = run(capsys, mnist_dir, f"{models}:answer")
    assert code == 0 and not errors(data), data["findings"]
    trained(data, 60)


def test_train_steps_on_a_float64_model_through_the_api(models, mnist_dir) -> None:
    """The Python API with float32 MNIST images: the copy is trained in float64, the model
    itself is left as it was, and a model without floating arrays still gets float32."""
    from bnlab.data import load_mnist, to_float

    sys.path.insert(0, str(Path(models).parent))
    try:
        from models import answer
    finally:
        sys.path.remove(str(Path(models).parent))
    model = answer()
    mnist = load_mnist(mnist_dir)
    x, labels = to_float(mnist.test_images[:500]), mnist.test_labels[:500]
    before = {name: param.array.copy() for name, param in model.namedparams()}
    report = doctor.check(model, x, labels=labels, train_steps=20)
    assert not [f for f in report.findings if f.severity == "error"], report
    trained({"probe": report.probe}, 20)
    assert float_dtype(model) == np.float64 and as_input(model, x).dtype == np.float64
    for name, param in model.namedparams():
        assert param.array.dtype == np.float64 and np.array_equal(param.array, before[name]), name
    assert as_input(chainer.Chain(), x.astype(np.float64)).dtype == np.float32


def test_fix_on_a_float64_model_writes_float64(models, mnist_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fixed"
    code, data = run(capsys, mnist_dir, f"{models}:question", "--train-steps", "20", "--fix", str(out))
    assert code == 1
    repair = data["repair"]
    assert repair["after"]["train_eval_agreement"] > repair["before"]["train_eval_agreement"]
    with np.load(out / "model.npz", allow_pickle=False) as npz:
        assert "bn/0/avg_mean" in npz.files and "bn/1/avg_var" in npz.files
        floats = {name: npz[name].dtype for name in npz.files if npz[name].dtype.kind == "f"}
    assert len(floats) == 14 and set(floats.values()) == {np.dtype(np.float64)}, floats


def test_float16_question_is_diagnosed(models, mnist_dir, capsys) -> None:
    """Chainer 7.8.1's BatchNormalization runs in float16 on the CPU; the doctor's Adam
    updates float16 parameters through float32 copies, so its training steps stay finite."""
    # float16 matrix products on the CPU are slow (no BLAS): a small probe, few steps
    code, data = run(capsys, mnist_dir, f"{models}:question_float16", "--batch-size", "200", "--train-steps", "10")
    assert code == 1
    assert [f["sites"] for f in errors(data)] == [["call 1 after l1", "call 2 after l2"]]
    assert not [f for f in data["findings"] if f["check"] == "non-finite"], data["findings"]
    trained(data, 10)

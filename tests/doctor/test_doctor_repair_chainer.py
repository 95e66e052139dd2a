"""The cure on Chainer models (the examples in examples/): split the shared link,
re-estimate avg_mean / avg_var over real MNIST training batches."""

from __future__ import annotations

import copy
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from examples_import import EXAMPLES, import_example

pytestmark = pytest.mark.chainer  # runs in .venv-chainer (make test-chainer)
chainer = pytest.importorskip("chainer")

from bnlab.doctor import sources  # noqa: E402
from bnlab.doctor.backends import load  # noqa: E402
from bnlab.doctor.backends.chainer import repair as repair_chainer  # noqa: E402
from bnlab.doctor.command import main  # noqa: E402
from bnlab.doctor.repair import repair, repair_report, split_shared  # noqa: E402


@pytest.fixture(scope="module")
def mnist_source():
    model = import_example("question_chainer").MyModel()
    return sources.builtin_source("mnist", model, load("chainer"), None, 1000, 0)


@pytest.fixture(scope="module")
def trained_question(mnist_source):
    """The question's Chainer program, 40 Adam steps (lr 0.01) at batch 1000."""
    np.random.seed(0)
    model = import_example("question_chainer").MyModel()
    optimizer = chainer.optimizers.Adam(alpha=0.01)
    optimizer.setup(model)
    with chainer.using_config("train", True):
        for x, y in itertools.islice(mnist_source.train_batches, 40):
            loss = chainer.functions.softmax_cross_entropy(model(x), y.astype(np.int32))
            model.cleargrads()
            loss.backward()
            optimizer.update()
    return model


def test_chainer_repair_splits_the_link(trained_question, mnist_source) -> None:
    model = trained_question
    saved = copy.deepcopy(model.bn.avg_mean), copy.deepcopy(model.bn.avg_var)
    fixed = repair_report(model, mnist_source.fit_batches(), mnist_source.held_out[:3])
    assert np.array_equal(model.bn.avg_mean, saved[0]) and np.array_equal(model.bn.avg_var, saved[1])
    assert isinstance(model.bn, chainer.links.BatchNormalization)
    assert isinstance(fixed.model.bn, repair_chainer.PerCallBatchNormalization)
    split = next(c for c in fixed.changes if c["change"] == "split")
    assert split["sites"] == ["call 1 after l1", "call 2 after l2"]
    assert split["into"] == ["bn.0", "bn.1"]
    assert fixed.after["val_acc"] > fixed.before["val_acc"]
    assert fixed.after["train_eval_agreement"] > 0.97 > fixed.before["train_eval_agreement"]
    # each copy holds its own call site's statistics: the mean of its batch means
    first = fixed.model.bn[0]
    with chainer.no_backprop_mode():
        means = [model.l1(x).array.mean(axis=0) for x, _ in mnist_source.fit_batches()]
    np.testing.assert_allclose(first.avg_mean, np.mean(means, axis=0), rtol=1e-4, atol=1e-5)


def test_chainer_repaired_weights_load_into_the_rebuilt_model(trained_question, mnist_source) -> None:
    fixed = repair(trained_question, list(mnist_source.fit_batches())[:5])
    buffer = io.BytesIO()
    chainer.serializers.save_npz(buffer, fixed)
    buffer.seek(0)
    rebuilt = split_shared(import_example("question_chainer").MyModel(), {"bn": 2})
    chainer.serializers.load_npz(buffer, rebuilt)
    x = mnist_source.probe_x[:50]
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        np.testing.assert_array_equal(rebuilt(x).array, fixed(x).array)


def test_chainer_answer_is_only_reestimated(mnist_source) -> None:
    model = import_example("answer_chainer").MyModel()
    new, changes = repair_chainer.repair(model, list(mnist_source.fit_batches())[:2])
    assert [c["change"] for c in changes] == ["re-estimated", "re-estimated"]
    assert not np.allclose(new.bn1.avg_mean, 0.0) and np.allclose(model.bn1.avg_mean, 0.0)


def test_chainer_fix_on_the_command_line(tmp_path: Path, capsys) -> None:
    target = f"{EXAMPLES / 'question_chainer.py'}:MyModel"
    out = tmp_path / "fixed"
    assert main([target, "--data", "mnist", "--train-steps", "5", "--fix", str(out), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["repair"]["framework"] == "chainer"
    assert {"val_acc", "val_loss", "train_eval_agreement"} <= set(report["repair"]["after"])
    assert (out / "model.npz").is_file()
    with np.load(out / "model.npz", allow_pickle=False) as npz:
        assert "bn/0/avg_mean" in npz.files and "bn/1/avg_var" in npz.files
    assert "split_shared(model, {'bn': 2})" in (out / "HOW_TO_LOAD.txt").read_text()

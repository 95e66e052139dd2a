"""``watch`` around a Chainer loop: statistic updates per ``optimizer.update()`` and
weight decay from the optimizer's hooks, on the question's MLP and real MNIST."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

chainer = pytest.importorskip("chainer")
pytestmark = pytest.mark.chainer  # runs in .venv-chainer

import chainer.functions as F  # noqa: E402
import chainer.links as L  # noqa: E402
from chainer.optimizer_hooks import WeightDecay  # noqa: E402

from bnlab import doctor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import answer_chainer  # noqa: E402
import question_chainer  # noqa: E402


@pytest.fixture(scope="module")
def batches(mnist_arrays):
    x, y = mnist_arrays[0][:2000], mnist_arrays[1][:2000].astype(np.int32)
    return [(x[i : i + 100], y[i : i + 100]) for i in range(0, 2000, 100)]


def train(model, batches, optimizer=None, forward=None) -> chainer.Optimizer:
    optimizer = optimizer or chainer.optimizers.Adam(alpha=1e-3)
    if optimizer.target is None:
        optimizer.setup(model)
    for x, t in batches:
        loss = F.softmax_cross_entropy((forward or model)(x), t)
        model.cleargrads()
        loss.backward()
        optimizer.update()
    with chainer.using_config("train", False):
        model(batches[0][0])  # a validation pass: not a step
    return optimizer


def test_shared_bn_is_updated_twice_per_step(batches) -> None:
    np.random.seed(0)
    model = question_chainer.MyModel()
    with doctor.watch(model) as w:
        train(model, batches)
    assert w.steps == 20 and w.passes == 21
    report = w.report()
    (finding,) = report.errors
    assert finding.check == "shared-bn" and finding.sites == ["call 1 after l1", "call 2 after l2"]
    assert finding.data["updates_per_step"] == 2.0
    assert "40 train-mode calls in 20 training steps" in " ".join(finding.evidence)
    assert all(not link.local_link_hooks for link in model.links())


def test_one_bn_per_layer_is_updated_once_per_step(batches) -> None:
    np.random.seed(0)
    model = answer_chainer.MyModel()
    with doctor.watch(model) as w:
        train(model, batches)
    report = w.report()
    assert not report.errors and not report.warnings, report.to_text()
    updates = w._watcher.updates()
    assert {path: (u.forward_calls, u.extra_calls, u.changed) for path, u in updates.items()} == {
        "bn1": (20, 0, True),
        "bn2": (20, 0, True),
    }


def test_weight_decay_hook_on_the_optimizer(batches) -> None:
    np.random.seed(0)
    model = answer_chainer.MyModel()
    optimizer = chainer.optimizers.MomentumSGD(lr=0.01)
    optimizer.setup(model)
    optimizer.add_hook(WeightDecay(5e-4))  # decays every parameter, gamma and beta too
    with doctor.watch(model, optimizer=optimizer) as w:
        train(model, batches[:5], optimizer)
    (finding,) = w.report().by_check("bn-weight-decay")
    assert finding.data == {"optimizer": "MomentumSGD", "weight_decay": {"bn1": 5e-4, "bn2": 5e-4}}
    assert "update_rule.add_hook" in finding.fix_code


def test_decay_on_the_other_parameters_only_is_clean(batches) -> None:
    """The recipe of the fix: update-rule hooks on every parameter but BN's."""
    np.random.seed(0)
    model = answer_chainer.MyModel()
    optimizer = chainer.optimizers.MomentumSGD(lr=0.01)
    optimizer.setup(model)
    norm = {id(p) for link in model.links() if isinstance(link, L.BatchNormalization) for p in link.params()}
    for param in model.params():
        if id(param) not in norm:
            param.update_rule.add_hook(WeightDecay(5e-4))
    with doctor.watch(model, optimizer=optimizer) as w:
        train(model, batches[:5], optimizer)
    assert w.steps == 5
    assert not w.report().by_check("bn-weight-decay")


def test_adam_weight_decay_rate_is_seen_without_the_optimizer(batches) -> None:
    np.random.seed(0)
    model = answer_chainer.MyModel()
    optimizer = chainer.optimizers.Adam(alpha=1e-3, weight_decay_rate=1e-4)
    optimizer.setup(model)
    with doctor.watch(model) as w:  # the parameters' update rules carry the rate
        train(model, batches[:5], optimizer)
    assert w.steps == 5
    (finding,) = w.report().by_check("bn-weight-decay")
    assert finding.data["weight_decay"] == {"bn1": 1e-4, "bn2": 1e-4}


class ForgetMLP(answer_chainer.MyModel):
    """The first block under F.forget: backward runs it again (to save memory)."""

    def block(self, x):
        return F.relu(self.bn1(self.l1(x)))

    def forward(self, x):
        h = F.forget(self.block, x)
        return self.l3(F.relu(self.bn2(self.l2(h))))


def test_forget_recomputation_updates_statistics_twice(batches) -> None:
    np.random.seed(0)
    model = ForgetMLP()
    with doctor.watch(model) as w:
        train(model, batches[:10])
    (finding,) = w.report().by_check("extra-stat-updates")
    assert finding.where == "bn1"
    assert (finding.data["forward_calls"], finding.data["extra_calls"]) == (10, 10)


def test_statistics_updated_by_functions_elsewhere(batches) -> None:
    np.random.seed(0)
    model = answer_chainer.MyModel()

    class Outside(chainer.Chain):
        """bn2's statistics fed by F.batch_normalization, the link itself never called."""

        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.net = model

        def forward(self, x):
            h = F.relu(model.bn1(model.l1(x)))
            bn = model.bn2
            h = F.batch_normalization(
                model.l2(h), bn.gamma, bn.beta, running_mean=bn.avg_mean, running_var=bn.avg_var, decay=bn.decay
            )
            return model.l3(F.relu(h))

    outer = Outside()
    with doctor.watch(outer) as w:
        train(outer, batches[:5])
    (finding,) = w.report().by_check("stats-updated-outside")
    assert finding.where == "net.bn2"

"""The doctor on Chainer models (skipped where Chainer is not installed)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.chainer  # runs in .venv-chainer (make test-chainer)
chainer = pytest.importorskip("chainer")
import chainer.functions as F  # noqa: E402
import chainer.links as L  # noqa: E402

from bnlab import doctor  # noqa: E402


class MLP(chainer.Chain):
    def __init__(self, decay=0.9, share=False, dropout=False):
        super().__init__()
        self.dropout = dropout
        with self.init_scope():
            self.l1 = L.Linear(20, 32, nobias=True)
            self.l2 = L.Linear(32, 32, nobias=True)
            self.l3 = L.Linear(32, 4)
            self.bn1 = L.BatchNormalization(32, decay=decay)
            self.bn2 = self.bn1 if share else L.BatchNormalization(32, decay=decay)

    def forward(self, x):
        h = self.l1(x)
        if self.dropout:
            h = F.dropout(h, 0.5)
        h = F.relu(self.bn1(h))
        h = F.relu(self.bn2(self.l2(h)))
        return self.l3(h)


class ConvNet(chainer.Chain):
    def __init__(self, share=False):
        super().__init__()
        self.share = share
        with self.init_scope():
            self.convs = chainer.ChainList(
                L.Convolution2D(3, 8, 3, pad=1, nobias=True), L.Convolution2D(8, 8, 3, pad=1, nobias=True)
            )
            self.bns = chainer.ChainList(L.BatchNormalization(8), L.BatchNormalization(8))
            self.fc = L.Linear(8, 5)

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = F.relu(self.bns[0 if self.share else i](conv(x)))
        return self.fc(F.mean(x, axis=(2, 3)))


class Stateless(chainer.Chain):
    """LayerNormalization and GroupNormalization: no running statistics."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(20, 16)
            self.ln = L.LayerNormalization(16)
            self.conv = L.Convolution2D(1, 4, 3, pad=1)
            self.gn = L.GroupNormalization(2, 4)
            self.out = L.Linear(16 + 4, 4)

    def forward(self, x):
        h = F.relu(self.ln(self.l1(x)))
        h = F.relu(h)  # a stateless function applied again: fine
        g = F.relu(self.gn(self.conv(F.reshape(x[:, :16], (-1, 1, 4, 4)))))
        return self.out(F.concat([h, F.mean(g, axis=(2, 3))]))


def vec(n=64):
    return np.random.RandomState(0).randn(n, 20).astype(np.float32)


def img(n=16):
    return np.random.RandomState(0).randn(n, 3, 8, 8).astype(np.float32)


def state(model):
    params = {name: p.array.copy() for name, p in model.namedparams()}
    persist = {}
    for name, link in model.namedlinks():
        for attr in link._persistent:
            value = getattr(link, attr)
            persist[f"{name}/{attr}"] = value.copy() if hasattr(value, "copy") else value
    return params, persist


def assert_same(a, b):
    for part_a, part_b in zip(a, b):
        assert part_a.keys() == part_b.keys()
        for key in part_a:
            assert np.array_equal(part_a[key], part_b[key]), key


def checked(model, x, **kwargs):
    np.random.seed(0)
    before = state(model)
    train_flag = chainer.config.train
    report = doctor.check(model, x, **kwargs)
    assert_same(before, state(model))
    assert chainer.config.train == train_flag
    for link in model.links():
        assert not link.local_link_hooks
    return report


def test_healthy_mlp() -> None:
    report = checked(MLP(), vec(), train_steps=60)
    assert not report.errors and not report.warnings, report


def test_healthy_convnet_in_chainlist() -> None:
    report = checked(ConvNet(), img(), train_steps=60)
    assert not report.errors and not report.warnings, report


def test_stateless_normalization() -> None:
    report = checked(Stateless(), vec(), train_steps=10)
    assert not report.findings, report


def test_shared_bn_mlp() -> None:
    report = checked(MLP(share=True), vec(), train_steps=30)
    (finding,) = report.by_check("shared-bn")
    assert finding.severity == "error" and finding.where == "bn1"
    assert finding.sites == ["call 1 after l1", "call 2 after l2"]
    assert "L.BatchNormalization(32, decay=0.9" in finding.fix_code


def test_shared_bn_in_chainlist_loop() -> None:
    report = checked(ConvNet(share=True), img(), train_steps=10)
    (finding,) = report.by_check("shared-bn")
    assert finding.where == "bns.0"
    assert finding.sites == ["call 1 after convs.0", "call 2 after convs.1"]


def test_torch_style_decay() -> None:
    report = checked(MLP(decay=0.1), vec())
    findings = report.by_check("momentum-convention")
    assert {f.where for f in findings} == {"bn1", "bn2"}
    assert findings[0].data["suggested"] == 0.9
    assert "decay=0.9" in findings[0].fix


def test_decay_one_never_updates() -> None:
    report = checked(MLP(decay=1.0), vec(), train_steps=10)
    assert {f.where for f in report.by_check("stats-never-updated")} == {"bn1", "bn2"}
    assert report.exit_code == 1


def test_dropout_before_bn() -> None:
    report = checked(MLP(dropout=True), vec(), train_steps=5)
    assert [f.where for f in report.by_check("dropout-before-bn")] == ["bn1"]


def test_eval_config_is_respected_and_restored() -> None:
    model = MLP()
    with chainer.using_config("train", False):
        checked(model, vec(), train_steps=3)
        assert chainer.config.train is False


def test_json_round_trip() -> None:
    report = checked(MLP(share=True), vec(), train_steps=5)
    assert doctor.Report.from_json(report.to_json()) == report


def chainer_loop(model, x, steps=12, batch=16, train=True):
    t = (x[:, 0] > 0).astype(np.int32)
    opt = chainer.optimizers.Adam(alpha=0.01)
    opt.setup(model)
    with chainer.using_config("train", train):
        for step in range(steps):
            start = (step * batch) % len(x)
            loss = F.softmax_cross_entropy(model(x[start : start + batch]), t[start : start + batch])
            model.cleargrads()
            loss.backward()
            opt.update()
    with chainer.using_config("train", False):  # a validation pass: not a training step
        model(x[:8])


def test_watch_chainer_healthy_loop() -> None:
    model = MLP()
    with doctor.watch(model) as w:
        chainer_loop(model, vec(), steps=40)
    report = w.report()
    assert w.steps == 40 and w.passes == 41
    assert report.framework == "chainer"
    assert not report.errors and not report.warnings, report
    for link in model.links():
        assert not link.local_link_hooks


def test_watch_chainer_shared_bn() -> None:
    # Batches of 64: with 16 values per channel the two sites' statistics are within
    # sampling noise of each other, and the doctor says only a warning (stats.sites_alike).
    model = MLP(share=True)
    with doctor.watch(model) as w:
        chainer_loop(model, vec(256), batch=64)
    (finding,) = w.report().by_check("shared-bn")
    assert finding.severity == "error" and finding.sites == ["call 1 after l1", "call 2 after l2"]


def test_watch_chainer_training_in_test_mode() -> None:
    model = MLP()
    with doctor.watch(model) as w:
        chainer_loop(model, vec(), train=False)
    report = w.report()
    assert {f.where for f in report.by_check("stats-never-updated")} == {"bn1", "bn2"}
    evidence = " ".join(report.by_check("stats-never-updated")[0].evidence)
    assert "in eval mode in 12 of 12 steps" in evidence

"""``BNDoctorCallback`` in a real ``lightning.Trainer.fit`` on real MNIST (CPU, a few dozen steps)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision_compat import import_torchvision  # noqa: E402

# lightning imports torchmetrics, which imports torchvision when it is installed: this
# venv's torchvision needs the test-only shim beside the CPU torch (DEVELOPERS.md).
try:
    import_torchvision()
except ImportError:
    pass  # no torchvision: lightning does not need it
lightning = pytest.importorskip("lightning")

from bnlab.doctor.lightning import BNDoctorCallback, BNDoctorFailed  # noqa: E402


class MNISTClassifier(lightning.LightningModule):
    """The question's MLP (784-100-100-10): one BN per layer, or one BN after both layers."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.l1 = nn.Linear(784, 100, bias=False)
        self.l2 = nn.Linear(100, 100, bias=False)
        self.bn1 = nn.BatchNorm1d(100)
        self.bn2 = self.bn1 if shared else nn.BatchNorm1d(100)
        self.out = nn.Linear(100, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.l1(x)))
        return self.out(F.relu(self.bn2(self.l2(h))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


@pytest.fixture(scope="module")
def loader(mnist_arrays):
    train_x, train_y = mnist_arrays[0][:6400], mnist_arrays[1][:6400]
    data = TensorDataset(torch.as_tensor(train_x), torch.as_tensor(train_y))
    return DataLoader(data, batch_size=200, shuffle=True, generator=torch.Generator().manual_seed(0))


def fit(model, loader, callback, epochs: int = 1) -> lightning.Trainer:
    trainer = lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(model, loader)
    return trainer


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_shared_bn_is_an_error_per_layer_bn_is_not(loader) -> None:
    torch.manual_seed(0)
    shared, per_layer = MNISTClassifier(shared=True), MNISTClassifier(shared=False)
    shared_cb, per_layer_cb = BNDoctorCallback(echo=None), BNDoctorCallback(echo=None)
    fit(shared, loader, shared_cb)  # 32 steps of 200 real MNIST images
    fit(per_layer, loader, per_layer_cb)

    report = shared_cb.report
    assert report.probe["watched_steps"] == 32
    assert [(f.check, f.severity, f.where) for f in report.errors] == [("shared-bn", "error", "bn1")]
    assert not per_layer_cb.report.errors, per_layer_cb.report
    assert not per_layer_cb.report.by_check("shared-bn")
    assert no_hooks(shared) and no_hooks(per_layer)


def test_fail_on_error_raises_after_fit_and_keeps_the_report(loader, capsys) -> None:
    torch.manual_seed(0)
    model = MNISTClassifier(shared=True)
    callback = BNDoctorCallback(fail_on="error")
    with pytest.raises(BNDoctorFailed, match=r"\[shared-bn\]"):
        fit(model, loader, callback)
    assert "ERROR [shared-bn]" in capsys.readouterr().out  # printed before raising
    assert callback.report.exit_code == 1
    assert no_hooks(model)


def test_reports_every_epoch_and_removes_hooks_when_fit_fails(loader) -> None:
    torch.manual_seed(0)
    model = MNISTClassifier(shared=False)
    callback = BNDoctorCallback(every_n_epochs=1, echo=None)
    fit(model, loader, callback, epochs=2)
    assert [r.probe["watched_steps"] for r in callback.reports] == [32, 32]

    class Broken(MNISTClassifier):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("the user's own bug")
            return super().training_step(batch, batch_idx)

    broken = Broken(shared=False)
    with pytest.raises(RuntimeError, match="the user's own bug"):
        fit(broken, loader, BNDoctorCallback(echo=None))
    assert no_hooks(broken)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="fail_on"):
        BNDoctorCallback(fail_on="always")
    with pytest.raises(ValueError, match="every_n_epochs"):
        BNDoctorCallback(every_n_epochs=0)


def test_the_trainers_optimizer_is_handed_to_the_watch(loader) -> None:
    class Decayed(MNISTClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, weight_decay=5e-4)

    torch.manual_seed(0)
    callback = BNDoctorCallback(echo=None)
    fit(Decayed(shared=False), loader, callback)
    (finding,) = callback.report.by_check("bn-weight-decay")
    assert finding.where == "bn1, bn2"

"""bnlab's doctor on the situations torch-audit 0.3.0's batch-norm rules are about.

torch-audit (PyPI, not a dependency, not imported here) has four rules on batch norm:
TA501 (a stateful layer called more than once in a training-mode forward pass), TA304
(a batch of fewer than 8 samples while the model has BatchNorm), TA400 (Linear/Conv with
a bias directly followed by a norm inside an ``nn.Sequential``), TA402 (weight decay on
norm parameters or biases). The models below are our own, one per situation, including
the ones where the two tools are meant to differ; docs/notes/zoo.md has the table.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import doctor


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # weights; the inputs have their own generators


# -- TA501: stateful layer reuse ------------------------------------------------------------


class SharedAfterTwoLayers(nn.Module):
    """The question's bug: one BN after both hidden layers."""

    def __init__(self, affine: bool = True, track: bool = True) -> None:
        super().__init__()
        self.l1 = nn.Linear(20, 32, bias=False)
        self.l2 = nn.Linear(32, 32, bias=False)
        self.bn = nn.BatchNorm1d(32, affine=affine, track_running_stats=track)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.l1(x)))
        return self.out(F.relu(self.bn(self.l2(h))))


class BNTwiceInARow(nn.Module):
    """``bn(bn(x))``: the second call sees already-normalized activations."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(20, 32, bias=False)
        self.bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.bn(self.l1(x)))))


class TwoViewsOneEncoder(nn.Module):
    """A siamese/SimCLR-style encoder applied to two halves of alike data: shared on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(10, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        return self.head(torch.cat([self.enc(x[:, :10]), self.enc(x[:, 10:])], 1))


def inputs(n: int = 64, d: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_ta501_shared_bn_is_an_error_as_in_torch_audit() -> None:
    report = doctor.check(SharedAfterTwoLayers(), inputs())
    assert [f.severity for f in report.by_check("shared-bn")] == ["error"]


def test_ta501_shared_bn_in_eval_mode_is_still_found() -> None:
    # torch-audit counts calls only while the layer is in training mode; bnlab probes
    # both modes on a copy, so a model handed over in eval mode is checked too.
    report = doctor.check(SharedAfterTwoLayers().eval(), inputs())
    assert [f.severity for f in report.by_check("shared-bn")] == ["error"]


def test_ta501_shared_bn_without_affine_parameters_is_found() -> None:
    # torch-audit hooks only leaf modules that own parameters: BatchNorm1d(affine=False)
    # has none, so its reuse goes unseen there. Its running statistics are still mixed.
    report = doctor.check(SharedAfterTwoLayers(affine=False), inputs())
    assert [f.severity for f in report.by_check("shared-bn")] == ["error"]


def test_ta501_shared_bn_without_running_stats_is_fine_in_both() -> None:
    report = doctor.check(SharedAfterTwoLayers(track=False), inputs())
    assert not report.by_check("shared-bn")


def test_ta501_bn_called_twice_in_a_row() -> None:
    # The second call always sees ~N(0, 1) input, the first the layer's raw activations.
    report = doctor.check(BNTwiceInARow(), inputs(), train_steps=20)
    assert [f.severity for f in report.by_check("shared-bn")] == ["error"]


def test_ta501_two_views_through_one_encoder_is_a_warning_not_an_error() -> None:
    # torch-audit: ERROR (any reuse). bnlab: the call sites see alike activations, so one
    # set of running statistics can describe both; reported as a warning, exit 0.
    # 512 samples: the two halves' statistics then differ by sampling noise of ~0.05 SD.
    report = doctor.check(TwoViewsOneEncoder(), inputs(n=512), train_steps=20)
    assert [f.severity for f in report.by_check("shared-bn")] == ["warning"]
    assert report.exit_code == 0


# -- TA304: tiny batch ----------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(20, 32, bias=False)
        self.bn1 = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(F.relu(self.bn1(self.l1(x))))


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class PooledThenBN(nn.Module):
    """BN2d after global pooling: one value per channel per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.bn(F.adaptive_avg_pool2d(self.conv(x), 1)).flatten(1))


def images(n: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_ta304_four_samples_into_batchnorm1d() -> None:
    report = doctor.check(MLP(), inputs(n=4))
    (finding,) = report.by_check("small-batch")
    assert finding.severity == "warning" and finding.data["values_per_channel"] == 4


def test_ta304_two_images_into_a_conv_bn() -> None:
    # torch-audit warns on the batch size (2 < 8). bnlab's small-batch counts values per
    # channel (2 x 30 x 30 = 1800 here): the statistics themselves are not noisy, but two
    # samples still make the running statistics follow two images at a time.
    report = doctor.check(SmallConvNet(), images(2))
    findings = report.by_check("small-batch")
    assert findings and findings[0].severity == "warning"
    assert findings[0].data["batch_size"] == 2


def test_ta304_one_value_per_channel_is_an_error() -> None:
    # Batch 1 into BN after global pooling: PyTorch refuses to train; torch-audit only warns.
    report = doctor.check(PooledThenBN(), images(1, size=8))
    assert [f.severity for f in report.by_check("small-batch")] == ["error"]


def test_ta304_sixteen_pooled_samples_are_fine_in_both() -> None:
    report = doctor.check(PooledThenBN(), images(16, size=8))
    assert not report.by_check("small-batch")


# -- TA400: redundant bias before a norm ----------------------------------------------------


class BiasBeforeBNInSequential(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(self.body(x))


class BiasBeforeBNInForward(nn.Module):
    """The same pair, wired in forward() instead of a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class BiasReluBN(nn.Module):
    """Conv(bias) -> ReLU -> BN: the bias changes the ReLU's output, it is not redundant."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def test_ta400_bias_before_bn_in_a_sequential() -> None:
    report = doctor.check(BiasBeforeBNInSequential(), inputs())
    (finding,) = report.by_check("bias-before-bn")
    assert finding.severity == "info" and finding.where == "body.0"


def test_ta400_bias_before_bn_wired_in_forward() -> None:
    # torch-audit reads only the order of a Sequential's children; bnlab follows the
    # tensor that reaches the BN, so this pair is found too.
    report = doctor.check(BiasBeforeBNInForward(), images(8, size=8))
    (finding,) = report.by_check("bias-before-bn")
    assert finding.where == "conv"


def test_ta400_bias_then_relu_then_bn_is_fine_in_both() -> None:
    report = doctor.check(BiasReluBN(), images(8, size=8))
    assert not report.by_check("bias-before-bn")


# -- TA402: weight decay on norm parameters -------------------------------------------------


def train_watched(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 8):
    x = inputs(n=64)
    y = (x[:, 0] > 0).long()
    with doctor.watch(model, optimizer=optimizer) as watched:
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return watched.report()


def test_ta402_weight_decay_on_bn_parameters() -> None:
    model = MLP()
    report = train_watched(model, torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=5e-4))
    (finding,) = report.by_check("bn-weight-decay")
    assert finding.where == "bn1"
    # torch-audit's TA402 also names the biases (out.bias); bnlab reports norm layers only.
    assert "out" not in finding.where


def test_ta402_norm_parameters_in_a_no_decay_group_are_fine_in_both() -> None:
    model = MLP()
    norm = list(model.bn1.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in norm)]
    optimizer = torch.optim.SGD(
        [{"params": rest, "weight_decay": 5e-4}, {"params": norm, "weight_decay": 0.0}], lr=0.05
    )
    assert not train_watched(model, optimizer).by_check("bn-weight-decay")

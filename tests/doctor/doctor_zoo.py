"""A zoo of small PyTorch models: healthy ones, and ones with one planted BN problem.

Each :class:`Case` says which checks must fire (with which severity) and is otherwise
expected to be silent at error level -- and, for healthy models, at warning level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# -- healthy models ----------------------------------------------------------------


class MLP(nn.Module):
    """One BN per hidden layer (the answer, small)."""

    def __init__(self, d_in=20, hidden=32, classes=4):
        super().__init__()
        self.l1 = nn.Linear(d_in, hidden, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.l2 = nn.Linear(hidden, hidden, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.l1(x)))
        h = F.relu(self.bn2(self.l2(h)))
        return self.out(h)


def conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), nn.MaxPool2d(2), conv_bn(8, 16), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.layers = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class TransformerClassifier(nn.Module):
    """Pre-LN transformer block: LayerNorm only, no batch statistics."""

    def __init__(self, d=16, classes=3):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.ff(self.ln2(h))
        return self.head(h.mean(1))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn2 = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class NestedMLP(nn.Module):
    """ModuleList of Sequential blocks, each with its own BN."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(20 if i == 0 else 24, 24, bias=False), nn.BatchNorm1d(24), nn.ReLU())
            for i in range(3)
        )
        self.head = nn.Sequential(nn.Sequential(nn.Linear(24, 4)))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class AffineFreeMLP(MLP):
    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm1d(32, affine=False)
        self.bn2 = nn.BatchNorm1d(32, affine=False)


class SharedStateless(nn.Module):
    """One ReLU and one Dropout module used everywhere; decoder tied to encoder weights."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(20, 12)
        self.bn = nn.BatchNorm1d(12)
        self.act = nn.ReLU()
        self.mid = nn.Linear(12, 12)
        self.head = nn.Linear(20, 4)

    def forward(self, x):
        h = self.act(self.bn(self.enc(x)))
        h = self.act(self.mid(h))
        recon = F.linear(h, self.enc.weight.t())  # tied weights: shared on purpose
        return self.head(self.act(recon))


class SharedNoRunningStats(nn.Module):
    """A BN without running statistics shared by two layers: it has no state to mix."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(20, 32)
        self.l2 = nn.Linear(32, 32)
        self.bn = nn.BatchNorm1d(32, track_running_stats=False)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.l1(x)))
        h = F.relu(self.bn(self.l2(h)))
        return self.out(h)


class SharedInstanceNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.InstanceNorm2d(8)  # no running statistics by default
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.norm(self.c1(x)))
        x = F.relu(self.norm(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class InputBN(nn.Module):
    """BN straight on the raw features, then a healthy MLP."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm1d(20)
        self.mlp = MLP()

    def forward(self, x):
        return self.mlp(self.bn_in(x))


class ConvReluBN(nn.Module):
    """Conv -> ReLU(inplace) -> BN: the conv's bias is NOT redundant here."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.bn(self.relu(self.conv(x))).mean((2, 3)))


class Siamese(nn.Module):
    """One encoder applied to two inputs of the same distribution (shared on purpose)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(10, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        a, b = x[:, :10], x[:, 10:]
        return self.head(torch.cat([self.enc(a), self.enc(b)], 1))


# -- planted problems ----------------------------------------------------------------


class SharedBN(nn.Module):
    """The question's bug, small."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(20, 32)
        self.l2 = nn.Linear(32, 32)
        self.bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.l1(x)))
        h = F.relu(self.bn(self.l2(h)))
        return self.out(h)


class SharedConvBN(nn.Module):
    """A BN2d reused inside a loop over a ModuleList of convolutions."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)]
        )
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(self.bn(conv(x)))
        return self.fc(x.mean((2, 3)))


class SharedSyncBN(SharedBN):
    """SyncBatchNorm is a _BatchNorm too (and runs on CPU outside distributed training)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.SyncBatchNorm(32)


class QuestionWithSpareBN(SharedBN):
    """The question's variant: bn2 defined, bn used twice."""

    def __init__(self):
        super().__init__()
        self.bn2 = nn.BatchNorm1d(32)


class KerasMomentum(MLP):
    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm1d(32, momentum=0.9)  # Keras' 0.9 typed into PyTorch


class ZeroMomentum(MLP):
    def __init__(self):
        super().__init__()
        self.bn2 = nn.BatchNorm1d(32, momentum=0.0)


class DropoutBeforeBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(20, 32, bias=False)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.drop(self.l1(x)))))


class FrozenBN(MLP):
    def __init__(self):
        super().__init__()
        for p in self.bn1.parameters():
            p.requires_grad_(False)


class EvalBNDuringTraining(MLP):
    """Overrides train() to keep its BN layers in eval mode, with untouched statistics."""

    def train(self, mode=True):
        super().train(mode)
        self.bn1.eval()
        self.bn2.eval()
        return self


def stale_stats_model() -> nn.Module:
    """A trained MLP whose bn1 statistics are then replaced by another data set's."""
    model = MLP()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 20, generator=generator)
    y = torch.randint(0, 4, (64,), generator=generator)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.bn1.running_mean += 3.0 * model.bn1.running_var.sqrt()
        model.bn1.running_var *= 0.1
    return model


def parallel_model() -> nn.Module:
    return nn.DataParallel(MLP())  # on a CPU-only machine: runs the module directly


class TinySpatialBN(nn.Module):
    """BN2d after global pooling to 1x1: one value per channel with batch size 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.bn(self.pool(self.conv(x))).flatten(1))


def _trained(model: nn.Module, d_in: int = 20, steps: int = 60) -> nn.Module:
    """``model`` after ``steps`` Adam steps on one fixed random batch (mode: train)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, d_in, generator=generator)
    y = torch.randint(0, 4, (64,), generator=generator)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def trained_mlp() -> nn.Module:
    return _trained(MLP())


def reset_stats_model() -> nn.Module:
    """Trained, then ``reset_running_stats()`` (or a checkpoint loaded without BN buffers)."""
    model = _trained(MLP())
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.reset_running_stats()
    return model


class ZeroInitGamma(MLP):
    """Untrained, bn2's gamma set to 0 (torchvision's zero_init_residual): not a reset."""

    def __init__(self):
        super().__init__()
        nn.init.zeros_(self.bn2.weight)


def nan_output_model() -> nn.Module:
    model = MLP()
    with torch.no_grad():
        model.out.weight[0, 0] = float("nan")
    return model


class DoubleBN(nn.Module):
    """``bn(bn(x))``: one BN called twice in sequence."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(20, 32, bias=False)
        self.bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.bn(self.l1(x)))))


class CheckpointedBN(nn.Module):
    """BN inside an activation-checkpointed block: recomputed (and updated) in backward."""

    def __init__(self, bn_inside=True):
        super().__init__()
        self.bn_inside = bn_inside
        self.l1 = nn.Linear(20, 32, bias=False)
        self.bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 4)

    def block(self, x):
        h = self.l1(x)
        return self.bn(h) if self.bn_inside else h

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self.block, x, use_reentrant=False) if torch.is_grad_enabled() else self.block(x)
        if not self.bn_inside:
            h = self.bn(h)
        return self.out(F.relu(h))


class CheckpointedNoBN(CheckpointedBN):
    def __init__(self):
        super().__init__(bn_inside=False)


class FunctionalBN(nn.Module):
    """``self.bn``'s buffers updated by F.batch_norm; the module itself is never called."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(20, 32, bias=False)
        self.bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        bn = self.bn
        h = F.batch_norm(self.l1(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training, 0.1, bn.eps)
        return self.out(F.relu(h))


def sgd_with_decay(params):
    return torch.optim.SGD(params, lr=0.05, weight_decay=1e-4)


def sgd_without_norm_decay(model):
    """The usual recipe: weight decay on everything but the norm layers."""
    norm = [p for m in model.modules() if isinstance(m, nn.BatchNorm1d) for p in m.parameters()]
    ids = {id(p) for p in norm}
    other = [p for p in model.parameters() if id(p) not in ids]
    return lambda params: torch.optim.SGD(
        [{"params": other, "weight_decay": 1e-4}, {"params": norm, "weight_decay": 0.0}], lr=0.05
    )


# -- the cases -----------------------------------------------------------------------


def vec(n=64, d=20):
    return lambda g: torch.randn(n, d, generator=g)


def img(n=32, c=3, size=8):
    return lambda g: torch.randn(n, c, size, size, generator=g)


def seq(n=32, length=6, d=8):
    return lambda g: torch.randn(n, length, d, generator=g)


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], torch.Tensor]
    expect: dict[str, str] = field(default_factory=dict)  # check id -> severity
    train_steps: int = 60
    healthy: bool = False  # then: no warning either
    options: Callable[[nn.Module], dict] | None = None  # more check() arguments, per model


CASES = [
    Case("mlp", MLP, vec(), healthy=True),
    Case("convnet", ConvNet, img(), healthy=True),
    Case("resnet", ResNet, img(), healthy=True),
    Case("transformer-layernorm", TransformerClassifier, seq(), healthy=True),
    Case("groupnorm", GroupNormNet, img(), healthy=True),
    Case("nested-sequential-modulelist", NestedMLP, vec(), healthy=True),
    Case("affine-false", AffineFreeMLP, vec(), healthy=True),
    Case("shared-stateless", SharedStateless, vec(), {"bias-before-bn": "info"}, healthy=True),
    Case("shared-bn-without-running-stats", SharedNoRunningStats, vec(), {"bias-before-bn": "info"}, healthy=True),
    Case("shared-instancenorm", SharedInstanceNorm, img(), healthy=True),
    Case("bn-on-input", InputBN, vec(), healthy=True),
    # running variance still lags after 60 Adam steps here; 100 steps let it catch up
    Case("conv-relu-bn", ConvReluBN, img(), healthy=True, train_steps=100),
    Case("siamese-shared-encoder", Siamese, vec(d=20), {"shared-bn": "warning"}),
    Case("shared-bn", SharedBN, vec(), {"shared-bn": "error"}),
    Case("shared-conv-bn", SharedConvBN, img(), {"shared-bn": "error"}),
    Case("shared-syncbn", SharedSyncBN, vec(), {"shared-bn": "error"}),
    Case("shared-bn-with-unused-bn2", QuestionWithSpareBN, vec(), {"shared-bn": "error", "unused-bn": "info"}),
    Case("shared-bn-untrained", SharedBN, vec(), {"shared-bn": "error"}, train_steps=0),
    Case("keras-momentum", KerasMomentum, vec(), {"momentum-convention": "warning"}),
    Case("zero-momentum", ZeroMomentum, vec(), {"momentum-convention": "warning", "stats-never-updated": "error"}),
    Case("dropout-before-bn", DropoutBeforeBN, vec(), {"dropout-before-bn": "info"}),
    Case("frozen-bn-train-mode", FrozenBN, vec(), {"frozen-bn-train-mode": "info"}),
    Case("bn-eval-during-training", EvalBNDuringTraining, vec(), {"stats-never-updated": "error"}),
    Case("stale-stats", stale_stats_model, vec(), {"stale-stats": "warning"}, train_steps=0),
    Case("untrained", MLP, vec(), {"untrained-stats": "info"}, train_steps=0),
    Case("dataparallel-small-batch", parallel_model, vec(n=16), {"dataparallel-bn": "info"}),
    Case("small-batch", MLP, vec(n=4), {"small-batch": "warning"}, train_steps=0),
    Case("one-value-per-channel", TinySpatialBN, img(n=1), {"small-batch": "error"}, train_steps=0),
    Case("bias-before-bn", SharedNoRunningStats, vec(), {"bias-before-bn": "info"}, train_steps=0),
    # the doctor's own 5 steps must not be blamed on the model (stale-stats, divergence)
    Case("resnet-5-steps", ResNet, img(), {"train-eval-divergence": "info"}, healthy=True, train_steps=5),
    Case("convnet-5-steps", ConvNet, img(), healthy=True, train_steps=5),
    Case("trained-mlp", trained_mlp, vec(), healthy=True, train_steps=0),
    Case("stats-reset", reset_stats_model, vec(), {"stats-reset": "error"}, train_steps=0),
    Case("stats-reset-then-5-steps", reset_stats_model, vec(), {"stats-reset": "error"}, train_steps=5),
    Case("zero-init-gamma-untrained", ZeroInitGamma, vec(), {"untrained-stats": "info"}, train_steps=0),
    Case("nan-output", nan_output_model, vec(), {"non-finite": "error"}, train_steps=0),
    Case("bn-of-bn-untrained", DoubleBN, vec(), {"shared-bn": "error"}, train_steps=0),
    Case("checkpointed-bn", CheckpointedBN, vec(), {"extra-stat-updates": "warning"}),
    Case("checkpointed-block-bn-outside", CheckpointedNoBN, vec(), healthy=True),
    Case("functional-bn-elsewhere", FunctionalBN, vec(), {"stats-updated-outside": "warning"}),
    Case(
        "weight-decay-on-bn",
        MLP,
        vec(),
        {"bn-weight-decay": "info"},
        options=lambda m: {"optimizer_factory": sgd_with_decay},
    ),
    Case(
        "weight-decay-not-on-bn",
        MLP,
        vec(),
        healthy=True,
        options=lambda m: {"optimizer_factory": sgd_without_norm_decay(m)},
    ),
    Case("conv-bn-two-images", ConvNet, img(n=2, size=31), {"small-batch": "warning"}, train_steps=0),
]

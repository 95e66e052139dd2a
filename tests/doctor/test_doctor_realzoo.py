"""The doctor on real-world models: torchvision and timm architectures, no pretrained weights.

Healthy models must give no error and no warning; planted bugs (a shared BN inserted into a
resnet, running statistics reset after training, Keras-style momentum, tiny batches) must be
found. Models are built with ``weights=None`` / ``pretrained=False``: nothing is downloaded.
Inputs are small (8x3x32x32, real MNIST digits padded to 32x32 and repeated over 3 channels),
so the default part runs in about a minute on one thread (62 s measured, with the
machine shared); the full zoo in about 90 s.

The rest of the architectures run with ``BNLAB_FULL_ZOO=1`` (marker ``full_zoo``).
torchvision/timm are optional test dependencies: without them these tests skip. See
``torchvision_compat`` for how they import beside the CPU build of torch.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_doctor_zoo import assert_untouched, snapshot
from torch import nn
from torchvision_compat import import_timm, import_torchvision

from bnlab import doctor
from bnlab.doctor.command import main as doctor_cli

try:
    tv = import_torchvision()
except ImportError:
    pytest.skip("torchvision is not installed (optional test dependency)", allow_module_level=True)
try:
    timm = import_timm()
except ImportError:
    timm = None

HERE = Path(__file__).resolve().parent
FULL = bool(os.environ.get("BNLAB_FULL_ZOO"))
full_zoo = pytest.mark.skipif(not FULL, reason="set BNLAB_FULL_ZOO=1 for the whole zoo")
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed")

# Findings a healthy, untrained model may carry: the doctor says it looks untrained and that
# the modes disagree *because* of that. rexnet's squeeze-excite has Conv(bias)->BN: a real,
# harmless remark.
UNTRAINED_INFO = {"untrained-stats", "train-eval-divergence", "bias-before-bn"}


# -- the models ---------------------------------------------------------------------------


def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: getattr(tv.models, name)(weights=None, num_classes=10, **kwargs)


def _timm(name: str) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10)


# name -> (builder, in the default suite)
MODELS: dict[str, tuple[Callable[[], nn.Module], bool]] = {
    "resnet18": (_tv("resnet18"), True),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), True),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), True),
    "resnet50": (_tv("resnet50"), False),
    "efficientnet_b0": (_tv("efficientnet_b0"), False),
    "densenet121": (_tv("densenet121"), False),
    "regnet_y_400mf": (_tv("regnet_y_400mf"), False),
    "googlenet": (_tv("googlenet", aux_logits=False, init_weights=True), False),
    "timm-ghostnet_100": (_timm("ghostnet_100"), True),
    "timm-rexnet_100": (_timm("rexnet_100"), False),
}


def model_params() -> list:
    params = []
    for name, (_, default) in MODELS.items():
        marks = [] if default else [full_zoo, pytest.mark.full_zoo]
        if name.startswith("timm-"):
            marks.append(needs_timm)
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]()


# -- real data: MNIST digits as 3x32x32 images --------------------------------------------


def as_images(flat: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(flat).reshape(-1, 1, 28, 28)
    x = (x - 0.1307) / 0.3081  # MNIST's usual normalization
    return F.pad(x, (2, 2, 2, 2), value=float(-0.1307 / 0.3081)).expand(-1, 3, -1, -1).contiguous()


@pytest.fixture(scope="module")
def digits(mnist_arrays):
    """(train_x, train_y, probe_x, probe_y): 256 training and 16 held-out test images."""
    train_x, train_y, test_x, test_y = mnist_arrays
    return (
        as_images(train_x[:256]),
        torch.as_tensor(train_y[:256]),
        as_images(test_x[:16]),
        torch.as_tensor(test_y[:16]),
    )


def calibrate(model: nn.Module, images: torch.Tensor, batch: int = 32) -> nn.Module:
    """Give the model the running statistics its weights produce (as a user's training or
    ``swa_utils.update_bn`` would): a cumulative average over train-mode passes, no grads."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), batch):
            model(images[start : start + batch])
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model


def user_train(model: nn.Module, digits, steps: int, batch: int = 16) -> nn.Module:
    """A few real SGD steps on MNIST, as a user's loop would run them."""
    train_x, train_y = digits[0], digits[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        start = (step * batch) % len(train_x)
        loss = F.cross_entropy(model(train_x[start : start + batch]), train_y[start : start + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def loud(report: doctor.Report) -> list[tuple[str, str, str]]:
    """Errors and warnings, as (check, severity, where): what must be empty when healthy."""
    return [(f.check, f.severity, f.where) for f in report.findings if f.severity != "info"]


# -- healthy models ----------------------------------------------------------------------


@pytest.mark.parametrize("name", model_params())
def test_untrained_real_model_is_healthy(name: str, digits) -> None:
    model = build(name)
    before = snapshot(model)
    report = doctor.check(model, digits[2][:8])
    assert_untouched(model, before)
    assert not loud(report), report
    assert {f.check for f in report.findings} <= UNTRAINED_INFO
    assert report.by_check("untrained-stats")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(report.summary["layers"]) == len(bns)
    assert all(layer["calls"] == 1 for layer in report.summary["layers"])


@pytest.mark.parametrize("name", model_params())
def test_real_model_with_its_own_statistics_is_healthy(name: str, digits) -> None:
    """Running statistics that match the weights (as after training): nothing to report."""
    model = calibrate(build(name), digits[0])
    report = doctor.check(model, digits[2], labels=digits[3])
    assert not loud(report), report
    assert not report.by_check("untrained-stats") and not report.by_check("stale-stats")


def test_divergence_without_a_cause_is_info(digits) -> None:
    """Random weights, matching statistics: logits nearly tied, so many argmax flips between
    modes (50% of 16 here) with no BN cause: info, not a warning (docs/notes/zoo.md)."""
    report = doctor.check(calibrate(build("resnet18"), digits[0]), digits[2], labels=digits[3])
    (finding,) = report.by_check("train-eval-divergence")
    assert finding.severity == "info" and finding.data["differ"] > 0.10


def test_dataparallel_on_cpu(digits) -> None:
    model = nn.DataParallel(calibrate(build("resnet18"), digits[0]))
    report = doctor.check(model, digits[2], labels=digits[3])
    assert not loud(report), report
    # on a CPU-only machine DataParallel runs the module itself: names keep the prefix
    assert report.summary["layers"][0]["path"] == "module.bn1"


def test_syncbatchnorm_converted_runs_on_cpu(digits) -> None:
    # Outside distributed training SyncBatchNorm normalizes like BatchNorm2d, on the CPU too.
    model = nn.SyncBatchNorm.convert_sync_batchnorm(calibrate(build("resnet18"), digits[0]))
    assert isinstance(model.bn1, nn.SyncBatchNorm)
    report = doctor.check(model, digits[2], labels=digits[3])
    assert not loud(report), report
    assert {layer["kind"] for layer in report.summary["layers"]} == {"SyncBatchNorm"}


def test_fx_traced_model_reads_like_the_original(digits) -> None:
    plain = calibrate(build("resnet18"), digits[0])
    traced = torch.fx.symbolic_trace(plain)
    report = doctor.check(traced, digits[2], labels=digits[3])
    assert not loud(report), report
    assert [layer["path"] for layer in report.summary["layers"]] == [
        layer["path"] for layer in doctor.check(plain, digits[2]).summary["layers"]
    ]


@needs_timm
def test_timm_frozen_batchnorm_is_silent(digits) -> None:
    """timm's freeze(): FrozenBatchNorm2d (buffers, no running updates) in the frozen part."""
    from timm.utils.model import freeze

    torch.manual_seed(0)
    model = calibrate(timm.create_model("resnet18", pretrained=False, num_classes=10), digits[0])
    freeze(model, ["conv1", "bn1", "layer1"])  # the usual fine-tuning recipe
    assert type(model.bn1).__name__ == "FrozenBatchNorm2d"
    report = doctor.check(model, digits[2], labels=digits[3])
    assert not loud(report), report
    paths = [layer["path"] for layer in report.summary["layers"]]
    assert "bn1" not in paths and "layer2.0.bn1" in paths  # frozen ones carry no running state


# -- planted bugs ------------------------------------------------------------------------


def test_shared_bn_inserted_into_resnet_is_an_error(digits) -> None:
    model = build("resnet18")
    model.layer1[1].bn1 = model.layer1[0].bn1  # both 64 channels: runs, and mixes two sites
    report = doctor.check(model, digits[2][:8])
    (finding,) = report.by_check("shared-bn")
    assert finding.severity == "error" and finding.where == "layer1.0.bn1"
    assert finding.sites == ["call 1 after layer1.0.conv1", "call 2 after layer1.1.conv1"]
    assert report.exit_code == 1


def test_stem_bn_reused_in_a_block_after_training_is_an_error(digits) -> None:
    model = calibrate(build("shufflenet_v2_x0_5"), digits[0])
    model.stage2[0].branch2[1] = model.conv1[1]  # 24 channels each: the stem's BN reused
    report = doctor.check(model, digits[2], labels=digits[3])
    assert [f.severity for f in report.by_check("shared-bn")] == ["error"]


def test_keras_momentum_on_every_bn_is_found(digits) -> None:
    model = build("mobilenet_v3_small")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 0.9  # Keras' 0.9 typed into PyTorch
    report = doctor.check(model, digits[2][:8])
    found = report.by_check("momentum-convention")
    assert len(found) == len(bns) and all(f.severity == "warning" for f in found)
    assert found[0].data["suggested"] == pytest.approx(0.1)
    assert not report.errors


def test_two_images_per_batch_is_a_small_batch(digits) -> None:
    """resnet18 on 2x3x32x32: every BN trains on 2 samples; layer4's on 2 values per channel."""
    model = build("resnet18")
    report = doctor.check(model, digits[2][:2])
    small = {f.where: f for f in report.by_check("small-batch")}
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(small) == sorted(bns)
    assert all(f.severity == "warning" for f in small.values())
    assert small["layer4.1.bn2"].data["values_per_channel"] == 2
    assert small["bn1"].data["values_per_channel"] == 2 * 16 * 16
    assert not report.errors


def test_eight_images_per_batch_is_not(digits) -> None:
    assert not doctor.check(build("resnet18"), digits[2][:8]).by_check("small-batch")


def test_running_stats_reset_after_training_is_found(digits) -> None:
    model = user_train(build("shufflenet_v2_x0_5"), digits, steps=8)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
    report = doctor.check(model, digits[2], labels=digits[3])
    assert report.by_check("stats-reset") and report.exit_code == 1, report
    assert not report.by_check("untrained-stats")


# -- the command line --------------------------------------------------------------------

MODEL_FILE = """
import sys
sys.path.insert(0, {here!r})
import torch
from torchvision_compat import import_torchvision

tv = import_torchvision()

def healthy():
    return tv.models.resnet18(weights=None, num_classes=10)

def shared():
    model = tv.models.resnet18(weights=None, num_classes=10)
    model.layer1[1].bn1 = model.layer1[0].bn1
    return model

class TwoViews(torch.nn.Module):
    # SimCLR's pattern: one encoder on two augmented views of the same images.

    def __init__(self):
        super().__init__()
        self.encoder = tv.models.resnet18(weights=None, num_classes=10)

    def forward(self, x):
        return self.encoder(x) + self.encoder(torch.flip(x, dims=[3]))
"""


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    path = tmp_path / "real_models.py"
    path.write_text(textwrap.dedent(MODEL_FILE.format(here=str(HERE))))
    return str(path)


def test_cli_finds_the_shared_bn_with_training_steps(model_file: str, capsys) -> None:
    argv = [f"{model_file}:shared", "--input-shape", "8,3,32,32", "--train-steps", "3"]
    assert doctor_cli(argv) == 1
    out = capsys.readouterr().out
    assert "ERROR [shared-bn]" in out and "layer1.0.bn1" in out


def test_cli_healthy_untrained_resnet_exits_0(model_file: str, capsys) -> None:
    assert doctor_cli([f"{model_file}:healthy", "--input-shape", "8,3,32,32"]) == 0
    assert "0 errors, 0 warnings" in capsys.readouterr().out


def test_cli_healthy_resnet_with_training_steps_exits_0(model_file: str, capsys) -> None:
    argv = [f"{model_file}:healthy", "--input-shape", "8,3,32,32", "--train-steps", "3"]
    assert doctor_cli(argv) == 0, capsys.readouterr().out
    assert "0 errors, 0 warnings" in capsys.readouterr().out


def two_views(model_file: str, shape: str, capsys) -> tuple[int, list[dict]]:
    argv = [f"{model_file}:TwoViews", "--input-shape", shape, "--train-steps", "5", "--json"]
    code = doctor_cli(argv)
    findings = json.loads(capsys.readouterr().out)["findings"]
    return code, [f for f in findings if f["check"] == "shared-bn"]


def test_cli_shared_encoder_on_two_views_is_a_warning_with_training_steps(model_file: str, capsys) -> None:
    """Issue 11's false error (the copy trained on the probe batch itself) is gone."""
    code, shared = two_views(model_file, "16,3,64,64", capsys)
    assert code == 0
    assert len(shared) == 20 and all(f["severity"] == "warning" for f in shared)


def test_cli_shared_encoder_on_two_views_with_few_values_per_channel(model_file: str, capsys) -> None:
    # layer4 sees 8 values per channel here: the sites' comparison allows for sampling noise.
    code, shared = two_views(model_file, "8,3,32,32", capsys)
    assert code == 0 and shared and all(f["severity"] == "warning" for f in shared)

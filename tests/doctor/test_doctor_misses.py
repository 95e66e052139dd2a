"""The doctor on the misses found on models nobody here wrote (issue 19): each miss has a
model that triggers it and one that must not.

- ``F.batch_norm`` given a layer's running statistics at a second call site;
- a Chainer model returning a dict (``chainer.links.ResNet50Layers``);
- Lazy convolution nets with ``--input-shape`` and ``--train-steps``;
- the text report of a model with many BN layers (and Keras not importing TensorFlow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import doctor
from bnlab.doctor.backends.torch.probe import compiled
from bnlab.doctor.command import main as doctor_cli
from bnlab.doctor.listing import layer_calls, name_list

REPO = Path(__file__).resolve().parents[2]


def vec(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 20, generator=torch.Generator().manual_seed(0))


# -- F.batch_norm with a layer's buffers --------------------------------------------------


class ModuleThenFunctional(nn.Module):
    """``bn`` called as a module after l1, and through F.batch_norm with its buffers after l2."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(20, 32, bias=False)
        self.bn = nn.BatchNorm1d(32)
        self.l2 = nn.Linear(32, 32, bias=False)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.l1(x)))
        bn = self.bn
        h = F.batch_norm(
            self.l2(h), bn.running_mean, bn.running_var, bn.weight, bn.bias, training=self.training, eps=bn.eps
        )
        return self.out(F.relu(h))


class FunctionalTwice(ModuleThenFunctional):
    """Both call sites through F.batch_norm with ``bn``'s buffers; the module is never called."""

    def forward(self, x):
        bn = self.bn

        def norm(h):
            return F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training, 0.1, bn.eps)

        return self.out(F.relu(norm(self.l2(F.relu(norm(self.l1(x)))))))


class FunctionalOwnStats(ModuleThenFunctional):
    """F.batch_norm with statistics of its own (no layer's buffers) next to a BN called once."""

    def forward(self, x):
        h = F.relu(self.bn(self.l1(x)))
        h = F.batch_norm(self.l2(h), None, None, training=True)  # batch statistics only
        return self.out(F.relu(h))


@pytest.mark.parametrize("model_class", [ModuleThenFunctional, FunctionalTwice])
def test_functional_batch_norm_with_a_layers_buffers_is_a_shared_bn(model_class) -> None:
    torch.manual_seed(0)
    model = model_class()
    report = doctor.check(model, vec())
    (finding,) = report.by_check("shared-bn")
    assert finding.severity == "error" and finding.where == "bn"
    assert finding.sites == ["call 1 after l1", "call 2 after l2"]
    assert finding.data["calls"] == 2
    # the second site's line is the F.batch_norm call in forward, not a line inside torch
    assert [Path(site["file"]).name for site in finding.call_sites] == [Path(__file__).name] * 2
    assert report.exit_code == 1


def test_functional_batch_norm_after_training_steps_is_a_shared_bn() -> None:
    torch.manual_seed(0)
    report = doctor.check(FunctionalTwice(), vec(), train_steps=5)
    assert [f.severity for f in report.by_check("shared-bn")] == ["error"]
    (outside,) = report.by_check("stats-updated-outside")  # the module itself is never called
    assert outside.data["probe_calls"] == 2
    assert "F.batch_norm at 2 site(s): call 1 after l1, call 2 after l2" in " ".join(outside.evidence)


def test_functional_batch_norm_without_a_layers_buffers_is_no_finding() -> None:
    torch.manual_seed(0)
    report = doctor.check(FunctionalOwnStats(), vec())
    assert not report.by_check("shared-bn") and not report.errors
    assert report.summary["layers"][0]["calls"] == 1


def test_one_functional_call_site_is_not_shared() -> None:
    from doctor_zoo import FunctionalBN

    torch.manual_seed(0)
    report = doctor.check(FunctionalBN(), vec())
    assert not report.by_check("shared-bn") and not report.errors
    assert not report.by_check("unused-bn")  # its one call is seen now


def test_compiled_models_are_probed_without_the_function_mode() -> None:
    model = nn.Sequential(nn.Linear(20, 8), nn.BatchNorm1d(8))
    assert not compiled(model)
    assert compiled(torch.compile(model))  # torch.compile is lazy: nothing is compiled here
    model[1].compile()
    assert compiled(model)


# -- a Chainer model returning a dict -----------------------------------------------------


def _chainer_dict_net(shared: bool):
    import chainer
    import chainer.functions as CF
    import chainer.links as L

    class DictNet(chainer.Chain):
        """Returns a dict, like chainer.links.ResNet50Layers ({'prob': ...})."""

        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.conv1 = L.Convolution2D(3, 8, 3, pad=1, nobias=True)
                self.bn1 = L.BatchNormalization(8)
                self.conv2 = L.Convolution2D(8, 8, 3, pad=1, nobias=True)
                self.bn2 = self.bn1 if shared else L.BatchNormalization(8)
                self.fc = L.Linear(8, 5)

        def forward(self, x):
            h = CF.relu(self.bn1(self.conv1(x)))
            h = CF.relu(self.bn2(self.conv2(h)))
            pool = CF.average(h, axis=(2, 3))
            return {"pool5": pool, "prob": CF.softmax(self.fc(pool))}

    return DictNet()


@pytest.mark.chainer
def test_chainer_dict_output_is_read_like_pytorchs() -> None:
    pytest.importorskip("chainer")
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(0)).numpy()
    report = doctor.check(_chainer_dict_net(shared=False), x, train_steps=2)
    assert not report.errors
    assert report.probe["output"] == "the model returns a dict; the doctor reads output['pool5']"
    assert [layer["calls"] for layer in report.summary["layers"]] == [1, 1]


@pytest.mark.chainer
def test_chainer_dict_output_still_shows_a_shared_bn() -> None:
    pytest.importorskip("chainer")
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(0)).numpy()
    report = doctor.check(_chainer_dict_net(shared=True), x)
    (finding,) = report.by_check("shared-bn")
    assert finding.sites == ["call 1 after conv1", "call 2 after conv2"]


# -- Lazy nets with --input-shape -----------------------------------------------------------

LAZY_MODELS = """
from torch import nn


def lazy_convnet():
    return nn.Sequential(nn.LazyConv2d(16, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(10))


def lazy_dict_output():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = lazy_convnet()

        def forward(self, x):
            return {"aux": x.mean(), "logits": self.body(x)}

    return Net()
"""


@pytest.fixture()
def lazy_file(tmp_path: Path) -> Path:
    path = tmp_path / "lazy_models.py"
    path.write_text(LAZY_MODELS)
    return path


@pytest.mark.parametrize("name", ["lazy_convnet", "lazy_dict_output"])
def test_lazy_convnet_with_input_shape_and_training_steps(lazy_file: Path, name: str, capsys) -> None:
    status = doctor_cli([f"{lazy_file}:{name}", "--input-shape", "16,3,32,32", "--train-steps", "5", "--json"])
    out = capsys.readouterr()
    assert status == 0, out.out + out.err
    report = json.loads(out.out)
    assert report["probe"]["train_steps"] == 5
    assert [layer["path"] for layer in report["summary"]["layers"]] == ["1" if name == "lazy_convnet" else "body.1"]


def test_lazy_convnet_on_a_shape_it_does_not_take_is_still_refused(lazy_file: Path, capsys) -> None:
    status = doctor_cli([f"{lazy_file}:lazy_convnet", "--input-shape", "16,20", "--train-steps", "5"])
    err = capsys.readouterr().err
    assert status == 2
    assert "does not run on inputs of shape (16, 20)" in err and "Traceback" not in err


# -- the report at a glance -----------------------------------------------------------------


def test_name_lists_shorten_past_eight_names() -> None:
    names = [f"bn{i}" for i in range(20)]
    assert name_list(names[:8]) == ", ".join(names[:8])
    assert name_list(names) == "bn0, bn1, bn2, bn3 and 16 more"
    layers = [{"path": n, "calls": 1} for n in names]
    assert layer_calls(layers[:3]) == "bn0, bn1, bn2 (each called once)"  # small models: every name
    assert layer_calls(layers) == "20, each called once: bn0, bn1, bn2, bn3 and 16 more"
    layers[5]["calls"], layers[6]["calls"] = 2, 0
    assert layer_calls(layers) == (
        "20: bn5 (called 2 times); bn6 (never called); 18 more called once: bn0, bn1, bn2, bn3 and 14 more"
    )


def test_a_layer_called_several_times_reads_as_one_layer() -> None:
    """The header said "bn x4", which reads as four layers: one layer, called 4 times."""
    assert layer_calls([{"path": "bn", "calls": 4}]) == "bn (called 4 times)"
    assert layer_calls([{"path": "bn", "calls": 1}]) == "bn (called once)"
    mixed = [{"path": "bn1", "calls": 1}, {"path": "bn2", "calls": 2}, {"path": "bn3", "calls": None}]
    assert layer_calls(mixed) == "bn1 (called once), bn2 (called 2 times), bn3"


def _resnet18() -> nn.Module:
    from torchvision_compat import import_torchvision

    try:
        tv = import_torchvision()
    except ImportError:
        pytest.skip("torchvision is not installed (optional test dependency)")
    torch.manual_seed(0)
    return tv.models.resnet18(weights=None, num_classes=10)


def test_many_bn_layers_read_at_a_glance_text_only() -> None:
    model = _resnet18()
    model.layer1[1].bn1 = model.layer1[0].bn1  # one shared BN: the layer that matters
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    report = doctor.check(model, x)
    text = report.to_text(width=1000)  # one line per header entry
    header = next(line for line in text.splitlines() if line.startswith("normalization layers:"))
    assert header.startswith("normalization layers: 19: layer1.0.bn1 (called 2 times); 18 more called once: bn1, ")
    assert "and 14 more" in header
    (untrained,) = report.by_check("untrained-stats")
    assert len(untrained.data["layers"]) == 19
    where = next(line for line in text.splitlines() if line.startswith("  where: bn1, "))
    assert where.endswith("and 15 more")
    # small-batch on each of the 19 layers (4 images): printed once, the others named
    assert len(report.by_check("small-batch")) == 19
    assert text.count("WARNING [small-batch]") == 1
    assert "  also: the same for 18 more: layer1.0.bn1, layer1.0.bn2, " in text
    # The JSON keeps every name.
    data = json.loads(report.to_json())
    assert len(data["summary"]["layers"]) == 19
    (finding,) = [f for f in data["findings"] if f["check"] == "untrained-stats"]
    assert len(finding["where"].split(", ")) == 19


def test_few_bn_layers_are_listed_in_full() -> None:
    from doctor_zoo import MLP

    torch.manual_seed(0)
    text = doctor.check(MLP(), vec()).to_text()
    assert "normalization layers: bn1, bn2 (each called once)\n" in text
    assert "  where: bn1, bn2\n" in text


def test_three_alike_findings_are_each_printed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 8, bias=False))
    model.append(nn.BatchNorm1d(8)).append(nn.Linear(8, 8, bias=False)).append(nn.BatchNorm1d(8))
    report = doctor.check(model, vec(4))  # 4 samples: small-batch on each of the 3 BNs
    assert len(report.by_check("small-batch")) == 3
    assert report.to_text().count("WARNING [small-batch]") == 3
    assert "also:" not in report.to_text()


def test_keras_on_torch_does_not_import_tensorflow() -> None:
    """Keras's clone_model asks TensorFlow about config values; the doctor keeps it from
    importing TensorFlow (and printing its start-up logging) for a model on torch."""
    pytest.importorskip("keras")
    script = (
        "import sys\n"
        "import keras, numpy as np\n"
        "from bnlab import doctor\n"
        "x = keras.Input((12, 12, 3))\n"
        "h = keras.layers.ZeroPadding2D(1)(x)\n"
        "h = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, use_bias=False)(h))\n"
        "model = keras.Model(x, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h)))\n"
        "report = doctor.check(model, np.random.default_rng(0).standard_normal((8, 12, 12, 3), dtype=np.float32))\n"
        "print('LAYERS', [layer['path'] for layer in report.summary['layers']])\n"
        "print('TENSORFLOW', 'tensorflow' in sys.modules)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert "LAYERS ['batch_normalization']" in result.stdout, result.stdout + result.stderr
    assert "TENSORFLOW False" in result.stdout
    assert "oneDNN" not in result.stderr and "absl" not in result.stderr

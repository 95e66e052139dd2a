"""Training steps never use the probe batch: a legitimately shared encoder is not an error.

The CLI used to train the doctor's copy on the probe batch itself and then probe that
memorized batch; a SimCLR-style encoder shared between two views (correctly a warning)
then became an error. Now training uses fresh batches (``--input-shape``) or the training
split (``--data``) and the probe is held out.
"""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path

import numpy as np

from bnlab.doctor import sources
from bnlab.doctor.backends import load
from bnlab.doctor.command import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# A small resnet-like convnet (stride-2 residual blocks with BN, down-sampling shortcuts)
# applied to two views of each batch: every BN is shared, on purpose, between views that
# see the same distribution.
SHARED_ENCODER = """
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                  nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.down(x) + self.bn2(self.conv2(h)))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.layers = nn.Sequential(Block(16, 32, 2), Block(32, 64, 2), Block(64, 64, 2))

    def forward(self, x):
        return self.layers(F.relu(self.bn(self.stem(x)))).mean(dim=(2, 3))


class TwoViews(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        z1 = self.encoder(x)
        z2 = self.encoder(torch.flip(x, dims=[3]))
        return self.head(torch.cat([z1, z2], dim=1))
"""


def test_shared_encoder_is_no_error_after_training_steps(tmp_path: Path, capsys) -> None:
    path = tmp_path / "twoviews.py"
    path.write_text(textwrap.dedent(SHARED_ENCODER))
    code = main([f"{path}:TwoViews", "--input-shape", "16,3,32,32", "--train-steps", "5", "--json"])
    report = json.loads(capsys.readouterr().out)
    shared = [f for f in report["findings"] if f["check"] == "shared-bn"]
    assert len(shared) == 10  # every BN of the encoder is shared by the two views ...
    assert {f["severity"] for f in shared} == {"warning"}  # ... and that is fine
    assert code == 0 and report["exit_code"] == 0
    assert "fresh standard-normal batches" in report["data"]["training steps"]


def test_question_model_still_errors_after_training_steps(capsys) -> None:
    target = f"{EXAMPLES / 'question_torch.py'}:MyModel"
    assert main([target, "--input-shape", "64,784", "--train-steps", "5"]) == 1
    assert "ERROR [shared-bn] BatchNorm1d 'bn' is called 2 times" in capsys.readouterr().out


def test_random_training_batches_are_never_the_probe() -> None:
    from torch import nn

    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    src = sources.random_source(model, load("torch"), (8, 6), seed=3, train_steps=4)
    assert src.train_batches is not None
    batches = list(itertools.islice(src.train_batches, 4))
    for x, y in batches:
        assert x.shape == (8, 6) and y.shape == (8,) and set(y) <= {0, 1, 2}
        assert not np.array_equal(x, src.probe_x)
    assert not np.array_equal(batches[0][0], batches[1][0])

"""Watch your own PyTorch training loop with bnlab's doctor.

    PYTHONPATH=src python examples/watch_training_loop.py [--shared]

Trains the question's MLP (784-100-100-10) for one epoch on real MNIST (batch 200) inside
``bnlab.doctor.watch``, then prints the doctor's report. With ``--shared`` one BatchNorm
is applied after both hidden layers (the question's bug), and the report says so with the
numbers; without it (one BN per layer, the answer) it finds nothing to report.
Exit status: the report's (1 when it holds an error).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

from bnlab import doctor
from bnlab.data import load_mnist, to_float


class MLP(nn.Module):
    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.l1 = nn.Linear(784, 100, bias=False)
        self.l2 = nn.Linear(100, 100, bias=False)
        self.bn1 = nn.BatchNorm1d(100)
        self.bn2 = self.bn1 if shared else nn.BatchNorm1d(100)
        self.out = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.l1(x)))
        return self.out(F.relu(self.bn2(self.l2(h))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", action="store_true", help="one BN after both layers")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_mnist()
    x = torch.as_tensor(to_float(data.train_images))
    y = torch.as_tensor(data.train_labels.astype("int64"))
    model = MLP(shared=args.shared)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    with doctor.watch(model, optimizer=optimizer) as watched:  # hooks on, nothing else changes
        model.train()
        for batch in torch.randperm(len(x)).split(200):  # one epoch, your loop as it is
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    report = watched.report()  # hooks removed; the model was probed on a copy
    print(report)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())

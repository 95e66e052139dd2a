"""The seed's model, fixed: one BatchNorm1d per hidden layer.

bnlab doctor examples/answer_torch.py:MyModel --data mnist --train-steps 60
"""

import torch.nn.functional as F
from torch import nn


class MyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(784, 100)
        self.l2 = nn.Linear(100, 100)
        self.l3 = nn.Linear(100, 10)
        self.bn1 = nn.BatchNorm1d(100, momentum=0.1, eps=1e-3)
        self.bn2 = nn.BatchNorm1d(100, momentum=0.1, eps=1e-3)
        for layer in (self.l1, self.l2, self.l3):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")  # He init
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        h = F.relu(self.bn1(self.l1(x)))
        h = F.relu(self.bn2(self.l2(h)))
        return self.l3(h)

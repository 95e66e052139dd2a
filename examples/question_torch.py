"""The seed's model as a PyTorch user would write it -- with the bug.

One BatchNorm1d is applied after BOTH hidden layers, so its running statistics
average two different activations and the model falls apart in eval mode.

    bnlab doctor examples/question_torch.py:MyModel --data mnist --train-steps 60
"""

import torch.nn.functional as F
from torch import nn


class MyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(784, 100)
        self.l2 = nn.Linear(100, 100)
        self.l3 = nn.Linear(100, 10)
        self.bn = nn.BatchNorm1d(100, momentum=0.1, eps=1e-3)  # one BN ...
        for layer in (self.l1, self.l2, self.l3):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")  # He init
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        h = F.relu(self.bn(self.l1(x)))  # ... used here
        h = F.relu(self.bn(self.l2(h)))  # ... and here
        return self.l3(h)

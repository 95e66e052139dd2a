"""The seed's Chainer model -- with the bug: one BatchNormalization for two layers.

bnlab doctor examples/question_chainer.py:MyModel --data mnist --train-steps 60
"""

import chainer
import chainer.functions as F
import chainer.links as L
from chainer import initializers


class MyModel(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(784, 100, initialW=initializers.HeNormal())
            self.l2 = L.Linear(100, 100, initialW=initializers.HeNormal())
            self.l3 = L.Linear(100, 10, initialW=initializers.HeNormal())
            self.bn = L.BatchNormalization(100, decay=0.9, eps=0.001)

    def forward(self, x):
        h = F.relu(self.bn(self.l1(x)))
        h = F.relu(self.bn(self.l2(h)))
        return self.l3(h)
